"""dispy: run Python functions and programs in parallel on a cluster of nodes.

    import dispy
    cluster = dispy.JobCluster(compute, nodes=['node1', 'node2'], secret='s')
    job = cluster.submit(42)
    print(job())            # waits, returns compute(42)

See README.rst for the architecture (the route of a job) and the examples.
"""

import logging

from ._client import JobCluster
from ._data import NodeData
from ._executor import ClusterExecutor
from ._invoker import invoker, proc_count
from ._job import ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate
from ._local import LocalNode
from ._recovery import recover_jobs
from ._shared import SharedJobCluster
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
from .httpd import DispyHTTPServer


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
