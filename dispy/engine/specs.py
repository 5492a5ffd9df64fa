"""Node specifications as a client is given them: names, addresses,
``host:port``, ``NodeAllocate`` objects, ``'*'`` patterns and ``'local'``."""

from __future__ import annotations

import logging
import os

from .._job import DispyNode, NodeAllocate

logger = logging.getLogger("dispy")


#: Seconds after a cluster's start with no node ready before it says so (once).
NO_NODE_WARNING_S = 10.0


def waiting_for(specs, patterns) -> str:
    """What a cluster that has no node yet waits for, and what to do about it."""
    parts = []
    if specs:
        named = ", ".join(f"{h}:{p}" for h, p, _ in specs[:5]) + (", ..." if len(specs) > 5 else "")
        parts.append(f"the nodes named ({named}) have not answered, or refused its secret")
    if patterns:
        parts.append(f"discovery ({', '.join(h for h, _, _ in patterns[:5])}) found none")
    return (
        "; ".join(parts or ["no nodes were given"])
        + ". Its jobs wait for one: check that dispynode runs there with the same secret, "
        "name nodes with nodes=[...] (or DISPY_NODES), or use nodes='local' for a node "
        "on this machine"
    )


def is_wildcard(host: str) -> bool:
    """Whether a node spec names nodes to discover (``'*'``, ``'10.0.0.?'``)."""
    return "*" in host or "?" in host or "[" in host


def parse_nodes(nodes, node_port: int):
    """Turn the ``nodes`` argument into (host, port, allocation) entries for named
    nodes, (wildcard, port, allocation) entries for discovery, and whether a local
    node must be started."""
    if nodes is None:
        env = os.environ.get("DISPY_NODES", "").strip()
        nodes = [n.strip() for n in env.split(",") if n.strip()] if env else ["*"]
    if isinstance(nodes, str | NodeAllocate | DispyNode):
        nodes = [nodes]
    out, patterns, local = [], [], False
    for spec in nodes:
        alloc = None
        if isinstance(spec, NodeAllocate):
            alloc, host, port = spec, spec.host, spec.port or node_port
        elif isinstance(spec, DispyNode):
            host, port = spec.ip_addr, spec.port or node_port
        elif isinstance(spec, str):
            host, port = spec.strip(), node_port
            if host.count(":") == 1:
                host, p = host.split(":")
                try:
                    port = int(p)
                except ValueError:
                    raise ValueError(f"node {spec!r}: port {p!r} is not a number") from None
        else:
            raise TypeError(
                f"nodes entries must be host names, addresses, NodeAllocate or DispyNode, "
                f"not {type(spec).__name__}"
            )
        if not host:
            raise ValueError(f"node {spec!r}: empty host name")
        if host == "local":
            local = True
        elif is_wildcard(host):
            patterns.append((host, port, alloc))
        else:
            out.append((host, port, alloc))
    return out, patterns, local
