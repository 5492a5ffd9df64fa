"""The node daemon's handle on a computation process and its job processes.

::

    Computation  --socket pair--> computation process (``_process_main.main``)
        | setup(): spawn, C_LOAD, wait C_READY, C_FORK n
        | close(): C_CLEANUP, wait for exit (kill after a grace period)
        `-- its job processes' handles (``jobs.Worker``, one per job process,
              connected on the node's unix socket), idle or running a job; the
              exit status of each comes from the computation process (C_EXITED)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from dispy import transport
from dispy._paths import write_chunk
from dispy.errors import ConnectionClosed
from dispy.protocol import Kind
from dispy.protocol.conversation import CompPhase, next_comp_phase

if TYPE_CHECKING:
    from .jobs import Worker
    from .server import NodeServer, Session

logger = logging.getLogger("dispynode")

#: Seconds a closing computation's processes get before SIGKILL.
CLOSE_GRACE = 3.0
#: Job processes that may die before registering, in a row, before we stop replacing them.
MAX_EARLY_DEATHS = 10


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def start_computation_process(cwd: str) -> tuple[subprocess.Popen, socket.socket]:
    """A new computation process (``dispynode._process_main``), and the daemon's end
    of its control socket; it imports what it needs, then waits for its C_LOAD."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispynode._process_main", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


class Computation:
    """A computation set up on this node for one client session."""

    def __init__(self, node: NodeServer, session: Session, cid: str, name: str) -> None:
        self.node = node
        self.session = session
        self.cid = cid
        self.name = name
        self.dir = os.path.join(node.dest_path, f"{_safe_name(name)}_{cid}")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.token = os.urandom(32)
        self.phase = CompPhase.NEW
        self.error = ""  # why it is FAILED
        self.jobs_done = 0
        self.job_s: float | None = None  # its jobs' run time, a moving average
        self.workers: dict[int, Worker] = {}
        self._idle: list[Worker] = []
        self._dying: dict[int, Worker] = {}
        self._proc: subprocess.Popen | None = None
        self._ctl: transport.Channel | None = None
        self._reply: asyncio.Future | None = None
        self._drained = asyncio.Event()
        self._early_deaths = 0
        self.detached_at: float | None = None  # when its client went away (monotonic)
        node.computations[cid] = self

    @property
    def ready(self) -> bool:
        return self.phase is CompPhase.READY

    @property
    def closed(self) -> bool:
        return self.phase is CompPhase.CLOSED

    def _go(self, event: str) -> None:
        self.phase = next_comp_phase(self.phase, event)

    # -- files ----------------------------------------------------------------
    def write_file(self, rel: str, offset: int, data, mode: int) -> None:
        """Runs in a thread (disk I/O off the loop)."""
        write_chunk(self.dir, rel, offset, data, mode)

    # -- setup ----------------------------------------------------------------
    async def setup(self, spec: bytes, nargs: int = 0) -> None:
        """Start the computation process and run setup; ``spec`` ends with ``nargs``
        bytes of pickled setup arguments (NodeAllocate.setup_args)."""
        if self.phase is not CompPhase.NEW:
            raise ValueError(f"computation {self.cid} is {self.phase.value}: it is set up once")
        self._go("setup")
        spare = self.node.take_spare()
        self._proc, ours = spare if spare is not None else start_computation_process(self.dir)
        self._ctl = await transport.open_local(ours)
        self._ctl.on_message = self._on_ctl
        self._ctl.on_close = self._on_ctl_close
        self._ctl.start()
        self._reply = asyncio.get_running_loop().create_future()
        self._ctl.send(
            Kind.C_LOAD,
            {
                "cid": self.cid,
                "dir": self.dir,
                "addr": self.node.worker_addr,
                "token": self.token,
                "node_name": self.node.name,
                "node_ip": self.node.ip_addr,
                "max_file_size": self.node.max_file_size,
                "sa": nargs,
            },
            [spec],
        )
        ok, reason = await self._reply
        if self.closed:  # closed while its setup ran
            return
        if ok:
            self._go("set_up")
            self._ctl.send(Kind.C_FORK, {"n": self.node.cpus})
            logger.info(
                "computation %s (%s) set up for %s",
                self.name,
                self.cid,
                self.session.peer if self.session is not None else "a client now gone",
            )
        else:
            self._go("failed")
            self.error = (
                f"setup of computation {self.name!r} failed on node {self.node.name}: {reason}"
            )
            logger.warning("%s", self.error)
            await self._wait_exit()

    def _on_ctl(self, msg) -> None:
        kind, ctl = msg.kind, msg.ctl
        if kind == Kind.C_READY:
            if self._reply is not None and not self._reply.done():
                self._reply.set_result((bool(ctl.get("ok")), ctl.get("r", "")))
        elif kind == Kind.C_EXITED:
            pid, code = ctl["p"], ctl["c"]
            worker = self.workers.get(pid) or self._dying.pop(pid, None)
            if worker is not None:
                worker.exited(code)
            if self.ready:
                # a job process that dies before it even registers would die again:
                # replace such ones a few times only, not in an endless fork loop
                self._early_deaths = 0 if worker is not None else self._early_deaths + 1
                if self._early_deaths > MAX_EARLY_DEATHS:
                    logger.error(
                        "job processes of %s keep dying at start (exit %s); not replacing them",
                        self.name,
                        code,
                    )
                elif code != 0 or worker is not None:
                    self._ctl.send(Kind.C_FORK, {"n": 1})  # replace it

    def _on_ctl_close(self, exc) -> None:
        if self._reply is not None and not self._reply.done():
            code = self._proc.poll() if self._proc else None
            how = describe_exit(code) if code is not None else "ended"
            self._reply.set_result((False, f"the computation process {how}"))
        if self.ready:
            self._go("died")
            self.error = f"the computation process of {self.name!r} ended unexpectedly"
            logger.warning("%s", self.error)
            for w in list(self.workers.values()):
                w.kill(signal.SIGKILL)

    # -- workers ----------------------------------------------------------------
    def add_worker(self, worker: Worker) -> None:
        if self.closed:
            worker.chan.close()
            return
        self.workers[worker.pid] = worker
        self._idle.append(worker)
        worker.chan.start()
        self.node.dispatch()

    def idle_worker(self) -> Worker | None:
        return self._idle.pop() if self._idle else None

    def observe(self, t0, t1) -> None:
        """A job ran from ``t0`` to ``t1`` (its process's clock)."""
        if isinstance(t0, float) and isinstance(t1, float) and t1 >= t0:
            d = t1 - t0
            self.job_s = d if self.job_s is None else self.job_s + 0.1 * (d - self.job_s)

    def skip_ahead(self, why: str) -> None:
        """Drop the jobs sent ahead to the job processes (not started), handing them
        back to the client with ``why``."""
        for w in self.workers.values():
            for job in list(w.jobs)[1:]:
                if not job.handed_back and not job.cancelled:
                    job.handed_back = why
                    w.skip(job)

    def worker_idle(self, worker: Worker) -> None:
        if not worker.gone and not worker.stopping:
            self._idle.append(worker)

    def worker_gone(self, worker: Worker) -> None:
        self.workers.pop(worker.pid, None)
        if worker.job is not None:  # its exit status (C_EXITED) says what happened
            self._dying[worker.pid] = worker
        if worker in self._idle:
            self._idle.remove(worker)

    def cancel_running(self, jid: int) -> None:
        """Stop job ``jid`` if it runs; drop it unstarted if it was sent ahead."""
        for w in self.workers.values():
            for i, job in enumerate(w.jobs):
                if job.jid == jid and not job.cancelled:
                    job.cancelled = True
                    if i == 0:
                        w.stop()
                    else:
                        w.skip(job)
                    return

    def hand_back_running(self, why: str) -> int:
        """Stop the running jobs; each goes back to the client (to run again) with
        ``why``.  Returns how many."""
        n = 0
        for w in self.workers.values():
            if w.job is not None and not w.job.handed_back:
                w.job.handed_back = why
                self.node.jobs_handed_back += 1
                w.stop()  # (those sent ahead to it go back when it is gone)
                n += 1
        return n

    # -- close ------------------------------------------------------------------
    async def close(self, terminate: bool = False) -> str:
        """Run cleanup and stop the processes; return cleanup's error text, if any."""
        if self.closed:
            return ""
        self._go("close")
        self.node.computations.pop(self.cid, None)
        self.node.closed_cids.append(self.cid)
        self.node.start_spare()  # if it was the last one: ready for the next client
        error = ""
        if self._ctl is not None and not self._ctl.is_closed:
            if not terminate:
                await self._drain_running()
            self._reply = asyncio.get_running_loop().create_future()
            try:
                self._ctl.send(Kind.C_CLEANUP, {"grace": CLOSE_GRACE})
                ok, error = await asyncio.wait_for(self._reply, CLOSE_GRACE + 30)
            except (ConnectionClosed, TimeoutError):
                error = "cleanup did not finish"
        await self._wait_exit()
        if self._ctl is not None:
            self._ctl.close()
        for w in list(self.workers.values()):
            w.chan.close()
        await asyncio.to_thread(self._remove_files)
        return error

    def _remove_files(self) -> None:
        """The computation's folder, and its put() data in shared memory."""
        shm = self.node.shm_dir
        if shm is not None:
            for entry in os.listdir(shm) if os.path.isdir(shm) else ():
                if entry.startswith(f"{self.cid}-"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(shm, entry))
        shutil.rmtree(self.dir, True)

    async def _drain_running(self) -> None:
        """Wait for jobs running on this computation's workers to end (close without terminate)."""
        while any(w.job is not None for w in self.workers.values()):
            self._drained.clear()
            await self._drained.wait()

    def job_left(self) -> None:
        if not any(w.job is not None for w in self.workers.values()):
            self._drained.set()

    async def _wait_exit(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), CLOSE_GRACE + 5)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep[:40] or "computation"
