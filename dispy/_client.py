"""``JobCluster``: the client's face; its engine is ``dispy.engine``.

The route of a job::

    user thread                      dispy-loop thread (asyncio)              node
    -----------                      ---------------------------              ----
    submit(*args)
      pickle args (protocol 5,
      out-of-band buffers)
      DispyJob -> _incoming ----wake--> JobCluster._wake -> Engine.take
                                        Scheduler.submit, Scheduler.assign
                                        Engine.dispatch -> NodeLink.send_jobs
                                          JOBS frame (batched) ------------> Session -> job process
                                        NodeLink.on_message(RESULTS) <------- RESULTS (batched)
                                          Engine.results: unpickle, end the job
                                          job.future resolved  -> ACK -------> result dropped
    job() / wait() <---------------------  (callbacks run on the cluster's callback thread)

Everything a node does for the cluster goes over one long-lived,
authenticated connection per node (``dispy.engine.link.NodeLink``).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING

from . import _report, config, serialize
from ._callbacks import Callbacks
from ._data import NodeData, check_name
from ._data import _local as data_local
from ._ends import Ends
from ._job import ClusterStatus, DispyJob, DispyNode
from ._job_options import job_options
from ._local_node import LocalNode
from ._map import map_jobs
from ._node_control import NodeControl
from ._report import Progress
from .core import jobstate
from .engine import parse_nodes
from .errors import ComputationError, SubmitError
from .keys import derive_key_soon, resolve_secret

if TYPE_CHECKING:  # (annotations only: the engine side is imported by the first cluster)
    from .engine import Engine

logger = logging.getLogger("dispy")

#: Seconds between pulses (both ways); a node silent for MISSED_PULSES of them is dead.
DEFAULT_PULSE_INTERVAL = 2.0


class JobCluster(NodeControl):
    """Run ``computation`` (a function, or the path of a program) on nodes.

    ``nodes``: names or addresses of ``dispynode`` hosts (``'host'`` or
    ``'host:port'``), ``NodeAllocate`` objects, or ``'local'`` to start a
    node on this machine.  Default: the ``DISPY_NODES`` environment
    variable (comma separated), else ``['*']``.

    ``depends``: classes, functions, modules and file paths the computation
    needs; sent once per node.  ``setup`` runs once per node before any job
    (its globals are seen by the jobs), ``cleanup`` when the cluster closes.
    ``secret`` must match the nodes' secret; without one, ``$DISPY_SECRET``,
    ``$DISPY_SECRET_FILE`` or the per-user key file is used (see
    ``dispy.keys``), as dispynode does.  ``insecure=True`` talks to nodes
    started with ``--insecure`` (no authentication).  ``poll_interval``
    (dispy's seconds between polls of the nodes for results) is accepted and
    checked, and needs nothing more: nodes send results as jobs end, and a
    node that falls silent is noticed by its missing pulses
    (``pulse_interval``).

    Raises ``ComputationError`` if the computation or a dependency cannot be
    sent (a missing file, say), with the reason.
    """

    def __init__(
        self,
        computation,
        nodes=None,
        depends=(),
        job_status=None,
        cluster_status=None,
        ip_addr=None,
        port=None,
        node_port=None,
        ext_ip_addr=None,
        ipv4_udp_multicast=False,
        dest_path=None,
        loglevel=None,
        setup=None,
        cleanup=True,
        ping_interval=None,
        pulse_interval=None,
        poll_interval=None,
        reentrant=False,
        secret="",
        keyfile=None,
        certfile=None,
        recover_file=None,
        callback=None,
        job_timeout=None,
        max_file_size=0,
        insecure=False,
        cafile=None,
        host=None,
        ext_host=None,
        dispy_port=None,
    ) -> None:
        # dispy 4.15's names for the same options
        ip_addr = _either("ip_addr", ip_addr, "host", host)
        ext_ip_addr = _either("ext_ip_addr", ext_ip_addr, "ext_host", ext_host)
        if dispy_port is not None:  # dispy's base port: the client's; the node's is next
            port = _either("port", port, "dispy_port", int(dispy_port))
            node_port = node_port or int(dispy_port) + 1
        if loglevel is not None:
            logger.setLevel(loglevel)
        if setup is not None and not callable(setup):
            raise ComputationError("setup must be a function or functools.partial")
        if cleanup is not None and not isinstance(cleanup, bool) and not callable(cleanup):
            raise ComputationError("cleanup must be a function, functools.partial or a bool")
        self.dest_path = os.path.abspath(dest_path or os.getcwd())
        self.max_file_size = max_file_size or (1 << 40)
        self._job_timeout = job_timeout
        self._pulse_interval = float(pulse_interval or DEFAULT_PULSE_INTERVAL)
        if self._pulse_interval <= 0:
            raise ValueError("pulse_interval must be a positive number of seconds")
        self.name = getattr(computation, "__name__", None) or os.path.basename(str(computation))
        package = serialize.package_computation(computation, depends, setup, cleanup)
        self._node_port = node_port or config.NODE_PORT
        self._ssl = None
        if certfile or keyfile or cafile:
            from .tls import client_context

            self._ssl = client_context(certfile, keyfile, cafile)
        self._ip_addrs = [ip_addr] if isinstance(ip_addr, str) else list(ip_addr or [])
        self._ext_ip_addr = ext_ip_addr[0] if isinstance(ext_ip_addr, list | tuple) else ext_ip_addr
        self._client_port = port or config.CLIENT_PORT
        self._ping_interval = float(ping_interval) if ping_interval else None
        self._multicast = bool(ipv4_udp_multicast)
        if poll_interval is not None and (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, int | float)
            or not poll_interval > 0
        ):
            raise ValueError("poll_interval must be None or a positive number of seconds")
        # (dispy polled nodes for results every poll_interval s; here nodes send them
        # as jobs end and a silent node is noticed by its missing pulses, so there is
        # nothing to poll: the argument is checked and needs no other effect)
        specs, patterns, want_local = parse_nodes(nodes, node_port or config.NODE_PORT)
        self._local: LocalNode | None = None
        if want_local and not specs and not patterns and not secret and not insecure:
            secret = None  # only our own node: a fresh random secret, no key file needed
        else:
            secret, source = resolve_secret(secret, insecure)
            logger.debug("cluster %s authenticates with the secret from %s", self.name, source)
        if want_local:
            extra = ["--insecure"] if insecure else []
            if certfile:  # our own node uses the same certificate (dispy's convention)
                extra += ["--certfile", os.path.abspath(certfile)]
                extra += ["--keyfile", os.path.abspath(keyfile)] if keyfile else []
                extra += ["--cafile", os.path.abspath(cafile)] if cafile else []
            self._local = LocalNode(secret=secret, extra_args=extra).start()
            secret = self._local.secret
            specs.append(("127.0.0.1", self._local.port, None))
        # scrypt (~20 ms, the GIL released) runs while this imports the engine side
        # (asyncio: ~25 ms) and makes the recover file: the key is needed only later
        key_of = derive_key_soon(secret)
        from . import _loop
        from ._recover_jobs import create_recover_file
        from .engine import Engine

        self._lock = threading.Lock()
        self._incoming: collections.deque = collections.deque()
        self._wake_scheduled = False
        self._end_cond = threading.Condition()  # every job's end (DispyJob.finish) waits on it
        self._ends = Ends()  # the counts, and the publication of each job's end
        self._data_versions: dict[str, int] = {}
        #: the last jobs that did not finish (Terminated, Cancelled, Abandoned), newest last
        self.recent_failures: collections.deque = self._ends.recent_failures
        self._closed = False
        self._start_time = time.time()
        self._callbacks: Callbacks | None = None
        callback = callback or job_status
        if callback is not None or cluster_status is not None:
            self._callbacks = Callbacks(self.name, callback, cluster_status, self._ends.publish)
            self._ends.callbacks = self._callbacks
        self._engine = Engine(self, package, b"", specs, reentrant, patterns)
        self._engine_created(self._engine)
        #: the recover file's path (None: not kept, e.g. for nodes='local' only)
        self.recover_file = None
        if recover_file is not False and (specs or patterns):
            self._engine.recover = create_recover_file(
                recover_file, self._engine.cid, self.name, certfile, keyfile, cafile
            )
            self.recover_file = self._engine.recover.path
        self._key = self._engine.key = key_of()
        if self._engine.recover is not None:  # derived from the secret; never the secret itself
            self._engine.recover.set_meta("key", self._key)
        self._loop = _loop.get_loop()
        _loop.run(self._engine.start()).result()
        _open_clusters.add(self)

    def _engine_created(self, engine: Engine) -> None:
        """A hook for subclasses (SharedJobCluster), before any node is contacted."""

    # -- jobs ------------------------------------------------------------------------
    def submit(self, *args, **kwargs) -> DispyJob:
        """Queue a job running ``computation(*args, **kwargs)``; return its DispyJob.

        Raises ``SubmitError`` if the arguments cannot be pickled or the
        cluster is closed.
        """
        return self._submit(None, args, kwargs)

    def submit_node(self, node, *args, **kwargs) -> DispyJob | None:
        """Like ``submit``, but run the job on ``node`` (a DispyNode or host string).

        Returns None (and logs why) if that node is not set up for this cluster.
        """
        key = self._node_key(node)
        if key is None:
            logger.warning("submit_node: node %r is not a node of this cluster", node)
            return None
        return self._submit(key, args, kwargs)

    def put(self, obj, name: str | None = None) -> NodeData:
        """Place ``obj`` once on every node of the cluster (and on nodes that join
        later); return a small handle to pass to jobs, whose ``get()`` on the node
        gives the object.  numpy arrays in it are read-only views of one copy per
        node that all its job processes share.  A later put() with the same
        ``name`` replaces it.  Blocks until the nodes have it; nodes that could
        not take it are logged."""
        if self._closed:
            raise SubmitError("cluster is closed")
        name = check_name(name) if name is not None else uuid.uuid4().hex
        version = self._data_versions.get(name, 0) + 1
        self._data_versions[name] = version
        try:
            segs = serialize.dumps(obj)
        except Exception as exc:
            raise SubmitError(f"put(): the object cannot be pickled: {exc}") from exc
        for key in [k for k in data_local if k[0] == name]:
            del data_local[key]
        data_local[(name, version)] = obj
        for failure in self._on_loop(self._engine.put, name, version, segs):
            logger.error("put(%r) did not reach node %s", name, failure)
        return NodeData(name, version)

    def submit_job_id(self, job_id, *args, **kwargs) -> DispyJob:
        """Like ``submit``, with ``job.id`` set before the job can run (so callbacks see it)."""
        return self._submit(None, args, kwargs, job_id)

    def submit_job_id_node(self, job_id, node, *args, **kwargs) -> DispyJob | None:
        """``submit_node`` with ``job.id`` set before the job can run (dispy's name)."""
        key = self._node_key(node)
        if key is None:
            logger.warning("submit_job_id_node: node %r is not a node of this cluster", node)
            return None
        return self._submit(key, args, kwargs, job_id)

    def _on_loop(self, fn, *args):
        """Run ``fn(*args)`` (a coroutine function or plain) on the loop; return its result."""

        import asyncio

        from . import _loop

        async def call():
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        return _loop.run(call()).result()

    def _live_job(self, uid: int) -> DispyJob | None:
        """The job of this cluster with internal id ``uid``, if it has not ended (the
        web monitor's cancel button names jobs so)."""
        return self._on_loop(lambda: self._engine.live.get(uid))

    def _submit(self, node_key, args, kwargs, job_id=None, more_opts=None) -> DispyJob:
        if self._closed:
            raise SubmitError("cluster is closed: create a new JobCluster to submit jobs")
        opts, file_segs = job_options(kwargs, self._job_timeout, more_opts)
        segs = file_segs + serialize.dumps_args(args, kwargs)
        job = DispyJob(args, kwargs, segs, self)
        if job_id is not None:
            job.id = job_id
        job._pinned = node_key
        job._opts = opts
        job.submit_time = time.time()
        self._ends.added()
        with self._lock:
            self._incoming.append(job)
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            self._loop.call_soon_threadsafe(self._wake)
        return job

    def _wake(self) -> None:
        with self._lock:
            jobs = list(self._incoming)
            self._incoming.clear()
            self._wake_scheduled = False
        self._engine.take(jobs)

    def cancel(self, job: DispyJob) -> int:
        """Cancel a job: a queued job ends Cancelled at once, a running one is
        terminated on its node.  Returns 0, or -1 if the job already ended."""
        if job.status in jobstate.TERMINAL:
            return -1
        self._loop.call_soon_threadsafe(self._engine.cancel, job)
        return 0

    def map(
        self,
        iterable,
        max_pending: int | None = None,
        ordered: bool = True,
        star: bool = False,
        progress: bool | None = False,
        chunksize: int = 1,
    ):
        """Run the computation on each item of ``iterable``, lazily: at most
        ``max_pending`` jobs are in flight at once (default 2 x the cluster's
        CPUs, at least 16), so an endless iterable uses bounded memory.

        Yields results in input order (``ordered=False``: as jobs end).  Each
        item is one argument, or (``star=True``) a tuple of arguments.  A job
        that does not finish raises ``JobFailed`` (with ``.job``).  ``progress``:
        as for ``wait``.  ``chunksize=N`` (as in ``concurrent.futures``): each
        job runs the computation on N items in turn and returns their results
        together, for items too small to be worth a job each; a failing item
        fails its whole chunk (the error says which item).
        """
        return map_jobs(self, iterable, max_pending, ordered, star, progress, chunksize)

    def counts(self) -> dict:
        """Job counts: submitted, ended, failed (ended but not Finished), pending
        (not ended), running (sent to nodes)."""
        out = self._ends.counts()
        out["running"] = sum(lk.node.busy for lk in list(self._engine.links.values()))
        return out

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> bool:
        """Wait until every submitted job has ended; False if ``timeout`` passed first.

        ``progress=True`` draws a progress line on stderr (done, failed, running,
        rate); ``None`` (default) draws it only when stderr is a terminal and
        False never does.
        """
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
        return self._ends.wait(timeout, Progress(self) if progress else None)

    # -- called on the loop thread ---------------------------------------------------
    def _job_ended(self, job: DispyJob, node) -> None:
        self._ends.ended(job, node)  # (published now, or by the callbacks: see _ends)

    def _provisional(self, job: DispyJob, node) -> None:
        if self._callbacks is not None:
            self._callbacks.provisional(job, node)

    def _status_changed(self, job: DispyJob, node) -> None:
        if self._callbacks is not None:
            self._callbacks.status_changed(job, node)

    def _node_status(self, status: int, node: DispyNode) -> None:
        if self._callbacks is not None:
            self._callbacks.node_status(status, node)

    # -- information -----------------------------------------------------------------
    def status(self) -> ClusterStatus:
        """``ClusterStatus(nodes, jobs_pending)``: the nodes (``DispyNode``) and the
        number of jobs not yet ended."""
        nodes = [lk.node for lk in self._engine.links.values() if lk.ready or lk.node.jobs_done]
        return ClusterStatus(nodes, self._ends.unfinished)

    def stats(self) -> dict:
        """Per node (key 'ip:port'): name, cpus, jobs, sec_per_job, node_time,
        bytes_sent, bytes_received; and totals: jobs, total_job_time, wall_time, speedup."""
        return _report.stats(self._engine.links, self._start_time)

    def print_status(self, wall_time: float | None = None) -> None:
        """Print per node: CPUs, jobs done, seconds per job, node time, bytes sent and
        received; then the total job time, wall time and speedup."""
        _report.print_status(self.stats(), wall_time)

    # -- closing -----------------------------------------------------------------------
    def close(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Wait for jobs (up to ``timeout``), run cleanup on the nodes and disconnect.

        With ``terminate=True`` running jobs are stopped instead of awaited.
        """
        if self._closed:
            return
        if not terminate:
            self.wait(timeout)
        self._closed = True
        _open_clusters.discard(self)
        from . import _loop

        try:
            _loop.run(self._engine.close(terminate or timeout is not None)).result()
        finally:
            if self._callbacks is not None:
                self._callbacks.close()
            if self._local is not None:
                self._local.stop()
                self._local = None
            if self._engine.recover is not None:  # closed normally: nothing to recover
                self._engine.recover.close(remove=True)

    def shutdown(self) -> None:
        """Close the cluster, terminating jobs that are still running."""
        self.close(terminate=True)

    def __enter__(self) -> JobCluster:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(terminate=exc_type is not None)
        return False


_open_clusters: weakref.WeakSet = weakref.WeakSet()


def _either(name, value, alias, alias_value):
    """An option dispy has had under two names: either may be given, not both apart."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise TypeError(
            f"{name}={value!r} and {alias}={alias_value!r} name the same option: give one"
        )
    return alias_value


def _close_open_clusters() -> None:
    """A program that ends without close() (dispy's examples do): let its jobs
    finish, as a dispy user expects, then run cleanup and disconnect."""
    for cluster in list(_open_clusters):
        try:
            cluster.close()
        except Exception:
            logger.debug("closing %s at exit failed", cluster.name, exc_info=True)


# When the main thread ends, Python first shuts down every thread pool (the
# event loop's getaddrinfo and file reads run in one) and only then runs
# atexit: a cluster still finding its nodes then waited for ever.  So close
# open clusters in threading's own exit hook, before the pools go; it runs
# hooks last registered first, hence the import of the pools' module first.
import concurrent.futures.thread  # noqa: E402,F401 -- registers its exit hook

try:
    threading._register_atexit(_close_open_clusters)
except (AttributeError, RuntimeError):  # no such hook, or already shutting down
    atexit.register(_close_open_clusters)
