"""The node's session with one client: the node protocol's requests (INFO,
FILE, COMPUTE, DATA, JOBS, ACK, CANCEL, CLOSE, RESUME) and what goes back
(RESULTS, provisional results, files, pulses)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from dispy import config, transport
from dispy._data import check_name
from dispy._paths import safe_relpath
from dispy._tasks import spawn
from dispy.core import jobstate
from dispy.errors import ProtocolError
from dispy.protocol import Kind, field, job_id, job_ids, join_segments, split_segments
from dispy.protocol.conversation import CompPhase
from dispy.runtime.session import SessionBase

from .handles import Computation
from .jobs import NodeJob
from .put_data import link_data, store_data

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .server import NodeServer

logger = logging.getLogger("dispynode")

#: Folder (inside a computation's) where cluster.put() data lives.
DATA_FOLDER = ".dispy_data"

#: Seconds between a node's pulses to a client (its resources; liveness later).
DEFAULT_PULSE_INTERVAL = 10.0
MIN_PULSE_INTERVAL = 0.2


class Session(SessionBase):
    """One authenticated client connection and the computations it set up."""

    #: a file that cannot be written (a path under a file, a name too long...) is
    #: refused with the reason, as the scheduler does
    REFUSED = (ProtocolError, ValueError, OSError)

    def __init__(self, node: NodeServer, chan: transport.Channel) -> None:
        self.node = node
        self.comps: dict[str, Computation] = {}
        self._init_session(chan, logger, DEFAULT_PULSE_INTERVAL)
        self._at_once.update(
            {Kind.JOBS: self._jobs, Kind.ACK: self._ack, Kind.INFO_REQ: self._info,
             Kind.CANCEL: self._cancel}
        )  # fmt: skip
        chan.start()

    # -- messages from the client ---------------------------------------------
    # -- messages from the client: what the conversation's table takes at once ----------
    def _ack(self, ctl: dict, payload) -> None:
        self.node.ack(field(ctl, "c", str), job_ids(ctl))

    def _info(self, ctl: dict, payload) -> None:
        pulse = field(ctl, "pulse", (int, float), default=0)
        if pulse:
            self.pulse_interval = max(MIN_PULSE_INTERVAL, float(pulse))
        self._start_pulses()
        self.chan.send(Kind.INFO, self.node.info())
        if self.node.paused:
            self.pulse()

    def _cancel(self, ctl: dict, payload) -> None:
        comp = self.comps.get(field(ctl, "c", str))
        if comp is not None:
            for jid in job_ids(ctl):
                self.node.cancel(comp, jid)

    def _jobs(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.get(cid)
        segs = split_segments(payload, field(ctl, "s", list))
        incoming = len(field(ctl, "j", list))
        if len(self.node.queue) + incoming > config.MAX_QUEUED_JOBS:  # count ours only then
            queued = sum(1 for j in self.node.queue if j.comp.session is self)
            if queued + incoming > config.MAX_QUEUED_JOBS:
                raise ProtocolError(f"more than {config.MAX_QUEUED_JOBS} jobs queued by one client")
        pos = 0
        jobs = []
        files_jobs = []
        for entry in field(ctl, "j", list):
            if not (isinstance(entry, list) and len(entry) in (2, 3)):
                raise ProtocolError("job entry must be [job id, segment count, (options)]")
            jid, n = job_id(entry[0]), entry[1]
            opts = entry[2] if len(entry) == 3 else {}
            if not isinstance(n, int) or n < 1 or pos + n > len(segs):
                raise ProtocolError("bad job entry")
            if not isinstance(opts, dict):
                raise ProtocolError("job options must be a map")
            part = segs[pos : pos + n]
            pos += n
            if comp is None or not comp.ready:
                why = comp.error if comp is not None else "computation not set up on this node"
                self.send_result(cid, jid, {"st": jobstate.Terminated, "x": why}, [b"N."])
                continue
            timeout = field(opts, "t", (int, float), default=0)
            files = field(opts, "f", list, default=[])
            chunk = bool(field(opts, "m", int, default=0))
            if len(files) >= n:
                raise ProtocolError("job has more files than segments")
            job = NodeJob(comp, jid, part[len(files) :], timeout, chunk)
            if files:
                files_jobs.append((job, list(zip(files, part[: len(files)], strict=True))))
            else:
                jobs.append(job)
        self.node.enqueue(jobs)
        for job, files in files_jobs:  # write them off the loop, then queue the job
            self._ops.put_nowait(("job_files", job, files))

    async def _handle_op(self, kind, ctl, payload) -> None:
        """Requests in arrival order (they touch the disk and processes), and the files
        of jobs with dispy_job_depends."""
        if kind == "job_files":
            await self._job_files(ctl, payload)
        else:
            await super()._handle_op(kind, ctl, payload)

    def _comp_for_files(self, cid: str, name: str) -> Computation:
        comp = self.comps.get(cid)
        if comp is None:
            if len(cid) > 64 or not cid.isalnum():
                raise ProtocolError("computation id must be alphanumeric, at most 64 characters")
            comp = Computation(self.node, self, cid, name)
            self.comps[cid] = comp
        return comp

    async def _file(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self._comp_for_files(cid, field(ctl, "n", str, default="computation"))
        rel = safe_relpath(field(ctl, "p", str))
        offset = field(ctl, "o", int, default=0)
        if offset < 0:
            raise ProtocolError(f"file {rel!r}: negative offset {offset}")
        mode = field(ctl, "m", int, default=0o644) & 0o777
        size = offset + len(payload)
        if size > self.node.max_file_size:
            raise ValueError(
                f"file {rel!r} ({size} bytes) exceeds this node's limit of "
                f"{self.node.max_file_size} bytes (dispynode --max_file_size)"
            )
        data = bytes(payload) if len(payload) < 65536 else payload
        await asyncio.to_thread(comp.write_file, rel, offset, data, mode)

    async def _job_files(self, job: NodeJob, files: list) -> None:
        """dispy_job_depends: write the job's files into its folder, then queue it."""
        try:
            for spec, data in files:
                if not (isinstance(spec, list) and len(spec) == 2):
                    raise ProtocolError("job file entry must be [path, mode]")
                rel = safe_relpath(field({"p": spec[0]}, "p", str))
                if len(data) > self.node.max_file_size:
                    raise ValueError(
                        f"file {rel!r} ({len(data)} bytes) exceeds this node's limit of "
                        f"{self.node.max_file_size} bytes (dispynode --max_file_size)"
                    )
                mode = spec[1] & 0o777 if isinstance(spec[1], int) else 0o644
                await asyncio.to_thread(job.comp.write_file, rel, 0, data, mode)
        except (ValueError, OSError, ProtocolError) as exc:
            self.send_result(
                job.comp.cid,
                job.jid,
                {"st": jobstate.Terminated, "x": f"the job's files could not be written: {exc}"},
                [b"N."],
            )
            return
        self.node.enqueue([job])

    async def _compute(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self._comp_for_files(cid, field(ctl, "n", str))
        nargs = field(ctl, "sa", int, default=0)
        if not 0 <= nargs <= len(payload):
            raise ProtocolError("bad setup arguments length")
        if comp.phase is CompPhase.NEW:
            await comp.setup(bytes(payload), nargs)
        # else: set up already, in this session (a restarted dispyscheduler's RESUME
        # took it over, then its COMPUTE came): the same computation, nothing to do;
        # or its setup failed (the reply says why)
        reply = {"c": cid, "ok": comp.ready}
        if not comp.ready:
            reply["r"] = comp.error
        if not self.chan.is_closed:
            self.chan.send(Kind.COMPUTE_REPLY, reply)

    async def _data(self, ctl: dict, payload) -> None:
        """cluster.put: store the object once for every job of the computation."""
        cid = field(ctl, "c", str)
        comp = self.comps.get(cid)
        if comp is None or not comp.ready:
            raise ValueError(f"computation {cid} is not set up on this node")
        name = check_name(field(ctl, "n", str))
        version = field(ctl, "v", int)
        folder = os.path.join(comp.dir, DATA_FOLDER)
        shm = self.node.shm_dir
        if "f" in ctl:  # a client on this host wrote the file and names it: no bytes sent
            path, size = field(ctl, "f", str), field(ctl, "z", int)
            if size > self.node.max_file_size:
                raise ValueError(f"data {name!r} exceeds this node's --max_file_size")
            await asyncio.to_thread(link_data, folder, name, version, path, size, shm, comp.cid)
        else:
            segs = split_segments(payload, field(ctl, "s", list))
            if len(payload) > self.node.max_file_size:
                raise ValueError(f"data {name!r} exceeds this node's --max_file_size")
            await asyncio.to_thread(store_data, folder, name, version, segs, shm, comp.cid)
        if not self.chan.is_closed:
            self.chan.send(Kind.DATA_OK, {"c": cid, "t": ctl.get("t"), "ok": True})

    async def _close_comp(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.pop(cid, None)
        error = ""
        if comp is not None:
            self.node.drop_jobs(comp, terminate=bool(ctl.get("t", False)))
            error = await comp.close(terminate=bool(ctl.get("t", False)))
        self.node.forget(cid)  # the client closed it: nothing of it is owed any more
        if not self.chan.is_closed:
            self.chan.send(Kind.CLOSED, {"c": cid, "r": error or ""})

    async def _resume(self, ctl: dict, payload) -> None:
        """A client reconnected (or ``recover_jobs`` runs): attach the computation to
        this connection, say what the node still has of it, and send again every
        result not acknowledged yet (kept in memory, or on disk across a restart)."""
        cid = field(ctl, "c", str)
        node = self.node
        comp = node.computations.get(cid)
        if comp is not None and not comp.closed:
            self._take_over(comp)
        else:
            comp = None
        await node.restore(cid)
        owed = node.unacked.get(cid, {})
        jobs, running = [], []
        if comp is not None:
            jobs = [j.jid for j in node.queue if j.comp is comp]
            running = [w.job.jid for w in comp.workers.values() if w.job is not None]
            # (and those sent ahead to a job process: queued there, not lost)
            jobs += [j.jid for w in comp.workers.values() for j in w.jobs]
        logger.info(
            "client %s resumed computation %s: %s, %d job(s) on the node, %d result(s) owed",
            self.peer, cid, "known" if comp else "not known here", len(jobs), len(owed),
        )  # fmt: skip
        self._resumed(cid, bool(comp is not None and comp.ready), jobs, owed, running)

    # -- results to the client ------------------------------------------------
    def send_result(self, cid: str, jid: int, info: dict, segs) -> None:
        self.node.deliver(cid, jid, info, segs, self)

    def send_provisional(self, cid: str, jid: int, segs) -> None:
        if not self.chan.is_closed:
            self.say_starts()  # Running before its provisional results
            lens, flat = join_segments([segs])
            self.chan.send(
                Kind.STATUS, {"c": cid, "j": jid, "st": jobstate.ProvisionalResult, "s": lens}, flat
            )

    def send_file(self, cid: str, jid: int, path, mode, data) -> None:
        """A job's dispy_send_file: forward it to the client."""
        if not isinstance(path, str) or len(data) > self.node.max_file_size:
            logger.warning("file from job %s refused (bad name or over --max_file_size)", jid)
            return
        if not self.chan.is_closed:
            self.say_starts()
            self.chan.send(Kind.FILE, {"c": cid, "j": jid, "p": path, "m": mode}, [data])

    def _zombie_interval(self) -> float:
        return self.node.zombie_interval

    def pulse(self) -> None:
        """The node's free resources, and whether it takes jobs now (service hours)."""
        if not self.chan.is_closed:
            ctl = {"a": self.node.avail_info()}
            if self.node.paused:
                ctl["paused"] = self.node.paused
            self.chan.send(Kind.STATUS, ctl)

    # -- end ----------------------------------------------------------------
    def on_close(self, exc) -> None:
        if exc is not None:
            logger.info("client %s disconnected: %s", self.peer, exc)
        if self._current == Kind.CLOSE:  # let the computation close (cleanup, processes)
            self._stop_after = True
        else:
            self._ops_task.cancel()
        self._stop_pulses()
        spawn(self._close_all(), f"closing the computations of {self.peer}", logger)

    async def _close_all(self) -> None:
        """The connection ended without CLOSE: the client crashed, or the network
        failed.  Its computations go on; their results are kept (on disk too) for
        the client to resume, or for ``recover_jobs``, until --zombie_interval."""
        comps, self.comps = list(self.comps.values()), {}
        for comp in comps:
            if comp.session is self:
                comp.session = None
                comp.detached_at = self.last_heard  # the client's last sign of life
                logger.info(
                    "computation %s (%s) lost its client; jobs go on, results are kept",
                    comp.name,
                    comp.cid,
                )
        self.node.session_ended(self)
