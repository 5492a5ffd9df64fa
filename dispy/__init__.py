"""dispy: run Python functions and programs in parallel on a cluster of nodes.

    import dispy
    cluster = dispy.JobCluster(compute, nodes=['node1', 'node2'], secret='s')
    job = cluster.submit(42)
    print(job())            # waits, returns compute(42)

See README.rst for the architecture (the route of a job) and the examples.
"""

import importlib
import logging

from ._data import NodeData
from ._job import ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate
from ._version import __version__
from .errors import (
    AuthenticationFailed,
    ComputationError,
    DispyError,
    JobFailed,
    NodeLost,
    ProtocolError,
    SubmitError,
)

#: Imported on first use, not with the package: the daemons' processes (a node's
#: computation process above all) import dispy's modules but never the client,
#: and its imports (asyncio, ssl, the monitor...) cost ~0.15 s at every start.
_LAZY = {
    "JobCluster": "._client",
    "ClusterExecutor": "._cluster_executor",
    "invoker": "._invoker",
    "proc_count": "._invoker",
    "LocalNode": "._local_node",
    "recover_jobs": "._recover_jobs",
    "SharedJobCluster": "._shared_cluster",
    "DispyHTTPServer": ".httpd",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # dispy.httpd and the other submodules, as before
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


class _UntilConfigured(logging.StreamHandler):
    """dispy's messages go to stderr, as dispy users expect, until the program
    configures logging itself (a handler on the root logger): then they only
    propagate there, never twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


logger = logging.getLogger("dispy")
if not any(isinstance(h, _UntilConfigured) for h in logger.handlers):
    _handler = _UntilConfigured()
    _handler.setFormatter(logging.Formatter("%(asctime)s dispy %(levelname)s %(message)s"))
    logger.addHandler(_handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
# dispy programs write loglevel=dispy.logger.DEBUG: the levels as attributes of
# the (standard) logger, as dispy's own logger has them
for _level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    setattr(logger, _level, getattr(logging, _level))

__all__ = [
    "ClusterStatus",
    "recover_jobs",
    "SharedJobCluster",
    "DispyHTTPServer",
    "ClusterExecutor",
    "AuthenticationFailed",
    "ComputationError",
    "DispyError",
    "DispyJob",
    "DispyNode",
    "DispyNodeAvailInfo",
    "JobCluster",
    "JobFailed",
    "LocalNode",
    "NodeAllocate",
    "NodeData",
    "NodeLost",
    "ProtocolError",
    "SubmitError",
    "__version__",
    "invoker",
    "proc_count",
    "logger",
]
