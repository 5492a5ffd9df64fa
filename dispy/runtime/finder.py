"""The client's side of discovery: ask for nodes by broadcast and unicast,
hear their answers and announcements, and hand new nodes to the cluster.

Two UDP sockets:

* the *reply* socket, on a free port: sends DISCOVER and hears the nodes'
  unicast answers (its port is in the request, so two clients on one host
  never take each other's answers);
* the *announcement* socket, on the client port (51347) shared with
  SO_REUSEADDR: hears nodes that start (or free up) after the client.

A node found this way is used only if its address matches one of the
cluster's wildcards (``'*'`` matches any).  Names given explicitly get a
unicast DISCOVER too, so a ``dispynetrelay`` named in ``nodes`` relays the
request to its network.
"""

from __future__ import annotations

import asyncio
import logging

from .. import config, discovery
from .._tasks import spawn
from ..protocol import DatagramKind

logger = logging.getLogger("dispy")

#: Seconds after start at which discovery requests are (re)sent: UDP may drop one.
ROUNDS = (0.0, 0.5, 1.5, 4.0)


class NodeFinder:
    """Discovery for one cluster; ``on_node(ip, port, nid, alloc)`` gets each match."""

    def __init__(
        self,
        key: bytes,
        on_node,
        *,
        on_heard=None,
        ip_addrs: list[str],
        client_port: int = config.CLIENT_PORT,
        ext_ip_addr: str | None = None,
        ping_interval: float | None = None,
        multicast: bool = False,
    ) -> None:
        self.key = key
        self.multicast = multicast  # ipv4_udp_multicast: the group, not broadcast
        self.on_node = on_node
        self.on_heard = on_heard  # on_heard(ip, port): any node announced itself
        self.ip_addrs = ip_addrs
        self.client_port = client_port
        self.ext_ip_addr = ext_ip_addr
        self.ping_interval = ping_interval
        self.patterns: list[tuple[str, int, object]] = []  # (wildcard, node port, alloc)
        self.probes: list[tuple[str, int]] = []  # named hosts: unicast requests (relays)
        self.reply: discovery.Endpoint | None = None
        self.listener: discovery.Endpoint | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        host = self.ip_addrs[0] if self.ip_addrs else "0.0.0.0"
        self.reply = await discovery.open_endpoint(
            self.key, self._on_datagram, host, 0, name="dispy discovery"
        )
        try:
            self.listener = await discovery.open_endpoint(
                self.key,
                self._on_datagram,
                "0.0.0.0"
                if self.multicast
                else host,  # a socket bound to one address hears no group
                self.client_port,
                reuse=True,
                name="dispy",
            )
            if self.multicast:
                self.listener.join_multicast(self.ip_addrs)
        except OSError as exc:
            logger.debug(
                "not listening for node announcements on UDP port %s: %s", self.client_port, exc
            )
        self._task = asyncio.get_running_loop().create_task(self._rounds())

    def add(self, patterns, probes) -> None:
        new = [p for p in patterns if p not in self.patterns]
        self.patterns += new
        fresh = [p for p in probes if p not in self.probes]
        self.probes += fresh
        if self.reply is not None and (new or fresh):
            self.discover(new, fresh if self.patterns else [])

    async def _rounds(self) -> None:
        last = 0.0
        for at in ROUNDS:
            await asyncio.sleep(at - last)  # a schedule of retries, not a wait for a condition
            last = at
            self.discover()
        while self.ping_interval:
            await asyncio.sleep(self.ping_interval)
            self.discover()

    def discover(self, patterns=None, probes=None) -> None:
        """Send DISCOVER for ``patterns`` (default all) and to ``probes``."""
        if self.reply is None:
            return
        patterns = self.patterns if patterns is None else patterns
        probes = self.probes if probes is None and self.patterns else (probes or [])
        body: dict = {"port": self.reply.address[1]}
        if self.ext_ip_addr:
            body["ip"] = self.ext_ip_addr
        for pat, port, _ in patterns:
            if pat == "*":  # a node on this very host, whatever the interfaces
                self.reply.send(DatagramKind.DISCOVER, body, ("127.0.0.1", port))
            if self.multicast:
                self.reply.multicast(DatagramKind.DISCOVER, body, port, self.ip_addrs)
            else:
                targets = discovery.broadcast_targets([pat], self.ip_addrs)
                self.reply.broadcast(DatagramKind.DISCOVER, body, port, targets)
        for host, port in probes:
            spawn(self._probe(host, port, body), f"discovery request to {host}")

    async def _probe(self, host: str, port: int, body: dict) -> None:
        try:
            ip = await discovery.resolve_ipv4(host, port)
        except (OSError, UnicodeError):
            return  # the TCP link to that name reports the bad name
        if self.reply is not None:
            self.reply.send(DatagramKind.DISCOVER, body, (ip, port))

    def _on_datagram(self, kind: DatagramKind, body: dict, addr) -> None:
        if kind != DatagramKind.ANNOUNCE:
            return
        nid, port = body["nid"], body["port"]
        ip = discovery.sender_ip(body)
        if not isinstance(nid, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError("malformed announcement")
        if ip.startswith("127.") and not addr[0].startswith("127."):
            raise ValueError(f"a loopback address ({ip}) heard from {addr[0]}")
        if self.on_heard is not None:
            self.on_heard(ip, port)
        for pat, _, alloc in self.patterns:
            if discovery.matches(ip, [pat]):
                self.on_node(ip, port, nid, alloc)
                return
        logger.debug(
            "node %s:%s (%s) matches none of %s", ip, port, body.get("name"), self.patterns
        )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for ep in (self.reply, self.listener):
            if ep is not None:
                ep.close()
