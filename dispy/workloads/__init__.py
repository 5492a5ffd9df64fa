"""Numerical workloads that run as ordinary dispy jobs: distributed LSI
(truncated SVD) and LDA (variational Bayes) of sparse term-document corpora,
in the manner of gensim's distributed models, with numpy and scipy.

* ``dispy.workloads.corpus``: Matrix Market and bag-of-words corpora, and a
  seeded synthetic corpus drawn by LDA's generative process;
* ``dispy.workloads.lsi``: randomized SVD in passes over the corpus chunks;
* ``dispy.workloads.lda``: online / batch variational Bayes LDA.

How the pieces fit: a cluster's computation is ``call`` (run the module-level
function named in each job's arguments), so one cluster serves every step of
a workload.  A ``Runner`` hides where the steps run:

* ``ClusterRunner(cluster)``: jobs on the cluster's nodes.  Data that many
  jobs read (the corpus, the model of the current pass) goes to each node
  once with ``cluster.put`` and jobs receive the small ``NodeData`` handle;
  on the node ``handle.get()`` gives read-only numpy arrays that all job
  processes there share without a copy.  With ``use_put=False`` (or a
  cluster without ``put``) the data travels in the job arguments instead
  (each chunk only with its own job).
* ``SerialRunner()``: the same functions in this process, one after the
  other: the serial reference the distributed runs are checked against.

Sums of arrays over chunks (``runner.sum``) are added up on the node that
computed the parts, so a node sends one array per sum, whatever its number
of chunks; the order of the additions is the order the parts end, so a
run's result depends on how many nodes or CPUs computed it only by rounding.

Requires scipy (``pip install 'dispy[workloads]'``) on the client and nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import mmap
import os
import time
import uuid

import numpy as np

__all__ = [
    "ChunkRef",
    "ClusterRunner",
    "Inline",
    "NodeArray",
    "NodeArrayLost",
    "SerialRunner",
    "WorkloadError",
    "call",
    "local_cluster",
    "node_sum_add",
    "node_sum_take",
    "node_sum_then",
    "preload",
]


class WorkloadError(RuntimeError):
    """A workload's job failed on a node (the message has its traceback)."""


class NodeArrayLost(WorkloadError):
    """A job needed a ``NodeArray`` that its node does not have: the node that
    made it was lost or restarted, or the job ran on another node.  What was
    computed from it must be computed again (``lsi`` starts its passes again)."""


class NodeArrayMissing(LookupError):
    """Raised in a job by ``NodeArray.get()`` when the array is not on this node."""


def call(func, *args, **kwargs):
    """The computation of a workload cluster: ``func(*args, **kwargs)`` on the
    node.  ``func`` is a module-level function of an installed module (pickled
    by reference, so a job carries its name, not its code)."""
    return func(*args, **kwargs)


def one_blas_thread(func):
    """Decorator of the client's side of a workload: its dense linear algebra
    (a QR, an M-step) runs on one BLAS thread.  OpenBLAS threads spin for a
    while after each call; with a node on the same machine they took its
    CPUs from the jobs of the next pass (LSI on 2 CPUs: 1.5 s instead of
    0.8 s, the client's QR 8x slower).  Without threadpoolctl installed,
    nothing changes."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return func(*args, **kwargs)
        with threadpool_limits(1, user_api="blas"):
            return func(*args, **kwargs)

    return run


def preload() -> None:
    """Setup function for a workload cluster (``JobCluster(call, setup=preload)``):
    import numpy, scipy and the workload modules once per node, before the job
    processes are forked, so no job pays for the imports; and one BLAS thread
    per job process (a node runs a job per CPU: BLAS threads on top of that
    oversubscribe the CPUs, which made dense products 4x slower on 2 CPUs),
    as Dask's workers do, when threadpoolctl is installed."""
    import scipy.linalg  # noqa: F401  (LSI's orthonormalisation runs on a node: 40 ms)
    import scipy.sparse  # noqa: F401
    import scipy.special  # noqa: F401

    from . import lda, lsi  # noqa: F401

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1, user_api="blas")


# -- sums merged on the nodes ---------------------------------------------------------


def _check_key(key: str) -> str:
    if not key or not all(c.isalnum() or c in "-_" for c in key):
        raise ValueError(f"sum key {key!r}: use letters, digits, '-' and '_'")
    return key


def _sum_paths(key: str) -> tuple[str, str]:
    """Where this node's part of the sum ``key`` accumulates: in the computation's
    folder on the node (the job processes' working folder; the node removes it
    with the computation), beside the list of the parts added."""
    base = os.path.join(os.getcwd(), f".dispy-sum-{_check_key(key)}")
    return base, base + ".ids"


def _array_path(key: str) -> str:
    """Where a ``NodeArray`` lives on its node: in the computation's folder."""
    return os.path.join(os.getcwd(), f".dispy-array-{_check_key(key)}")


#: Per job process: the NodeArray last read (its key and a read-only view of its map).
_array_cache: dict = {}


class NodeArray:
    """A float64 array that a job wrote into the computation's folder on one
    node (``ClusterRunner.sum_then``): jobs on that node read it with ``get()``,
    a read-only map of the file that the node's job processes share; it never
    crosses the network.  ``ClusterRunner.get(handle)`` brings it to the client."""

    __slots__ = ("key", "shape", "node")

    def __init__(self, key: str, shape: tuple, node: str) -> None:
        self.key, self.shape, self.node = key, tuple(shape), node

    def __reduce__(self):
        return (NodeArray, (self.key, self.shape, self.node))

    def __repr__(self) -> str:
        return f"NodeArray({self.key!r}, shape={self.shape}, node={self.node!r})"

    def get(self) -> np.ndarray:
        cached = _array_cache.get(self.key)
        if cached is not None:
            return cached.reshape(self.shape)
        try:
            with open(_array_path(self.key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    arr = np.empty(0, dtype=np.float64)
                else:
                    arr = np.frombuffer(
                        mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ), dtype=np.float64
                    )
        except FileNotFoundError:
            raise NodeArrayMissing(
                f"{self!r} is not on this node: it was made on {self.node}, "
                "which was lost or restarted, or this job ran elsewhere"
            ) from None
        arr = arr.reshape(self.shape)
        _array_cache.clear()
        _array_cache[self.key] = arr
        return arr


def node_sum_add(func, key: str, index: int, *args) -> tuple:
    """Job: ``func(*args)`` (an array) added into this node's sum ``key`` (float64),
    with ``index`` recorded as added.  Returns the array's shape; the node's sum
    comes back with one ``node_sum_take`` job per node (``ClusterRunner.sum``)."""
    value = np.asarray(func(*args), dtype=np.float64)
    path, ids = _sum_paths(key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the node's other job processes add too
        size = os.fstat(fd).st_size
        if size == 0:
            os.ftruncate(fd, max(value.nbytes, 8))
        elif size != max(value.nbytes, 8):
            raise ValueError(f"node sum {key!r} holds {size} bytes, this part {value.nbytes}")
        if value.size:
            with mmap.mmap(fd, value.nbytes) as mm:
                total = np.frombuffer(mm, dtype=np.float64)
                total += value.ravel()
                del total
        with open(ids, "a") as f:
            f.write(f"{int(index)}\n")
    finally:
        os.close(fd)  # (releases the lock)
    return value.shape


def _held_sum(key: str):
    """This node's sum ``key``, locked against the adders: ``(fd, path, ids path,
    the indexes added)``, or None if nothing was added here.  Close ``fd`` to unlock."""
    path, ids = _sum_paths(key)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the node's other job processes add too
        with open(ids) as f:
            added = [int(line) for line in f if line.strip()]
    except BaseException:
        os.close(fd)
        raise
    return fd, path, ids, added


def _take_held(fd: int, path: str, ids: str) -> np.ndarray:
    """The held sum's values (a flat float64 copy); its files removed."""
    total = np.empty(os.fstat(fd).st_size // 8, dtype=np.float64)
    with os.fdopen(os.dup(fd), "rb") as f:
        f.readinto(memoryview(total).cast("B"))
    os.unlink(path)
    os.unlink(ids)
    return total


def node_sum_take(key: str):
    """Job: this node's sum ``key`` and the indexes added into it, as
    ``(flat float64 array, [index, ...])``, and remove it from the node;
    ``(None, [])`` if nothing was added here."""
    held = _held_sum(key)
    if held is None:
        return None, []
    fd, path, ids, added = held
    try:
        return _take_held(fd, path, ids), added
    finally:
        os.close(fd)


def node_sum_then(key: str, parts: int, shape: tuple, then, drop: str | None = None) -> tuple:
    """Job: take this node's sum ``key`` and, if it holds all ``parts`` parts,
    make ``then(sum)`` (a float64 array) the ``NodeArray`` of the same key:
    returns ``(True, its shape, None)``.  ``then`` gets the sum as a writable
    map of its file; if it returns that array (computed in place), the file
    becomes the NodeArray as it is: no copy, no new memory.  If parts are
    missing (they ran elsewhere), returns ``(False, sum, added)`` (as
    ``node_sum_take``) and the client completes it.  ``drop``: the key of a
    NodeArray to remove (the one this replaces)."""
    if drop:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_array_path(drop))
    held = _held_sum(key)
    if held is None:
        return False, None, []
    fd, path, ids, added = held
    try:
        size = os.fstat(fd).st_size
        if sorted(added) != list(range(parts)) or size != 8 * int(np.prod(shape)) or size == 0:
            return False, _take_held(fd, path, ids), added
        mm = mmap.mmap(fd, size)  # shared: what then() writes in place is the file
        total = np.frombuffer(mm, dtype=np.float64).reshape(shape)
        value = then(total)
        in_place = (
            isinstance(value, np.ndarray)
            and value.dtype == np.float64
            and value.flags.c_contiguous
            and value.nbytes == size
            and value.ctypes.data == total.ctypes.data
        )
        if not in_place:
            value = np.ascontiguousarray(value, dtype=np.float64)
            tmp = f"{_array_path(key)}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(memoryview(value).cast("B"))
            os.replace(tmp, _array_path(key))  # readers never see a part-written array
        out_shape = value.shape
        del value, total
        with contextlib.suppress(BufferError):  # (then() kept a view: the GC unmaps it)
            mm.close()
        if in_place:
            os.replace(path, _array_path(key))
        else:
            os.unlink(path)
        os.unlink(ids)
    finally:
        os.close(fd)  # (releases the lock)
    return True, out_shape, None


def node_array_get(handle: NodeArray) -> np.ndarray:
    """Job: a copy of the NodeArray ``handle`` (to send to the client)."""
    return np.array(handle.get())


def ordered_sum(results):
    """The sum of arrays, taken in the order given (a float64 copy of the first)."""
    total = None
    for r in results:
        if total is None:
            total = np.array(r, dtype=np.float64, copy=True)
        else:
            total += r
    return total


class Inline:
    """A handle that carries its object: what jobs get instead of a
    ``NodeData`` when data is not placed on the nodes (and in serial runs).
    ``get()`` returns the object, as ``NodeData.get()`` does."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __reduce__(self):
        return (Inline, (self.obj,))

    def get(self):
        return self.obj

    def __repr__(self) -> str:
        return f"Inline({type(self.obj).__name__})"


def corpus_arrays(matrix, lo: int = 0, hi: int | None = None) -> dict:
    """Rows ``lo:hi`` of a CSR corpus as plain arrays (what is put or sent):
    ``{'data', 'indices', 'indptr', 'n_terms'}``, indptr starting at 0."""
    hi = matrix.shape[0] if hi is None else hi
    a, b = int(matrix.indptr[lo]), int(matrix.indptr[hi])
    indptr = np.asarray(matrix.indptr[lo : hi + 1], dtype=np.int64) - a
    return {
        "data": np.ascontiguousarray(matrix.data[a:b]),
        "indices": np.ascontiguousarray(matrix.indices[a:b]),
        "indptr": indptr,
        "n_terms": int(matrix.shape[1]),
    }


def _csr(arrays: dict):
    import scipy.sparse as sp

    n_docs = len(arrays["indptr"]) - 1
    return sp.csr_matrix(
        (arrays["data"], arrays["indices"], arrays["indptr"]),
        shape=(n_docs, arrays["n_terms"]),
        copy=False,
    )


class ChunkRef:
    """Documents ``lo:hi`` of a corpus that was put on the nodes whole.

    ``get()`` returns them as a CSR matrix whose arrays are views of the
    node's copy (no copy per job)."""

    __slots__ = ("handle", "lo", "hi")

    def __init__(self, handle, lo: int, hi: int) -> None:
        self.handle = handle
        self.lo = lo
        self.hi = hi

    def __reduce__(self):
        return (ChunkRef, (self.handle, self.lo, self.hi))

    def get(self):
        whole = self.handle.get()
        ip = whole["indptr"]
        a, b = int(ip[self.lo]), int(ip[self.hi])
        part = {
            "data": whole["data"][a:b],
            "indices": whole["indices"][a:b],
            "indptr": ip[self.lo : self.hi + 1] - a,
            "n_terms": whole["n_terms"],
        }
        return _csr(part)

    def __repr__(self) -> str:
        return f"ChunkRef({self.handle!r}, {self.lo}, {self.hi})"


class _InlineChunk(Inline):
    """A chunk carried in the job's arguments; ``get()`` gives a CSR matrix."""

    __slots__ = ()

    def __reduce__(self):
        return (_InlineChunk, (self.obj,))

    def get(self):
        return _csr(self.obj)


class SerialRunner:
    """Run a workload's steps in this process, one after the other."""

    cpus = 1
    placement = "serial"

    def put(self, obj, name: str | None = None):
        return Inline(obj)

    def scatter(self, matrix, bounds, name: str | None = None) -> list:
        whole = Inline(corpus_arrays(matrix))
        return [ChunkRef(whole, lo, hi) for lo, hi in bounds]

    def map(self, func, arglists):
        for args in arglists:
            yield func(*args)

    def sum(self, func, arglists):
        """The sum of the arrays ``func(*args)``, in order."""
        return ordered_sum(self.map(func, arglists))

    def sum_then(
        self, func, arglists, then, name: str | None = None, on_node: bool = True, put: bool = True
    ):
        """A handle to ``then(sum of func(*args))``."""
        return Inline(then(self.sum(func, arglists)))

    def get(self, handle):
        return handle.get()

    def bytes_sent(self) -> int:
        return 0


class ClusterRunner:
    """Run a workload's steps as jobs of ``cluster`` (whose computation is
    ``dispy.workloads.call``).

    ``use_put``: place shared data once per node with ``cluster.put``
    (default: if the cluster has it); False sends it in job arguments.
    """

    def __init__(
        self,
        cluster,
        use_put: bool | None = None,
        job_timeout: float | None = None,
        merge: bool | None = None,
    ):
        self.cluster = cluster
        has_put = hasattr(cluster, "put")
        self.use_put = has_put if use_put is None else bool(use_put and has_put)
        self.placement = "put" if self.use_put else "arguments"
        self.job_timeout = job_timeout
        self._prefix = "wl-" + uuid.uuid4().hex[:8]
        self._sums = 0
        self._arrays: dict = {}  # name -> the last NodeArray of sum_then(name=...)
        # sums merged on each node need jobs pinned to the node that ran a part:
        # a JobCluster's own links (through dispyscheduler a job's node is not known)
        from dispy._client import JobCluster
        from dispy._shared_cluster import SharedJobCluster

        can = isinstance(cluster, JobCluster) and not isinstance(cluster, SharedJobCluster)
        self.merge = can if merge is None else bool(merge and can)

    @property
    def cpus(self) -> int:
        return max(1, sum(n.cpus for n in self.cluster.status()[0]))

    def wait_nodes(self, count: int = 1, timeout: float = 60.0) -> int:
        """Wait (at most ``timeout`` s) until ``count`` nodes are set up; return
        how many CPUs the cluster has then (at least one node must be up)."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.cluster.status()[0]
            if len(nodes) >= count or (nodes and time.monotonic() > deadline):
                return max(1, sum(n.cpus for n in nodes))
            if time.monotonic() > deadline:
                raise WorkloadError(f"no node of the cluster was ready within {timeout:g} s")
            time.sleep(0.05)

    def _name(self, name: str | None) -> str:
        return f"{self._prefix}-{name or uuid.uuid4().hex[:8]}"

    def put(self, obj, name: str | None = None):
        """``obj`` for jobs: a ``NodeData`` (placed once per node; a later put
        of the same ``name`` replaces it), or an ``Inline`` carrying it."""
        if self.use_put:
            return self.cluster.put(obj, name=self._name(name))
        return Inline(obj)

    def scatter(self, matrix, bounds, name: str | None = None) -> list:
        """The corpus ``matrix`` as one reference per chunk ``(lo, hi)``: the
        whole corpus is put once per node, or each chunk rides with its jobs."""
        if self.use_put:
            whole = self.cluster.put(corpus_arrays(matrix), name=self._name(name))
            return [ChunkRef(whole, lo, hi) for lo, hi in bounds]
        return [_InlineChunk(corpus_arrays(matrix, lo, hi)) for lo, hi in bounds]

    def _results(self, func, jobs):
        """Wait for ``jobs`` in order and yield their results; WorkloadError if one
        failed (the others are cancelled), NodeArrayLost if because a NodeArray
        was not on its node."""
        try:
            for job in jobs:
                job.future.exception(self.job_timeout)  # waits; TimeoutError if too long
                if job.status != job.Finished:
                    why = f"{job.exception or job.status}"
                    error = NodeArrayLost if "NodeArrayMissing" in why else WorkloadError
                    raise error(
                        f"{getattr(func, '__name__', func)} job failed on {job.ip_addr}: {why}"
                    )
                yield job.result
        finally:
            for job in jobs:
                if not job.future.done():
                    self.cluster.cancel(job)

    def map(self, func, arglists):
        """Submit ``func(*args)`` for every args; yield the results in order."""
        jobs = [self.cluster.submit(func, *args) for args in arglists]
        yield from self._results(func, jobs)

    def sum(self, func, arglists):
        """The sum of the arrays ``func(*args)`` over ``arglists``.

        With ``merge`` (a JobCluster's default) the parts are added up on the
        node that computed them (``node_sum_add``) and each node sends its sum
        once (``node_sum_take``): a node running n parts sends one array, not
        n.  The order of additions on a node is the order the parts end, so
        the sum is equal to the ordered one up to rounding.  Parts a node's
        sum lacks (a node lost in between) are computed again and sent as
        they are."""
        arglists = [tuple(args) for args in arglists]
        if not self.merge or not arglists:
            return ordered_sum(self.map(func, arglists))
        key, shapes, nodes = self._add(func, arglists)
        total, seen = self._take(key, shapes, nodes)
        return self._complete(func, arglists, total, seen)

    def sum_then(
        self, func, arglists, then, name: str | None = None, on_node: bool = True, put: bool = True
    ):
        """A handle for jobs to ``then(S)``, ``S`` the sum of the arrays
        ``func(*args)`` (as ``sum``); ``then`` a module-level function (or a
        picklable callable object).

        When all the parts were added up on one node (a cluster of one node, and
        ``on_node``), ``then`` runs there too and its result stays there: a
        ``NodeArray`` that the next jobs read from that node's disk cache, so
        neither the sum nor ``then``'s result crosses the network.  Otherwise
        the client takes the sum, applies ``then`` and puts the result
        (``put(then(S), name)``; with ``put=False`` it keeps it: an ``Inline``
        handle, for a result only the client wants).  A job reading a NodeArray
        its node does not have (the node was lost) fails with ``NodeArrayLost``."""
        arglists = [tuple(args) for args in arglists]
        if not (self.merge and on_node and arglists):
            return self._keep(then(self.sum(func, arglists)), name, put)
        key, shapes, nodes = self._add(func, arglists)
        if len(nodes) != 1:
            total, seen = self._take(key, shapes, nodes)
        else:
            old = self._arrays.get(name)
            drop = old.key if old is not None and old.node == nodes[0] else None
            job = self.cluster.submit_node(
                nodes[0], node_sum_then, key, len(arglists), shapes[0], then, drop
            )
            done, out, added = False, None, []  # (the node left: all parts again)
            if job is not None:
                ((done, out, added),) = self._results(node_sum_then, [job])
            if done:
                self._arrays[name] = handle = NodeArray(key, out, nodes[0])
                return handle
            total, seen = (out.reshape(shapes[added[0]]), added) if added else (None, [])
        return self._keep(then(self._complete(func, arglists, total, seen)), name, put)

    def _keep(self, value, name: str | None, put: bool):
        return self.put(value, name) if put else Inline(value)

    def get(self, handle):
        """The array or object behind ``handle`` (a NodeArray is fetched from its node)."""
        if not isinstance(handle, NodeArray):
            return handle.get()
        job = self.cluster.submit_node(handle.node, node_array_get, handle)
        if job is None:
            raise NodeArrayLost(f"{handle!r}: its node is no longer in the cluster")
        (arr,) = self._results(node_array_get, [job])
        return arr

    def _add(self, func, arglists) -> tuple[str, list, list]:
        """Run the parts as ``node_sum_add`` jobs: the sum's key, the parts'
        shapes and the nodes that hold parts of it."""
        self._sums += 1
        key = f"{self._prefix}-{self._sums}"
        jobs = [
            self.cluster.submit(node_sum_add, func, key, i, *args)
            for i, args in enumerate(arglists)
        ]
        shapes = list(self._results(func, jobs))
        nodes = sorted({self.cluster.job_node(job) for job in jobs} - {None})
        return key, shapes, nodes

    def _take(self, key: str, shapes: list, nodes: list) -> tuple:
        """Each node's sum ``key``, added up here: (the sum or None, the parts in it)."""
        takes = [self.cluster.submit_node(node, node_sum_take, key) for node in nodes]
        total, seen = None, []
        for flat, added in self._results(node_sum_take, [t for t in takes if t is not None]):
            if flat is None or not added:
                continue
            flat = flat.reshape(shapes[added[0]])
            if total is None:
                total = flat
            else:
                total += flat
            seen.extend(added)
        return total, seen

    def _complete(self, func, arglists, total, seen: list):
        """``total`` (the parts ``seen``) plus the parts it lacks, computed again."""
        if sorted(seen) != list(range(len(arglists))):
            if len(seen) != len(set(seen)):  # a part in two nodes' sums: start again, plainly
                return ordered_sum(self.map(func, arglists))
            missing = sorted(set(range(len(arglists))) - set(seen))
            for part in self.map(func, [arglists[i] for i in missing]):
                total = np.array(part, dtype=np.float64) if total is None else total + part
        return total

    def bytes_sent(self) -> int:
        """Bytes this client sent to the cluster's nodes so far."""
        return sum(n["bytes_sent"] for n in self.cluster.stats()["nodes"].values())


@contextlib.contextmanager
def local_cluster(
    local_cpus: int | None = None,
    nodes=None,
    secret: str | None = None,
    use_put: bool | None = None,
    wait: float = 60.0,
):
    """A ``ClusterRunner`` on a new cluster whose computation is ``call`` (and
    setup ``preload``), closed (and its local node stopped) on exit.

    ``local_cpus=N`` starts a ``dispy.LocalNode(cpus=N)`` on 127.0.0.1 for it;
    otherwise ``nodes`` (a list of names/addresses, or None for ``DISPY_NODES``)
    and ``secret`` are passed to ``JobCluster``.  Waits until the nodes are set
    up (at most ``wait`` seconds).
    """
    import dispy

    node = None
    try:
        if local_cpus:
            node = dispy.LocalNode(cpus=local_cpus).start()
            nodes, secret = [node.address], node.secret
        cluster = dispy.JobCluster(call, nodes=nodes, secret=secret or "", setup=preload)
        try:
            runner = ClusterRunner(cluster, use_put=use_put)
            expect = len(nodes) if isinstance(nodes, list | tuple) else 1
            runner.wait_nodes(expect, wait)
            yield runner
        finally:
            cluster.close()
    finally:
        if node is not None:
            node.stop()
