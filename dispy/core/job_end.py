"""A job's end as a node reports it in a ``RESULTS`` entry, decoded and
applied to a ``DispyJob``: the one place for the client's engine and
``recover_jobs`` (dispyscheduler forwards entries without unpickling them
and needs only ``END_EVENT``).  No I/O: the unpickler is passed in."""

from __future__ import annotations

import time

from ..errors import ProtocolError
from ..protocol import field
from . import jobstate

#: The transition that a node's reported end status makes.
END_EVENT = {
    jobstate.Finished: jobstate.FINISH,
    jobstate.Terminated: jobstate.FAIL,
    jobstate.Cancelled: jobstate.CANCEL,
    jobstate.Abandoned: jobstate.ABANDON,
}


def decode(entry: dict, part, loads, where: str, unknown: str | None = None):
    """``(event, result, exception text)`` of a (non-Created) result entry.

    ``loads`` unpickles the result of a Finished job; if it cannot, the job
    fails with the reason (``where``: the program that tried, "on the
    client").  An end status outside ``END_EVENT`` is a ``ProtocolError``,
    or the event ``unknown`` if given."""
    st = field(entry, "st", int)
    event = END_EVENT.get(st, unknown)
    if event is None:
        raise ProtocolError(f"unknown job status {st}")
    result, exc_text = None, entry.get("x")
    if st == jobstate.Finished:
        try:
            result = loads(part)
        except Exception as exc:
            event = jobstate.FAIL
            exc_text = (
                f"the job's result cannot be unpickled {where}: {exc} "
                "(its class must be importable there)"
            )
    return event, result, exc_text


def fill(job, entry: dict, result, exc_text, ip_addr: str) -> None:
    """The ended ``job``'s result, exception, outputs, times and node."""
    job.result = result
    job.exception = exc_text
    job.stdout = entry.get("o", "")
    job.stderr = entry.get("e", "")
    t0, t1 = entry.get("t0"), entry.get("t1")
    if t0:
        job.start_time = t0
    job.end_time = t1 or time.time()
    job.ip_addr = ip_addr
