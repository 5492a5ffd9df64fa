"""``recover_jobs()``: collect the results of a cluster whose client crashed.

A ``JobCluster`` keeps a recover file (``dispy._recover_file.RecoverFile``): its
computation id, the key derived from its secret, its nodes, and each job it
sent to a node and that has not ended (its id and arguments).  When the
client dies, the nodes go on: running jobs finish, and every result is kept
(in memory and on disk) until a client acknowledges it.

``recover_jobs`` opens that file in a new process and, for each node,
connects, sends RESUME for the computation and collects what the node sends
again: every result not acknowledged yet (also those of jobs that ended while
no client existed), then those of the jobs still running, as they end (up to
``timeout``; with ``terminate_pending`` the rest are cancelled).  It
acknowledges the results, closes the computation on the node (cleanup runs
there), marks the jobs done in the file and returns them as ``DispyJob``s.
A second call returns only what the first did not.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import pickle
import time

from . import _loop, serialize, transport
from ._job import DispyJob
from ._recover_file import RecoverFile, RecoverFileError
from .core import job_end, jobstate
from .errors import AuthenticationFailed, ConnectionClosed, ProtocolError
from .protocol import IDS_PER_FRAME, Kind, field, result_entries
from .protocol.conversation import Take, reply_key, request_key, taken_by_client
from .tls import client_context

logger = logging.getLogger("dispy")

#: Recover files made without ``recover_file=``: ``_dispy_<time>_<id>`` in the working directory.
DEFAULT_PREFIX = "_dispy_"
#: Arguments larger than this (pickled) are not kept in the recover file.
MAX_ARGS_BYTES = 1 << 20
#: Seconds ``recover_jobs`` waits for the nodes to confirm cancelled jobs and closing.
CLOSE_WAIT = 30.0


def default_path(cid: str) -> str:
    return os.path.abspath(f"{DEFAULT_PREFIX}{time.strftime('%Y%m%d%H%M%S')}_{cid[:8]}")


def create_recover_file(path, cid: str, name: str, certfile, keyfile, cafile) -> RecoverFile:
    """A cluster's new recover file (at ``path``, else ``default_path(cid)``): what
    ``recover_jobs`` needs to reach its nodes again.  The cluster's key (derived from
    its secret, never the secret itself) is set in it before any node is named."""
    return RecoverFile.create(
        os.path.abspath(path or default_path(cid)),
        {
            "cid": cid,
            "name": name,
            "nodes": [],
            "created": time.time(),
            "certfile": os.path.abspath(certfile) if certfile else None,
            "keyfile": os.path.abspath(keyfile) if keyfile else None,
            "cafile": os.path.abspath(cafile) if cafile else None,
        },
    )


def job_blob(job: DispyJob, node: str) -> bytes:
    """What the recover file keeps of a job sent to ``node``: its id, the node, and
    its pickled arguments (unless larger than MAX_ARGS_BYTES)."""
    nfiles = len(job._opts.get("f", ())) if job._opts else 0
    segs = job._segs  # None once the job ended (it is then not written at all, normally)
    segs = segs[nfiles:] if segs else []
    size = sum(memoryview(s).nbytes for s in segs)
    args = [bytes(s) for s in segs] if size <= MAX_ARGS_BYTES else None
    try:
        jid = pickle.dumps(job.id)
    except Exception:
        jid = pickle.dumps(repr(job.id))
    return pickle.dumps({"id": jid, "node": node, "args": args, "t": job.submit_time})


def _job_from_blob(uid: int, blob: bytes) -> tuple[DispyJob, str]:
    rec = pickle.loads(blob)
    args, kwargs = (), {}
    if rec.get("args"):
        try:
            args, kwargs = serialize.loads(rec["args"])
        except Exception as exc:  # a class not importable here, say
            logger.debug("arguments of job %s not restored: %s", uid, exc)
    job = DispyJob(args, kwargs, [], None)
    try:
        job.id = pickle.loads(rec["id"])
    except Exception:
        job.id = None
    job._uid = uid
    job.submit_time = rec.get("t")
    job.status = jobstate.next_status(job.status, jobstate.DISPATCH)  # it was sent to a node
    return job, rec["node"]


def _unrecorded_job(uid: int, host: str) -> DispyJob:
    """A job the node has and the recover file does not: its id and arguments
    were never written (``job.id`` is its number in the crashed client)."""
    job = DispyJob((), {}, [], None)
    job.id = job._uid = uid
    job.status = jobstate.next_status(job.status, jobstate.DISPATCH)
    job.ip_addr = host
    return job


def _newest_default() -> str:
    files = [
        f
        for f in glob.glob(DEFAULT_PREFIX + "*")
        if not f.endswith(("-wal", "-shm", "-journal")) and os.path.isfile(f)
    ]
    if not files:
        raise RecoverFileError(
            f"no recover file ({DEFAULT_PREFIX}*) in {os.getcwd()}: run recover_jobs in the "
            "folder the cluster ran in, or pass recover_file= the path it used"
        )
    return max(files, key=os.path.getmtime)


def recover_jobs(
    recover_file: str | None = None,
    timeout: float | None = None,
    terminate_pending: bool = False,
) -> list[DispyJob]:
    """Collect the jobs of a cluster whose client crashed (see the module doc).

    ``recover_file``: the path the cluster used (default: the newest
    ``_dispy_*`` file in the working directory).  ``timeout``: seconds to wait
    for jobs still running (None: until they end).  ``terminate_pending``:
    after ``timeout``, cancel the jobs still running.  Returns the jobs with
    their ``id`` (as the program set it), ``status``, ``result``, ``stdout``,
    ``stderr``, ``exception`` and times; jobs that the nodes no longer have
    end ``Abandoned`` with the reason.
    """
    path = recover_file or _newest_default()
    rf = RecoverFile.open(path)
    try:
        meta = rf.meta
        rows = rf.unfinished()
        by_node: dict[str, dict[int, DispyJob]] = {}
        for uid, blob in rows:
            job, node = _job_from_blob(uid, blob)
            by_node.setdefault(node, {})[uid] = job
        # every node the cluster used: it may hold jobs sent too shortly before
        # the crash to be written here (see _recover_node)
        for node in meta.get("nodes") or ():
            by_node.setdefault(node, {})
        if not by_node:
            return []
        ssl = None
        if meta.get("certfile") or meta.get("cafile"):
            ssl = client_context(meta.get("certfile"), meta.get("keyfile"), meta.get("cafile"))
        deadline = None if timeout is None else time.monotonic() + timeout
        coro = _recover_all(meta, by_node, ssl, deadline, terminate_pending)
        jobs = _loop.run(coro).result()
        rf.jobs_done([j._uid for j in jobs if j.status in jobstate.TERMINAL])
        rf.flush()
        return [j for j in jobs if j.status in jobstate.TERMINAL]
    finally:
        rf.close()


async def _recover_all(meta, by_node, ssl, deadline, terminate) -> list[DispyJob]:
    parts = await asyncio.gather(
        *(
            _recover_node(meta, addr, jobs, ssl, deadline, terminate)
            for addr, jobs in by_node.items()
        )
    )
    return [job for part in parts for job in part]


def _abandon(jobs, reason: str) -> None:
    for job in jobs:
        if job.status not in jobstate.TERMINAL:
            job.status = jobstate.next_status(job.status, jobstate.ABANDON)
            job.exception = reason
            job.end_time = time.time()


async def _recover_node(meta, addr: str, jobs: dict, ssl, deadline, terminate) -> list[DispyJob]:
    host, _, port = addr.rpartition(":")
    cid = meta["cid"]
    try:
        chan = await transport.connect(host, int(port), meta["key"], ssl=ssl)
    except (OSError, ConnectionClosed, TimeoutError, AuthenticationFailed, ProtocolError) as exc:
        logger.warning(
            "recover_jobs: cannot reach node %s: %s; its jobs stay unrecovered", addr, exc
        )
        return list(jobs.values())  # not terminal: a later call may still get them
    waiting: set[int] = set()
    reply: asyncio.Future = asyncio.get_running_loop().create_future()
    changed = asyncio.Event()
    closed = asyncio.get_running_loop().create_future()

    def on_message(msg) -> None:
        if taken_by_client(msg.kind) is Take.REPLY and not reply.done():
            key = reply_key(msg.kind, msg.ctl)
            if key == request_key(Kind.RESUME, {"c": cid}):
                if msg.kind == Kind.ERROR:
                    why = f"node {addr} refused to resume the computation: {msg.ctl.get('r')}"
                    reply.set_exception(ProtocolError(why))
                else:
                    reply.set_result(msg.ctl)
        if msg.kind == Kind.RESULTS:
            acks = []
            for entry, part in result_entries(msg.ctl, msg.payload):
                uid = field(entry, "j", int)
                acks.append(uid)
                job = jobs.get(uid)
                if job is None or job.status in jobstate.TERMINAL:
                    continue
                _apply_result(job, entry, part, host)
                waiting.discard(uid)
            for i in range(0, len(acks), IDS_PER_FRAME):
                chan.send(Kind.ACK, {"c": cid, "j": acks[i : i + IDS_PER_FRAME]})
            changed.set()
        elif msg.kind == Kind.CLOSED and not closed.done():
            closed.set_result(msg.ctl)

    chan.on_message = on_message
    chan.on_close = lambda exc: (changed.set(), closed.done() or closed.set_result(None))
    chan.start()
    try:
        chan.send(Kind.RESUME, {"c": cid})
        info = await asyncio.wait_for(reply, 30)
        owed = set(field(info, "done", list))
        for uid in (*field(info, "jobs", list), *owed):
            if not isinstance(uid, int) or isinstance(uid, bool):
                raise ProtocolError(f"node {addr} sent a job id that is not a number: {uid!r}")
            if uid not in jobs:  # sent, but the crash came before it was written
                jobs[uid] = _unrecorded_job(uid, host)
        waiting.update(u for u in field(info, "jobs", list) if u in jobs)
        gone = [j for u, j in jobs.items() if u not in waiting and u not in owed]
        _abandon(gone, f"node {addr} no longer has this job (it restarted before the job ended)")
        while waiting and not chan.is_closed:
            changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                break
        if waiting and terminate and not chan.is_closed:
            ids = sorted(waiting)
            for i in range(0, len(ids), IDS_PER_FRAME):
                chan.send(Kind.CANCEL, {"c": cid, "j": ids[i : i + IDS_PER_FRAME]})
            end = time.monotonic() + CLOSE_WAIT
            while waiting and not chan.is_closed and time.monotonic() < end:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), end - time.monotonic())
                except TimeoutError:
                    break
        if not waiting and not chan.is_closed:  # everything collected: close it there
            chan.send(Kind.CLOSE, {"c": cid, "t": True})
            try:
                await asyncio.wait_for(closed, CLOSE_WAIT)
            except TimeoutError:
                pass
    except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
        logger.warning("recover_jobs: node %s: %s", addr, exc)
    finally:
        chan.close()
        await chan.wait_closed()
    return list(jobs.values())


def _apply_result(job: DispyJob, entry: dict, part, host: str) -> None:
    st = field(entry, "st", int)
    if st == jobstate.Created:  # queued there, never started (its computation closed)
        job.status = jobstate.next_status(job.status, jobstate.ABANDON)
        job.exception = "the job never started: its computation was closed on the node"
        return
    event, result, exc_text = job_end.decode(
        entry, part, serialize.loads, "in the recovering program", unknown=jobstate.FAIL
    )
    job.status = jobstate.next_status(job.status, event)
    job_end.fill(job, entry, result, exc_text, host)
