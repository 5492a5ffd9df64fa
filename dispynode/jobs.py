"""A job's way through the node daemon, in one place::

    Session._jobs (JOBS from the client) --> enqueue --> dispatch (at most cpus at once)
        --> Worker.run: W_JOB to an idle job process of its computation
    job process: runs it (``_process_main``) --W_RESULT--> Worker._on_message
        --> job_ended --> deliver: kept (memory, and the node's result store)
            until the client's ACK, and sent in the session's next RESULTS frame

A job that does not end by its result (its process died, it was cancelled or
timed out, the node's service hours ended) ends the same way, with a status
that says why.  The daemon never unpickles a job's arguments or its result.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import signal
from typing import TYPE_CHECKING

from dispy import transport
from dispy.core import jobstate
from dispy.protocol import Kind, join_segments, split_segments, texts_in

from .handles import CLOSE_GRACE, describe_exit
from .store import StoreError

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .handles import Computation
    from .session import Session

logger = logging.getLogger("dispynode")

#: A result this large (bytes) is written to the node's store only once it has been
#: sent (if it is not acknowledged soon after); smaller ones as they come.
LARGE_RESULT = 1 << 20
#: Seconds to wait for a job process's exit status after its socket closed.
EXIT_STATUS_WAIT = 2.0
_NONE = b"N."  # pickle of None


class NodeJob:
    """A job as the node sees it: where it came from, its argument segments, its worker."""

    __slots__ = (
        "comp",
        "jid",
        "payload",
        "worker",
        "cancelled",
        "timeout",
        "timer",
        "timed_out",
        "handed_back",
        "chunk",
    )

    def __init__(
        self, comp: Computation, jid: int, payload: list, timeout: float = 0, chunk: bool = False
    ) -> None:
        self.comp = comp
        self.jid = jid
        self.payload = payload
        self.worker: Worker | None = None
        self.cancelled = False
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.handed_back = ""  # why it is stopped and handed back (service hours ended)
        self.chunk = chunk  # cluster.map(chunksize=): the job's argument is a list of items


class Worker:
    """Daemon side of one job process."""

    def __init__(self, comp: Computation, chan: transport.Channel, pid: int) -> None:
        self.comp = comp
        self.chan = chan
        self.pid = pid
        self.job: NodeJob | None = None
        self.exit_code: int | None = None
        self.gone = False
        chan.on_message = self._on_message
        chan.on_close = self._on_close

    def run(self, job: NodeJob) -> None:
        self.job = job
        job.worker = self
        lens, flat = join_segments([job.payload])
        ctl = {"j": job.jid, "s": lens, "m": 1} if job.chunk else {"j": job.jid, "s": lens}
        self.chan.send(Kind.W_JOB, ctl, flat)
        job.payload = None
        if job.timeout:
            job.timer = asyncio.get_running_loop().call_later(job.timeout, self._time_out, job)

    def _time_out(self, job: NodeJob) -> None:
        if self.job is job:
            job.timed_out = True
            self.stop()

    def _on_message(self, msg) -> None:
        job = self.job
        if job is None:
            return
        session, cid = self.comp.session, self.comp.cid
        if msg.kind == Kind.W_PROVISIONAL:
            if session is not None:  # no client connected: a provisional result is not kept
                segs = split_segments(msg.payload, msg.ctl["s"])
                session.send_provisional(cid, job.jid, segs)
            return
        if msg.kind == Kind.W_SENDFILE:
            if session is None:
                logger.warning(
                    "file %r from job %s dropped: its client is gone", msg.ctl["p"], job.jid
                )
            else:
                session.send_file(cid, job.jid, msg.ctl["p"], msg.ctl.get("m", 0o644), msg.payload)
            return
        if msg.kind != Kind.W_RESULT:
            return
        ctl = msg.ctl
        self.job = None
        if job.timer is not None:
            job.timer.cancel()
        ctl, segs = texts_in(ctl, split_segments(msg.payload, ctl["s"]))
        info = {k: ctl[k] for k in ("st", "t0", "t1", "o", "e", "x") if k in ctl}
        self.comp.worker_idle(self)
        self.comp.node.job_ended(job, info, segs)
        self.comp.job_left()

    def _on_close(self, exc) -> None:
        self.gone = True
        self.comp.worker_gone(self)
        if self.job is not None:
            if self.exit_code is None:
                asyncio.get_running_loop().call_later(EXIT_STATUS_WAIT, self._end_job)
            else:
                self._end_job()

    def exited(self, code: int) -> None:
        self.exit_code = code
        if self.gone and self.job is not None:
            self._end_job()

    def _end_job(self) -> None:
        job, self.job = self.job, None
        if job is None:
            return
        if job.timer is not None:
            job.timer.cancel()
        if job.handed_back:  # not the job's failure: its client runs it again
            info = {"st": jobstate.Created, "x": job.handed_back}
        elif job.cancelled:
            info = {"st": jobstate.Cancelled, "x": "cancelled while running"}
        elif job.timed_out:
            info = {
                "st": jobstate.Terminated,
                "x": f"the job ran longer than its time limit of {job.timeout:g} s "
                "(dispy_job_timeout) and was stopped",
            }
        else:
            how = describe_exit(self.exit_code) if self.exit_code is not None else "ended"
            info = {
                "st": jobstate.Terminated,
                "x": f"the job's process (pid {self.pid}) {how} while running the job",
            }
        self.comp.node.job_ended(job, info, [_NONE])
        self.comp.job_left()

    def stop(self) -> None:
        """SIGTERM now, SIGKILL after CLOSE_GRACE if it is still there."""
        self.kill(signal.SIGTERM)
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self.kill, signal.SIGKILL)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class NodeJobs:
    """The node's queue and the results it owes its clients; mixed into
    ``NodeServer`` (its ``queue``, ``running``, ``cpus``, ``paused``, ``unacked``,
    ``store`` and the rest)."""

    def enqueue(self, jobs: list[NodeJob]) -> None:
        if self.paused:  # outside service hours: back to their clients, to run elsewhere
            for session in {j.comp.session for j in jobs if j.comp.session is not None}:
                session.pulse()  # first, so that the client sends them nowhere here
            for job in jobs:
                self._hand_back(job, self.paused)
            return
        self.queue.extend(jobs)
        self.dispatch()

    def _hand_back(self, job: NodeJob, why: str) -> None:
        self.jobs_handed_back += 1
        self.deliver(job.comp.cid, job.jid, {"st": jobstate.Created, "x": why}, [b"N."],
                     job.comp.session)  # fmt: skip

    def dispatch(self) -> None:
        queue = self.queue
        scanned = 0
        while queue and self.running < self.cpus and scanned < len(queue):
            job = queue[0]
            worker = job.comp.idle_worker()
            if worker is None:
                queue.rotate(-1)
                scanned += 1
                continue
            queue.popleft()
            scanned = 0
            self.running += 1
            worker.run(job)

    def job_ended(self, job: NodeJob, info: dict, segs) -> None:
        """A job left its worker (result, crash or cancel); report it, run the next."""
        self.running -= 1
        self.jobs_done += 1
        comp = job.comp
        comp.jobs_done += 1
        self.deliver(comp.cid, job.jid, info, segs, comp.session)
        self.dispatch()

    # -- results owed to clients ------------------------------------------------
    def deliver(self, cid: str, jid: int, info: dict, segs, session: Session | None) -> None:
        """Keep a job's end (memory and disk) until its client acknowledges it, and
        send it now on ``session`` (its computation's client connection, if any)."""
        entry = dict(info)
        entry["c"], entry["j"], entry["n"] = cid, jid, len(segs)
        self.unacked.setdefault(cid, {})[jid] = (entry, segs)
        if session is None:
            self._keep(cid, jid)
        elif sum(memoryview(s).nbytes for s in segs) < LARGE_RESULT:
            self._keep(cid, jid)
            session.queue_result(entry, segs)
        else:
            # its acknowledgment cannot come before its last byte went out: the
            # store's wait for it starts then (writing it meanwhile slowed the
            # sending down by half, for nothing, as the client had it soon after)
            session.queue_result(entry, segs, functools.partial(self._keep, cid, jid))

    def _keep(self, cid: str, jid: int) -> None:
        """On disk (after the store's short wait for an acknowledgment), if still owed."""
        owed = self.unacked.get(cid, {}).get(jid)
        if owed is None or self.store is None:
            return
        try:
            self.store.put(cid, jid, *owed)
        except StoreError as exc:
            logger.error("result of job %s not kept on disk: %s", jid, exc)

    def ack(self, cid: str, jids: list) -> None:
        owed = self.unacked.get(cid)
        if owed is not None:
            for jid in jids:
                owed.pop(jid, None)
            if not owed and cid not in self.computations:
                del self.unacked[cid]
        if self.store is not None:
            self.store.ack(cid, [j for j in jids if isinstance(j, int)])

    def forget(self, cid: str) -> None:
        owed = self.unacked.pop(cid, None)
        if owed and self.store is not None:
            self.store.ack(cid, list(owed))

    async def restore(self, cid: str) -> None:
        """Results of ``cid`` that an earlier run of this node left on disk, into memory."""
        if self.store is None or self._stored_cids.pop(cid, None) is None:
            return
        rows = await asyncio.to_thread(self.store.pending, cid)
        owed = self.unacked.setdefault(cid, {})
        for jid, entry, segs in rows:
            owed.setdefault(jid, (entry, segs))

    def cancel(self, comp: Computation, jid: int) -> None:
        for job in self.queue:
            if job.comp is comp and job.jid == jid:
                self.queue.remove(job)
                self.deliver(
                    comp.cid,
                    jid,
                    {"st": jobstate.Cancelled, "x": "cancelled"},
                    [b"N."],
                    comp.session,
                )
                return
        comp.cancel_running(jid)

    def drop_jobs(self, comp: Computation, terminate: bool) -> None:
        """A computation closes: hand its queued (never started) jobs back to the client,
        which may run them elsewhere."""
        keep = collections.deque()
        for job in self.queue:
            if job.comp is comp:
                self.deliver(
                    comp.cid,
                    job.jid,
                    {"st": jobstate.Created, "x": "returned unstarted"},
                    [b"N."],
                    comp.session,
                )
            else:
                keep.append(job)
        self.queue = keep
