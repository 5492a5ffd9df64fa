"""Which job goes to which node, and what happens to jobs when a node goes.

No I/O: the face (``JobCluster``'s engine) tells the scheduler what happened
(a node is ready, a job ended, a node was lost) and sends what ``assign``
returns.  Job statuses change only through ``jobstate.next_status``.

Each node gets up to ``cpus * prefetch`` jobs at once: ``cpus`` run while
the rest wait on the node, so a node never idles for a network round trip
between two short jobs.  ``prefetch`` follows the node's job times
(``observe``): 2 for jobs of a few ms or more, up to MAX_PREFETCH for tiny
ones, so that each CPU has about AHEAD_S of work waiting.

A job sent ahead stays *Created* until it starts.  A node that says which
jobs started (``reports``: dispynode, and dispyscheduler passing its nodes'
word on) makes them *Running* on its word (``started``); for a peer that
does not, the first ``cpus`` of a node's jobs in flight are reckoned
*Running*, and as each ends the next one is (``take_started``).  A node given fewer CPUs than it has (``NodeAllocate``,
``set_node_cpus``: ``limited``) gets only ``cpus`` jobs at once, so that it
never runs more of them.
"""

from __future__ import annotations

import collections
import functools
import math

from . import jobstate

_LIVE = (jobstate.Running, jobstate.ProvisionalResult)
#: Seconds of work a node should hold per CPU beyond its running job: longer than a
#: round trip to the client, so a CPU never waits for the next job.
AHEAD_S = 0.002
#: At most this many times a node's CPUs in jobs sent to it (tiny jobs: with the
#: node sending them on ahead to its job processes, bigger batches each way cost
#: less per job; 50 us jobs on 2 CPUs: 4: 9,500 jobs/s; 8: 12,800; 16: 18,100;
#: 24: 19,500).
MAX_PREFETCH = 16


class NodeState:
    """What the scheduler knows of one node."""

    __slots__ = (
        "key",
        "cpus",
        "running",
        "ready",
        "paused",
        "pinned",
        "prefetch",
        "base_prefetch",
        "job_s",
        "limited",
        "reports",
    )

    def __init__(self, key, cpus: int, prefetch: int = 2, limited: bool = False) -> None:
        self.key = key
        self.cpus = cpus
        self.prefetch = self.base_prefetch = prefetch
        self.job_s: float | None = None  # its jobs' run time, a moving average
        #: the node says which of its jobs started (its RESULTS' ``g``): its jobs are
        #: Running on its word only, not reckoned
        self.reports = False
        self.limited = limited  # fewer CPUs than the node has: no jobs sent ahead
        #: the jobs sent there and not ended, in the order sent
        self.running: dict[int, object] = {}
        self.ready = False
        self.paused = False  # outside the node's service hours: it takes no jobs for now
        self.pinned: collections.deque = collections.deque()

    @property
    def capacity(self) -> int:
        return self.cpus if self.limited else self.cpus * self.prefetch

    def busy(self) -> int:
        """How many of its jobs run now (Running or ProvisionalResult)."""
        return sum(1 for job in self.running.values() if job.status in _LIVE)


class Scheduler:
    """Queue and allocation for one cluster.

    Jobs are objects with ``status``, ``_uid``, ``_pinned`` (a node key or
    None) and ``_node`` attributes (``DispyJob``).
    """

    def __init__(
        self,
        reentrant: bool = False,
        prefetch: int = 2,
        queue=None,
        eligible=None,
        report_started: bool = False,
    ) -> None:
        self.reentrant = reentrant
        self.prefetch = prefetch
        #: queued jobs: a deque (one cluster), or a ``queues.ClusterQueue`` (several)
        self.pending = queue if queue is not None else collections.deque()
        #: ``eligible(node_key, cluster)``: may that node run that cluster's jobs now?
        #: (None: every node runs every job; needs a ClusterQueue otherwise)
        self.eligible = eligible
        self.nodes: dict[object, NodeState] = {}
        #: jobs that became Running since the last ``take_started()`` (kept only
        #: with ``report_started``: an owner that never takes them keeps none)
        self._started: list | None = [] if report_started else None

    # -- nodes ----------------------------------------------------------------
    def add_node(self, key, cpus: int, limited: bool = False, reports: bool = False) -> NodeState:
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = NodeState(key, cpus, self.prefetch)
        node.cpus = cpus
        node.limited = limited
        node.reports = reports
        node.ready = True
        self._promote(node)
        return node

    def set_cpus(self, key, cpus: int, limited: bool | None = None) -> None:
        node = self.nodes[key]
        node.cpus = max(0, cpus)
        if limited is not None:
            node.limited = limited
        self._promote(node)

    def _promote(self, node: NodeState) -> None:
        """Mark Running the node's first jobs in flight, up to its CPUs (unless the
        node says itself which ones started: ``started``)."""
        if node.reports:
            return
        free = node.cpus - node.busy()
        if free <= 0:
            return
        for job in node.running.values():
            if job.status == jobstate.Created:
                job.status = jobstate.next_status(job.status, jobstate.DISPATCH)
                if self._started is not None:
                    self._started.append(job)
                free -= 1
                if free == 0:
                    return

    def started(self, key, uid) -> None:
        """The node says its job ``uid`` started: Running (if it waited to)."""
        node = self.nodes.get(key)
        job = node.running.get(uid) if node is not None else None
        if job is not None and job.status == jobstate.Created:
            job.status = jobstate.next_status(job.status, jobstate.DISPATCH)
            if self._started is not None:
                self._started.append(job)

    def observe(self, key, seconds: float) -> None:
        """A job of the node ran ``seconds`` (its own start to end): adjust how many
        jobs the node holds ahead of its CPUs."""
        node = self.nodes.get(key)
        if node is None or not seconds >= 0:
            return
        avg = node.job_s = (
            seconds if node.job_s is None else node.job_s + 0.1 * (seconds - node.job_s)
        )
        want = 1 + math.ceil(AHEAD_S / max(avg, 1e-6))
        node.prefetch = max(node.base_prefetch, min(MAX_PREFETCH, want))

    def take_started(self) -> list:
        """The jobs that became Running since the last call (to stamp and report)."""
        if not self._started:
            return []
        out, self._started = self._started, []
        return out

    def remove_node(self, key) -> list[tuple[object, int]]:
        """The node is gone: requeue or abandon its jobs; return (job, new status) pairs."""
        node = self.nodes.pop(key, None)
        if node is None:
            return []
        # (a job cancelled before it started keeps its place until the node confirms:
        # it ended already, and has nothing to lose)
        jobs = [j for j in list(node.running.values()) + list(node.pinned) if _open(j)]
        return [self._lose(job) for job in jobs]

    def lose_jobs(self, key, jobs) -> list[tuple[object, int]]:
        """A node lost these of its jobs (it restarted): requeue or abandon them."""
        node = self.nodes.get(key)
        out = []
        for job in jobs:
            if node is not None:
                node.running.pop(job._uid, None)
            if _open(job):
                out.append(self._lose(job))
        if node is not None:
            self._promote(node)
        return out

    def _lose(self, job) -> tuple[object, int]:
        may_rerun = getattr(job, "_reentrant", self.reentrant) and job._pinned is None
        if job.status == jobstate.Created and job._node is None:  # pinned, not yet sent
            event = jobstate.ABANDON
        else:
            event = jobstate.REQUEUE if may_rerun else jobstate.ABANDON
        job.status = jobstate.next_status(job.status, event)
        job._node = None
        if job.status == jobstate.Created:
            self.pending.appendleft(job)
        return job, job.status

    # -- jobs -------------------------------------------------------------------
    def submit(self, job, node_key=None) -> bool:
        """Queue a job (for one node if ``node_key``); False if that node is unknown."""
        if node_key is not None:
            node = self.nodes.get(node_key)
            if node is None:
                return False
            job._pinned = node_key
            node.pinned.append(job)
        else:
            self.pending.append(job)
        return True

    def assign(self) -> list[tuple[NodeState, list]]:
        """Give queued jobs to nodes with free slots (first one per free CPU on
        every node, then the jobs sent ahead); those a CPU is free for become
        Running, the others stay Created until then (``_promote``)."""
        batches: dict[object, list] = {}
        for ahead in (False, True):
            for node in self.nodes.values():
                if not node.ready or node.paused or not (node.pinned or self.pending):
                    continue
                taken = len(node.running) + len(batches.get(node.key, ()))
                limit = node.capacity if ahead else min(node.cpus, node.capacity)
                if limit - taken > 0:
                    batch = self._take(node, limit - taken)
                    if batch:
                        batches.setdefault(node.key, []).extend(batch)
        out = []
        for key, batch in batches.items():
            node = self.nodes[key]
            for job in batch:  # Created still: Running once a CPU is free for it
                job._node = node.key
                node.running[job._uid] = job
            self._promote(node)
            out.append((node, batch))
        return out

    def _take(self, node: NodeState, free: int) -> list:
        """Up to ``free`` jobs for ``node``: its pinned ones first, then the queue's."""
        batch = []
        while free > 0 and node.pinned:
            if self.eligible is not None and not self.eligible(node.key, node.pinned[0]._cluster):
                break  # (several clusters) not set up there yet, or taken exclusively
            batch.append(node.pinned.popleft())
            free -= 1
        if self.eligible is None:
            while free > 0 and self.pending:
                batch.append(self.pending.popleft())
                free -= 1
        else:
            ok = functools.partial(self.eligible, node.key)
            while free > 0 and self.pending:
                job = self.pending.pop_for(ok)
                if job is None:
                    break
                batch.append(job)
                free -= 1
        return batch

    def ended(self, job, event: str) -> bool:
        """A job's node reported its end; False (and nothing else changes) if it
        already ended (cancelled before it started, say)."""
        before = job.status
        node = self.nodes.get(job._node)
        try:
            job.status = jobstate.next_status(job.status, event)
        except jobstate.InvalidTransition:
            self.release(job._node, job._uid)  # its place on the node is free now
            return False
        if before == jobstate.Created and job._node is None:
            self._unqueue(job)  # requeued, and a late result came: unqueue it
        if node is not None:
            node.running.pop(job._uid, None)
            self._promote(node)
        return True

    def _unqueue(self, job) -> None:
        try:
            self.pending.remove(job)
        except ValueError:
            node = self.nodes.get(job._pinned)
            if node is not None and job in node.pinned:
                node.pinned.remove(job)

    def requeue(self, job) -> bool:
        """A node handed back a job it never started: queue it again (first)."""
        if job.status == jobstate.Created and job._node is None:
            return False  # queued here already
        try:
            job.status = jobstate.next_status(job.status, jobstate.REQUEUE)
        except jobstate.InvalidTransition:
            return False
        node = self.nodes.get(job._node)
        if node is not None:
            node.running.pop(job._uid, None)
            self._promote(node)
        job._node = None
        if job._pinned is not None and job._pinned in self.nodes:
            self.nodes[job._pinned].pinned.appendleft(job)
        elif job._pinned is not None:  # its node is gone
            job.status = jobstate.next_status(job.status, jobstate.ABANDON)
            return False
        else:
            self.pending.appendleft(job)
        return True

    def adopt(self, job, key) -> bool:
        """A node says it has this job, which was queued (requeued after the node was
        lost, or restored by a restarted scheduler): it is Running there now.  False if
        the job is not waiting to start or the node is unknown."""
        node = self.nodes.get(key)
        if node is None or job.status != jobstate.Created:
            return False
        self._unqueue(job)  # if it is queued
        job.status = jobstate.next_status(job.status, jobstate.DISPATCH)
        job._node = key
        node.running[job._uid] = job
        return True

    def release(self, key, uid: int) -> None:
        """The node reported the end of a job that had ended here already (cancelled
        before it started): its place on the node is free."""
        node = self.nodes.get(key)
        if node is not None and node.running.pop(uid, None) is not None:
            self._promote(node)

    def cancel_sent(self, job) -> bool:
        """Cancel a job sent to a node that has not started it: Cancelled now (the
        node is told to drop it; its place there is free once the node says so).
        False if the job is not such a one."""
        if job.status != jobstate.Created or job._node is None:
            return False
        job.status = jobstate.next_status(job.status, jobstate.CANCEL)
        return True

    def set_ready(self, key, ready: bool) -> None:
        """A ready node gets jobs; deallocated or closing nodes do not."""
        node = self.nodes.get(key)
        if node is not None:
            node.ready = ready

    def set_paused(self, key, paused: bool) -> None:
        """The node is outside its service hours (dispynode --service_stop): no jobs
        for it until it says it serves again; ``ready`` is kept as it was."""
        node = self.nodes.get(key)
        if node is not None:
            node.paused = paused

    def cancel_queued(self, job) -> bool:
        """Cancel a job that has not been sent to a node; False if it was sent."""
        if job.status != jobstate.Created:
            return False
        try:
            self.pending.remove(job)
        except ValueError:
            node = self.nodes.get(job._pinned)
            if node is None or job not in node.pinned:
                return False
            node.pinned.remove(job)
        job.status = jobstate.next_status(job.status, jobstate.CANCEL)
        return True

    def abandon_all(self) -> list:
        """No node can run queued jobs: abandon them; return them."""
        jobs = list(self.pending)
        self.pending.clear()
        for node in self.nodes.values():
            jobs.extend(node.pinned)
            node.pinned.clear()
        for job in jobs:
            job.status = jobstate.next_status(job.status, jobstate.ABANDON)
        return jobs


def _open(job) -> bool:
    """Whether ``job`` has not ended (its node's word may still change it)."""
    return job.status not in jobstate.TERMINAL
