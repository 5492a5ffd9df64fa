"""The node daemon's event-loop side: client sessions, computations, job dispatch.

::

    client --TCP (authenticated)--> Session --FILE/COMPUTE--> Computation (handles.py)
                                      |                         |-- computation process
                                      |--JOBS--> NodeServer.queue   `-- job processes
                                      |             | dispatch: one job per idle job process,
                                      |             v at most `cpus` at once
                                      |          Worker --W_JOB--> job process
                                      |<-RESULTS-- Worker <-W_RESULT-- (forwarded, not unpickled)
                                      `--ACK-->  result dropped from the session's unacked set

The daemon never unpickles user data: arguments and results are forwarded
as the bytes the client and the job process made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import hmac
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import time

import psutil

from dispy import _data as data
from dispy import config, discovery, transport
from dispy._data import check_name
from dispy._paths import private_dir, safe_relpath
from dispy._tasks import spawn
from dispy._version import __version__
from dispy.core import jobstate
from dispy.errors import DispyError, ProtocolError
from dispy.protocol import (
    Kind,
    derive_key,
    field,
    job_id,
    job_ids,
    join_segments,
    split_segments,
)
from dispy.protocol._datagram import DatagramKind
from dispy.runtime.session import OPS, SessionBase

from . import service as service_hours
from .handles import Computation, Worker, start_computation_process
from .service import ServiceHours
from .store import ResultStore, StoreError

logger = logging.getLogger("dispynode")

#: Folder (inside a computation's) where cluster.put() data lives.
DATA_FOLDER = ".dispy_data"

#: The node's result store, in --dest_path: results kept until their client acknowledges them.
STORE_FILE = "results.db"

#: Seconds between a node's pulses to a client (its resources; liveness later).
DEFAULT_PULSE_INTERVAL = 10.0
MIN_PULSE_INTERVAL = 0.2


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


class Session(SessionBase):
    """One authenticated client connection and the computations it set up."""

    #: a file that cannot be written (a path under a file, a name too long...) is
    #: refused with the reason, as the scheduler does
    REFUSED = (ProtocolError, ValueError, OSError)

    def __init__(self, node: NodeServer, chan: transport.Channel) -> None:
        self.node = node
        self.comps: dict[str, Computation] = {}
        self._init_session(chan, logger)
        self.pulse_interval = DEFAULT_PULSE_INTERVAL
        self.last_heard = time.monotonic()
        self._pulse_task: asyncio.Task | None = None
        chan.on_message = self.on_message
        chan.on_close = self.on_close
        chan.start()

    # -- messages from the client ---------------------------------------------
    def on_message(self, msg) -> None:
        self.last_heard = time.monotonic()
        kind, ctl = msg.kind, msg.ctl
        if kind == Kind.JOBS:
            self._jobs(ctl, msg.payload)
        elif kind == Kind.ACK:
            self.node.ack(field(ctl, "c", str), job_ids(ctl))
        elif kind == Kind.INFO_REQ:
            pulse = field(ctl, "pulse", (int, float), default=0)
            if pulse:
                self.pulse_interval = max(MIN_PULSE_INTERVAL, float(pulse))
            if self._pulse_task is None:
                self._pulse_task = asyncio.get_running_loop().create_task(self._pulses())
            self.chan.send(Kind.INFO, self.node.info())
            if self.node.paused:
                self.pulse()
        elif kind in OPS:
            self._queue_op(kind, ctl, msg.payload)
        elif kind == Kind.CANCEL:
            comp = self.comps.get(field(ctl, "c", str))
            if comp is not None:
                for jid in job_ids(ctl):
                    self.node.cancel(comp, jid)
        elif kind == Kind.PING:
            self.chan.send(Kind.PONG, {})
        else:
            raise ProtocolError(f"unexpected message kind {kind} from a client")

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
        if not comp.ready:
            await comp.setup(bytes(payload), nargs)
        # else: set up already, in this session (a restarted dispyscheduler's RESUME
        # took it over, then its COMPUTE came): the same computation, nothing to do
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
            await asyncio.to_thread(_link_data, folder, name, version, path, size, shm, comp.cid)
        else:
            segs = split_segments(payload, field(ctl, "s", list))
            if len(payload) > self.node.max_file_size:
                raise ValueError(f"data {name!r} exceeds this node's --max_file_size")
            await asyncio.to_thread(_store_data, folder, name, version, segs, shm, comp.cid)
        if not self.chan.is_closed:
            self.chan.send(Kind.DATA_OK, {"c": cid, "t": ctl.get("t"), "ok": True})

    async def _close_comp(self, ctl: dict) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.pop(cid, None)
        error = ""
        if comp is not None:
            self.node.drop_jobs(comp, terminate=bool(ctl.get("t", False)))
            error = await comp.close(terminate=bool(ctl.get("t", False)))
        self.node.forget(cid)  # the client closed it: nothing of it is owed any more
        if not self.chan.is_closed:
            self.chan.send(Kind.CLOSED, {"c": cid, "r": error or ""})

    async def _resume(self, ctl: dict) -> None:
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
        jobs = []
        if comp is not None:
            jobs = [j.jid for j in node.queue if j.comp is comp]
            jobs += [w.job.jid for w in comp.workers.values() if w.job is not None]
        logger.info(
            "client %s resumed computation %s: %s, %d job(s) on the node, %d result(s) owed",
            self.peer, cid, "known" if comp else "not known here", len(jobs), len(owed),
        )  # fmt: skip
        self._resumed(cid, bool(comp is not None and comp.ready), jobs, owed)

    # -- results to the client ------------------------------------------------
    def send_result(self, cid: str, jid: int, info: dict, segs) -> None:
        self.node.deliver(cid, jid, info, segs, self)

    def send_provisional(self, cid: str, jid: int, segs) -> None:
        if not self.chan.is_closed:
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
            self.chan.send(Kind.FILE, {"c": cid, "j": jid, "p": path, "m": mode}, [data])

    async def _pulses(self) -> None:
        """Send the node's free resources every pulse interval (dispy's AvailInfo); drop
        a client silent for --zombie_interval (its computations close)."""
        while not self.chan.is_closed:
            await asyncio.sleep(self.pulse_interval)  # a period, not a wait for a condition
            silent = time.monotonic() - self.last_heard
            if silent > self.node.zombie_interval:
                logger.warning(
                    "client %s silent for %.0f s (zombie interval): closing its computations",
                    self.peer,
                    silent,
                )
                self.chan.abort()
                return
            self.pulse()

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
        if self._pulse_task is not None:
            self._pulse_task.cancel()
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


def _store_data(
    folder: str, name: str, version: int, segs, shm: str | None = None, cid: str = ""
) -> None:
    """Write put() data where the job processes map it: in the node's shared-memory
    folder (a link to it in the computation's folder) when there is room, as
    LensKit's invoker does; else in the computation's folder on disk."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = data.data_path(folder, name, version)
    size = sum(memoryview(s).nbytes for s in segs)
    stored = False
    if shm is not None and size < psutil.virtual_memory().available // 4:
        target = data.data_path(shm, f"{cid}-{name}", version)
        try:
            data.write(target, segs)
            os.symlink(target, path)
            stored = True
        except OSError as exc:  # full (ENOSPC), or gone: on disk instead
            logger.info("put data %r not in shared memory (%s); on disk", name, exc)
            for leftover in (target, target + ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
    if not stored:
        data.write(path, segs)
    _drop_older(folder, name, version)


def _link_data(
    folder: str, name: str, version: int, handed: str, size: int, shm: str | None, cid: str
) -> None:
    """put() data that a client on this host wrote to shared memory and named:
    a hard link to that file, no copy (checked through a descriptor, and the
    link checked to be that very file).  ValueError when it cannot be: the
    client then sends the bytes."""
    if shm is None:
        raise ValueError("this node has no shared-memory folder to link handed data into")
    fd = data.open_handed_file(handed, size)
    try:
        checked = os.fstat(fd)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        target = data.data_path(shm, f"{cid}-{name}", version)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)  # a put() of this version again
        try:
            os.link(handed, target, follow_symlinks=False)
        except OSError as exc:  # another file system (EXDEV)...
            raise ValueError(f"handed data file {handed!r} cannot be linked here: {exc}") from None
        linked = os.lstat(target)
        if (linked.st_dev, linked.st_ino) != (checked.st_dev, checked.st_ino):
            os.unlink(target)  # replaced between the check and the link
            raise ValueError(f"handed data file {handed!r} changed while it was linked")
    finally:
        os.close(fd)
    path = data.data_path(folder, name, version)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.symlink(target, path)
    _drop_older(folder, name, version)


def _drop_older(folder: str, name: str, version: int) -> None:
    for entry in os.listdir(folder):  # older versions: job processes keep their mappings
        stem, _, ver = entry.rpartition(".")
        if stem == name and ver.isdigit() and int(ver) < version:
            _remove_data(os.path.join(folder, entry))


def _remove_data(path: str) -> None:
    """A data file, and its shared-memory file if it is a link to one."""
    with contextlib.suppress(OSError):
        if os.path.islink(path):
            os.unlink(os.readlink(path))
    with contextlib.suppress(OSError):
        os.unlink(path)


class NodeServer:
    """Accepts clients, runs their computations, keeps at most ``cpus`` jobs running."""

    def __init__(
        self,
        *,
        ip_addrs: list[str],
        port: int,
        secret: str,
        cpus: int,
        dest_path: str,
        name: str | None = None,
        ext_ip_addr: str | None = None,
        max_file_size: int = 0,
        serve: int = -1,
        handshake_timeout: float = config.HANDSHAKE_TIMEOUT,
        max_unauth: int = config.MAX_UNAUTHENTICATED,
        ssl=None,
        zombie_interval: float = 3600.0,
        client_port: int = config.CLIENT_PORT,
        discover: bool = True,
        multicast: bool = False,
        scheduler_host: str | None = None,
        service: ServiceHours | None = None,
        clock=datetime.datetime.now,
    ) -> None:
        self.ssl = ssl
        self.multicast = multicast  # --ipv4_udp_multicast: announce to the group
        self.scheduler_host = scheduler_host  # --scheduler_host: announce there too
        self._scheduler_addr: str | None = None
        self.service = service
        self.clock = clock
        self._service_timer: asyncio.TimerHandle | None = None
        #: why the node takes no jobs now (outside its service hours); "" while it serves
        self.paused = ""
        self.client_port = client_port
        self.discover = discover
        self.nid = os.urandom(8).hex()  # this run of the node, so clients see one node once
        self.udp: discovery.Endpoint | None = None
        self.zombie_interval = zombie_interval
        self.handshake_timeout = handshake_timeout
        self.max_unauth = max_unauth
        self.ip_addrs = ip_addrs
        self.port = port
        self.key = derive_key(secret)
        self.cpus = cpus
        self.dest_path = os.path.abspath(dest_path)
        self.name = name or socket.gethostname()
        self.ext_ip_addr = ext_ip_addr
        self.max_file_size = max_file_size or (1 << 40)
        self.serve_limit = serve
        self.sessions: set[Session] = set()
        self.computations: dict[str, Computation] = {}
        self.closed_cids: collections.deque = collections.deque(maxlen=256)
        self.queue: collections.deque[NodeJob] = collections.deque()
        self.running = 0
        self.jobs_done = 0
        self.jobs_handed_back = 0  # not run here (service hours), to run elsewhere
        self.shm_dir: str | None = None  # put() data, when it fits in memory
        self.worker_addr = f"\0dispynode-{os.getpid()}-{os.urandom(8).hex()}"
        self._local_waiting = 0  # job-process connections that have not shown a token yet
        self._local_refusals = transport.LogThrottle(logger, "refused local connections")
        self.stopped = asyncio.Event()
        #: results not acknowledged yet: cid -> jid -> (entry, segments); on disk too
        self.unacked: dict[str, dict[int, tuple[dict, list]]] = {}
        self.store: ResultStore | None = None
        self._stored_cids: dict[str, int] = {}  # results an earlier run left on disk
        self._reaper: asyncio.Task | None = None
        self._servers: list[asyncio.Server] = []
        #: a computation process started ahead while no computation runs (its
        #: interpreter and imports cost ~0.15 s at a client's COMPUTE otherwise)
        self._spare: tuple[subprocess.Popen, socket.socket] | None = None
        self._stopping = False
        self.bound: list[tuple[str, int]] = []
        self.served = 0

    async def start(self) -> None:
        try:
            self.dest_path = private_dir(self.dest_path)
        except OSError as exc:
            raise DispyError(f"cannot use --dest_path {self.dest_path}: {exc}") from None
        try:
            self.shm_dir = await asyncio.to_thread(data.shared_memory_folder, "node")
        except OSError as exc:  # never a reason not to serve: put() data goes to disk
            logger.warning("put() data goes to disk: %s", exc)
        store = os.path.join(self.dest_path, STORE_FILE)
        try:
            self.store = ResultStore(store)
        except (OSError, StoreError) as exc:
            raise DispyError(f"cannot keep results in {store}: {exc}") from None
        self._stored_cids = self.store.pending_cids()
        if self._stored_cids:
            logger.info(
                "%d result(s) of %d computation(s) kept from an earlier run, for their clients",
                sum(self._stored_cids.values()),
                len(self._stored_cids),
            )
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        psutil.cpu_percent(None)
        hosts = self.ip_addrs or [None]
        for host in hosts:
            srv = await transport.serve(
                host,
                self.port,
                self.key,
                self._on_client,
                timeout=self.handshake_timeout,
                max_unauth=self.max_unauth,
                ssl=self.ssl,
            )
            self._servers.append(srv)
            for sock in srv.sockets:
                self.bound.append(sock.getsockname()[:2])
            if self.port == 0 and self.bound:  # the other addresses use the same port
                self.port = self.bound[0][1]
        self.start_spare()
        self._servers.append(
            await transport.serve_unix(self.worker_addr, self._on_worker, self._local_refused)
        )
        if self.service is not None:
            logger.info("service hours: %s", self.service.describe())
            self.service_tick()
        if self.scheduler_host:
            await self._resolve_scheduler()
        if self.discover or self.scheduler_host:
            await self._start_discovery()

    # -- discovery (UDP) ------------------------------------------------------
    def _loopback_only(self) -> bool:
        return bool(self.bound) and all(
            host.startswith("127.") or host == "::1" for host, _ in self.bound
        )

    async def _resolve_scheduler(self) -> None:
        try:
            self._scheduler_addr = await discovery.resolve_ipv4(
                self.scheduler_host, self.client_port
            )
        except (OSError, UnicodeError) as exc:
            logger.warning(
                "--scheduler_host %s: cannot resolve it (%s); not announcing there",
                self.scheduler_host,
                exc,
            )

    async def _start_discovery(self) -> None:
        host = "127.0.0.1" if self._loopback_only() else "0.0.0.0"
        try:
            self.udp = await discovery.open_endpoint(
                self.key, self._on_datagram, host, self.port, reuse=True, name="dispynode"
            )
        except OSError as exc:
            logger.warning(
                "no discovery: cannot use UDP port %s (%s); clients must name this node",
                self.port,
                exc.strerror or exc,
            )
            return
        if self.multicast and self.discover:
            joined = self.udp.join_multicast([h for h, _ in self.bound])
            logger.info(
                "discovery by multicast: %s on %d interface(s)", discovery.MULTICAST_GROUP, joined
            )
        self.announce()

    def announcement(self) -> dict:
        body = {"nid": self.nid, "port": self.port, "name": self.name, "cpus": self.cpus}
        specific = [h for h, _ in self.bound if h not in ("0.0.0.0", "::")]
        if self.ext_ip_addr:
            body["ip"] = self.ext_ip_addr
        elif len(specific) == 1:
            body["ip"] = specific[0]
        return body

    def announce(self) -> None:
        """Tell clients on this node's networks (client port, broadcast) that it is free."""
        if self.udp is None or self.paused:
            return
        body = self.announcement()
        if self._scheduler_addr:
            self.udp.send(DatagramKind.ANNOUNCE, body, (self._scheduler_addr, self.client_port))
        if not self.discover:
            return
        bound = [h for h, _ in self.bound]
        if self.multicast and not self._loopback_only():
            self.udp.multicast(DatagramKind.ANNOUNCE, body, self.client_port, bound)
        elif not self._loopback_only():
            targets = discovery.broadcast_targets(["*"], bound)
            self.udp.broadcast(DatagramKind.ANNOUNCE, body, self.client_port, targets)
        self.udp.send(DatagramKind.ANNOUNCE, body, ("127.0.0.1", self.client_port))

    def _on_datagram(self, kind: DatagramKind, body: dict, addr) -> None:
        if kind != DatagramKind.DISCOVER or self.paused or not self.discover:
            return
        ip = discovery.sender_ip(body)
        port = body.get("port")
        if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"bad reply address {ip!r}:{port!r}")
        if not 0 < port < 65536:
            raise ValueError(f"bad reply port {port}")
        logger.debug("discovery request from %s (answer to %s:%s)", addr[0], ip, port)
        self.udp.send(DatagramKind.ANNOUNCE, self.announcement(), (ip, port))

    @property
    def ip_addr(self) -> str:
        if self.ext_ip_addr:
            return self.ext_ip_addr
        for host, _ in self.bound:
            if host not in ("0.0.0.0", "::"):
                return host
        return socket.gethostbyname(socket.gethostname()) if self.bound else ""

    def info(self) -> dict:
        return {
            "name": self.name,
            "nid": self.nid,
            "ip": self.ip_addr,
            "cpus": self.cpus,
            "platform": platform.platform(),
            "version": __version__,
            # a client with the same id may name put() data files instead of sending them
            "host": data.host_id() if self.shm_dir else None,
            "avail": self.avail_info(),
        }

    def avail_info(self) -> dict:
        try:
            disk = psutil.disk_usage(self.dest_path).free
        except OSError:
            disk = 0
        return {
            "cpu": psutil.cpu_percent(None),
            "memory": psutil.virtual_memory().available,
            "disk": disk,
            "swap": psutil.swap_memory().percent,
        }

    # -- clients --------------------------------------------------------------
    def _on_client(self, chan: transport.Channel) -> None:
        logger.info("client %s authenticated", chan.peer)
        self.sessions.add(Session(self, chan))

    def session_ended(self, session: Session) -> None:
        self.sessions.discard(session)
        self.served += 1
        if not self.sessions and not self.stopped.is_set():
            self.announce()  # free again: clients that came meanwhile can find us
        if 0 < self.serve_limit <= self.served:
            logger.info("served %d clients (--serve); exiting", self.served)
            self.stopped.set()

    # -- job processes ------------------------------------------------------
    def _local_refused(self, uid) -> None:
        self._local_refusals.note(
            logging.WARNING,
            "local connection from user %s to the job-process socket refused "
            "(only this node's own processes may connect)",
            uid,
        )

    def _on_worker(self, chan: transport.Channel) -> None:
        if self._local_waiting >= max(64, 4 * self.cpus):
            chan.close()  # a flood of local connections that never say who they are
            return
        self._local_waiting += 1
        waiting = True

        def settled() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self._local_waiting -= 1
                timer.cancel()

        def too_slow() -> None:
            if waiting:
                logger.warning("local connection that sent no token in time; closed")
                settled()
                chan.close()

        timer = asyncio.get_running_loop().call_later(self.handshake_timeout, too_slow)
        chan.on_close = lambda exc: settled()

        def first(msg) -> None:
            settled()
            ctl = msg.ctl
            comp = self.computations.get(ctl.get("c")) if msg.kind == Kind.W_HELLO else None
            token = ctl.get("t")
            if (
                comp is None
                or not isinstance(token, bytes)
                or not hmac.compare_digest(token, comp.token)
            ):
                closed = msg.kind == Kind.W_HELLO and ctl.get("c") in self.closed_cids
                # a job process forked just before its computation closed says hello late
                (logger.debug if closed else logger.warning)(
                    "local connection without a valid token; closed"
                )
                chan.close()
                return
            chan.lift_limit()
            comp.add_worker(Worker(comp, chan, field(ctl, "p", int)))

        chan.on_message = first
        chan.start()

    # -- the queue ------------------------------------------------------------
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

    # -- service hours ----------------------------------------------------------
    def service_tick(self) -> None:
        """Apply the service hours at the clock's time; look again when they change
        (at least every minute: the wall clock may jump)."""
        if self._service_timer is not None:
            self._service_timer.cancel()
        now = self.clock()
        state = self.service.state(now)
        if state == service_hours.SERVING:
            self._serve_again()
        else:
            self._pause(state)
        wait = (self.service.next_change(now) - now).total_seconds()
        self._service_timer = asyncio.get_running_loop().call_later(
            min(max(wait, 0.05), 60.0), self.service_tick
        )

    def _pause(self, state: str) -> None:
        ended = state == service_hours.ENDED
        why = (
            f"outside its service hours ({self.service.describe()}; "
            f"dispynode --service_{'end' if ended else 'stop'})"
        )
        if not self.paused:
            logger.info(
                "service hours: taking no new jobs now; queued jobs go back to their clients"
            )
        self.paused = why
        for s in list(self.sessions):
            s.pulse()
        queued, self.queue = self.queue, collections.deque()
        for job in queued:
            self._hand_back(job, why)
        if ended:
            running = sum(c.hand_back_running(why) for c in list(self.computations.values()))
            if running:
                logger.info(
                    "service hours ended: %d running job(s) stopped and handed back", running
                )

    def _serve_again(self) -> None:
        if not self.paused:
            return
        self.paused = ""
        logger.info("service hours: taking jobs again")
        for s in list(self.sessions):
            s.pulse()
        self.announce()

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
        if self.store is not None:
            try:
                self.store.put(cid, jid, entry, segs)
            except StoreError as exc:
                logger.error("result of job %s not kept on disk: %s", jid, exc)
        if session is not None:
            session.queue_result(entry, segs)

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

    async def _reap(self) -> None:
        """Close computations whose client has been gone for --zombie_interval (their
        results stay on disk for ``recover_jobs``); expire old results."""
        period = max(0.5, min(60.0, self.zombie_interval / 4))
        last_expire = 0.0
        while True:
            await asyncio.sleep(period)  # a housekeeping period, not a wait for a condition
            now = time.monotonic()
            for comp in list(self.computations.values()):
                gone = getattr(comp, "detached_at", None)
                if comp.session is None and gone is not None and now - gone > self.zombie_interval:
                    logger.warning(
                        "client of computation %s (%s) gone for %.0f s (zombie interval): "
                        "closing it; its results stay for recover_jobs",
                        comp.name, comp.cid, now - gone,
                    )  # fmt: skip
                    self.drop_jobs(comp, terminate=True)
                    await comp.close(terminate=True)
                    self.unacked.pop(comp.cid, None)  # on disk until the retention limit
            if self.store is not None and now - last_expire > 3600:
                last_expire = now
                await asyncio.to_thread(self.store.expire)

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

    # -- lifetime -------------------------------------------------------------
    def start_spare(self) -> None:
        """Start a computation process ahead, when none is spare and no computation
        runs (so a running cluster's node holds no idle process's memory)."""
        if self._spare is not None or self.computations or self._stopping or not self._servers:
            return
        try:
            self._spare = start_computation_process(self.dest_path)
        except OSError as exc:
            logger.debug("no spare computation process: %s", exc)

    def take_spare(self) -> tuple[subprocess.Popen, socket.socket] | None:
        """The spare computation process, if it is still alive (None otherwise)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[1].close()
            return None
        return spare

    async def shutdown(self) -> None:
        self._stopping = True
        spare = self.take_spare()
        if spare is not None:  # idle, holding nothing: no need to wait for its imports
            spare[1].close()
            spare[0].kill()
            await asyncio.to_thread(spare[0].wait)
        if self._service_timer is not None:
            self._service_timer.cancel()
        if self.udp is not None:
            self.udp.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for srv in self._servers:
            srv.close()
        sessions = list(self.sessions)
        for s in sessions:
            s.chan.close()
        comps = list(self.computations.values())
        await asyncio.gather(*(c.close(terminate=True) for c in comps), return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.shm_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.shm_dir, True)

    def clean(self) -> None:
        """--clean: remove what earlier runs left under dest_path."""
        if os.path.isdir(self.dest_path):
            shutil.rmtree(self.dest_path, ignore_errors=True)


def install_signal_handlers(node: NodeServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stopped.set)
