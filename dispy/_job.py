"""The objects a dispy user handles: DispyJob, DispyNode, NodeAllocate."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import functools
import itertools
import threading
import weakref
from typing import NamedTuple

from .core import jobstate


class DispyJob:
    """A submitted job.

    ``status`` is one of the class constants; ``result``, ``stdout``,
    ``stderr``, ``exception`` (the remote traceback text), ``ip_addr``,
    ``start_time`` and ``end_time`` are filled in when the job ends.
    ``id`` is free for the user (dispy never reads it); unless set, a
    number unique in the process, increasing with each job, that tests false:
    ``if job.id:`` tells whether the program has set one, as dispy's examples
    expect (``bounded_submit.py``).  ``finish`` is a ``threading.Event`` set at
    the job's end; ``job()`` waits for the end and returns the result (None if
    the job failed).

    With callbacks (``callback``, ``cluster_status``), a job's end reaches the
    program on the callback thread, just before the callbacks are called with
    it: until then other threads see the job as it was (``status``), so a
    callback never reports an end that the submitting thread saw first.  A
    thread that waits for the job (``job()``, ``finish.wait()``, the cluster's
    ``wait()``) takes the end at once, never waiting for the callbacks.
    """

    Created = jobstate.Created
    Running = jobstate.Running
    ProvisionalResult = jobstate.ProvisionalResult
    Cancelled = jobstate.Cancelled
    Terminated = jobstate.Terminated
    Abandoned = jobstate.Abandoned
    Finished = jobstate.Finished

    _ids = itertools.count(1)

    __slots__ = (
        "id",
        "_status",
        "_held",
        "result",
        "stdout",
        "stderr",
        "exception",
        "ip_addr",
        "start_time",
        "end_time",
        "submit_time",
        "_future",
        "_end",
        "_uid",
        "_args",
        "_kwargs",
        "_segs",
        "_pinned",
        "_opts",
        "_node",
        "_cluster",
        "__weakref__",
    )

    def __init__(self, args: tuple, kwargs: dict, segs: list, cluster) -> None:
        self._status = jobstate.Created
        self._held = None  # the status other threads see until the end is published
        self.result = None
        self.stdout = None
        self.stderr = None
        self.exception = None
        self.ip_addr = None
        self.start_time = None
        self.end_time = None
        self.submit_time = None
        # the job's end, on a condition its cluster's jobs share, and its Future,
        # made when first asked for: a Future and an Event of its own per job cost
        # 1.3 KB of a job's 3.6 (200,000 jobs held by a program: 0.8 GB)
        cond = cluster._end_cond if cluster is not None else threading.Condition()
        self._end = JobEnd(cond)
        self._future: concurrent.futures.Future | None = None
        self._uid = next(DispyJob._ids)
        self.id = JobNumber(self._uid)
        self._args = args
        self._kwargs = kwargs
        self._segs = segs
        self._pinned = None
        self._opts = None
        self._node = None
        self._cluster = cluster

    @property
    def status(self) -> int:
        """One of the class constants: Created, Running, ProvisionalResult, then
        Finished, Terminated, Cancelled or Abandoned."""
        held = self._held
        if held is None or threading.get_ident() in SEES_ENDS:
            return self._status
        return held

    @status.setter
    def status(self, value: int) -> None:
        if (
            self._held is None
            and value in jobstate.TERMINAL
            and self._status not in jobstate.TERMINAL
            and self._cluster is not None
            and self._cluster._callbacks is not None
        ):
            self._held = self._status  # published with the end, on the callback thread
        self._status = value

    @property
    def finish(self) -> JobEnd:
        """Set when the job has ended (dispy's ``job.finish.wait(timeout)``; it
        works as a ``threading.Event``)."""
        return self._end

    @property
    def future(self) -> concurrent.futures.Future:
        """The job's ``concurrent.futures.Future``: its result, or ``JobFailed``;
        cancelling it cancels the job."""
        with self._end._cond:  # made once, resolved once: here or at the job's end
            fut = self._future
            if fut is not None:
                return fut
            fut = self._future = concurrent.futures.Future()
            ended = self._end._flag
        if ended:
            resolve_future(self, fut)
        else:
            # (through a weak reference: a job -> future -> callback -> job cycle would
            # keep every result, 100 MB arrays included, alive until the cyclic GC ran)
            fut.add_done_callback(functools.partial(_future_done, weakref.ref(self)))
        return fut

    def _ended(self) -> concurrent.futures.Future | None:
        """The client's last word on the job (its status, result...), published:
        wake its waiters.  Returns its Future, if one was made, to be resolved
        (``resolve_future``) once the caller holds no lock."""
        self._args = self._kwargs = self._segs = None  # not needed any more
        end = self._end
        with end._cond:
            self._held = None
            end._over = end._flag = True
            end._waiting = None
            end._cond.notify_all()
            fut = self._future
        return None if fut is None or fut.done() else fut  # (cancelled: done already)

    def __call__(self, clear: bool = False, timeout: float | None = None):
        """Wait for the job to end (at most ``timeout`` seconds); return its result.

        Returns None if the job failed (see ``exception``) or did not end in time.
        """
        if not self._end.wait(timeout):
            return None
        result = self.result
        if clear:
            self.result = None
        return result

    def __await__(self):
        """``await job`` in asyncio code: the result, or JobFailed; cancelling the
        awaiting task cancels the job."""
        import asyncio

        try:
            return (yield from asyncio.wrap_future(self.future).__await__())
        except asyncio.CancelledError:
            if not self._end.is_set():
                self._cluster.cancel(self)
            raise

    def __lt__(self, other: DispyJob) -> bool:
        return self._uid < other._uid

    def __repr__(self) -> str:
        return f"<DispyJob id={self.id!r} status={jobstate.NAMES.get(self.status, self.status)}>"


class JobNumber(int):
    """A job's id until the program sets one: its number, which tests false, as
    dispy's unset id (None) does."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False


#: The threads that see a job's end before it is published: the event loop's
#: (it makes the end) and the callback threads (they publish it).
SEES_ENDS: set[int] = set()


class JobEnd(threading.Event):
    """A job's end: a ``threading.Event`` (as dispy's ``job.finish`` is) whose
    condition its cluster's jobs share; an Event of its own (a condition and a
    lock) cost each job about 0.6 KB.  ``set``, ``is_set`` and ``clear`` are
    Event's own; ``wait`` checks its own flag, since another job's end wakes it.

    ``_over``: the client has ended the job; ``_flag``: its end is published.
    Between the two (the cluster has callbacks, which get the end first), a
    thread that waits for it does not wait for the callbacks: the event loop and
    the callback threads see the end as it is, any other publishes it
    (``_waiting``, the job, is set for that)."""

    def __init__(self, cond: threading.Condition) -> None:  # no Event.__init__: no lock
        self._cond = cond
        self._flag = False
        self._over = False
        self._waiting = None

    def wait(self, timeout: float | None = None) -> bool:
        if not self._flag and not self._over:
            with self._cond:
                if not self._cond.wait_for(lambda: self._flag or self._over, timeout):
                    return False
        if not self._flag and threading.get_ident() not in SEES_ENDS:
            job = self._waiting
            if job is not None:
                job._cluster._ends.publish(job)
        return True


def resolve_future(job: DispyJob, fut: concurrent.futures.Future) -> None:
    """Give an ended job's Future its result, or JobFailed."""
    from .errors import JobFailed

    try:
        if job.status == jobstate.Finished:
            fut.set_result(job.result)
        else:
            name = jobstate.NAMES.get(job.status, job.status)
            fut.set_exception(
                JobFailed(job, f"job {job.id!r} {name}: {job.exception or 'no reason given'}")
            )
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


def _future_done(job_ref, fut: concurrent.futures.Future) -> None:
    """A job's future was cancelled by its user: cancel the job."""
    job = job_ref()
    if job is not None and fut.cancelled() and not job._end.is_set():
        job._cluster.cancel(job)


class ClusterStatus(NamedTuple):
    """What ``cluster.status()`` returns, as dispy does: ``nodes`` (the
    ``DispyNode`` objects, the same ones ``cluster_status`` callbacks get) and
    ``jobs_pending`` (jobs not ended yet).  A tuple: ``nodes, n = status()``."""

    nodes: list
    jobs_pending: int


class DispyNodeAvailInfo:
    """A node's free resources: ``cpu`` (% busy), ``memory`` and ``disk`` (bytes
    available), ``swap`` (% used)."""

    __slots__ = ("cpu", "memory", "disk", "swap")

    def __init__(self, cpu=0.0, memory=0, disk=0, swap=0.0) -> None:
        self.cpu, self.memory, self.disk, self.swap = cpu, memory, disk, swap

    def __repr__(self) -> str:
        return (
            f"DispyNodeAvailInfo(cpu={self.cpu}, memory={self.memory}, "
            f"disk={self.disk}, swap={self.swap})"
        )


class DispyNode:
    """A node as the client sees it (also passed to ``cluster_status`` callbacks)."""

    Initialized = jobstate.Created - 1
    Closed = jobstate.Created - 2
    AvailInfo = jobstate.Created - 3

    def __init__(self, ip_addr: str, port: int, name: str = "", cpus: int = 0) -> None:
        self.ip_addr = ip_addr
        self.port = port
        self.name = name or ip_addr
        self.cpus = cpus
        self.avail_cpus = cpus
        self.busy = 0
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.tx = 0
        self.rx = 0
        self.update_time = 0.0
        self.platform = ""
        self.avail_info: DispyNodeAvailInfo | None = None

    def __repr__(self) -> str:
        return f"<DispyNode {self.name} {self.ip_addr}:{self.port} cpus={self.cpus}>"


class NodeAllocate:
    """Which nodes a cluster uses, and how many of their CPUs.

    ``host`` is a name, an address, or a wildcard pattern like ``'192.168.2.*'``;
    override ``allocate`` to decide per node (return the number of CPUs to use,
    0 or less to skip the node).
    """

    def __init__(
        self, host: str, port: int | None = None, cpus: int = 0, depends=(), setup_args=()
    ):
        self.host = host
        self.port = port
        self.cpus = cpus
        self.depends = list(depends)
        self.setup_args = tuple(setup_args)

    def allocate(
        self, cluster, ip_addr: str, name: str, cpus: int, avail_info=None, platform=""
    ) -> int:
        if not (
            fnmatch.fnmatchcase(ip_addr, self.host)
            or (name and fnmatch.fnmatchcase(name, self.host))
        ):
            return 0
        if self.cpus > 0:
            return min(self.cpus, cpus)
        if self.cpus < 0:
            return max(cpus + self.cpus, 0)
        return cpus

    def __repr__(self) -> str:
        return f"NodeAllocate({self.host!r}, port={self.port}, cpus={self.cpus})"
