"""The client's engine, on the dispy-loop thread: jobs from the user's
threads go to the scheduler (``dispy.core.scheduler``) and, in batches, to
the node links; results come back here, end their jobs and go to the
cluster's callbacks; put() data, job files, node loss and the recover file
are handled here too."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

from .. import serialize
from .._data import client_shm_folder as data_client_shm_folder
from .._data import data_path
from .._data import host_id as data_host_id
from .._data import write as data_write
from .._job import DispyJob, DispyNode
from .._paths import write_chunk
from .._recover_file import RecoverFile
from .._recover_jobs import job_blob
from .._tasks import spawn
from ..core import job_end, jobstate
from ..core.scheduler import Scheduler
from ..errors import DispyError
from ..protocol import field, result_entries, split_segments, started_jobs
from ..runtime.finder import NodeFinder
from ..runtime.link import NodeIds
from .link import NodeLink
from .specs import NO_NODE_WARNING_S, waiting_for

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .._client import JobCluster

logger = logging.getLogger("dispy")


class Engine:
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
        self.sched = Scheduler(reentrant=reentrant, report_started=True)
        self.links: dict[tuple, NodeLink] = {}
        self.ids = NodeIds(self.links)  # one link per node
        self.live: dict[int, DispyJob] = {}
        self.writes: dict[int, set] = {}  # files jobs sent, being written
        self.data: dict[str, tuple[int, list]] = {}  # cluster.put(): name -> (version, segments)
        #: put() data written to shared memory for nodes on this host: name -> (version, task)
        self.shm_files: dict[str, tuple[int, asyncio.Task]] = {}
        self.fatal: str | None = None
        self._lonely: asyncio.TimerHandle | None = None  # (NO_NODE_WARNING_S after start)
        self.pulse_interval = cluster._pulse_interval
        self.ssl = cluster._ssl

    async def start(self) -> None:
        self._lonely = asyncio.get_running_loop().call_later(NO_NODE_WARNING_S, self._no_node_yet)
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

    def _no_node_yet(self) -> None:
        if self.fatal is None and not any(lk.ready for lk in self.links.values()):
            logger.warning(
                "cluster %s: no node ready %g s after its start; %s",
                self.cluster.name, NO_NODE_WARNING_S, waiting_for(self.specs, self.patterns),
            )  # fmt: skip

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
        if self.ids.known(ip, port, nid):
            return
        logger.info("discovered node %s:%s", ip, port)
        self.add_links([(ip, port, alloc)])

    def heard(self, ip: str, port: int) -> None:
        """A node announced itself: a link waiting to reconnect to it tries now."""
        for link in self.links.values():
            if link.port == port and ip in (link.host, link.node.ip_addr) and link.chan is None:
                link.wake()

    def claim(self, nid, link: NodeLink) -> bool:
        """A link learned its node's run id: False if another live link has that node."""
        return self.ids.claim(nid, link)

    def add_links(self, specs) -> int:
        added = 0
        for host, port, alloc in specs:
            link = NodeLink(self, host, port, alloc)
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
            link.send_jobs(batch)
            if link.chan is not None:
                link.chan.flush()  # (the batch is whole: no need to wait for the turn's end)
            if self.recover is not None:
                # (after the jobs went out, not on their way: the recover file's writer
                # commits only WRITE_DELAY later, either way)
                where = f"{link.node.ip_addr}:{link.port}"
                try:
                    self.recover.add_jobs(
                        (job._uid, functools.partial(job_blob, job, where)) for job in batch
                    )
                except DispyError as exc:
                    logger.error("recover file: %s", exc)
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
    def results(self, link: NodeLink, ctl: dict, payload) -> None:
        node = link.node
        entries = list(result_entries(ctl, payload))
        # jobs that started there: Running after the ends that freed their CPUs, but
        # before their own end if they ended too (a tiny job starts and ends at once;
        # a job that ran - its end has a start time - whose start was said on a
        # connection that died, is Running before its end all the same)
        starts = started_jobs(ctl).get(self.cid) or []
        said = set(starts)
        early = [
            u for e, _ in entries if e.get("t0") and type(u := e.get("j")) is int and u not in said
        ]
        if starts:
            ended = {entry.get("j") for entry, _ in entries}
            early = [uid for uid in starts if uid in ended] + early
        if early:
            self._started_on(link, early)
        for entry, part in entries:
            uid = field(entry, "j", int)
            link.ack(self.cid, uid)
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
            event, result, exc_text = job_end.decode(entry, part, serialize.loads, "on the client")
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
            # through a dispyscheduler: the node that ran it (the entry says)
            ip = entry.get("ip")
            job_end.fill(
                job, entry, result, exc_text, ip if isinstance(ip, str) and ip else node.ip_addr
            )
            node.jobs_done += 1
            t0, t1 = entry.get("t0"), entry.get("t1")
            if t0 and t1:
                node.cpu_time += t1 - t0
                self.sched.observe(link.key, t1 - t0)
            self._finish(job, node)
        if starts:
            self._started_on(link, starts)
        node.busy = self.sched.nodes[link.key].busy() if link.key in self.sched.nodes else 0
        self.dispatch()

    def _started_on(self, link: NodeLink, uids: list) -> None:
        for uid in uids:
            self.sched.started(link.key, uid)
        self._report_started()

    def provisional(self, link: NodeLink, ctl: dict, payload) -> None:
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

    def file_from_job(self, link: NodeLink, ctl: dict, payload) -> None:
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
        """The job's one end: to the cluster, which publishes it (counts it,
        resolves job() and its Future) and calls its callbacks."""
        if job._end._over:  # (the cluster sets it)
            return
        self.live.pop(job._uid, None)
        if self.recover is not None:
            self.recover.jobs_done((job._uid,))
        job._segs = None
        self.cluster._job_ended(job, node)

    def _abandon(self, job: DispyJob, reason: str) -> None:
        if job.status not in jobstate.TERMINAL:
            job.status = jobstate.next_status(job.status, jobstate.ABANDON)
        job.exception = reason
        job.end_time = time.time()
        self._complete(job, None)

    # -- nodes -----------------------------------------------------------------------
    async def record_node(self, link: NodeLink) -> None:
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

    def node_ready(self, link: NodeLink) -> None:
        self.sched.add_node(link.key, link.node.cpus, link.limited, link.reports_starts)
        self.sched.set_paused(link.key, link.paused)  # told before it was ready
        logger.info("node %s (%s) ready with %d CPUs", link.node.name, link.key, link.node.cpus)
        self.cluster._node_status(DispyNode.Initialized, link.node)
        self.dispatch()

    def jobs_resend(self, link: NodeLink, jobs: list) -> None:
        """Jobs a restarted scheduler never got: queue them again, first."""
        for job in jobs:
            if self.sched.requeue(job):
                self.cluster._status_changed(job, link.node)
        self.dispatch()

    def jobs_lost(self, link: NodeLink, jobs: list, why: str) -> None:
        """Jobs a node no longer has (it restarted): requeue or abandon them."""
        for job, status in self.sched.lose_jobs(link.key, jobs):
            if status == jobstate.Abandoned:
                job.exception = f"node {link.node.name} ({link.host}:{link.port}): {why}"
                job.end_time = time.time()
                self._complete(job, link.node)
            else:
                self.cluster._status_changed(job, link.node)
        self.dispatch()

    def node_lost(self, link: NodeLink) -> None:
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

    def node_failed(self, link: NodeLink) -> None:
        if all(lk.failure is not None for lk in self.links.values()):
            reasons = "; ".join(lk.failure for lk in self.links.values())
            self.fatal = f"no node can run this cluster's jobs: {reasons}"
            for job in self.sched.abandon_all():
                job.exception = self.fatal
                job.end_time = time.time()
                self._complete(job, None)

    async def close(self, terminate: bool) -> None:
        if self._lonely is not None:
            self._lonely.cancel()
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
    import psutil  # (only for a host name: a client on loopback does without it)

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
