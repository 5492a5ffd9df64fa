"""``dispy.invoker``: LensKit's parallel model-op invoker, over the cluster.

::

    with dispy.invoker(model, func, n_jobs=2) as inv:
        results = list(inv.map(users))          # func(model, user) for each user

The model is placed once per node (``cluster.put``: numpy arrays in it are
read-only maps of one copy that every job process of the node shares) and
``func(model, *args)`` runs in the job processes with the model object
itself.  ``n_jobs=1`` runs in this process; no ``nodes``: a node started on
this machine with ``n_jobs`` job processes; ``nodes=[...]``: those nodes, with
any other ``JobCluster`` option (``secret``, TLS files, ...).
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import sys

from ._client import JobCluster
from ._local_node import LocalNode
from .errors import DispyError, JobFailed, SubmitError

#: LensKit's environment variable for the default process count.
NUM_PROCS_ENV = "DISPY_NUM_PROCS"


def proc_count(core_div: int = 2, max_default: int | None = None) -> int:
    """How many job processes an invoker uses by default: ``$DISPY_NUM_PROCS``
    (or LensKit's ``$LK_NUM_PROCS``), else the CPUs divided by ``core_div``,
    at most ``max_default``; at least 1."""
    for env in (NUM_PROCS_ENV, "LK_NUM_PROCS"):
        value = os.environ.get(env)
        if value:
            try:
                return max(1, int(value.split(",")[0]))
            except ValueError:
                raise DispyError(f"${env}={value!r} is not a number of processes") from None
    n = max(1, (os.cpu_count() or 1) // core_div)
    return min(n, max_default) if max_default else n


def _task(func):
    """The job each argument set becomes: ``func`` on the node's copy of the model.
    (A closure: it travels by value with ``func`` in it.)"""

    def invoke(handle, *args):
        return func(handle.get(), *args)

    invoke.__name__ = getattr(func, "__name__", "invoke")
    return invoke


class InProcessInvoker:
    """``n_jobs=1``: ``func(model, *args)`` here, one after the other."""

    def __init__(self, model, func) -> None:
        self.model, self.func = model, func

    def map(self, *iterables):
        for args in zip(*iterables, strict=False):
            yield self.func(self.model, *args)

    def shutdown(self) -> None:
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class ClusterInvoker:
    """The model placed once per node; ``map`` runs ``func(model, *args)`` there."""

    def __init__(self, model, func, n_jobs: int | None, nodes, cluster_options: dict) -> None:
        if not callable(func):
            raise TypeError(f"invoker(): func must be callable, not {type(func).__name__}")
        self._local: LocalNode | None = None
        self.cluster: JobCluster | None = None
        options = dict(cluster_options)
        options.setdefault("recover_file", False)
        try:
            if nodes is None:  # a node of our own, with n_jobs job processes
                self._local = LocalNode(cpus=n_jobs or proc_count()).start()
                nodes = [self._local.address]
                options["secret"] = self._local.secret
            # func's own module goes to the nodes (as a computation's would)
            module = sys.modules.get(getattr(func, "__module__", None) or "")
            if module is not None and module.__name__ != "__main__":
                options["depends"] = [*options.get("depends", ()), module]
            self.cluster = JobCluster(_task(func), nodes=nodes, **options)
            try:
                self.handle = self.cluster.put(model)
            except SubmitError as exc:
                raise TypeError(
                    f"invoker(): the model cannot be sent to the nodes: {exc.__cause__ or exc} "
                    "(it must be picklable, as for LensKit's invoker)"
                ) from exc.__cause__
        except BaseException:
            self.shutdown()
            raise

    def map(self, *iterables, max_pending: int | None = None, chunksize: int | None = None):
        """``func(model, *args)`` for each argument set (``zip(*iterables)``), in
        input order, lazily (at most ``max_pending`` jobs in flight).  A task that
        raises ends the iteration with ``JobFailed`` naming it.

        ``chunksize``: tasks per job.  By default up to 4 when the iterables have
        a length and there are enough tasks for every job process to get many
        chunks (a job's round trip costs about a millisecond: 400 tasks of 10 ms
        ran 13% faster in chunks of 4), else 1."""
        if self.cluster is None:
            raise DispyError("invoker is shut down")
        if chunksize is None:
            chunksize = self._default_chunksize(iterables)
        sent: collections.deque = collections.deque()  # argument sets not yet answered

        def jobs():
            for a in zip(*iterables, strict=False):
                sent.append(a)
                yield (self.handle, *a)

        results = self.cluster.map(jobs(), star=True, max_pending=max_pending, chunksize=chunksize)
        for i in itertools.count():
            try:
                result = next(results)
            except StopIteration:
                return
            except JobFailed as exc:
                job = exc.job
                text = str(job.exception or exc)
                m = _CHUNK_ITEM.match(text)
                j = int(m.group(1)) if m else 0
                text = text[m.end() :] if m else text
                args = sent[j] if j < len(sent) else ()
                raise JobFailed(
                    job,
                    f"invoker task {i + j} (arguments {_short(args)}) failed"
                    + (f" on {job.ip_addr}" if job.ip_addr else "")
                    + f": {text}",
                ) from None
            sent.popleft()
            yield result

    def _default_chunksize(self, iterables) -> int:
        try:
            n = min(len(it) for it in iterables)
        except TypeError:  # an iterator: its length is not known
            return 1
        cpus = sum(node.cpus for node in self.cluster.status()[0]) or 1
        return max(1, min(4, n // (16 * cpus)))

    def shutdown(self) -> None:
        """Close the cluster (the model is removed from every node) and stop the
        node this invoker started, if any."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self._local is not None:
            self._local.stop()
            self._local = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


#: How a chunk's failure names its item (dispynode's job process writes it).
_CHUNK_ITEM = re.compile(r"item (\d+) of the chunk: ")


def _short(args, limit: int = 80) -> str:
    text = ", ".join(repr(a) for a in args)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invoker(model, func, n_jobs: int | None = None, *, nodes=None, **cluster_options):
    """An invoker of ``func(model, *args)`` (LensKit's ``invoker``): ``map(*iterables)``
    gives the results in input order; ``shutdown()`` (or leaving a ``with``
    block) frees the model everywhere.

    ``n_jobs=1`` (and no ``nodes``): in this process.  No ``nodes``: a node
    started on this machine with ``n_jobs`` job processes (default
    ``proc_count()``).  ``nodes=[...]``: those nodes (``n_jobs`` is then theirs
    to decide), with ``JobCluster``'s other options (``secret=``, ...).
    """
    if n_jobs is not None and n_jobs < 1:
        raise ValueError(f"invoker(): n_jobs must be at least 1, not {n_jobs}")
    if nodes is None and (n_jobs or proc_count()) == 1 and not cluster_options:
        return InProcessInvoker(model, func)
    return ClusterInvoker(model, func, n_jobs, nodes, cluster_options)
