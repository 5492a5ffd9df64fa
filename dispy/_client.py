"""``JobCluster``: the client face, and the engine behind it.

The route of a job::

    user thread                      dispy-loop thread (asyncio)              node
    -----------                      ---------------------------              ----
    submit(*args)
      pickle args (protocol 5,
      out-of-band buffers)
      DispyJob -> _incoming ----wake--> _Engine.wake -> Scheduler.submit
                                        Scheduler.assign -> _NodeLink.send_jobs
                                          JOBS frame (batched) ------------> Session -> job process
                                        _NodeLink.on_message(RESULTS) <------ RESULTS (batched)
                                          unpickle result, Scheduler.ended
                                          job.future.set_result  -> ACK -----> result dropped
    job() / wait() <---------------------  (callbacks run on the cluster's callback thread)

Everything a node does for the cluster goes over one long-lived,
authenticated connection per node (``_NodeLink``).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import copy
import functools
import itertools
import logging
import os
import queue
import socket
import ssl
import sys
import threading
import time
import uuid
import weakref

import cloudpickle
import psutil

from . import _loop, config, discovery, serialize, transport
from ._data import NodeData, check_name, data_path
from ._data import _local as data_local
from ._data import client_shm_folder as data_client_shm_folder
from ._data import host_id as data_host_id
from ._data import write as data_write
from ._finder import NodeFinder
from ._job import ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate
from ._link import MISSED_PULSES, LinkBase
from ._local import LocalNode
from ._paths import write_chunk
from ._recover import RecoverFile
from ._recovery import default_path as _default_recover_path
from ._recovery import job_blob
from ._tasks import spawn
from .core import jobstate
from .core.scheduler import Scheduler
from .errors import (
    AuthenticationFailed,
    ComputationError,
    ConnectionClosed,
    DispyError,
    IncompatibleVersion,
    ProtocolError,
    SubmitError,
)
from .keys import resolve_secret
from .protocol import (
    IDS_PER_FRAME,
    JOBS_PER_FRAME,
    Kind,
    derive_key,
    field,
    join_segments,
    result_entries,
    split_segments,
)
from .tls import client_context

logger = logging.getLogger("dispy")

#: Seconds between pulses (both ways); a node silent for MISSED_PULSES of them is dead.
DEFAULT_PULSE_INTERVAL = 2.0
#: Most bytes of job arguments put in one JOBS frame.
BATCH_BYTES = 8 << 20
#: put() data for a node on this host, of this user, is written once to shared
#: memory and handed over by name (tests turn it off to test sending the bytes)
HAND_OVER_DATA = True
_END_EVENT = {
    jobstate.Finished: jobstate.FINISH,
    jobstate.Terminated: jobstate.FAIL,
    jobstate.Cancelled: jobstate.CANCEL,
    jobstate.Abandoned: jobstate.ABANDON,
}


def _job_files(paths) -> tuple[list, list]:
    """dispy_job_depends: read the files now; ([[name, mode], ...], [contents, ...])."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    specs, datas = [], []
    for p in paths:
        if not isinstance(p, str | os.PathLike):
            raise SubmitError(f"dispy_job_depends takes file paths, not {type(p).__name__}")
        path = os.fspath(p)
        try:
            with open(path, "rb") as f:
                datas.append(f.read())
            mode = os.stat(path).st_mode & 0o777
        except OSError as exc:
            raise SubmitError(
                f"dispy_job_depends file {path!r} cannot be read: {exc.strerror}; fix the path"
            ) from None
        specs.append([os.path.basename(path), mode])
    return specs, datas


class _Permanent(DispyError):
    """A node that will not work for this cluster however often we try."""


def _parse_nodes(nodes, node_port: int):
    """Turn the ``nodes`` argument into (host, port, allocation) entries for named
    nodes, (wildcard, port, allocation) entries for discovery, and whether a local
    node must be started."""
    if nodes is None:
        env = os.environ.get("DISPY_NODES", "").strip()
        nodes = [n.strip() for n in env.split(",") if n.strip()] if env else ["*"]
    if isinstance(nodes, str | NodeAllocate | DispyNode):
        nodes = [nodes]
    out, patterns, local = [], [], False
    for spec in nodes:
        alloc = None
        if isinstance(spec, NodeAllocate):
            alloc, host, port = spec, spec.host, spec.port or node_port
        elif isinstance(spec, DispyNode):
            host, port = spec.ip_addr, spec.port or node_port
        elif isinstance(spec, str):
            host, port = spec.strip(), node_port
            if host.count(":") == 1:
                host, p = host.split(":")
                try:
                    port = int(p)
                except ValueError:
                    raise ValueError(f"node {spec!r}: port {p!r} is not a number") from None
        else:
            raise TypeError(
                f"nodes entries must be host names, addresses, NodeAllocate or DispyNode, "
                f"not {type(spec).__name__}"
            )
        if not host:
            raise ValueError(f"node {spec!r}: empty host name")
        if host == "local":
            local = True
        elif discovery.is_wildcard(host):
            patterns.append((host, port, alloc))
        else:
            out.append((host, port, alloc))
    return out, patterns, local


class _NodeLink(LinkBase):
    """The client's connection to one node, for one cluster."""

    def __init__(self, engine: _Engine, host: str, port: int, alloc: NodeAllocate | None) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.alloc = alloc
        self.key = (host, port)
        self.node = DispyNode(host, port)
        self.node_cpus = 0  # the CPUs the node says it has
        self.same_host = False  # put() data is handed over by file name
        self._init_link(logger)
        self.failure: str | None = None  # permanent failure, if any
        self._acks: list[int] = []
        self._ack_scheduled = False
        self.setup_done = False
        self.paused = False  # the node is outside its service hours (its pulses say)
        self.was_setup = False  # the computation was set up there: reconnect with RESUME
        self.task: asyncio.Task | None = None

    FILE_CHUNK = 8 << 20

    def _pulse_interval(self) -> float:
        return self.engine.pulse_interval

    def _node_lost(self) -> None:
        self.engine.node_lost(self)

    PERMANENT = (_Permanent, AuthenticationFailed, IncompatibleVersion)

    def _permanent(self, exc: Exception) -> None:
        self.failure = str(exc)
        logger.error("%s", exc)
        self.engine.node_failed(self)

    def _refused_means_dead(self) -> bool:
        return not self.engine.via_scheduler  # a scheduler keeps jobs across its restarts

    async def _session(self) -> None:
        engine = self.engine
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
            raise _Permanent(
                f"node {self.host!r}: unknown host name ({why}); check the spelling, "
                "or give its IP address"
            ) from None
        addr = infos[0][4][0]
        timeout = config.HANDSHAKE_TIMEOUT
        if self.suspect:
            timeout = max(1.0, min(timeout, self.window - (time.monotonic() - self.last_heard)))
        try:
            chan = await transport.connect(
                addr, self.port, engine.key, ssl=engine.ssl, timeout=timeout
            )
        except ssl.SSLError as exc:
            why = exc.reason or str(exc)
            hint = (
                "the node does not speak TLS (drop certfile/cafile, or start it with --certfile)"
                if "WRONG_VERSION" in str(why).upper() or "record layer" in str(exc)
                else "check that client and node certificates come from the same CA"
            )
            raise _Permanent(
                f"TLS with node {self.host}:{self.port} failed ({why}): {hint}"
            ) from None
        except AuthenticationFailed as exc:
            if engine.via_scheduler:
                raise _Permanent(
                    f"authentication with dispyscheduler {self.host}:{self.port} failed ({exc}); "
                    "use its cluster secret: SharedJobCluster(..., secret=...) must match "
                    "dispyscheduler --cluster_secret (by default its node secret)"
                ) from None
            raise _Permanent(
                f"authentication with node {self.host}:{self.port} failed ({exc}); "
                "use the same secret on both sides (JobCluster(..., secret=...) and dispynode -s)"
            ) from None
        except IncompatibleVersion as exc:
            raise _Permanent(f"node {self.host}:{self.port}: {exc}") from None
        self.node.ip_addr = addr
        closed = self._attach(chan)
        info = await self._request(Kind.INFO_REQ, {"pulse": engine.pulse_interval}, Kind.INFO)
        if info.get("relay"):
            logger.info(
                "%s:%s is a dispynetrelay: it relays discovery for its network",
                self.host,
                self.port,
            )
            self._closing = True
            chan.close()
            return
        if not engine.claim(info.get("nid"), self):
            logger.debug("%s:%s is a node this cluster uses already", self.host, self.port)
            self._closing = True
            chan.close()
            return
        cpus = self.node_cpus = field(info, "cpus", int)
        self.node.name = field(info, "name", str)
        if engine.via_scheduler:
            engine.scheduler_nodes(info.get("nodes"))
        self.node.platform = info.get("platform", "")
        self.node.avail_info = _avail(info.get("avail"))
        self.node.update_time = time.time()
        host = info.get("host")  # on this host, as this user: put() data can go by file name
        self.same_host = HAND_OVER_DATA and isinstance(host, str) and host == data_host_id()
        if self.alloc is not None:
            cpus = self.alloc.allocate(
                engine.cluster, addr, self.node.name, cpus, self.node.avail_info, self.node.platform
            )
            if cpus <= 0:
                logger.info("node %s not allocated (NodeAllocate returned %s)", self.key, cpus)
                chan.close()
                self._closing = True
                return
        self.node.cpus = self.node.avail_cpus = cpus
        known = False
        if self.was_setup:  # we had the computation there: what became of it and its jobs?
            known = await self._resume()
        if not known:
            await self._send_computation()
        self.setup_done = self.was_setup = True
        if self._closing:  # closed meanwhile: close() sends CLOSE, then closes the connection
            await closed
            return
        if engine.recover is not None:
            await engine.record_node(self)
        # what put() placed so far, and what it places meanwhile: the node is ready
        # (and put() sends to it itself) only once it has every object
        sent: dict[str, int] = {}
        while todo := [(n, v, s) for n, (v, s) in engine.data.items() if sent.get(n) != v]:
            for name, version, segs in todo:
                await self.put_data(name, version, segs)
                sent[name] = version
        self.ready = True
        engine.node_ready(self)
        await self._serve(chan, closed)

    @property
    def window(self) -> float:
        """Seconds without a connection after which the node is declared dead.  A
        dispyscheduler keeps its clients' jobs across a restart: it gets longer."""
        window = self.engine.pulse_interval * MISSED_PULSES
        if self.engine.via_scheduler:
            window = max(window, config.SCHEDULER_RECONNECT_S)
        return window

    async def _resume(self) -> bool:
        """Reconnected: take the computation over again.  The node answers with the
        jobs it still has (queued or running) and those ended but not acknowledged,
        whose results it sends again right after.  While the node was only suspect,
        its other jobs of ours are lost there (it restarted): they are requeued or
        abandoned now.  True if the computation is still set up there."""
        engine = self.engine
        reply = await self._request(Kind.RESUME, {"c": engine.cid}, Kind.RESUMED)
        on_node = set(field(reply, "jobs", list)) | set(field(reply, "done", list))
        if self.suspect:
            self._end_grace()
            state = engine.sched.nodes.get(self.key)
            lost = [j for j in state.running.values() if j._uid not in on_node] if state else []
            if engine.via_scheduler and reply.get("known"):
                # a restarted dispyscheduler asked its nodes: the jobs it does not list
                # run nowhere (they came just before it stopped): send them again
                engine.jobs_resend(self, lost)
            else:
                engine.jobs_lost(self, lost, "its node restarted while running it")
        logger.info(
            "node %s:%s reconnected: %d job(s) there, computation %s",
            self.host, self.port, len(on_node), "kept" if reply.get("known") else "set up again",
        )  # fmt: skip
        return bool(reply.get("known"))

    async def _send_computation(self) -> None:
        pkg = self.engine.package
        cid = self.engine.cid
        files = list(pkg.files)
        setup_args = b""
        if self.alloc is not None:  # this node's own files and setup arguments
            files += [(os.path.basename(os.fspath(p)), os.fspath(p)) for p in self.alloc.depends]
            if self.alloc.setup_args:
                setup_args = cloudpickle.dumps(tuple(self.alloc.setup_args))
        for rel, path in files:
            await self.send_file(rel, path)
        reply = await self._request(
            Kind.COMPUTE,
            {"c": cid, "n": pkg.name, "sa": len(setup_args), **self.engine.compute_opts},
            Kind.COMPUTE_REPLY,
            [pkg.spec_bytes, setup_args],
        )
        if not reply.get("ok"):
            raise _Permanent(
                f"node {self.node.name} ({self.host}:{self.port}) could not set up the "
                f"computation: {reply.get('r', 'no reason given')}"
            )

    async def send_file(self, rel: str, path: str) -> None:
        """Send a file into the computation's folder on the node, in chunks."""
        mode = os.stat(path).st_mode & 0o777
        await self._send_file(self.engine.cid, self.engine.package.name, rel, path, mode)

    async def put_data(self, name: str, version: int, segs) -> None:
        """Place one cluster.put() object on the node; raises DispyError if refused.

        A node on this host, run by this user, is handed the file the client
        wrote once to shared memory (it links it: no bytes sent, no copy); if it
        cannot take it, the bytes are sent."""
        tag = f"{name}:{version}"
        if self.same_host:
            handed = await self.engine.shm_file(name, version, segs)
            if handed is not None:
                path, size = handed
                reply = await self._request(
                    Kind.DATA,
                    {"c": self.engine.cid, "n": name, "v": version, "f": path, "z": size, "t": tag},
                    Kind.DATA_OK,
                    tag=tag,
                )
                if reply.get("ok"):
                    return
                logger.info("node %s: put() data sent over the connection: %s",
                            self.node.name, reply.get("r"))  # fmt: skip
                self.same_host = False
        lens, flat = join_segments([segs])
        reply = await self._request(
            Kind.DATA,
            {"c": self.engine.cid, "n": name, "v": version, "s": lens, "t": tag},
            Kind.DATA_OK,
            flat,
            tag=tag,
        )
        if not reply.get("ok"):
            raise DispyError(f"node {self.node.name} refused data {name!r}: {reply.get('r')}")

    async def _request(
        self, kind: int, ctl: dict, reply_kind: int, payload=(), tag: str | None = None
    ) -> dict:
        return await self._ask(kind, ctl, (reply_kind, tag) if tag else reply_kind, payload)

    # -- messages from the node -------------------------------------------------
    def on_message(self, msg) -> None:
        self.last_heard = time.monotonic()
        kind = msg.kind
        if kind == Kind.RESULTS:
            self.engine.results(self, msg.ctl, msg.payload)
            return
        if kind == Kind.STATUS:
            if "a" in msg.ctl:
                cpus = msg.ctl.get("cpus")  # a scheduler's CPUs change as its nodes come and go
                if isinstance(cpus, int) and cpus > 0 and cpus != self.node.cpus:
                    self.node.cpus = self.node.avail_cpus = cpus
                    if self.key in self.engine.sched.nodes:
                        self.engine.sched.set_cpus(self.key, cpus)
                        self.engine.dispatch()
                if self.engine.via_scheduler:
                    self.engine.scheduler_nodes(msg.ctl.get("nodes"))
                self._paused(msg.ctl.get("paused"))
                self.node.avail_info = _avail(msg.ctl["a"])
                self.node.update_time = time.time()
                self.engine.cluster._node_status(DispyNode.AvailInfo, self.node)
            else:
                self.engine.provisional(self, msg.ctl, msg.payload)
            return
        if kind == Kind.FILE:
            self.engine.file_from_job(self, msg.ctl, msg.payload)
            return
        key = (kind, msg.ctl.get("t")) if kind == Kind.DATA_OK else kind
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.ctl)
        elif kind == Kind.ERROR:
            logger.warning("node %s: %s", self.node.name, msg.ctl.get("r"))
        elif kind not in (Kind.PONG, Kind.STATUS):
            raise ProtocolError(f"unexpected message kind {kind} from node")

    def _paused(self, why) -> None:
        """The node says it is outside its service hours (``why``), or serves again."""
        self.paused = bool(why)  # (applied when it is added to the scheduler, if not yet)
        node = self.engine.sched.nodes.get(self.key)
        if node is None or node.paused == bool(why):
            return
        self.engine.sched.set_paused(self.key, bool(why))
        if why:
            logger.info("node %s takes no jobs for now: %s", self.node.name, why)
        else:
            logger.info("node %s takes jobs again", self.node.name)
            self.engine.dispatch()

    def ack(self, uid: int) -> None:
        self._acks.append(uid)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_acks)

    def _send_acks(self) -> None:
        self._ack_scheduled = False
        acks, self._acks = self._acks, []
        if self.chan is not None and not self.chan.is_closed:
            for i in range(0, len(acks), IDS_PER_FRAME):
                self.chan.send(Kind.ACK, {"c": self.engine.cid, "j": acks[i : i + IDS_PER_FRAME]})

    # -- jobs to the node ------------------------------------------------------------
    def send_jobs(self, jobs: list) -> None:
        batch, size = [], 0
        for job in jobs:
            batch.append(job)
            size += sum(memoryview(s).nbytes for s in job._segs)
            if size >= BATCH_BYTES or len(batch) >= JOBS_PER_FRAME:
                self._send_batch(batch)
                batch, size = [], 0
        if batch:
            self._send_batch(batch)

    def _send_batch(self, jobs: list) -> None:
        entries = [
            [job._uid, len(job._segs), job._opts] if job._opts else [job._uid, len(job._segs)]
            for job in jobs
        ]
        lens, flat = join_segments(job._segs for job in jobs)
        try:
            self.chan.send(Kind.JOBS, {"c": self.engine.cid, "j": entries, "s": lens}, flat)
        except ConnectionClosed:
            pass  # the loss handler requeues or abandons them

    @property
    def limited(self) -> bool:
        """Given fewer CPUs than the node has (NodeAllocate, set_node_cpus): at most
        that many of this cluster's jobs are on the node at once, so it never runs more."""
        if self.engine.via_scheduler:  # its CPUs come and go with its nodes
            return False
        return 0 < self.node.cpus < (self.node_cpus or 0)

    def cancel(self, job) -> None:
        if self.chan is not None and not self.chan.is_closed:
            self.chan.send(Kind.CANCEL, {"c": self.engine.cid, "j": [job._uid]})

    def _lost(self) -> None:
        self._fail_waiters()
        if self.chan is not None:
            self.node.tx += self.chan.bytes_sent
            self.node.rx += self.chan.bytes_received
            self.chan.abort()
            self.chan = None
        self.setup_done = False
        if self.ready:
            self.ready = False
            if self._suspend(self.window, self._closing):  # its jobs stay put meanwhile
                self.engine.sched.set_ready(self.key, False)
            else:
                self.engine.node_lost(self)

    async def close_computation(self, terminate: bool) -> None:
        """Close the computation on the node (cleanup runs there); keep the connection."""
        chan = self.chan
        # also while the computation is being set up there (or set up again after a
        # restart of the node): a connection that ends without CLOSE leaves it running
        if chan is not None and not chan.is_closed:
            self.engine.sched.set_ready(self.key, False)
            try:
                await asyncio.wait_for(
                    self._request(Kind.CLOSE, {"c": self.engine.cid, "t": terminate}, Kind.CLOSED),
                    None if not terminate else 30,
                )
            except (ConnectionClosed, TimeoutError) as exc:
                logger.debug("closing computation on %s: %s", self.key, exc)

    async def resetup(self) -> None:
        """Close the computation on the node and set it up again (setup runs again)."""
        await self.close_computation(terminate=False)
        if self.chan is None or self.chan.is_closed:
            raise ConnectionClosed(f"node {self.host}:{self.port} is not connected")
        await self._send_computation()
        self.engine.sched.add_node(self.key, self.node.cpus, self.limited)
        self.engine.sched.set_paused(self.key, self.paused)
        self.engine.dispatch()

    async def close(self, terminate: bool) -> None:
        self._closing = True
        if self.suspect:
            self._declare_dead("the cluster is closing")
        await self.close_computation(terminate)
        if self.chan is not None:
            self.node.tx += self.chan.bytes_sent
            self.node.rx += self.chan.bytes_received
            self.chan.close()
            await self.chan.wait_closed()
            self.chan = None
        if self.task is not None:
            self.task.cancel()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _avail(d) -> DispyNodeAvailInfo | None:
    if not isinstance(d, dict):
        return None
    return DispyNodeAvailInfo(
        d.get("cpu", 0.0), d.get("memory", 0), d.get("disk", 0), d.get("swap", 0.0)
    )


class _Engine:
    """The cluster's state on the loop thread: scheduler, node links, live jobs."""

    def __init__(
        self, cluster: JobCluster, package, key: bytes, specs, reentrant: bool, patterns=()
    ) -> None:
        self.cluster = cluster
        self.package = package
        self.key = key
        self.cid = uuid.uuid4().hex
        self.specs = specs
        self.patterns = list(patterns)
        self.finder: NodeFinder | None = None
        self.recover: RecoverFile | None = None  # jobs sent to nodes, for recover_jobs()
        self.compute_opts: dict = {}  # extra COMPUTE fields (SharedJobCluster's, for the scheduler)
        #: a SharedJobCluster's view of the nodes behind its scheduler, by (ip, port)
        self.behind: dict[tuple, DispyNode] = {}
        self.nids: dict[str, tuple] = {}  # node run id -> link key: one link per node
        self.sched = Scheduler(reentrant=reentrant, report_started=True)
        self.links: dict[tuple, _NodeLink] = {}
        self.live: dict[int, DispyJob] = {}
        self.writes: dict[int, set] = {}  # files jobs sent, being written
        self.data: dict[str, tuple[int, list]] = {}  # cluster.put(): name -> (version, segments)
        #: put() data written to shared memory for nodes on this host: name -> (version, task)
        self.shm_files: dict[str, tuple[int, asyncio.Task]] = {}
        self.fatal: str | None = None
        self.pulse_interval = cluster._pulse_interval
        self.ssl = cluster._ssl

    async def start(self) -> None:
        self.add_links(self.specs)
        if self.patterns:
            await self.discover(self.patterns, self.specs)
        elif self.links:  # hear named nodes that start later
            try:
                await self.discover([], self.specs)
            except OSError as exc:
                logger.debug("not listening for node announcements: %s", exc)
        if not self.links and not self.patterns:
            self.fatal = "no nodes to use: give nodes=[...] names or addresses, or nodes='local'"
            logger.error("%s", self.fatal)

    async def discover(self, patterns, specs) -> None:
        """Look for nodes matching ``patterns``; ask the named hosts in ``specs`` too
        (relays answer for their networks).  With no patterns, only listen: a
        named node that starts later announces itself, and its link connects then."""
        c = self.cluster
        if self.finder is None:
            self.finder = NodeFinder(
                self.key,
                self.discovered,
                on_heard=self.heard,
                ip_addrs=c._ip_addrs,
                client_port=c._client_port,
                ext_ip_addr=c._ext_ip_addr,
                ping_interval=c._ping_interval,
                multicast=c._multicast,
            )
            await self.finder.start()
        self.finder.add(list(patterns), [(h, p) for h, p, _ in specs])
        if patterns:
            self.fatal = None

    @property
    def via_scheduler(self) -> bool:
        """A SharedJobCluster's engine: its one "node" is a dispyscheduler."""
        return bool(self.compute_opts)

    def discovered(self, ip: str, port: int, nid: str, alloc) -> None:
        """Discovery found a node matching a wildcard: link to it unless linked already."""
        if nid in self.nids and self.nids[nid] in self.links:
            return
        for link in self.links.values():
            if link.port == port and ip in (link.host, link.node.ip_addr):
                return
        logger.info("discovered node %s:%s", ip, port)
        self.add_links([(ip, port, alloc)])

    def heard(self, ip: str, port: int) -> None:
        """A node announced itself: a link waiting to reconnect to it tries now."""
        for link in self.links.values():
            if link.port == port and ip in (link.host, link.node.ip_addr) and link.chan is None:
                link.wake()

    def claim(self, nid, link: _NodeLink) -> bool:
        """A link learned its node's run id: False if another live link has that node."""
        if not isinstance(nid, str):
            return True
        other = self.nids.get(nid)
        if other is not None and other != link.key and other in self.links:
            olink = self.links[other]
            if olink.failure is None and not olink._closing:
                return False
        self.nids[nid] = link.key
        return True

    def add_links(self, specs) -> int:
        added = 0
        for host, port, alloc in specs:
            link = _NodeLink(self, host, port, alloc)
            if link.key in self.links and self.links[link.key].failure is None:
                continue
            self.links[link.key] = link
            link.task = asyncio.get_running_loop().create_task(link.run())
            added += 1
        if added:
            self.fatal = None
        return added

    async def shm_file(self, name: str, version: int, segs) -> tuple[str, int] | None:
        """(path, size) of put() data written once to this process's shared-memory
        folder, for nodes on this host to link; None if it cannot be written."""
        have = self.shm_files.get(name)
        if have is None or have[0] != version:
            old = have[1] if have is not None else None
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._write_shm, name, version, segs, old)
            )
            self.shm_files[name] = (version, task)
            have = (version, task)
        return await asyncio.shield(have[1])

    def _write_shm(self, name: str, version: int, segs, old) -> tuple[str, int] | None:
        folder = data_client_shm_folder()
        if folder is None:
            return None
        path = data_path(folder, f"{self.cid}-{name}", version)
        try:
            data_write(path, segs)
            size = os.stat(path).st_size
        except OSError as exc:  # full: nodes get the bytes
            logger.info("put() data %r not written to shared memory: %s", name, exc)
            return None
        if old is not None and (written := _written(old)) is not None:
            _unlink_quietly(written[0])  # nodes keep their own links to it
        return path, size

    def drop_shm_files(self) -> None:
        for _version, task in self.shm_files.values():
            if (written := _written(task)) is not None:
                _unlink_quietly(written[0])
        self.shm_files.clear()

    async def put(self, name: str, version: int, segs) -> list[str]:
        """Place data on every set-up node (nodes set up later get it then)."""
        self.data[name] = (version, segs)
        if data_host_id() is not None and any(_on_this_host(lk.host) for lk in self.links.values()):
            # a node here gets the file by name: write it now, while nodes set up
            spawn(self.shm_file(name, version, segs), f"writing put() data {name!r}")
        # (links still setting up send engine.data themselves before they are ready)
        links = [lk for lk in self.links.values() if lk.ready and lk.chan is not None]
        results = await asyncio.gather(
            *(lk.put_data(name, version, segs) for lk in links), return_exceptions=True
        )
        return [f"{lk.key}: {r}" for lk, r in zip(links, results, strict=True) if r is not None]

    # -- submissions -----------------------------------------------------------
    def take(self, jobs: list) -> None:
        for job in jobs:
            if self.fatal is not None:
                self._abandon(job, self.fatal)
                continue
            self.live[job._uid] = job
            if not self.sched.submit(job, job._pinned):
                self.live.pop(job._uid, None)
                self._abandon(job, f"node {job._pinned} is not set up for this cluster")
        self.dispatch()

    def dispatch(self) -> None:
        for node, batch in self.sched.assign():
            link = self.links[node.key]
            for job in batch:
                job.ip_addr = link.node.ip_addr
            if self.recover is not None:
                where = f"{link.node.ip_addr}:{link.port}"
                try:
                    self.recover.add_jobs(
                        (job._uid, functools.partial(job_blob, job, where)) for job in batch
                    )
                except DispyError as exc:
                    logger.error("recover file: %s", exc)
            link.send_jobs(batch)
        self._report_started()

    def _report_started(self) -> None:
        """Jobs that a CPU of their node is free for now: Running, from now (the
        node's own start time replaces it with the result)."""
        started = self.sched.take_started()
        if not started:
            return
        now = time.time()
        for job in started:
            job.start_time = now
            link = self.links.get(job._node)
            node = link.node if link is not None else None
            if node is not None:
                node.busy = self.sched.nodes[link.key].busy()
            self.cluster._status_changed(job, node)

    def cancel(self, job: DispyJob) -> None:
        if self.sched.cancel_queued(job):
            job.exception = "cancelled before it started"
            self._complete(job, None)
            return
        link = self.links.get(job._node)
        if self.sched.cancel_sent(job):  # on its node, not started: it never will
            job.exception = "cancelled before it started"
            if link is not None:
                link.cancel(job)
            self._complete(job, None)
            self._report_started()
            return
        if link is not None and job.status in (jobstate.Running, jobstate.ProvisionalResult):
            link.cancel(job)

    # -- results ---------------------------------------------------------------------
    def results(self, link: _NodeLink, ctl: dict, payload) -> None:
        node = link.node
        for entry, part in result_entries(ctl, payload):
            uid = field(entry, "j", int)
            link.ack(uid)
            job = self.live.get(uid)
            if job is None:
                logger.debug("result for job %s that already ended; ignored", uid)
                self.sched.release(link.key, uid)
                continue
            st = field(entry, "st", int)
            if st == jobstate.Created:  # handed back unstarted (its computation closed there)
                if self.sched.requeue(job):
                    self.cluster._status_changed(job, node)
                elif job.status == jobstate.Abandoned:
                    job.exception = "its node closed before the job started"
                    self._complete(job, node)
                continue
            event = _END_EVENT.get(st)
            if event is None:
                raise ProtocolError(f"unknown job status {st}")
            result, exc_text = None, entry.get("x")
            if st == jobstate.Finished:
                try:
                    result = serialize.loads(part)
                except Exception as exc:
                    event = jobstate.FAIL
                    exc_text = (
                        f"the job's result cannot be unpickled on the client: {exc} "
                        "(its class must be importable here)"
                    )
            elsewhere = job._node
            if not self.sched.ended(job, event):
                logger.debug("late result for job %s ignored", uid)
                continue
            if elsewhere is not None and elsewhere != link.key and elsewhere in self.links:
                # a late result from a node declared dead: the rerun is not needed
                logger.debug(
                    "job %s ended on %s; its rerun on %s is cancelled", uid, link, elsewhere
                )
                self.links[elsewhere].cancel(job)
            job.result = result
            job.exception = exc_text
            job.stdout = entry.get("o", "")
            job.stderr = entry.get("e", "")
            t0, t1 = entry.get("t0"), entry.get("t1")
            if t0:
                job.start_time = t0
            job.end_time = t1 or time.time()
            # through a dispyscheduler: the node that ran it (the entry says)
            ip = entry.get("ip")
            job.ip_addr = ip if isinstance(ip, str) and ip else node.ip_addr
            node.jobs_done += 1
            if t0 and t1:
                node.cpu_time += t1 - t0
            self._finish(job, node)
        node.busy = self.sched.nodes[link.key].busy() if link.key in self.sched.nodes else 0
        self.dispatch()

    def provisional(self, link: _NodeLink, ctl: dict, payload) -> None:
        uid = field(ctl, "j", int)
        job = self.live.get(uid)
        if job is None:
            return
        try:
            value = serialize.loads(split_segments(payload, field(ctl, "s", list)))
        except Exception as exc:
            logger.error("provisional result of job %s cannot be unpickled: %s", job.id, exc)
            return
        try:
            job.status = jobstate.next_status(job.status, jobstate.PROVISIONAL)
        except jobstate.InvalidTransition:
            return
        job.result = value
        self.cluster._provisional(job, link.node)

    def file_from_job(self, link: _NodeLink, ctl: dict, payload) -> None:
        """A job's dispy_send_file: write it under the cluster's folder, off the loop."""
        uid = field(ctl, "j", int)
        rel = field(ctl, "p", str)
        mode = field(ctl, "m", int, default=0o644) & 0o777
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm.startswith("..") or "\0" in rel:
            logger.warning("node %s sent a file with a bad path %r; ignored", link.node.name, rel)
            return
        if len(payload) > self.cluster.max_file_size:
            logger.warning(
                "file %r from job %s (%d bytes) exceeds max_file_size; ignored",
                rel,
                uid,
                len(payload),
            )
            return
        dest = os.path.join(self.cluster.dest_path, norm)
        # confined to dest_path: no symlink there (or on the way) is followed out of it
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(write_chunk, self.cluster.dest_path, norm, 0, bytes(payload), mode)
        )
        self.writes.setdefault(uid, set()).add(task)

        def done(t: asyncio.Task) -> None:
            pending = self.writes.get(uid)
            if pending is not None:
                pending.discard(t)
                if not pending:
                    del self.writes[uid]
            if not t.cancelled() and t.exception() is not None:
                logger.error("cannot write file %r sent by job %s: %s", dest, uid, t.exception())

        task.add_done_callback(done)

    def _finish(self, job: DispyJob, node) -> None:
        """Complete a job once the files it sent are written."""
        pending = self.writes.get(job._uid)
        if not pending:
            self._complete(job, node)
            return

        tasks = list(pending)  # the set empties as the writes finish

        async def later() -> None:
            await asyncio.wait(tasks)
            self._complete(job, node)

        spawn(later(), f"completing job {job.id!r} once its files are written")

    def _complete(self, job: DispyJob, node) -> None:
        """The job's one end: resolve its future, count it, queue its callbacks."""
        if job._end.is_set():
            return
        self.live.pop(job._uid, None)
        if self.recover is not None:
            self.recover.jobs_done((job._uid,))
        job._segs = None
        self.cluster._job_ended(job, node)  # counts first: job() returns after them
        job._ended()

    def _abandon(self, job: DispyJob, reason: str) -> None:
        if job.status not in jobstate.TERMINAL:
            job.status = jobstate.next_status(job.status, jobstate.ABANDON)
        job.exception = reason
        job.end_time = time.time()
        self._complete(job, None)

    # -- nodes -----------------------------------------------------------------------
    async def record_node(self, link: _NodeLink) -> None:
        """Name ``link``'s node in the recover file, committed, before any job goes
        there: ``recover_jobs`` asks every node named there for all the jobs it
        has of this computation, so a job sent just before a crash, not yet
        written itself, is still collected."""
        nodes = set(self.recover.meta.get("nodes") or ())
        nodes.add(f"{link.node.ip_addr}:{link.port}")
        try:
            self.recover.set_meta("nodes", sorted(nodes))
            await asyncio.to_thread(self.recover.flush)
        except DispyError as exc:
            logger.error("recover file: %s", exc)

    def scheduler_nodes(self, rows) -> None:
        """The scheduler's list of its nodes (its INFO and pulses): kept for status()."""
        if not isinstance(rows, list):
            return
        seen = {}
        now = time.time()
        for row in rows:
            if not isinstance(row, dict):
                continue
            ip, port = row.get("ip"), row.get("port")
            if not isinstance(ip, str) or not isinstance(port, int) or isinstance(port, bool):
                continue
            node = self.behind.get((ip, port)) or DispyNode(ip, port)
            for attr, key in (("cpus", "cpus"), ("busy", "busy"), ("jobs_done", "done")):
                value = row.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(node, attr, value)
            name = row.get("name")
            if isinstance(name, str) and name:
                node.name = name
            node.avail_cpus = node.cpus
            node.update_time = now
            seen[(ip, port)] = node
        self.behind = seen

    def node_ready(self, link: _NodeLink) -> None:
        self.sched.add_node(link.key, link.node.cpus, link.limited)
        self.sched.set_paused(link.key, link.paused)  # told before it was ready
        logger.info("node %s (%s) ready with %d CPUs", link.node.name, link.key, link.node.cpus)
        self.cluster._node_status(DispyNode.Initialized, link.node)
        self.dispatch()

    def jobs_resend(self, link: _NodeLink, jobs: list) -> None:
        """Jobs a restarted scheduler never got: queue them again, first."""
        for job in jobs:
            if self.sched.requeue(job):
                self.cluster._status_changed(job, link.node)
        self.dispatch()

    def jobs_lost(self, link: _NodeLink, jobs: list, why: str) -> None:
        """Jobs a node no longer has (it restarted): requeue or abandon them."""
        for job, status in self.sched.lose_jobs(link.key, jobs):
            if status == jobstate.Abandoned:
                job.exception = f"node {link.node.name} ({link.host}:{link.port}): {why}"
                job.end_time = time.time()
                self._complete(job, link.node)
            else:
                self.cluster._status_changed(job, link.node)
        self.dispatch()

    def node_lost(self, link: _NodeLink) -> None:
        for job, status in self.sched.remove_node(link.key):
            if status == jobstate.Abandoned:
                job.exception = (
                    f"node {link.node.name} ({link.host}:{link.port}) was lost while running "
                    "the job (use reentrant=True to run such jobs again elsewhere)"
                )
                job.end_time = time.time()
                self._complete(job, link.node)
        self.cluster._node_status(DispyNode.Closed, link.node)
        self.dispatch()

    def node_failed(self, link: _NodeLink) -> None:
        if all(lk.failure is not None for lk in self.links.values()):
            reasons = "; ".join(lk.failure for lk in self.links.values())
            self.fatal = f"no node can run this cluster's jobs: {reasons}"
            for job in self.sched.abandon_all():
                job.exception = self.fatal
                job.end_time = time.time()
                self._complete(job, None)

    async def close(self, terminate: bool) -> None:
        if self.finder is not None:
            self.finder.close()
        await asyncio.gather(*(lk.close(terminate) for lk in self.links.values()))
        self.drop_shm_files()
        for job in list(self.live.values()):
            event = jobstate.CANCEL if job.status == jobstate.Created else jobstate.ABANDON
            job.status = jobstate.next_status(job.status, event)
            job.exception = "the cluster was closed before the job ended"
            self._complete(job, None)


def _on_this_host(host: str) -> bool:
    """Whether ``host`` (as given in nodes=) is a loopback address or one of this host's."""
    if host == "localhost" or host.startswith("127."):
        return True
    return host in {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}


def _written(task: asyncio.Task) -> tuple[str, int] | None:
    """What a finished shared-memory write gave (None if unfinished or failed)."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


#: Seconds between redraws of a progress line.
PROGRESS_REFRESH = 0.2


class _Progress:
    """One line on stderr: a bar, done/total, failed, running, jobs per second."""

    def __init__(self, cluster: JobCluster, stream=None) -> None:
        self.cluster = cluster
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.start = cluster.counts()["ended"]

    def draw(self, final: bool = False) -> None:
        c = self.cluster.counts()
        total = max(c["submitted"], 1)
        width = 30
        fill = int(width * c["ended"] / total)
        rate = (c["ended"] - self.start) / max(time.monotonic() - self.t0, 1e-9)
        line = (
            f"\r[{'#' * fill}{'.' * (width - fill)}] {c['ended']}/{c['submitted']} done, "
            f"{c['failed']} failed, {c['running']} running, {rate:.1f} jobs/s"
        )
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


class JobCluster:
    """Run ``computation`` (a function, or the path of a program) on nodes.

    ``nodes``: names or addresses of ``dispynode`` hosts (``'host'`` or
    ``'host:port'``), ``NodeAllocate`` objects, or ``'local'`` to start a
    node on this machine.  Default: the ``DISPY_NODES`` environment
    variable (comma separated), else ``['*']``.

    ``depends``: classes, functions, modules and file paths the computation
    needs; sent once per node.  ``setup`` runs once per node before any job
    (its globals are seen by the jobs), ``cleanup`` when the cluster closes.
    ``secret`` must match the nodes' secret; without one, ``$DISPY_SECRET``,
    ``$DISPY_SECRET_FILE`` or the per-user key file is used (see
    ``dispy.keys``), as dispynode does.  ``insecure=True`` talks to nodes
    started with ``--insecure`` (no authentication).  ``poll_interval``
    (dispy's seconds between polls of the nodes for results) is accepted and
    checked, and needs nothing more: nodes send results as jobs end, and a
    node that falls silent is noticed by its missing pulses
    (``pulse_interval``).

    Raises ``ComputationError`` if the computation or a dependency cannot be
    sent (a missing file, say), with the reason.
    """

    def __init__(
        self,
        computation,
        nodes=None,
        depends=(),
        job_status=None,
        cluster_status=None,
        ip_addr=None,
        port=None,
        node_port=None,
        ext_ip_addr=None,
        ipv4_udp_multicast=False,
        dest_path=None,
        loglevel=None,
        setup=None,
        cleanup=True,
        ping_interval=None,
        pulse_interval=None,
        poll_interval=None,
        reentrant=False,
        secret="",
        keyfile=None,
        certfile=None,
        recover_file=None,
        callback=None,
        job_timeout=None,
        max_file_size=0,
        insecure=False,
        cafile=None,
        host=None,
        ext_host=None,
        dispy_port=None,
    ) -> None:
        # dispy 4.15's names for the same options
        ip_addr = _either("ip_addr", ip_addr, "host", host)
        ext_ip_addr = _either("ext_ip_addr", ext_ip_addr, "ext_host", ext_host)
        if dispy_port is not None:  # dispy's base port: the client's; the node's is next
            port = _either("port", port, "dispy_port", int(dispy_port))
            node_port = node_port or int(dispy_port) + 1
        if loglevel is not None:
            logger.setLevel(loglevel)
        if setup is not None and not callable(setup):
            raise ComputationError("setup must be a function or functools.partial")
        if cleanup is not None and not isinstance(cleanup, bool) and not callable(cleanup):
            raise ComputationError("cleanup must be a function, functools.partial or a bool")
        self._callback = callback or job_status
        self._cluster_status = cluster_status
        self.dest_path = os.path.abspath(dest_path or os.getcwd())
        self.max_file_size = max_file_size or (1 << 40)
        self._job_timeout = job_timeout
        self._pulse_interval = float(pulse_interval or DEFAULT_PULSE_INTERVAL)
        if self._pulse_interval <= 0:
            raise ValueError("pulse_interval must be a positive number of seconds")
        self.name = getattr(computation, "__name__", None) or os.path.basename(str(computation))
        package = serialize.package_computation(computation, depends, setup, cleanup)
        self._node_port = node_port or config.NODE_PORT
        self._ssl = client_context(certfile, keyfile, cafile)
        self._ip_addrs = [ip_addr] if isinstance(ip_addr, str) else list(ip_addr or [])
        self._ext_ip_addr = ext_ip_addr[0] if isinstance(ext_ip_addr, list | tuple) else ext_ip_addr
        self._client_port = port or config.CLIENT_PORT
        self._ping_interval = float(ping_interval) if ping_interval else None
        self._multicast = bool(ipv4_udp_multicast)
        if poll_interval is not None and (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, int | float)
            or not poll_interval > 0
        ):
            raise ValueError("poll_interval must be None or a positive number of seconds")
        # (dispy polled nodes for results every poll_interval s; here nodes send them
        # as jobs end and a silent node is noticed by its missing pulses, so there is
        # nothing to poll: the argument is checked and needs no other effect)
        specs, patterns, want_local = _parse_nodes(nodes, node_port or config.NODE_PORT)
        self._local: LocalNode | None = None
        if want_local and not specs and not patterns and not secret and not insecure:
            secret = None  # only our own node: a fresh random secret, no key file needed
        else:
            secret, source = resolve_secret(secret, insecure)
            logger.debug("cluster %s authenticates with the secret from %s", self.name, source)
        if want_local:
            extra = ["--insecure"] if insecure else []
            if certfile:  # our own node uses the same certificate (dispy's convention)
                extra += ["--certfile", os.path.abspath(certfile)]
                extra += ["--keyfile", os.path.abspath(keyfile)] if keyfile else []
                extra += ["--cafile", os.path.abspath(cafile)] if cafile else []
            self._local = LocalNode(secret=secret, extra_args=extra).start()
            secret = self._local.secret
            specs.append(("127.0.0.1", self._local.port, None))
        self._key = derive_key(secret)
        self._lock = threading.Lock()
        self._incoming: collections.deque = collections.deque()
        self._wake_scheduled = False
        self._done_cond = threading.Condition()
        self._end_cond = threading.Condition()  # every job's end (DispyJob.finish) waits on it
        self._unfinished = 0
        self._submitted = self._ended = self._failed = 0
        self._data_versions: dict[str, int] = {}
        #: the last jobs that did not finish (Terminated, Cancelled, Abandoned), newest last
        self.recent_failures: collections.deque = collections.deque(maxlen=50)
        self._closed = False
        self._start_time = time.time()
        self._cb_queue: queue.SimpleQueue | None = None
        self._cb_thread: threading.Thread | None = None
        if self._callback is not None or self._cluster_status is not None:
            self._cb_queue = queue.SimpleQueue()
            self._cb_thread = threading.Thread(
                target=self._run_callbacks, name=f"dispy-callbacks-{self.name}", daemon=True
            )
            self._cb_thread.start()
        self._engine = _Engine(self, package, self._key, specs, reentrant, patterns)
        self._engine_created(self._engine)
        #: the recover file's path (None: not kept, e.g. for nodes='local' only)
        self.recover_file = None
        if recover_file is not False and (specs or patterns):
            self.recover_file = os.path.abspath(
                recover_file or _default_recover_path(self._engine.cid)
            )
            self._engine.recover = RecoverFile.create(
                self.recover_file,
                {
                    "cid": self._engine.cid,
                    "name": self.name,
                    "key": self._key,  # derived from the secret; never the secret itself
                    "nodes": [],
                    "created": time.time(),
                    "certfile": os.path.abspath(certfile) if certfile else None,
                    "keyfile": os.path.abspath(keyfile) if keyfile else None,
                    "cafile": os.path.abspath(cafile) if cafile else None,
                },
            )
        self._loop = _loop.get_loop()
        _loop.run(self._engine.start()).result()
        _open_clusters.add(self)

    def _engine_created(self, engine: _Engine) -> None:
        """A hook for subclasses (SharedJobCluster), before any node is contacted."""

    # -- jobs ------------------------------------------------------------------------
    def submit(self, *args, **kwargs) -> DispyJob:
        """Queue a job running ``computation(*args, **kwargs)``; return its DispyJob.

        Raises ``SubmitError`` if the arguments cannot be pickled or the
        cluster is closed.
        """
        return self._submit(None, args, kwargs)

    def submit_node(self, node, *args, **kwargs) -> DispyJob | None:
        """Like ``submit``, but run the job on ``node`` (a DispyNode or host string).

        Returns None (and logs why) if that node is not set up for this cluster.
        """
        key = self._node_key(node)
        if key is None:
            logger.warning("submit_node: node %r is not a node of this cluster", node)
            return None
        return self._submit(key, args, kwargs)

    def put(self, obj, name: str | None = None) -> NodeData:
        """Place ``obj`` once on every node of the cluster (and on nodes that join
        later); return a small handle to pass to jobs, whose ``get()`` on the node
        gives the object.  numpy arrays in it are read-only views of one copy per
        node that all its job processes share.  A later put() with the same
        ``name`` replaces it.  Blocks until the nodes have it; nodes that could
        not take it are logged."""
        if self._closed:
            raise SubmitError("cluster is closed")
        name = check_name(name) if name is not None else uuid.uuid4().hex
        version = self._data_versions.get(name, 0) + 1
        self._data_versions[name] = version
        try:
            segs = serialize.dumps(obj)
        except Exception as exc:
            raise SubmitError(f"put(): the object cannot be pickled: {exc}") from exc
        for key in [k for k in data_local if k[0] == name]:
            del data_local[key]
        data_local[(name, version)] = obj
        for failure in self._on_loop(self._engine.put, name, version, segs):
            logger.error("put(%r) did not reach node %s", name, failure)
        return NodeData(name, version)

    def submit_job_id(self, job_id, *args, **kwargs) -> DispyJob:
        """Like ``submit``, with ``job.id`` set before the job can run (so callbacks see it)."""
        return self._submit(None, args, kwargs, job_id)

    def submit_job_id_node(self, job_id, node, *args, **kwargs) -> DispyJob | None:
        """``submit_node`` with ``job.id`` set before the job can run (dispy's name)."""
        key = self._node_key(node)
        if key is None:
            logger.warning("submit_job_id_node: node %r is not a node of this cluster", node)
            return None
        return self._submit(key, args, kwargs, job_id)

    def _node_key(self, node):
        """The link key of ``node`` (DispyNode, 'host', 'host:port', name); None if unknown
        or ambiguous (several nodes match)."""
        if isinstance(node, DispyNode):
            key = (node.ip_addr, node.port)
            if key in self._engine.links:
                return key
            host = node.ip_addr
        else:
            host = str(node)
        matches = [
            key
            for key, link in list(self._engine.links.items())
            if host == f"{key[0]}:{key[1]}" or host == f"{link.node.ip_addr}:{key[1]}"
        ]
        if not matches:
            matches = [
                key
                for key, link in list(self._engine.links.items())
                if host in (link.host, link.node.ip_addr, link.node.name)
            ]
        return matches[0] if len(matches) == 1 else None

    def _link(self, node) -> _NodeLink | None:
        key = self._node_key(node)
        return self._engine.links.get(key) if key is not None else None

    def _on_loop(self, fn, *args):
        """Run ``fn(*args)`` (a coroutine function or plain) on the loop; return its result."""

        async def call():
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        return _loop.run(call()).result()

    # -- node control ----------------------------------------------------------------
    def allocate_node(self, node) -> int:
        """Add a node (name, address, 'host:port', NodeAllocate, or a list) to the
        cluster while it runs; returns how many were added."""
        specs, patterns, local = _parse_nodes(
            node if isinstance(node, list) else [node], self._node_port
        )
        if local:
            raise ValueError("allocate_node('local') is not supported; use nodes='local'")
        added = self._on_loop(self._engine.add_links, specs)
        if patterns:
            self._on_loop(self._engine.discover, patterns, [])
        return added

    def discover_nodes(self, nodes) -> None:
        """Look for nodes now: names or addresses (contacted directly; relays pass the
        request on) and wildcards such as ``'192.168.2.*'`` (broadcast)."""
        specs, patterns, local = _parse_nodes(
            nodes if isinstance(nodes, list) else [nodes], self._node_port
        )
        if local:
            raise ValueError("discover_nodes('local') is not supported; use nodes='local'")
        self._on_loop(self._engine.add_links, specs)
        if patterns:
            self._on_loop(self._engine.discover, patterns, specs)

    def deallocate_node(self, node) -> int:
        """Stop giving new jobs to ``node`` (running jobs go on); 0, or -1 if unknown."""
        key = self._node_key(node)
        if key is None:
            return -1
        self._on_loop(self._engine.sched.set_ready, key, False)
        return 0

    def close_node(self, node, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` and stop using it.  Its jobs that had
        not started run elsewhere; running ones finish first, or with
        ``terminate_pending`` are stopped.  Returns 0, or -1 if unknown."""
        link = self._link(node)
        if link is None:
            return -1
        self._on_loop(link.close, terminate_pending)
        return 0

    def resetup_node(self, node) -> int:
        """Run the computation's setup on ``node`` again (after its running jobs end)."""
        link = self._link(node)
        if link is None or not link.ready:
            return -1
        try:
            self._on_loop(link.resetup)
        except DispyError as exc:
            logger.error("resetup of node %s failed: %s", link.key, exc)
            return -1
        return 0

    def node_jobs(self, node, from_node: bool = False) -> list:
        """Jobs of this cluster that are running (or sent) on ``node``."""
        key = self._node_key(node)
        if key is None:
            return []

        def jobs():
            state = self._engine.sched.nodes.get(key)
            return list(state.running.values()) if state else []

        return self._on_loop(jobs)

    def set_node_cpus(self, node, cpus: int) -> int:
        """Use ``cpus`` CPUs of ``node`` (negative: all but that many); returns the
        number now used, or -1 if the node is unknown."""
        link = self._link(node)
        if link is None:
            return -1
        total = link.node_cpus or link.node.avail_cpus or link.node.cpus
        n = max(0, total + cpus) if cpus < 0 else min(cpus, total) if total else cpus

        def apply():
            link.node.cpus = n
            if link.key in self._engine.sched.nodes:
                self._engine.sched.set_cpus(link.key, n, link.limited)
            self._engine.dispatch()

        self._on_loop(apply)
        return n

    def send_file(self, path, node) -> int:
        """Send the file at ``path`` into the computation's folder on ``node``.

        Returns 0, or -1 (with the reason logged) if the file or node is missing."""
        link = self._link(node)
        if link is None or not link.ready:
            logger.error("send_file: %r is not a node set up for this cluster", node)
            return -1
        path = os.fspath(path)
        if not os.path.isfile(path):
            logger.error("send_file: %r is not a file", path)
            return -1
        self._on_loop(link.send_file, os.path.basename(path), path)
        return 0

    def _submit(self, node_key, args, kwargs, job_id=None, more_opts=None) -> DispyJob:
        if self._closed:
            raise SubmitError("cluster is closed: create a new JobCluster to submit jobs")
        job_files = kwargs.pop("dispy_job_depends", None) or ()
        timeout = kwargs.pop("dispy_job_timeout", None) or self._job_timeout
        opts: dict = {}
        file_segs: list = []
        if timeout:
            if not isinstance(timeout, int | float) or timeout <= 0:
                raise SubmitError(f"dispy_job_timeout must be a positive number, not {timeout!r}")
            opts["t"] = float(timeout)
        if job_files:
            opts["f"], file_segs = _job_files(job_files)
        if more_opts:
            opts.update(more_opts)
        segs = file_segs + serialize.dumps_args(args, kwargs)
        job = DispyJob(args, kwargs, segs, self)
        if job_id is not None:
            job.id = job_id
        job._pinned = node_key
        job._opts = opts or None
        job.submit_time = time.time()
        with self._done_cond:
            self._unfinished += 1
            self._submitted += 1
        with self._lock:
            self._incoming.append(job)
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            self._loop.call_soon_threadsafe(self._wake)
        return job

    def _wake(self) -> None:
        with self._lock:
            jobs = list(self._incoming)
            self._incoming.clear()
            self._wake_scheduled = False
        self._engine.take(jobs)

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: a queued job ends Cancelled at once, a running one is
        terminated on its node.  Returns 0, or -1 if the job already ended."""
        if job.status in jobstate.TERMINAL:
            return -1
        self._loop.call_soon_threadsafe(self._engine.cancel, job)
        return 0

    def map(
        self,
        iterable,
        max_pending: int | None = None,
        ordered: bool = True,
        star: bool = False,
        progress: bool | None = False,
        chunksize: int = 1,
    ):
        """Run the computation on each item of ``iterable``, lazily: at most
        ``max_pending`` jobs are in flight at once (default 2 x the cluster's
        CPUs, at least 16), so an endless iterable uses bounded memory.

        Yields results in input order (``ordered=False``: as jobs end).  Each
        item is one argument, or (``star=True``) a tuple of arguments.  A job
        that does not finish raises ``JobFailed`` (with ``.job``).  ``progress``:
        as for ``wait``.  ``chunksize=N`` (as in ``concurrent.futures``): each
        job runs the computation on N items in turn and returns their results
        together, for items too small to be worth a job each; a failing item
        fails its whole chunk (the error says which item).
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer, not {chunksize!r}")
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
        bar = _Progress(self) if progress else None
        if max_pending is None:
            cpus = sum(n.cpus for n in self.status()[0])
            max_pending = max(16, 2 * cpus)
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        items = iter(iterable)
        window: collections.deque = collections.deque()

        def fill() -> None:
            while len(window) < max_pending:
                if chunksize > 1:
                    chunk = list(itertools.islice(items, chunksize))
                    if not chunk:
                        return
                    calls = [tuple(item) for item in chunk] if star else [(i,) for i in chunk]
                    window.append(self._submit(None, (calls,), {}, more_opts={"m": 1}))
                    continue
                try:
                    item = next(items)
                except StopIteration:
                    return
                window.append(self.submit(*item) if star else self.submit(item))

        fill()
        while window:
            if ordered:
                job = window.popleft()
            else:
                done, _ = concurrent.futures.wait(
                    [j.future for j in window], return_when=concurrent.futures.FIRST_COMPLETED
                )
                job = next(j for j in window if j.future in done)
                window.remove(job)
            job._end.wait()
            fill()
            if bar is not None:
                bar.draw(final=not window)
            if chunksize > 1:
                yield from job.future.result()
            else:
                yield job.future.result()

    def counts(self) -> dict:
        """Job counts: submitted, ended, failed (ended but not Finished), pending
        (not ended), running (sent to nodes)."""
        with self._done_cond:
            out = {
                "submitted": self._submitted,
                "ended": self._ended,
                "failed": self._failed,
                "pending": self._unfinished,
            }
        out["running"] = sum(lk.node.busy for lk in list(self._engine.links.values()))
        return out

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> bool:
        """Wait until every submitted job has ended; False if ``timeout`` passed first.

        ``progress=True`` draws a progress line on stderr (done, failed, running,
        rate); ``None`` (default) draws it only when stderr is a terminal and
        False never does.
        """
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if not progress:
            with self._done_cond:
                return self._done_cond.wait_for(lambda: self._unfinished == 0, timeout)
        bar = _Progress(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done_cond:
            while self._unfinished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                step = PROGRESS_REFRESH if left is None else min(left, PROGRESS_REFRESH)
                if self._done_cond.wait(step) and not self._unfinished:
                    break  # the final line follows
                self._done_cond.release()
                try:
                    bar.draw()
                finally:
                    self._done_cond.acquire()
            done = self._unfinished == 0
        bar.draw(final=True)
        return done

    # -- called on the loop thread ---------------------------------------------------
    def _job_ended(self, job: DispyJob, node) -> None:
        with self._done_cond:
            self._unfinished -= 1
            self._ended += 1
            if job.status != jobstate.Finished:
                self._failed += 1
                self.recent_failures.append(job)
            if self._unfinished == 0:
                self._done_cond.notify_all()
        if self._cb_queue is not None:
            self._cb_queue.put(("job", job, node, job.status))

    def _provisional(self, job: DispyJob, node) -> None:
        if self._cb_queue is not None:
            # a snapshot: by the time the callback runs, the job may have ended
            self._cb_queue.put(("job", copy.copy(job), node, job.status))

    def _status_changed(self, job: DispyJob, node) -> None:
        if self._cluster_status is not None:
            self._cb_queue.put(("status", job, node, job.status))

    def _node_status(self, status: int, node: DispyNode) -> None:
        if self._cluster_status is not None:
            self._cb_queue.put(("node", None, node, status))

    def _run_callbacks(self) -> None:
        while True:
            item = self._cb_queue.get()
            if item is None:
                return
            what, job, node, status = item
            try:
                if what == "job":
                    if self._callback is not None:
                        self._callback(job)
                    if self._cluster_status is not None:
                        self._cluster_status(status, node, job)
                else:
                    self._cluster_status(status, node, job)
            except Exception:
                logger.exception("callback raised an exception (ignored)")

    # -- information -----------------------------------------------------------------
    def status(self) -> ClusterStatus:
        """``ClusterStatus(nodes, jobs_pending)``: the nodes (``DispyNode``) and the
        number of jobs not yet ended."""
        nodes = [lk.node for lk in self._engine.links.values() if lk.ready or lk.node.jobs_done]
        return ClusterStatus(nodes, self._unfinished)

    def stats(self) -> dict:
        """Per node (key 'ip:port'): name, cpus, jobs, sec_per_job, node_time,
        bytes_sent, bytes_received; and totals: jobs, total_job_time, wall_time, speedup."""
        wall = time.time() - self._start_time
        per_node = {}
        for (_host, port), lk in list(self._engine.links.items()):
            n = lk.node
            if not (lk.ready or n.jobs_done):
                continue
            per_node[f"{n.ip_addr}:{port}"] = {
                "name": n.name,
                "cpus": n.cpus,
                "jobs": n.jobs_done,
                "sec_per_job": n.cpu_time / n.jobs_done if n.jobs_done else 0.0,
                "node_time": n.cpu_time,
                "bytes_sent": n.tx + (lk.chan.bytes_sent if lk.chan else 0),
                "bytes_received": n.rx + (lk.chan.bytes_received if lk.chan else 0),
            }
        cpu = sum(v["node_time"] for v in per_node.values())
        return {
            "nodes": per_node,
            "jobs": sum(v["jobs"] for v in per_node.values()),
            "total_job_time": cpu,
            "wall_time": wall,
            "speedup": cpu / wall if wall > 0 else 0.0,
        }

    def print_status(self, wall_time: float | None = None) -> None:
        """Print per node: CPUs, jobs done, seconds per job, node time, bytes sent and
        received; then the total job time, wall time and speedup."""
        s = self.stats()
        print()
        print(
            f"{'Node':>28} | {'CPUs':>4} | {'Jobs':>6} | {'Sec/Job':>8} | {'Node Time Sec':>13}"
            f" | {'Sent':>9} | {'Rcvd':>9}"
        )
        print("-" * 97)
        for addr, n in s["nodes"].items():
            label = f"{n['name']} ({addr})" if n["name"] not in addr else addr
            print(
                f"{label[-28:]:>28} | {n['cpus']:>4} | {n['jobs']:>6} | "
                f"{n['sec_per_job']:>8.3f} | {n['node_time']:>13.3f} | "
                f"{_size(n['bytes_sent']):>9} | {_size(n['bytes_received']):>9}"
            )
        print()
        wall = wall_time if wall_time is not None else s["wall_time"]
        print(
            f"Total job time: {s['total_job_time']:.3f} sec, wall time: {wall:.3f} sec, "
            f"speedup: {s['total_job_time'] / wall if wall > 0 else 0:.3f}"
        )
        print()

    # -- closing -----------------------------------------------------------------------
    def close(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Wait for jobs (up to ``timeout``), run cleanup on the nodes and disconnect.

        With ``terminate=True`` running jobs are stopped instead of awaited.
        """
        if self._closed:
            return
        if not terminate:
            self.wait(timeout)
        self._closed = True
        _open_clusters.discard(self)
        try:
            _loop.run(self._engine.close(terminate or timeout is not None)).result()
        finally:
            if self._cb_queue is not None:
                self._cb_queue.put(None)
                if threading.current_thread() is not self._cb_thread:
                    self._cb_thread.join()
            if self._local is not None:
                self._local.stop()
                self._local = None
            if self._engine.recover is not None:  # closed normally: nothing to recover
                self._engine.recover.close(remove=True)

    def shutdown(self) -> None:
        """Close the cluster, terminating jobs that are still running."""
        self.close(terminate=True)

    def __enter__(self) -> JobCluster:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(terminate=exc_type is not None)
        return False


_open_clusters: weakref.WeakSet = weakref.WeakSet()


def _either(name, value, alias, alias_value):
    """An option dispy has had under two names: either may be given, not both apart."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise TypeError(
            f"{name}={value!r} and {alias}={alias_value!r} name the same option: give one"
        )
    return alias_value


def _close_open_clusters() -> None:
    """A program that ends without close() (dispy's examples do): let its jobs
    finish, as a dispy user expects, then run cleanup and disconnect."""
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:
            logger.debug("closing %s at exit failed", cluster.name, exc_info=True)


# When the main thread ends, Python first shuts down every thread pool (the
# event loop's getaddrinfo and file reads run in one) and only then runs
# atexit: a cluster still finding its nodes then waited for ever.  So close
# open clusters in threading's own exit hook, before the pools go; it runs
# hooks last registered first, hence the import of the pools' module first.
import concurrent.futures.thread  # noqa: E402,F401 -- registers its exit hook

try:
    threading._register_atexit(_close_open_clusters)
except (AttributeError, RuntimeError):  # no such hook, or already shutting down
    atexit.register(_close_open_clusters)
