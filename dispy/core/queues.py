"""The queue of several clusters' jobs, in the order a sharing policy gives.

``JobCluster`` has one cluster and a plain deque; ``dispyscheduler`` serves
many clusters on the same nodes and keeps their jobs in a ``ClusterQueue``:

* ``first`` (default): jobs in the order they were submitted, whichever
  cluster they belong to;
* ``fair``: clusters take turns, one job each (round-robin);
* ``early``: the cluster created first goes first, until its queue is empty.

A node takes the next job it may run: ``pop_for(eligible)`` skips clusters
that ``eligible(cluster)`` refuses (not set up on that node yet, or the node
belongs to an exclusive cluster).  No I/O; jobs are objects with
``_cluster`` (any hashable, with a ``created`` order given to ``add_cluster``)
and ``_seq`` (set here).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator

POLICIES = ("first", "fair", "early")


class ClusterQueue:
    """Per-cluster deques behind the deque interface the scheduler uses."""

    def __init__(self, policy: str = "first") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self._queues: dict[object, collections.deque] = {}
        self._order: list = []  # clusters by creation
        self._turn = 0  # fair: where the next round starts
        self._seq = itertools.count()
        self._len = 0

    def add_cluster(self, cluster) -> None:
        if cluster not in self._queues:
            self._queues[cluster] = collections.deque()
            self._order.append(cluster)

    def remove_cluster(self, cluster) -> list:
        """Forget a cluster; return its queued jobs."""
        q = self._queues.pop(cluster, None)
        if q is None:
            return []
        i = self._order.index(cluster)
        self._order.pop(i)
        if i < self._turn:
            self._turn -= 1
        self._len -= len(q)
        return list(q)

    # -- the deque interface ----------------------------------------------------------
    def append(self, job) -> None:
        job._seq = next(self._seq)
        self._queue(job).append(job)
        self._len += 1

    def appendleft(self, job) -> None:
        if getattr(job, "_seq", None) is None:
            job._seq = next(self._seq)
        self._queue(job).appendleft(job)
        self._len += 1

    def remove(self, job) -> None:
        self._queues[job._cluster].remove(job)  # ValueError if absent, like a deque
        self._len -= 1

    def clear(self) -> None:
        for q in self._queues.values():
            q.clear()
        self._len = 0

    def popleft(self):
        job = self.pop_for(lambda cluster: True)
        if job is None:
            raise IndexError("pop from an empty queue")
        return job

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator:
        for cluster in self._order:
            yield from self._queues[cluster]

    def __contains__(self, job) -> bool:
        q = self._queues.get(getattr(job, "_cluster", None))
        return q is not None and job in q

    # -- policy -----------------------------------------------------------------------
    def _queue(self, job) -> collections.deque:
        q = self._queues.get(job._cluster)
        if q is None:
            self.add_cluster(job._cluster)
            q = self._queues[job._cluster]
        return q

    def pop_for(self, eligible: Callable[[object], bool]):
        """The next job, by the policy, of a cluster ``eligible`` accepts; None if none."""
        if not self._len:
            return None
        order = self._order
        if self.policy == "first":
            best = None
            for cluster in order:
                q = self._queues[cluster]
                if q and (best is None or q[0]._seq < best[0]._seq) and eligible(cluster):
                    best = q
            job = best.popleft() if best is not None else None
        elif self.policy == "early":
            job = None
            for cluster in order:
                q = self._queues[cluster]
                if q and eligible(cluster):
                    job = q.popleft()
                    break
        else:  # fair
            job = None
            n = len(order)
            for k in range(n):
                i = (self._turn + k) % n
                q = self._queues[order[i]]
                if q and eligible(order[i]):
                    job = q.popleft()
                    self._turn = (i + 1) % n
                    break
        if job is not None:
            self._len -= 1
        return job
