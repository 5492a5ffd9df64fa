"""The scheduler's link to one real node, over which the computations of all
its clients are set up and their jobs run."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from dispy import transport
from dispy.errors import ConnectionClosed, ProtocolError
from dispy.protocol import JOBS_PER_FRAME, Kind, field, join_segments
from dispy.runtime.link import LOST, MISSED_PULSES, SET_UP, LinkBase, Phase

from .model import Comp, SJob

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .server import SchedulerServer

logger = logging.getLogger("dispyscheduler")


class NodeLink(LinkBase):
    """The scheduler's one connection to a node, shared by every computation."""

    def __init__(self, server: SchedulerServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.key = (host, port)
        self.ip = host
        self.name = host
        self.cpus = 0
        self.reports_starts = False  # its RESULTS say which jobs started
        self.paused = False  # the node is outside its service hours (its pulses say)
        self._init_link(logger)
        self._streams.update(
            {
                Kind.RESULTS: lambda ctl, payload: server.node_results(self, ctl, payload),
                Kind.STATUS: self._status,
                # dispy_send_file from a job: to its client
                Kind.FILE: lambda ctl, payload: server.forward_to_client(
                    self, Kind.FILE, ctl, payload
                ),
            }
        )
        self.had: set[str] = set()  # computations set up on this node (kept across reconnections)
        self.task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """The node's IP address (once connected; its name until then)."""
        return self.ip

    def _pulse_interval(self) -> float:
        return self.server.pulse_interval

    def _node_lost(self) -> None:
        self.server.node_lost(self)

    def _permanent(self, exc: Exception) -> None:
        logger.error(
            "node %s: %s (the scheduler's --node_secret must be the nodes' secret)", self, exc
        )

    async def _session(self) -> None:
        server = self.server
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )
        self.ip = infos[0][4][0]
        chan = await transport.connect(self.ip, self.port, server.node_key, ssl=server.node_ssl)
        closed = self._attach(chan)
        info = await self.request(Kind.INFO_REQ, {"pulse": server.pulse_interval})
        if info.get("relay"):
            self._closing = True
            chan.close()
            return
        self.cpus = field(info, "cpus", int)
        self.reports_starts = bool(info.get("starts"))
        self.name = field(info, "name", str)
        nid = info.get("nid")
        if isinstance(nid, str) and not server.claim(nid, self):
            self._closing = True
            chan.close()
            return
        # computations set up here before a reconnection (or before the scheduler
        # restarted): take them over again (the node kept them, their jobs and their
        # results), or close those closed meanwhile
        on_node: list[tuple[Comp, list]] = []
        for cid in list(self.had):
            comp = server.comps.get(cid)
            if comp is None or comp.closed:
                self.had.discard(cid)
                chan.send(Kind.CLOSE, {"c": cid, "t": True})
                continue
            reply = await self.request(Kind.RESUME, {"c": cid})
            jids = field(reply, "jobs", list) + field(reply, "done", list)
            if reply.get("known"):
                comp.ready_on.add(self.key)
                if comp.exclusive:
                    server.owner.setdefault(self.key, cid)
            else:  # the node restarted: set it up there again (node_ready does)
                comp.ready_on.discard(self.key)
                if not jids:
                    self.had.discard(cid)
            on_node.append((comp, jids))
        if self.suspect:  # back within the window: what it no longer has is lost
            there = {(comp.cid, j) for comp, jids in on_node for j in jids}
            state = server.sched.nodes.get(self.key)
            running = list(state.running.values()) if state is not None else []
            self._back()
            server.jobs_lost(self, [j for j in running if (j.comp.cid, j.cjid) not in there])
        self._to(SET_UP)
        server.node_ready(self, on_node)
        await self._serve(chan, closed)

    def _lost(self) -> None:
        self._fail_waiters()
        if self.chan is not None:
            self.chan.abort()
            self.chan = None
        if self.ready:
            window = self.server.pulse_interval * MISSED_PULSES
            if self._suspend(window):  # its jobs stay put while it may return
                self.server.sched.set_ready(self.key, False)
                self.server._tell_cpus()
            else:
                self.server.node_lost(self)
        elif self.phase is Phase.UP:  # lost while being set up: nothing waits for it
            self._to(LOST)

    def _paused(self, why) -> None:
        """The node says it is outside its service hours (``why``), or serves again."""
        self.paused = bool(why)  # (applied when it is added to the scheduler, if not yet)
        node = self.server.sched.nodes.get(self.key)
        if node is None or node.paused == bool(why):
            return
        self.server.sched.set_paused(self.key, bool(why))
        logger.info(
            "node %s %s",
            self.key[0],
            f"takes no jobs for now: {why}" if why else "takes jobs again",
        )
        self.server._tell_cpus()
        if not why:
            self.server.dispatch()

    # -- what the node sends unasked ----------------------------------------------------
    def _status(self, ctl: dict, payload) -> None:
        if "j" in ctl:  # a provisional result: to its client
            self.server.forward_to_client(self, Kind.STATUS, ctl, payload)
        else:
            self._paused(ctl.get("paused"))

    # -- computations on this node -----------------------------------------------------
    async def setup(self, comp: Comp) -> None:
        """Send the computation's files and spec; mark it ready here if set up."""
        try:
            for rel, mode in list(comp.files.items()):
                path = os.path.join(comp.dir, rel)
                await self._send_file(comp.cid, comp.name, rel, path, mode)
            reply = await self.request(
                Kind.COMPUTE,
                {"c": comp.cid, "n": comp.name, "sa": len(comp.setup_args)},
                [comp.spec, comp.setup_args],
            )
            if not reply.get("ok"):
                comp.failed[self.key] = str(reply.get("r", "setup failed"))
                if self.server.owner.get(self.key) == comp.cid:
                    del self.server.owner[self.key]  # others may use it again
                logger.warning(
                    "computation %s on node %s: %s", comp.name, self, comp.failed[self.key]
                )
            else:
                for name in list(comp.data):
                    await self.put_data(comp, name)
                if comp.closed:  # closed while being set up here
                    self.chan.send(Kind.CLOSE, {"c": comp.cid, "t": True})
                    return
                comp.ready_on.add(self.key)
                self.had.add(comp.cid)
                logger.info("computation %s (%s) set up on node %s", comp.name, comp.cid, self)
        except (ConnectionClosed, OSError) as exc:
            comp.failed[self.key] = str(exc)
            if self.server.owner.get(self.key) == comp.cid:
                del self.server.owner[self.key]
        finally:
            comp.setting_up.discard(self.key)
            self.server.setup_done(comp)

    async def put_data(self, comp: Comp, name: str) -> None:
        version, lens, payload = comp.data[name]
        tag = f"{name}:{version}"
        reply = await self.request(
            Kind.DATA, {"c": comp.cid, "n": name, "v": version, "s": lens, "t": tag}, [payload]
        )
        if not reply.get("ok"):
            raise RuntimeError(f"node {self}: {reply.get('r')}")

    async def close_comp(self, comp: Comp, terminate: bool) -> str:
        if self.chan is None or self.chan.is_closed:
            return ""
        self.had.discard(comp.cid)
        try:
            reply = await asyncio.wait_for(
                self.request(Kind.CLOSE, {"c": comp.cid, "t": terminate}), 60
            )
            return str(reply.get("r") or "")
        except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
            return f"node {self}: {exc}"

    def send_jobs(self, jobs: list[SJob]) -> None:
        by_comp: dict[str, list[SJob]] = {}
        for job in jobs:
            by_comp.setdefault(job.comp.cid, []).append(job)
        for cid, all_jobs in by_comp.items():
            for i in range(0, len(all_jobs), JOBS_PER_FRAME):
                batch = all_jobs[i : i + JOBS_PER_FRAME]
                entries = [
                    [j.cjid, len(j.segs), j.opts] if j.opts else [j.cjid, len(j.segs)]
                    for j in batch
                ]
                lens, flat = join_segments(j.segs for j in batch)
                if self.chan is None:
                    return  # the loss handler requeues or abandons them
                try:
                    self.chan.send(Kind.JOBS, {"c": cid, "j": entries, "s": lens}, flat)
                except ConnectionClosed:
                    return  # the loss handler requeues or abandons them

    def cancel(self, job: SJob) -> None:
        if self.chan is not None and not self.chan.is_closed:
            self.chan.send(Kind.CANCEL, {"c": job.comp.cid, "j": [job.cjid]})

    async def close(self) -> None:
        self._closing = True
        if self.suspect:
            self._declare_dead("the scheduler is stopping")
        if self.chan is not None:
            self.chan.close()
            await self.chan.wait_closed()
        if self.task is not None:
            self.task.cancel()
