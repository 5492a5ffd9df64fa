"""Which job goes to which node, and what happens to jobs when a node goes.

No I/O: the face (``JobCluster``'s engine) tells the scheduler what happened
(a node is ready, a job ended, a node was lost) and sends what ``assign``
returns.  Job statuses change only through ``jobstate.next_status``.

Each node gets up to ``cpus * prefetch`` jobs at once: ``cpus`` run while
the rest wait on the node, so a node never idles for a network round trip
between two short jobs.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable

from . import jobstate


class NodeState:
    """What the scheduler knows of one node."""

    __slots__ = ("key", "cpus", "running", "ready", "pinned", "prefetch")

    def __init__(self, key, cpus: int, prefetch: int = 2) -> None:
        self.key = key
        self.cpus = cpus
        self.prefetch = prefetch
        self.running: dict[int, object] = {}
        self.ready = False
        self.pinned: collections.deque = collections.deque()

    @property
    def capacity(self) -> int:
        return self.cpus * self.prefetch

    def free(self) -> int:
        return self.capacity - len(self.running) if self.ready else 0


class Scheduler:
    """Queue and allocation for one cluster.

    Jobs are objects with ``status``, ``_uid``, ``_pinned`` (a node key or
    None) and ``_node`` attributes (``DispyJob``).
    """

    def __init__(
        self, reentrant: bool = False, prefetch: int = 2, queue=None, eligible=None
    ) -> None:
        self.reentrant = reentrant
        self.prefetch = prefetch
        #: queued jobs: a deque (one cluster), or a ``queues.ClusterQueue`` (several)
        self.pending = queue if queue is not None else collections.deque()
        #: ``eligible(node_key, cluster)``: may that node run that cluster's jobs now?
        #: (None: every node runs every job; needs a ClusterQueue otherwise)
        self.eligible = eligible
        self.nodes: dict[object, NodeState] = {}

    # -- nodes ----------------------------------------------------------------
    def add_node(self, key, cpus: int) -> NodeState:
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = NodeState(key, cpus, self.prefetch)
        node.cpus = cpus
        node.ready = True
        return node

    def set_cpus(self, key, cpus: int) -> None:
        self.nodes[key].cpus = max(0, cpus)

    def remove_node(self, key) -> list[tuple[object, int]]:
        """The node is gone: requeue or abandon its jobs; return (job, new status) pairs."""
        node = self.nodes.pop(key, None)
        if node is None:
            return []
        return [self._lose(job) for job in list(node.running.values()) + list(node.pinned)]

    def lose_jobs(self, key, jobs) -> list[tuple[object, int]]:
        """A node lost these of its jobs (it restarted): requeue or abandon them."""
        node = self.nodes.get(key)
        out = []
        for job in jobs:
            if node is not None:
                node.running.pop(job._uid, None)
            out.append(self._lose(job))
        return out

    def _lose(self, job) -> tuple[object, int]:
        may_rerun = getattr(job, "_reentrant", self.reentrant) and job._pinned is None
        if job.status == jobstate.Created:  # pinned, not yet sent
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
        """Give queued jobs to nodes with free slots; mark them Running."""
        out = []
        for node in self.nodes.values():
            free = node.free()
            if free <= 0 or not (node.pinned or self.pending):
                continue
            batch = []
            while free > 0 and node.pinned:
                if self.eligible is not None and not self.eligible(
                    node.key, node.pinned[0]._cluster
                ):
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
            if not batch:
                continue
            for job in batch:
                job.status = jobstate.next_status(job.status, jobstate.DISPATCH)
                job._node = node.key
                node.running[job._uid] = job
            out.append((node, batch))
        return out

    def ended(self, job, event: str) -> bool:
        """A job's node reported its end; False (and nothing changes) if it already ended."""
        before = job.status
        try:
            job.status = jobstate.next_status(job.status, event)
        except jobstate.InvalidTransition:
            return False
        if before == jobstate.Created:  # requeued, and a late result came: unqueue it
            self._unqueue(job)
        node = self.nodes.get(job._node)
        if node is not None:
            node.running.pop(job._uid, None)
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
        try:
            job.status = jobstate.next_status(job.status, jobstate.REQUEUE)
        except jobstate.InvalidTransition:
            return False
        node = self.nodes.get(job._node)
        if node is not None:
            node.running.pop(job._uid, None)
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

    def set_ready(self, key, ready: bool) -> None:
        """A ready node gets jobs; deallocated or closing nodes do not."""
        node = self.nodes.get(key)
        if node is not None:
            node.ready = ready

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

    def running_jobs(self) -> Iterable:
        for node in self.nodes.values():
            yield from node.running.values()
