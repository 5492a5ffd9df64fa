"""The client engine behind ``JobCluster``: ``Engine`` (jobs, results, nodes),
``NodeLink`` (one connection to a node or a dispyscheduler) and
``parse_nodes`` (the node specifications a cluster is given).

``Engine`` and ``NodeLink`` (asyncio, ~25 ms of imports) are imported on first
use: a new JobCluster imports them while its key is derived in another thread.
"""

import importlib

from .specs import parse_nodes

__all__ = ["Engine", "NodeLink", "parse_nodes"]
_LAZY = {"Engine": ".engine", "NodeLink": ".link"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
