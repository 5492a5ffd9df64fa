"""``JobCluster``'s control of its nodes while it runs: adding and finding nodes,
taking them out, closing or setting up the computation there again, their CPUs
and jobs, files sent to them.  Each call names a node as the user knows it (a
``DispyNode``, ``'host'``, ``'host:port'`` or its name) and does its work on the
loop thread."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ._job import DispyNode
from .engine import parse_nodes
from .errors import DispyError

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .engine import NodeLink

logger = logging.getLogger("dispy")


class NodeControl:
    """Mixed into ``JobCluster`` (which has ``_engine``, ``_node_port`` and ``_on_loop``)."""

    def _node_key(self, node):
        """The link key of ``node`` (DispyNode, 'host', 'host:port', name); None if unknown
        or ambiguous (several nodes match)."""
        if isinstance(node, DispyNode):
            key = (node.ip_addr, node.port)
            if key in self._engine.links:
                return key
            host = node.ip_addr
        else:
            host = str(node)
        matches = [
            key
            for key, link in list(self._engine.links.items())
            if host == f"{key[0]}:{key[1]}" or host == f"{link.node.ip_addr}:{key[1]}"
        ]
        if not matches:
            matches = [
                key
                for key, link in list(self._engine.links.items())
                if host in (link.host, link.node.ip_addr, link.node.name)
            ]
        return matches[0] if len(matches) == 1 else None

    def _link(self, node) -> NodeLink | None:
        key = self._node_key(node)
        return self._engine.links.get(key) if key is not None else None

    def job_node(self, job) -> str | None:
        """The node ``job`` was sent to, as ``'host:port'`` (what ``submit_node``
        takes); None if it went to none."""
        key = job._node
        return f"{key[0]}:{key[1]}" if key is not None else None

    def allocate_node(self, node) -> int:
        """Add a node (name, address, 'host:port', NodeAllocate, or a list) to the
        cluster while it runs; returns how many were added."""
        specs, patterns, local = parse_nodes(
            node if isinstance(node, list) else [node], self._node_port
        )
        if local:
            raise ValueError("allocate_node('local') is not supported; use nodes='local'")
        added = self._on_loop(self._engine.add_links, specs)
        if patterns:
            self._on_loop(self._engine.discover, patterns, [])
        return added

    def discover_nodes(self, nodes) -> None:
        """Look for nodes now: names or addresses (contacted directly; relays pass the
        request on) and wildcards such as ``'192.168.2.*'`` (broadcast)."""
        specs, patterns, local = parse_nodes(
            nodes if isinstance(nodes, list) else [nodes], self._node_port
        )
        if local:
            raise ValueError("discover_nodes('local') is not supported; use nodes='local'")
        self._on_loop(self._engine.add_links, specs)
        if patterns:
            self._on_loop(self._engine.discover, patterns, specs)

    def deallocate_node(self, node) -> int:
        """Stop giving new jobs to ``node`` (running jobs go on); 0, or -1 if unknown."""
        key = self._node_key(node)
        if key is None:
            return -1
        self._on_loop(self._engine.sched.set_ready, key, False)
        return 0

    def close_node(self, node, terminate_pending: bool = False) -> int:
        """Close the computation on ``node`` and stop using it.  Its jobs that had
        not started run elsewhere; running ones finish first, or with
        ``terminate_pending`` are stopped.  Returns 0, or -1 if unknown."""
        link = self._link(node)
        if link is None:
            return -1
        self._on_loop(link.close, terminate_pending)
        return 0

    def resetup_node(self, node) -> int:
        """Run the computation's setup on ``node`` again (after its running jobs end)."""
        link = self._link(node)
        if link is None or not link.ready:
            return -1
        try:
            self._on_loop(link.resetup)
        except DispyError as exc:
            logger.error("resetup of node %s failed: %s", link.key, exc)
            return -1
        return 0

    def node_jobs(self, node, from_node: bool = False) -> list:
        """Jobs of this cluster that are running (or sent) on ``node``."""
        key = self._node_key(node)
        if key is None:
            return []

        def jobs():
            state = self._engine.sched.nodes.get(key)
            return list(state.running.values()) if state else []

        return self._on_loop(jobs)

    def set_node_cpus(self, node, cpus: int) -> int:
        """Use ``cpus`` CPUs of ``node`` (negative: all but that many); returns the
        number now used, or -1 if the node is unknown."""
        link = self._link(node)
        if link is None:
            return -1
        total = link.node_cpus or link.node.avail_cpus or link.node.cpus
        n = max(0, total + cpus) if cpus < 0 else min(cpus, total) if total else cpus

        def apply():
            link.node.cpus = n
            if link.key in self._engine.sched.nodes:
                self._engine.sched.set_cpus(link.key, n, link.limited)
            self._engine.dispatch()

        self._on_loop(apply)
        return n

    def send_file(self, path, node) -> int:
        """Send the file at ``path`` into the computation's folder on ``node``.

        Returns 0, or -1 (with the reason logged) if the file or node is missing."""
        link = self._link(node)
        if link is None or not link.ready:
            logger.error("send_file: %r is not a node set up for this cluster", node)
            return -1
        path = os.fspath(path)
        if not os.path.isfile(path):
            logger.error("send_file: %r is not a file", path)
            return -1
        self._on_loop(link.send_file, os.path.basename(path), path)
        return 0
