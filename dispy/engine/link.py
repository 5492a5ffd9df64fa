"""The client's link to one node (or to a dispyscheduler): DNS, TLS and the
handshake, shipping the computation, RESUME after a reconnection, sending
job batches, receiving results, and ACK batching.  What it receives goes to
the engine (``engine.Engine``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING

import cloudpickle

from .. import config, transport
from .._data import host_id as data_host_id
from .._job import DispyNode, DispyNodeAvailInfo, NodeAllocate
from ..errors import (
    AuthenticationFailed,
    ConnectionClosed,
    DispyError,
    IncompatibleVersion,
    ProtocolError,
)
from ..protocol import JOBS_PER_FRAME, Kind, field, join_segments
from ..runtime.link import LOST, MISSED_PULSES, SET_UP, LinkBase, Phase

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .engine import Engine

logger = logging.getLogger("dispy")

#: Most bytes of job arguments put in one JOBS frame.
BATCH_BYTES = 8 << 20
#: put() data for a node on this host, of this user, is written once to shared
#: memory and handed over by name (tests turn it off to test sending the bytes)
HAND_OVER_DATA = True


class _Permanent(DispyError):
    """A node that will not work for this cluster however often we try."""


class NodeLink(LinkBase):
    """The client's connection to one node, for one cluster."""

    def __init__(self, engine: Engine, host: str, port: int, alloc: NodeAllocate | None) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.alloc = alloc
        self.key = (host, port)
        self.node = DispyNode(host, port)
        self.node_cpus = 0  # the CPUs the node says it has
        self.reports_starts = False  # its RESULTS say which jobs started (Running)
        self.same_host = False  # put() data is handed over by file name
        self._init_link(logger)
        self._streams.update(
            {
                Kind.RESULTS: lambda ctl, payload: engine.results(self, ctl, payload),
                Kind.STATUS: self._status,
                Kind.FILE: lambda ctl, payload: engine.file_from_job(self, ctl, payload),
            }
        )
        self.failure: str | None = None  # permanent failure, if any
        self.paused = False  # the node is outside its service hours (its pulses say)
        self.was_setup = False  # the computation was set up there: reconnect with RESUME
        self.task: asyncio.Task | None = None

    FILE_CHUNK = 8 << 20

    @property
    def address(self) -> str:
        """The node's IP address (once connected; its name until then)."""
        return self.node.ip_addr

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
        info = await self.request(Kind.INFO_REQ, {"pulse": engine.pulse_interval})
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
        self.reports_starts = bool(info.get("starts"))
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
        self.was_setup = True
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
        self._to(SET_UP)
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
        reply = await self.request(Kind.RESUME, {"c": engine.cid})
        on_node = set(field(reply, "jobs", list)) | set(field(reply, "done", list))
        if self.suspect:
            self._back()
            state = engine.sched.nodes.get(self.key)
            lost = [j for j in state.running.values() if j._uid not in on_node] if state else []
            if engine.via_scheduler and reply.get("known"):
                # a restarted dispyscheduler asked its nodes: the jobs it does not list
                # run nowhere (they came just before it stopped): send them again
                engine.jobs_resend(self, lost)
            else:
                engine.jobs_lost(self, lost, "its node restarted while running it")
        # jobs that started while the connection was down: Running now
        started = [u for u in field(reply, "run", list, default=[]) if type(u) is int]
        if started and self.key in engine.sched.nodes:
            engine._started_on(self, started)
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
        reply = await self.request(
            Kind.COMPUTE,
            {"c": cid, "n": pkg.name, "sa": len(setup_args), **self.engine.compute_opts},
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
                reply = await self.request(
                    Kind.DATA,
                    {"c": self.engine.cid, "n": name, "v": version, "f": path, "z": size, "t": tag},
                )
                if reply.get("ok"):
                    return
                logger.info("node %s: put() data sent over the connection: %s",
                            self.node.name, reply.get("r"))  # fmt: skip
                self.same_host = False
        lens, flat = join_segments([segs])
        reply = await self.request(
            Kind.DATA, {"c": self.engine.cid, "n": name, "v": version, "s": lens, "t": tag}, flat
        )
        if not reply.get("ok"):
            raise DispyError(f"node {self.node.name} refused data {name!r}: {reply.get('r')}")

    # -- what the node sends unasked ----------------------------------------------
    def _status(self, ctl: dict, payload) -> None:
        """A pulse (``a``: its resources), or a job's provisional result."""
        if "a" not in ctl:
            self.engine.provisional(self, ctl, payload)
            return
        cpus = ctl.get("cpus")  # a scheduler's CPUs change as its nodes come and go
        if isinstance(cpus, int) and cpus > 0 and cpus != self.node.cpus:
            self.node.cpus = self.node.avail_cpus = cpus
            if self.key in self.engine.sched.nodes:
                self.engine.sched.set_cpus(self.key, cpus)
                self.engine.dispatch()
        if self.engine.via_scheduler:
            self.engine.scheduler_nodes(ctl.get("nodes"))
        self._paused(ctl.get("paused"))
        self.node.avail_info = _avail(ctl["a"])
        self.node.update_time = time.time()
        self.engine.cluster._node_status(DispyNode.AvailInfo, self.node)

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
        if self.ready:
            if self._suspend(self.window):  # its jobs stay put meanwhile
                self.engine.sched.set_ready(self.key, False)
            else:
                self.engine.node_lost(self)
        elif self.phase is Phase.UP:  # lost while being set up: nothing waits for it
            self._to(LOST)

    async def close_computation(self, terminate: bool) -> None:
        """Close the computation on the node (cleanup runs there); keep the connection."""
        chan = self.chan
        # also while the computation is being set up there (or set up again after a
        # restart of the node): a connection that ends without CLOSE leaves it running
        if chan is not None and not chan.is_closed:
            self.engine.sched.set_ready(self.key, False)
            try:
                await asyncio.wait_for(
                    self.request(Kind.CLOSE, {"c": self.engine.cid, "t": terminate}),
                    None if not terminate else 30,
                )
            except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
                logger.debug("closing computation on %s: %s", self.key, exc)

    async def resetup(self) -> None:
        """Close the computation on the node and set it up again (setup runs again)."""
        await self.close_computation(terminate=False)
        if self.chan is None or self.chan.is_closed:
            raise ConnectionClosed(f"node {self.host}:{self.port} is not connected")
        await self._send_computation()
        self.engine.sched.add_node(self.key, self.node.cpus, self.limited, self.reports_starts)
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


def _avail(d) -> DispyNodeAvailInfo | None:
    if not isinstance(d, dict):
        return None
    return DispyNodeAvailInfo(
        d.get("cpu", 0.0), d.get("memory", 0), d.get("disk", 0), d.get("swap", 0.0)
    )
