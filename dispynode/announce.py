"""How a node makes itself known over UDP: its ANNOUNCE to the clients of its
networks (broadcast, or the multicast group with ``--ipv4_udp_multicast``) and
to a scheduler it names (``--scheduler_host``), at start and whenever it is free
again, and its answer to a client's DISCOVER.  A node listening on loopback only
announces to loopback only (and tests and demos never broadcast)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dispy import discovery
from dispy.protocol import DatagramKind

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .server import NodeServer

logger = logging.getLogger("dispynode")


class Announcer:
    """The node's UDP endpoint of discovery."""

    def __init__(
        self, node: NodeServer, discover: bool, multicast: bool, scheduler_host: str | None
    ) -> None:
        self.node = node
        self.discover = discover  # answer clients' DISCOVER and announce to them
        self.multicast = multicast  # --ipv4_udp_multicast: announce to the group
        self.scheduler_host = scheduler_host  # --scheduler_host: announce there too
        self._scheduler_addr: str | None = None
        self.udp: discovery.Endpoint | None = None

    async def start(self) -> None:
        if self.scheduler_host:
            await self._resolve_scheduler()
        if self.discover or self.scheduler_host:
            await self._open()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()

    def loopback_only(self) -> bool:
        return bool(self.node.bound) and all(
            host.startswith("127.") or host == "::1" for host, _ in self.node.bound
        )

    async def _resolve_scheduler(self) -> None:
        try:
            self._scheduler_addr = await discovery.resolve_ipv4(
                self.scheduler_host, self.node.client_port
            )
        except (OSError, UnicodeError) as exc:
            logger.warning(
                "--scheduler_host %s: cannot resolve it (%s); not announcing there",
                self.scheduler_host,
                exc,
            )

    async def _open(self) -> None:
        host = "127.0.0.1" if self.loopback_only() else "0.0.0.0"
        try:
            self.udp = await discovery.open_endpoint(
                self.node.key, self._on_datagram, host, self.node.port, reuse=True, name="dispynode"
            )
        except OSError as exc:
            logger.warning(
                "no discovery: cannot use UDP port %s (%s); clients must name this node",
                self.node.port,
                exc.strerror or exc,
            )
            return
        if self.multicast and self.discover:
            joined = self.udp.join_multicast([h for h, _ in self.node.bound])
            logger.info(
                "discovery by multicast: %s on %d interface(s)", discovery.MULTICAST_GROUP, joined
            )
        self.announce()

    def announcement(self) -> dict:
        body = {
            "nid": self.node.nid,
            "port": self.node.port,
            "name": self.node.name,
            "cpus": self.node.cpus,
        }
        specific = [h for h, _ in self.node.bound if h not in ("0.0.0.0", "::")]
        if self.node.ext_ip_addr:
            body["ip"] = self.node.ext_ip_addr
        elif len(specific) == 1:
            body["ip"] = specific[0]
        return body

    def announce(self) -> None:
        """Tell clients on this node's networks (client port, broadcast) that it is free."""
        if self.udp is None or self.node.paused:
            return
        body = self.announcement()
        if self._scheduler_addr:
            self.udp.send(
                DatagramKind.ANNOUNCE, body, (self._scheduler_addr, self.node.client_port)
            )
        if not self.discover:
            return
        bound = [h for h, _ in self.node.bound]
        if self.multicast and not self.loopback_only():
            self.udp.multicast(DatagramKind.ANNOUNCE, body, self.node.client_port, bound)
        elif not self.loopback_only():
            targets = discovery.broadcast_targets(["*"], bound)
            self.udp.broadcast(DatagramKind.ANNOUNCE, body, self.node.client_port, targets)
        self.udp.send(DatagramKind.ANNOUNCE, body, ("127.0.0.1", self.node.client_port))

    def _on_datagram(self, kind: DatagramKind, body: dict, addr) -> None:
        if kind != DatagramKind.DISCOVER or self.node.paused or not self.discover:
            return
        ip = discovery.sender_ip(body)
        port = body.get("port")
        if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"bad reply address {ip!r}:{port!r}")
        if not 0 < port < 65536:
            raise ValueError(f"bad reply port {port}")
        logger.debug("discovery request from %s (answer to %s:%s)", addr[0], ip, port)
        self.udp.send(DatagramKind.ANNOUNCE, self.announcement(), (ip, port))
