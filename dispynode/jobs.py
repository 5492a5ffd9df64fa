"""A job's way through the node daemon, in one place::

    Session._jobs (JOBS from the client) --> enqueue --> dispatch (at most cpus at once)
        --> Worker.run: W_JOB to an idle job process of its computation (it starts:
            the client is told, ``job_started``), or sent ahead to a busy one
    job process: runs its jobs in the order sent (``_process_main``) --W_RESULT-->
        Worker._on_message --> the next one sent ahead starts
        --> job_ended --> deliver: kept (memory, and the node's result store)
            until the client's ACK, and sent in the session's next RESULTS frame

Jobs are sent ahead (about AHEAD_WORK_S of work per job process) only while the
node runs one computation and its jobs are short (AHEAD_JOB_S): each then
starts as the one before ends, with no round trip to the daemon between.  One
sent ahead has not started: a W_SKIP drops it unrun when it is cancelled or
handed back, and if it started meanwhile it is stopped as a running one is.

A job that does not end by its result (its process died, it was cancelled or
timed out, the node's service hours ended) ends the same way, with a status
that says why.  The daemon never unpickles a job's arguments or its result.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
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
#: Most jobs a job process holds at once: the one it runs and those sent ahead.
MAX_WORKER_DEPTH = 8
#: Seconds of work sent ahead to a job process, at most (by its computation's
#: job times): enough to cover the daemon's turn between two jobs.
AHEAD_WORK_S = 0.002
#: Jobs are sent ahead only while their computation's jobs take less than this
#: (seconds, a moving average): for longer ones a round trip costs little, and a
#: job waiting behind another may not wait long while a CPU is free.
AHEAD_JOB_S = 0.01
#: Arguments this large (bytes) are never sent ahead: such a job waits in the
#: node's queue until a job process is free for it.
AHEAD_MAX_BYTES = 1 << 20
#: Seconds to wait for a job process's exit status after its socket closed.
EXIT_STATUS_WAIT = 2.0
_NONE = b"N."  # pickle of None
#: Why a job goes back to its client unstarted when its computation closes.
UNSTARTED = "returned unstarted"


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
        #: the jobs sent to its process, in order: the first one runs
        self.jobs: collections.deque[NodeJob] = collections.deque()
        self.exit_code: int | None = None
        self.gone = False
        #: stop() signalled its process: it takes no new job, even if its job ends first
        self.stopping = False
        chan.on_message = self._on_message
        chan.on_close = self._on_close

    @property
    def job(self) -> NodeJob | None:
        """The job its process runs now (the first of those sent to it)."""
        return self.jobs[0] if self.jobs else None

    def run(self, job: NodeJob) -> None:
        """Send ``job`` to the process: it starts now if the process is idle, else
        when the jobs sent before it have ended."""
        job.worker = self
        self.jobs.append(job)
        lens, flat = join_segments([job.payload])
        ctl = {"j": job.jid, "s": lens, "m": 1} if job.chunk else {"j": job.jid, "s": lens}
        self.chan.send(Kind.W_JOB, ctl, flat)
        if len(self.jobs) == 1:
            self._started(job)

    def _started(self, job: NodeJob) -> None:
        job.payload = None  # (kept while it waited: had this process died, it ran elsewhere)
        if job.cancelled or job.handed_back:  # its W_SKIP came too late: it runs, stop it
            self.stop()
            return
        if job.timeout:
            job.timer = asyncio.get_running_loop().call_later(job.timeout, self._time_out, job)
        self.comp.node.job_started(job)

    def skip(self, job: NodeJob) -> None:
        """Drop ``job``, sent ahead, before it starts (the process says whether it did)."""
        self.chan.send(Kind.W_SKIP, {"j": job.jid})

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
        if ctl.get("k"):  # a job sent ahead, dropped unstarted (W_SKIP)
            skipped = next((j for j in self.jobs if j.jid == ctl.get("j") and j is not job), None)
            if skipped is not None:
                self.jobs.remove(skipped)
                self.comp.node.job_skipped(skipped)
            return
        self.jobs.popleft()
        if job.timer is not None:
            job.timer.cancel()
        ctl, segs = texts_in(ctl, split_segments(msg.payload, ctl["s"]))
        info = {k: ctl[k] for k in ("st", "t0", "t1", "o", "e", "x") if k in ctl}
        self.comp.observe(info.get("t0"), info.get("t1"))
        ahead = []
        if self.stopping:  # its end raced the signal: what was sent ahead runs elsewhere
            ahead, self.jobs = list(self.jobs), collections.deque()
        nxt = self.job
        if nxt is None:
            self.comp.worker_idle(self)
        else:  # it runs now: the process took it as this one ended
            self._started(nxt)
        self.comp.node.job_ended(job, info, segs, freed=nxt is None)
        self.comp.job_left()
        if ahead:
            self.comp.node.requeue(ahead)

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
        if not self.jobs:
            return
        job = self.jobs.popleft()
        ahead, self.jobs = list(self.jobs), collections.deque()
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
        self.comp.node.requeue(ahead)  # never started: they run elsewhere
        self.comp.job_left()

    def stop(self) -> None:
        """SIGTERM now, SIGKILL after CLOSE_GRACE if it is still there."""
        self.stopping = True
        self.kill(signal.SIGTERM)
        asyncio.get_running_loop().call_later(CLOSE_GRACE, self.kill, signal.SIGKILL)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _size(job: NodeJob) -> int:
    return sum(memoryview(p).nbytes for p in job.payload)


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
        # (with several computations each job waits for a free CPU in the order sent)
        ahead = len(self.computations) == 1 and not self.paused
        while queue and scanned < len(queue):
            free = self.running < self.cpus
            if not free and not ahead:
                break
            job = queue[0]
            worker = job.comp.idle_worker() if free else None
            if worker is None and ahead:
                worker = self._worker_ahead(job.comp)
                if worker is None and not free:
                    break  # (one computation: no queued job fits anywhere now)
                if worker is not None and _size(job) > AHEAD_MAX_BYTES:
                    worker = None
            if worker is None:
                queue.rotate(-1)
                scanned += 1
                continue
            queue.popleft()
            scanned = 0
            if not worker.jobs:
                self.running += 1
            worker.run(job)

    def _worker_ahead(self, comp: Computation) -> Worker | None:
        """A busy job process of ``comp`` to send a job ahead to (the least busy one
        with room), if ``comp``'s jobs are short; else None."""
        if comp.job_s is None or comp.job_s >= AHEAD_JOB_S or not comp.ready:
            return None
        depth = min(MAX_WORKER_DEPTH, 1 + math.ceil(AHEAD_WORK_S / max(comp.job_s, 1e-6)))
        best = None
        for w in comp.workers.values():
            if w.stopping or not 0 < len(w.jobs) < depth:
                continue
            if best is None or len(w.jobs) < len(best.jobs):
                best = w
        return best

    def requeue(self, jobs: list[NodeJob]) -> None:
        """Jobs sent ahead to a job process that died before it started them (they
        go back to the front of the queue, in their order)."""
        for job in reversed(jobs):
            job.worker = None
            if job.comp.closed and not job.handed_back:
                job.handed_back = UNSTARTED
            if job.handed_back or job.cancelled:
                self.job_skipped(job)
            elif self.paused:
                self._hand_back(job, self.paused)
            else:
                self.queue.appendleft(job)
        self.dispatch()

    def job_started(self, job: NodeJob) -> None:
        """``job`` runs now: its client is told (its status is Running from now)."""
        session = job.comp.session
        if session is not None:
            session.report_start(job.comp.cid, job.jid)

    def job_skipped(self, job: NodeJob) -> None:
        """A job sent ahead was dropped before it started: cancelled, or handed back."""
        if job.handed_back and job.handed_back != UNSTARTED:  # service hours
            self._hand_back(job, job.handed_back)
            return
        if job.handed_back:
            info = {"st": jobstate.Created, "x": UNSTARTED}
        else:
            info = {"st": jobstate.Cancelled, "x": "cancelled before it started"}
        self.deliver(job.comp.cid, job.jid, info, [b"N."], job.comp.session)

    def job_ended(self, job: NodeJob, info: dict, segs, freed: bool = True) -> None:
        """A job left its worker (result, crash or cancel); report it, run the next.
        ``freed``: its CPU is free (no job sent ahead took it over)."""
        if freed:
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
            # with no other job running or waiting here, no other end can join this
            # one's frame: it goes now, not at the end of the loop turn
            session.queue_result(entry, segs, now=self.running == 0 and not self.queue)
            self._keep(cid, jid)
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
        comp.skip_ahead(UNSTARTED)
        keep = collections.deque()
        for job in self.queue:
            if job.comp is comp:
                self.deliver(
                    comp.cid,
                    job.jid,
                    {"st": jobstate.Created, "x": UNSTARTED},
                    [b"N."],
                    comp.session,
                )
            else:
                keep.append(job)
        self.queue = keep
