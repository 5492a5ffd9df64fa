"""The shared scheduler's event-loop side.

To a client (``SharedJobCluster``) the scheduler looks like one big node: it
speaks the node protocol (INFO, FILE, COMPUTE, JOBS, RESULTS, ACK, CANCEL,
CLOSE, RESUME, DATA) on the scheduler port, authenticated with the cluster
secret.  Behind it, it keeps one connection per real node (authenticated
with the node secret) over which the computations of all its clients are set
up and their jobs run::

    client A --\\                        /-- node 1
    client B ---> SchedulerServer ------+--- node 2      (one connection each,
    client C --/   queue by policy       \\-- node 3       every client's cid on it)

Scheduling is ``dispy.core``'s: one ``Scheduler`` holds the nodes and their
slots, a ``ClusterQueue`` orders the clients' jobs by the sharing policy
(``first``, ``fair``, ``early``), and ``eligible`` says which node may run
which cluster's jobs (set up there; exclusive clusters own their nodes).

The scheduler never unpickles: arguments and results are forwarded as the
bytes the client and the job process made.  A result is acknowledged to the
node only once the client acknowledged it, so until then it is on the node's
disk.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import platform
import shutil
import socket
import sqlite3

from dispy import config, discovery, transport
from dispy._paths import claim_dir
from dispy._tasks import spawn
from dispy._version import __version__
from dispy.core import jobstate
from dispy.core.queues import ClusterQueue
from dispy.core.scheduler import Scheduler
from dispy.engine import parse_nodes
from dispy.errors import DispyError
from dispy.protocol import Kind
from dispy.runtime.finder import NodeFinder
from dispy.runtime.link import MISSED_PULSES, NodeIds

from .clients import ClientSession
from .durable import Durable
from .jobs import JobRoute
from .model import Comp, SJob
from .nodes import NodeLink
from .state import SchedulerState

logger = logging.getLogger("dispyscheduler")

STATE_FILE = "scheduler.db"


class SchedulerServer(Durable, JobRoute):
    """Clients on one side, nodes on the other, dispy.core's scheduler between."""

    def __init__(
        self,
        *,
        cluster_key: bytes,
        node_key: bytes,
        ip_addrs: list[str],
        port: int,
        node_port: int = config.NODE_PORT,
        nodes: list[str] = (),
        policy: str = "first",
        dest_path: str,
        pulse_interval: float = 2.0,
        ping_interval: float | None = None,
        zombie_interval: float = 3600.0,
        max_file_size: int = 0,
        client_ssl=None,
        node_ssl=None,
        ext_ip_addr: str | None = None,
        client_port: int = config.CLIENT_PORT,
        multicast: bool = False,
    ) -> None:
        self.multicast = multicast  # --ipv4_udp_multicast: find nodes by the group
        self.cluster_key = cluster_key
        self.node_key = node_key
        self.ip_addrs = ip_addrs
        self.port = port
        self.node_port = node_port
        self.node_specs = list(nodes) or ["*"]
        self.dest_path = os.path.abspath(dest_path)
        self.pulse_interval = pulse_interval
        self.ping_interval = ping_interval
        self.zombie_interval = zombie_interval
        self.max_file_size = max_file_size or (1 << 40)
        self.client_ssl = client_ssl
        self.node_ssl = node_ssl
        self.ext_ip_addr = ext_ip_addr
        self.client_port = client_port
        self.name = f"dispyscheduler@{socket.gethostname()}"
        self.nid = os.urandom(8).hex()
        self.queue = ClusterQueue(policy)
        self.sched = Scheduler(prefetch=2, queue=self.queue, eligible=self.eligible)
        self.comps: dict[str, Comp] = {}
        self.links: dict[tuple, NodeLink] = {}
        self.ids = NodeIds(self.links)  # one link per node
        self.uids = itertools.count(1)  # the scheduler core's job keys (not persisted)
        self.state: SchedulerState | None = None
        self.restored = asyncio.Event()  # set once restored jobs are placed (or queued)
        self.restored.set()
        self._limbo: list[SJob] = []  # restored jobs, until the nodes said which they run
        self._waiting_links: set = set()  # nodes to hear from before the limbo ends
        self._restored_cids: set[str] = set()
        self.retired: dict[str, dict] = {}  # zombie cid -> {jid: (entry, segs)}
        self._known_nodes: set = set()
        # tallies since start, for the monitor (--httpd)
        self.stats = {"submitted": 0, "ended": 0, "failed": 0}
        self.done_on: collections.Counter = collections.Counter()  # node key -> jobs ended
        self.failures: collections.deque = collections.deque(maxlen=50)  # (job, comp, entry)
        self.owner: dict[tuple, str] = {}  # node key -> the exclusive computation owning it
        self.sessions: set[ClientSession] = set()
        self.finder: NodeFinder | None = None
        self.bound: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self._reaper: asyncio.Task | None = None
        self.stopped = asyncio.Event()
        self._lock_fd: int | None = None  # (claim_dir: the folder is this process's)

    # -- start / stop ---------------------------------------------------------------------
    async def start(self, clean: bool = False) -> None:
        """Take the folder (``clean``: emptied first, --clean) and start serving."""
        self.dest_path, self._lock_fd = await asyncio.to_thread(
            claim_dir, self.dest_path, "dispyscheduler", clean
        )
        state = os.path.join(self.dest_path, STATE_FILE)
        try:
            self.state = SchedulerState(state)
        except (OSError, sqlite3.Error) as exc:
            raise DispyError(f"cannot keep the scheduler's state in {state}: {exc}") from None
        saved_nodes = await asyncio.to_thread(self._restore)
        for host in self.ip_addrs or [None]:
            srv = await transport.serve(
                host, self.port, self.cluster_key, self._on_client, ssl=self.client_ssl
            )
            self._servers.append(srv)
            for sock in srv.sockets:
                self.bound.append(sock.getsockname()[:2])
            if self.port == 0 and self.bound:
                self.port = self.bound[0][1]
        specs, patterns, _local = parse_nodes(self.node_specs, self.node_port)
        named = [(host, port) for host, port, _ in specs]
        for host, port in named + [n for n in saved_nodes if n not in named]:
            self.add_link(host, port)
        if self._limbo or self._restored_cids:
            self.restored.clear()
            self._waiting_links = set(self.links)
            asyncio.get_running_loop().call_later(
                self.pulse_interval * MISSED_PULSES, self._end_restore
            )
            if not self._waiting_links:
                self._end_restore()
        if patterns:
            self.finder = NodeFinder(
                self.node_key,
                self._discovered,
                ip_addrs=self.ip_addrs,
                client_port=self.client_port,
                ping_interval=self.ping_interval,
                multicast=self.multicast,
            )
            await self.finder.start()
            self.finder.add(patterns, named)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def shutdown(self) -> None:
        if self.finder is not None:
            self.finder.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for srv in self._servers:
            srv.close()
        for s in list(self.sessions):
            s.chan.close()
        for comp in list(self.comps.values()):
            await self.close_comp(comp, terminate=True)
        await asyncio.gather(*(lk.close() for lk in self.links.values()))
        if self.state is not None:
            await asyncio.to_thread(self.state.close)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- nodes ----------------------------------------------------------------------------
    def add_link(self, host: str, port: int) -> None:
        if (host, port) in self.links:
            return
        link = NodeLink(self, host, port)
        link.had = set(self._restored_cids)  # ask it what became of them (after a restart)
        self.links[link.key] = link
        link.task = asyncio.get_running_loop().create_task(link.run())

    def _discovered(self, ip: str, port: int, nid: str, alloc) -> None:
        if self.ids.known(ip, port, nid):
            return
        logger.info("discovered node %s:%s", ip, port)
        self.add_link(ip, port)

    def claim(self, nid: str, link: NodeLink) -> bool:
        return self.ids.claim(nid, link)

    def total_cpus(self) -> int:
        nodes = self.sched.nodes
        return max(
            1,
            sum(
                lk.cpus
                for lk in self.links.values()
                if lk.ready and not getattr(nodes.get(lk.key), "paused", False)
            ),
        )

    def node_rows(self) -> list[dict]:
        """The ready nodes, as clients see them (SharedJobCluster.status(), as dispy)."""
        rows = []
        for lk in self.links.values():
            if lk.ready:
                st = self.sched.nodes.get(lk.key)
                rows.append({
                    "ip": lk.ip, "port": lk.port, "name": lk.name, "cpus": lk.cpus,
                    "busy": st.busy() if st is not None else 0, "done": self.done_on[lk.key],
                })  # fmt: skip
        return rows

    def status_for_clients(self) -> dict:
        """A pulse to clients: the CPUs they may size their queues to, and the nodes."""
        return {"a": {}, "cpus": self.total_cpus(), "nodes": self.node_rows()}

    def info(self) -> dict:
        return {
            "name": self.name,
            "nid": self.nid,
            "cpus": self.total_cpus(),
            "starts": 1,  # RESULTS say which jobs started (its nodes' word, passed on)
            "platform": platform.platform(),
            "version": __version__,
            "ip": self.ext_ip_addr or (self.bound[0][0] if self.bound else ""),
            "scheduler": True,
            "nodes": self.node_rows(),
        }

    def node_ready(self, link: NodeLink, on_node=()) -> None:
        """``on_node``: (computation, job ids) the node still has (RESUMED)."""
        self.sched.add_node(link.key, link.cpus, reports=link.reports_starts)
        self.sched.set_paused(link.key, link.paused)  # told before it was ready
        logger.info("node %s (%s) ready with %d CPUs", link.name, link, link.cpus)
        for comp, jids in on_node:
            self.adopt(link, comp, jids)
        if link.key not in self._known_nodes:
            self._known_nodes.add(link.key)
            self.state.set_meta("nodes", sorted(self._known_nodes))
        if link.key in self._waiting_links:
            self._waiting_links.discard(link.key)
            if not self._waiting_links:
                self._end_restore()
        for comp in list(self.comps.values()):
            self._maybe_setup(comp, link)
        self._tell_cpus()
        self.dispatch()

    def _tell_cpus(self) -> None:
        """Clients size their queues to the scheduler's CPUs: tell them when that changes."""
        for s in list(self.sessions):
            if not s.chan.is_closed:
                s.chan.send(Kind.STATUS, self.status_for_clients())

    def jobs_lost(self, link: NodeLink, jobs: list) -> None:
        """Jobs a node that came back no longer has (it restarted): requeue or abandon."""
        self._lost_jobs(link, self.sched.lose_jobs(link.key, jobs), "restarted while running")
        self.dispatch()

    def _lost_jobs(self, link: NodeLink, lost: list, what: str) -> None:
        for job, status in lost:
            hint = "use reentrant=True to run such jobs again elsewhere"
            if status == jobstate.Created and job.segs is None:
                # adopted from a node after a restart, never written here: its arguments
                # are not known, so it cannot run again
                try:
                    self.queue.remove(job)
                except ValueError:
                    pass
                job.status = jobstate.next_status(job.status, jobstate.ABANDON)
                status = job.status
                hint = "its arguments were lost in a scheduler restart: it cannot run again"
            if status == jobstate.Abandoned:
                self._end(job, {"st": jobstate.Abandoned,
                                "x": f"node {link.name} ({link}) {what} the job ({hint})"},
                          [b"N."])  # fmt: skip

    def node_lost(self, link: NodeLink) -> None:
        (logger.info if link._closing else logger.warning)("node %s (%s) lost", link.name, link)
        self._tell_cpus()
        for comp in self.comps.values():
            comp.ready_on.discard(link.key)
        self.owner.pop(link.key, None)
        self._lost_jobs(link, self.sched.remove_node(link.key), "was lost while running")
        self.dispatch()

    def adopt(self, link: NodeLink, comp: Comp, jids: list) -> None:
        """The node has these jobs of ``comp`` (running, or ended with the result on its
        disk): they are running there, unless they run elsewhere already."""
        for jid in jids:
            if not isinstance(jid, int):
                continue
            job = comp.jobs.get(jid)
            if job is None:  # came just before a restart, not yet in the state file
                job = comp.jobs[jid] = SJob(next(self.uids), comp, jid, None, None)
            if job.status == jobstate.Created and job._node is None:
                self.sched.adopt(job, link.key)

    # -- computations ---------------------------------------------------------------------
    def add_comp(self, comp: Comp) -> None:
        self.comps[comp.cid] = comp
        self.queue.add_cluster(comp.cid)

    def _node_matches(self, comp: Comp, link: NodeLink) -> bool:
        return (
            discovery.matches(link.ip, comp.patterns)
            or discovery.matches(link.host, comp.patterns)
            or link.name in comp.patterns
        )

    def _maybe_setup(self, comp: Comp, link: NodeLink) -> None:
        if (
            comp.spec is None
            or comp.closed
            or not link.ready
            or link.key in comp.ready_on
            or link.key in comp.setting_up
            or link.key in comp.failed
            or not self._node_matches(comp, link)
        ):
            return
        owner = self.owner.get(link.key)
        if owner is not None and owner != comp.cid:
            return  # an exclusive cluster has it
        if comp.exclusive:  # it is ours now: others' jobs there finish, no new ones start
            self.owner[link.key] = comp.cid
        comp.setting_up.add(link.key)  # now: setup_done() answers the client's COMPUTE
        spawn(link.setup(comp), f"setting up {comp.name} on {link.key}", logger)

    def setup_everywhere(self, comp: Comp) -> None:
        for link in list(self.links.values()):
            self._maybe_setup(comp, link)
        self.setup_done(comp)

    def setup_done(self, comp: Comp) -> None:
        """Answer the client's COMPUTE once one node has set it up (others may take
        longer), or once every node refused it (with each node's reason); ok too if no
        node is there yet: its jobs wait."""
        fut = comp.compute_reply
        if fut is not None and not fut.done() and comp.ready_on:  # one node runs it: go
            fut.set_result((True, ""))
        elif fut is not None and not fut.done() and not comp.setting_up:  # all answered
            tried = [lk for lk in self.links.values() if lk.ready and self._node_matches(comp, lk)]
            if tried and all(lk.key in comp.failed for lk in tried):
                fut.set_result((False, "; ".join(comp.failed.values())))
            else:  # no node for it yet (none found, or all taken by exclusive clusters)
                fut.set_result((True, ""))
        self.dispatch()

    def eligible(self, node_key, cid) -> bool:
        """May that node run that cluster's jobs now?  Set up there, and the node is not
        an exclusive cluster's; an exclusive cluster's own jobs start on it once the
        jobs of others that were running there when it took the node have ended."""
        comp = self.comps.get(cid)
        if comp is None or node_key not in comp.ready_on:
            return False
        owner = self.owner.get(node_key)
        if owner is None:
            return True
        if owner != cid:
            return False
        state = self.sched.nodes.get(node_key)
        return state is None or all(j._cluster == cid for j in state.running.values())

    async def close_comp(self, comp: Comp, terminate: bool, forget: bool = True) -> str:
        """Close the computation on its nodes and here; ``forget``: also in the state file."""
        comp.closed = True
        self.comps.pop(comp.cid, None)
        for job in self.queue.remove_cluster(comp.cid):
            job.status = jobstate.next_status(job.status, jobstate.CANCEL)
        links = [self.links[k] for k in list(comp.ready_on) if k in self.links]
        errors = await asyncio.gather(*(lk.close_comp(comp, terminate) for lk in links))
        for job in list(comp.jobs.values()):
            if job._node is not None and job.status not in jobstate.TERMINAL:
                state = self.sched.nodes.get(job._node)
                if state is not None:
                    state.running.pop(job._uid, None)
        for key, owner in list(self.owner.items()):
            if owner == comp.cid:
                del self.owner[key]
        if forget:
            self.state.drop_comp(comp.cid)
        shutil.rmtree(comp.dir, ignore_errors=True)
        logger.info("computation %s (%s) closed", comp.name, comp.cid)
        for other in list(self.comps.values()):  # freed nodes: exclusive ones may go now
            for link in list(self.links.values()):
                self._maybe_setup(other, link)
        self.dispatch()
        return "; ".join(e for e in errors if e)

    # -- clients --------------------------------------------------------------------------
    def _on_client(self, chan: transport.Channel) -> None:
        logger.info("client %s authenticated", chan.peer)
        self.sessions.add(ClientSession(self, chan))
