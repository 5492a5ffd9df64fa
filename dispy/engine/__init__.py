"""The client engine behind ``JobCluster``: ``Engine`` (jobs, results, nodes),
``NodeLink`` (one connection to a node or a dispyscheduler) and
``parse_nodes`` (the node specifications a cluster is given)."""

from .engine import Engine
from .link import NodeLink
from .specs import parse_nodes

__all__ = ["Engine", "NodeLink", "parse_nodes"]
