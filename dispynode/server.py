"""The node daemon's event-loop side: client sessions, computations, and (with
``jobs.py``, the job's way through the node) job dispatch.

::

    client --TCP (authenticated)--> Session --FILE/COMPUTE--> Computation (handles.py)
                                      |                         |-- computation process
                                      |--JOBS--> queue (jobs.py)   `-- job processes
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
from dispy import config, transport
from dispy._paths import claim_dir
from dispy._peer_guards import LogThrottle
from dispy._version import __version__
from dispy.errors import DispyError
from dispy.protocol import Kind, derive_key, field

from . import service as service_hours
from .announce import Announcer
from .handles import Computation, start_computation_process
from .jobs import NodeJob, NodeJobs, Worker
from .service import ServiceHours
from .session import Session
from .store import ResultStore, StoreError

logger = logging.getLogger("dispynode")

#: The node's result store, in --dest_path: results kept until their client acknowledges them.
STORE_FILE = "results.db"


class NodeServer(NodeJobs):
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
        #: telling clients (and a scheduler) that this node is here and free
        self.announcer = Announcer(self, discover, multicast, scheduler_host)
        self.service = service
        self.clock = clock
        self._service_timer: asyncio.TimerHandle | None = None
        #: why the node takes no jobs now (outside its service hours); "" while it serves
        self.paused = ""
        self.client_port = client_port
        self.nid = os.urandom(8).hex()  # this run of the node, so clients see one node once
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
        self._local_refusals = LogThrottle(logger, "refused local connections")
        self.stopped = asyncio.Event()
        self._lock_fd: int | None = None  # (claim_dir: the folder is this process's)
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

    async def start(self, clean: bool = False) -> None:
        """Take the folder (``clean``: emptied first, --clean) and start serving."""
        self.dest_path, self._lock_fd = await asyncio.to_thread(
            claim_dir, self.dest_path, "dispynode", clean
        )
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
        await self.announcer.start()

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
            "starts": 1,  # RESULTS say which jobs started ("g"): Running is the node's word
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
            self.announcer.announce()  # free again: clients that came meanwhile can find us
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
        for comp in list(self.computations.values()):
            comp.skip_ahead(why)  # sent ahead to its job processes: not started either
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
        self.announcer.announce()

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
        self.announcer.close()
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def install_signal_handlers(node: NodeServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stopped.set)
