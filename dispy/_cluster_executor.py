"""``ClusterExecutor``: the cluster as a ``concurrent.futures.Executor``.

One mechanism underneath: a ``JobCluster`` whose computation runs whatever
function each job carries (pickled by value with cloudpickle), so libraries
that accept an executor (``loop.run_in_executor``, joblib-style code) run
on the nodes.  Futures are the jobs' own ``job.future``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import sys
import time

import cloudpickle

from .serialize import is_user_module


def _call(fn_bytes: bytes, args: tuple, kwargs: dict):
    """Runs on the node: the job's function, with its arguments."""
    import pickle

    return pickle.loads(fn_bytes)(*args, **kwargs)


def _call_chunk(fn_bytes: bytes, chunk: list):
    import pickle

    fn = pickle.loads(fn_bytes)
    return [fn(*args) for args in chunk]


def _dump_fn(fn) -> bytes:
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    if mod is not None and is_user_module(mod):
        cloudpickle.register_pickle_by_value(mod)  # not importable on the nodes
        try:
            return cloudpickle.dumps(fn)
        finally:
            cloudpickle.unregister_pickle_by_value(mod)
    return cloudpickle.dumps(fn)


class ClusterExecutor(concurrent.futures.Executor):
    """``concurrent.futures.Executor`` over dispy nodes.

    ``ClusterExecutor(nodes=..., secret=..., **JobCluster options)``; then
    ``submit(fn, *args)`` returns a Future, ``map(fn, *iterables, chunksize=)``
    yields results in order, ``shutdown(wait, cancel_futures=)`` closes.
    """

    def __init__(self, nodes=None, depends=(), **cluster_options) -> None:
        from ._client import JobCluster

        self._cluster = JobCluster(_call, nodes=nodes, depends=depends, **cluster_options)
        self._chunk_cluster = None
        self._options = dict(cluster_options, nodes=nodes, depends=depends)
        self._jobs: list = []
        self._shutdown = False

    @property
    def cluster(self):
        return self._cluster

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        job = self._cluster.submit(_dump_fn(fn), args, kwargs)
        self._jobs.append(job)
        if len(self._jobs) > 1024:  # forget the ended ones (bounded bookkeeping)
            self._jobs = [j for j in self._jobs if not j._end.is_set()]
        return job.future

    def map(self, fn, *iterables, timeout=None, chunksize: int = 1):
        if chunksize <= 1:
            return super().map(fn, *iterables, timeout=timeout)
        if self._chunk_cluster is None:
            from ._client import JobCluster

            self._chunk_cluster = JobCluster(_call_chunk, **self._options)
        fn_bytes = _dump_fn(fn)
        args = iter(zip(*iterables, strict=False))
        futures = []
        while chunk := list(itertools.islice(args, chunksize)):
            futures.append(self._chunk_cluster.submit(fn_bytes, chunk).future)
        deadline = None if timeout is None else time.monotonic() + timeout

        def results():
            for fut in futures:
                left = None if deadline is None else deadline - time.monotonic()
                yield from fut.result(left)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        if cancel_futures:
            for job in self._jobs:
                job.future.cancel()
        for cluster in (self._cluster, self._chunk_cluster):
            if cluster is not None:
                cluster.close(terminate=not wait)
