"""``dispynetrelay``: run on a host in a network of nodes, so clients in other
networks find those nodes.

::

    dispynetrelay [-i ADDR]... [--relay_port PORT] [--node_port 51348]
                  [--client_port 51347] [-s SECRET | --secret_file F]
                  [--certfile F [--keyfile F]] [--daemon] [-d]

A client names the relay in ``nodes`` next to a wildcard for the relay's
network (``nodes=['<relay ip>', '192.168.3.*']``).  Then:

* the client's DISCOVER reaches the relay by unicast (UDP, ``--relay_port``,
  the node port by default); the relay broadcasts it on its own networks
  with the client's address in it, and the nodes there answer the client
  directly (UDP), after which the client connects to them (TCP);
* the relay remembers such clients for a while and forwards them the
  ANNOUNCEs its network's nodes broadcast when they start or free up;
* the client's TCP connection to the relay (it is a name in ``nodes``) is
  authenticated and told "relay", so the client does not take it for a node.

Only authenticated datagrams are relayed (the relay holds the cluster
secret); a relayed datagram is never relayed again.  Prints one line
``dispynetrelay ready: ...`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import logging
import socket
import sys
import time

from dispy import config, discovery, transport
from dispy.errors import DispyError
from dispy.keys import read_secret_file, resolve_secret
from dispy.protocol import DatagramKind, Kind, derive_key
from dispy.runtime.daemon import check_ports, run_until_stopped, setup_logging
from dispy.tls import server_context

logger = logging.getLogger("dispynetrelay")

#: Seconds a client that asked through this relay keeps hearing its network's announcements.
CLIENT_TTL = 24 * 3600.0
#: Most clients remembered (the oldest is forgotten first).
MAX_CLIENTS = 1024


class Relay:
    """The relay's state: two UDP sockets, one TCP listener, the clients heard from."""

    def __init__(
        self,
        key: bytes,
        *,
        ip_addrs: list[str],
        relay_port: int,
        node_port: int,
        client_port: int,
        ssl=None,
        multicast: bool = False,
        scheduler: tuple[str, int] | None = None,
    ) -> None:
        self.key = key
        self.multicast = multicast  # --ipv4_udp_multicast: the group, not broadcast
        #: --scheduler_node: (address, port) told of every node here, for as long as we run
        self.scheduler = scheduler
        self._timers: list[asyncio.TimerHandle] = []
        self.ip_addrs = ip_addrs
        #: -i named addresses: only the nodes of their networks are relayed
        self.restricted = any(ip not in ("", "0.0.0.0", "::") for ip in ip_addrs)
        self.relay_port = relay_port
        self.node_port = node_port
        self.client_port = client_port
        self.ssl = ssl
        self.clients: collections.OrderedDict[tuple[str, int], float] = collections.OrderedDict()
        self.requests: discovery.Endpoint | None = None
        self.announcements: discovery.Endpoint | None = None
        self.server: asyncio.Server | None = None
        self.relayed = 0
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        host = self.ip_addrs[0] if len(self.ip_addrs) == 1 else "0.0.0.0"
        # with -i, announcements are heard on that interface only (they are
        # broadcasts, so the socket cannot be bound to the address itself)
        device = discovery.device_of(self.ip_addrs)
        self.requests = await discovery.open_endpoint(
            self.key, self._on_request, host, self.relay_port, reuse=True, name="relay requests",
            device=device if host == "0.0.0.0" else None,
        )  # fmt: skip
        self.announcements = await discovery.open_endpoint(
            self.key, self._on_announce, "0.0.0.0", self.client_port, reuse=True, name="relay",
            device=device,
        )  # fmt: skip
        if self.multicast:
            self.announcements.join_multicast(self.ip_addrs)
        self.server = await transport.serve(
            host if host != "0.0.0.0" else None,
            self.requests.address[1],
            self.key,
            self._on_client,
            ssl=self.ssl,
        )
        if self.scheduler is not None:  # the nodes here answer the scheduler directly
            loop = asyncio.get_running_loop()
            for at in (0.0, 0.5, 1.5, 4.0):  # UDP may drop one
                self._timers.append(loop.call_later(at, self._forward_discover, *self.scheduler))

    def local_networks(self) -> list[ipaddress.IPv4Network]:
        return [i.network for i in discovery.interfaces(self.ip_addrs)]

    def _targets(self) -> list[str]:
        return discovery.broadcast_targets(["*"], self.ip_addrs)

    def _remember(self, ip: str, port: int) -> None:
        self.clients[(ip, port)] = time.monotonic()
        self.clients.move_to_end((ip, port))
        while len(self.clients) > MAX_CLIENTS:
            self.clients.popitem(last=False)

    def _on_request(self, kind: DatagramKind, body: dict, addr) -> None:
        if kind != DatagramKind.DISCOVER or body.get("relayed"):
            return
        ip = discovery.sender_ip(body)
        port = body.get("port")
        if isinstance(port, bool) or not isinstance(port, int):
            raise ValueError("malformed discovery request")
        src = ipaddress.ip_address(addr[0])
        if any(src in net for net in self.local_networks()):
            return  # a client on our own network: its broadcast reached the nodes already
        self._remember(ip, port)
        n = self._forward_discover(ip, port)
        logger.info("relayed discovery for client %s:%s to %d network(s)", ip, port, n)

    def _forward_discover(self, ip: str, port: int) -> int:
        """Ask this network's nodes to answer (ip, port); how many networks were asked."""
        fwd = {"port": port, "ip": ip, "relayed": 1}
        if self.multicast:
            n = self.requests.multicast(DatagramKind.DISCOVER, fwd, self.node_port, self.ip_addrs)
        else:
            n = self.requests.broadcast(DatagramKind.DISCOVER, fwd, self.node_port, self._targets())
        self.requests.send(DatagramKind.DISCOVER, fwd, ("127.0.0.1", self.node_port))
        self.relayed += 1
        return n

    def _on_announce(self, kind: DatagramKind, body: dict, addr) -> None:
        if kind != DatagramKind.ANNOUNCE or body.get("relayed"):
            return
        if not isinstance(body.get("nid"), str):
            raise ValueError("malformed announcement")
        now = time.monotonic()
        for key in [k for k, t in self.clients.items() if now - t > CLIENT_TTL]:
            del self.clients[key]
        ip = discovery.sender_ip(body)
        if self.restricted and not any(
            ipaddress.ip_address(ip) in net for net in self.local_networks()
        ):
            logger.debug("announcement of %s ignored: not on the networks of -i", ip)
            return
        fwd = dict(body, relayed=1, ip=ip)
        told = list(self.clients) + ([self.scheduler] if self.scheduler else [])
        for client in told:
            self.announcements.send(DatagramKind.ANNOUNCE, fwd, client)
        if told:
            logger.info("node %s announced; told %d client(s)", fwd["ip"], len(told))

    def _on_client(self, chan: transport.Channel) -> None:
        """A client that names the relay in ``nodes`` connects: tell it what we are."""

        def on_message(msg) -> None:
            if msg.kind == Kind.INFO_REQ:  # the client closes once it has read this
                chan.send(Kind.INFO, {"relay": True, "name": socket.gethostname(), "cpus": 0})
            else:
                chan.close()

        chan.on_message = on_message
        chan.start()

    async def shutdown(self) -> None:
        for t in self._timers:
            t.cancel()
        for ep in (self.requests, self.announcements):
            if ep is not None:
                ep.close()
        if self.server is not None:
            self.server.close()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dispynetrelay",
        description="Relay dispy node discovery between this host's network and clients elsewhere.",
    )
    p.add_argument(
        "-i",
        "--ip_addr",
        "--host",
        dest="ip_addr",
        action="append",
        default=[],
        help="address (and network) to relay on (repeatable; default: all)",
    )
    p.add_argument(
        "--relay_port",
        type=int,
        default=None,
        help="port clients send discovery to (default: --node_port)",
    )
    p.add_argument(
        "--node_port", type=int, default=None, help=f"nodes' port (default {config.NODE_PORT})"
    )
    p.add_argument(
        "--client_port",
        type=int,
        default=None,
        help=f"port node announcements go to (default {config.CLIENT_PORT})",
    )
    p.add_argument(
        "--dispy_port",
        type=int,
        default=None,
        help="dispy's base port: the client port; the node port is the next one",
    )
    p.add_argument(
        "--ipv4_udp_multicast",
        action="store_true",
        help=f"relay by IPv4 multicast (group {discovery.MULTICAST_GROUP}) instead of broadcast",
    )
    p.add_argument(
        "--scheduler_node",
        "--scheduler_host",
        dest="scheduler_node",
        metavar="HOST",
        help="a dispyscheduler (or client) in another network: this network's nodes are "
        "announced to it as they start",
    )
    p.add_argument(
        "--scheduler_port",
        type=int,
        default=None,
        help="the UDP port it hears node announcements on (default: the client port)",
    )
    p.add_argument(
        "-s",
        "--secret",
        default=None,
        help="cluster secret (prefer --secret_file or $DISPY_SECRET)",
    )
    p.add_argument("--secret_file", help="read the cluster secret from this file")
    p.add_argument("--certfile", help="TLS certificate for clients that connect (PEM)")
    p.add_argument("--keyfile", help="TLS private key, if not in --certfile")
    p.add_argument("--daemon", action="store_true", help="do not read commands from standard input")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    check_ports(p, args, "dispy_port")
    base = args.dispy_port
    if args.client_port is None:
        args.client_port = base if base is not None else config.CLIENT_PORT
    if args.node_port is None:
        args.node_port = base + 1 if base is not None else config.NODE_PORT
    if args.relay_port is None:
        args.relay_port = args.node_port
    if args.scheduler_port is None:
        args.scheduler_port = args.client_port
    check_ports(p, args, "relay_port", "node_port", "client_port", "scheduler_port")
    if args.secret and args.secret_file:
        p.error("give --secret or --secret_file, not both")
    if args.keyfile and not args.certfile:
        p.error("--keyfile needs --certfile")
    try:
        if args.secret_file:
            args.secret, args.auth = read_secret_file(args.secret_file), args.secret_file
        else:
            args.secret, args.auth = resolve_secret(args.secret)
    except DispyError as exc:
        p.error(str(exc))
    return args


async def run(args: argparse.Namespace) -> int:
    ssl_ctx = None
    if args.certfile:
        try:
            ssl_ctx = server_context(args.certfile, args.keyfile, None)
        except DispyError as exc:
            print(f"dispynetrelay: {exc}", file=sys.stderr)
            return 2
    scheduler = None
    if args.scheduler_node:
        try:
            ip = await discovery.resolve_ipv4(args.scheduler_node, args.scheduler_port)
        except (OSError, UnicodeError) as exc:
            print(f"dispynetrelay: --scheduler_node {args.scheduler_node}: {exc}", file=sys.stderr)
            return 2
        scheduler = (ip, args.scheduler_port)
    relay = Relay(
        derive_key(args.secret),
        ip_addrs=args.ip_addr,
        relay_port=args.relay_port,
        node_port=args.node_port,
        client_port=args.client_port,
        ssl=ssl_ctx,
        multicast=args.ipv4_udp_multicast,
        scheduler=scheduler,
    )
    try:
        await relay.start()
    except OSError as exc:
        print(
            f"dispynetrelay: cannot listen on port {args.relay_port} or {args.client_port}: "
            f"{exc.strerror or exc} (try --relay_port)",
            file=sys.stderr,
        )
        await relay.shutdown()
        return 2
    nets = " ".join(str(n) for n in relay.local_networks()) or "none"
    print(f"dispynetrelay ready: port={relay.requests.address[1]} networks={nets}", flush=True)
    logger.info("secret from %s", args.auth)
    await run_until_stopped(relay.stopped, daemon=args.daemon)
    await relay.shutdown()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("dispynetrelay", args.debug)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
