"""dispy: run Python functions and programs in parallel on a cluster of nodes.

    import dispy
    cluster = dispy.JobCluster(compute, nodes=['node1', 'node2'], secret='s')
    job = cluster.submit(42)
    print(job())            # waits, returns compute(42)

See README.rst for the architecture (the route of a job) and the examples.
"""

import logging

from ._client import JobCluster
from ._job import DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate
from ._local import LocalNode
from ._version import __version__
from .errors import (
    AuthenticationFailed,
    ComputationError,
    DispyError,
    NodeLost,
    ProtocolError,
    SubmitError,
)

logger = logging.getLogger("dispy")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s dispy %(levelname)s %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False

__all__ = [
    "AuthenticationFailed",
    "ComputationError",
    "DispyError",
    "DispyJob",
    "DispyNode",
    "DispyNodeAvailInfo",
    "JobCluster",
    "LocalNode",
    "NodeAllocate",
    "NodeLost",
    "ProtocolError",
    "SubmitError",
    "__version__",
    "logger",
]
