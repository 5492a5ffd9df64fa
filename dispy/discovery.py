"""Finding nodes over UDP: the one datagram endpoint that clients, nodes and
``dispynetrelay`` share, and the rules for where discovery may broadcast.

The conversation (every datagram is authenticated with the cluster secret,
see ``protocol._datagram``; none carries pickle):

* a client sends DISCOVER ``{"port": p}`` by broadcast (for ``'*'`` and
  wildcards such as ``'192.168.2.*'``) and by unicast (to named hosts, which
  may be relays) to the node port (51348);
* a node that hears an authenticated DISCOVER answers, by unicast UDP to the
  client's address, with ANNOUNCE ``{"nid", "port", "name", "cpus"[, "ip"]}``;
  the client then connects to the node over TCP (the node never connects
  out, so a datagram can never make it open a connection anywhere);
* a node that starts, or whose client leaves, broadcasts ANNOUNCE to the
  client port (51347), so clients started earlier find it;
* a relay forwards a client's DISCOVER onto its own network, with the
  client's address in ``ip``/``port`` and ``relayed`` set, and forwards the
  ANNOUNCEs it hears there to the clients it has heard from.

With ``ipv4_udp_multicast`` (dispy's option of that name) the datagrams that
would be broadcast go to the IPv4 multicast group ``MULTICAST_GROUP`` instead,
once per local interface, and the sockets that hear them join that group.

Safety: a program broadcasts only on the interfaces of its own network
namespace.  When ``$DISPY_BROADCAST_ONLY_IN_NETNS`` holds a namespace's
inode (the test suite sets it to the machine's own), every non-loopback
datagram from that namespace is refused, so tests can only broadcast inside
the namespaces they create.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable

from .errors import AuthenticationFailed, DispyError, ProtocolError
from .protocol._datagram import DatagramDecoder, DatagramKind, encode_datagram

logger = logging.getLogger("dispy.discovery")

GUARD_ENV = "DISPY_BROADCAST_ONLY_IN_NETNS"

#: The administratively scoped IPv4 group dispy uses for multicast discovery.
MULTICAST_GROUP = "239.255.97.5"


def netns_inode() -> int | None:
    """The inode that names this process's network namespace (None if unreadable)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def guarded() -> bool:
    """True when only loopback may be reached from here: ``$DISPY_BROADCAST_ONLY_IN_NETNS``
    holds the inode of the namespace to protect (the test suite sets it to the
    machine's own) and this process is in it.  A value that is not an inode
    number protects every namespace."""
    value = os.environ.get(GUARD_ENV)
    if not value:
        return False
    mine = netns_inode()
    try:
        return mine is None or mine == int(value)
    except ValueError:
        return True


def local_ip_for(dest: str) -> str | None:
    """The address of this host that a datagram to ``dest`` leaves from (a route
    lookup: connecting a UDP socket sends nothing); None if there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return None


async def resolve_ipv4(host: str, port: int) -> str:
    """The IPv4 address of ``host`` for datagrams; ``OSError``/``UnicodeError`` if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
    )
    if not infos:
        raise OSError(f"no IPv4 address for {host}")
    return infos[0][4][0]


def sender_ip(body: dict) -> str:
    """The address a datagram says it is from (``ip``, under the cluster's HMAC).
    The datagram's source address is never used: anyone can send again a datagram
    they heard, from their own address."""
    ip = body.get("ip")
    if not isinstance(ip, str) or not ip:
        raise ValueError("no address in it")
    return str(ipaddress.ip_address(ip))


def interfaces(bind: list[str] | None = None) -> list[ipaddress.IPv4Interface]:
    """The non-loopback IPv4 interfaces of this host (those holding a ``bind``
    address, when given and not a wildcard address)."""
    import psutil  # (here: a client that discovers no nodes does without it)

    want = {b for b in (bind or []) if b not in ("", "0.0.0.0", "::")}
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET or not a.netmask:
                continue
            try:
                iface = ipaddress.IPv4Interface(f"{a.address}/{a.netmask}")
            except ValueError:
                continue
            if iface.ip.is_loopback or (want and a.address not in want):
                continue
            out.append(iface)
    return out


def pattern_broadcast(pattern: str) -> str | None:
    """The broadcast address of a wildcard like ``'192.168.2.*'`` (``'192.168.2.255'``),
    or None when the pattern is not trailing stars on a dotted quad."""
    parts = pattern.split(".")
    if len(parts) != 4 or parts[0] == "*":
        return None
    seen_star = False
    for i, p in enumerate(parts):
        if p == "*":
            seen_star = True
            parts[i] = "255"
        elif seen_star or not p.isdigit() or int(p) > 255:
            return None
    return ".".join(parts) if seen_star else None


def broadcast_targets(patterns: list[str], bind: list[str] | None = None) -> list[str]:
    """Where to broadcast for ``patterns``: for ``'a.b.c.*'`` its own broadcast
    address and that of a local network it covers; for ``'*'`` and other
    shapes (``'10.0.0.[2-5]'``), every local network's (answers are filtered
    by the pattern)."""
    out: list[str] = []
    ifaces = [i for i in interfaces(bind) if i.network.prefixlen < 31]
    for pat in patterns:
        own = pattern_broadcast(pat) if pat != "*" else None
        if own is None:
            cands = [str(i.network.broadcast_address) for i in ifaces]
        else:
            cands = [own] + [
                str(i.network.broadcast_address)
                for i in ifaces
                if fnmatch.fnmatchcase(str(i.ip), pat)
            ]
        for c in cands:
            if c not in out:
                out.append(c)
    return out


def matches(ip: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(ip, p) for p in patterns)


class Endpoint(asyncio.DatagramProtocol):
    """One UDP socket speaking authenticated discovery datagrams.

    ``on_datagram(kind, body, addr)`` gets every datagram that authenticated;
    the rest are dropped silently: counted in ``dropped`` and logged at debug.
    """

    def __init__(self, key: bytes, on_datagram: Callable, name: str = "discovery") -> None:
        self.key = key
        self.decoder = DatagramDecoder(key)
        self.on_datagram = on_datagram
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self.received = 0
        self.refused = 0  # sends the network guard stopped
        self._from: dict[str, str | None] = {}  # destination -> our address toward it

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2] if self.transport else ("", 0)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            kind, body = self.decoder.decode(data, time.time())
        except (ProtocolError, AuthenticationFailed, ValueError, TypeError) as exc:
            self.dropped += 1
            logger.debug("%s: datagram from %s dropped: %s", self.name, addr[0], exc)
            return
        self.received += 1
        try:
            self.on_datagram(kind, body, addr)
        except (KeyError, TypeError, ValueError, DispyError) as exc:
            self.dropped += 1
            logger.debug("%s: datagram from %s ignored: %s", self.name, addr[0], exc)

    def error_received(self, exc) -> None:
        logger.debug("%s: %s", self.name, exc)

    def send(self, kind: DatagramKind, body: dict, addr: tuple[str, int]) -> bool:
        """Send one datagram; False (logged at debug) if it could not go."""
        if self.transport is None or self.transport.is_closing():
            return False
        if guarded() and not ipaddress.ip_address(addr[0]).is_loopback:
            self.refused += 1
            logger.debug(
                "%s: not sending to %s: %s is set and this is the machine's own network namespace",
                self.name,
                addr[0],
                GUARD_ENV,
            )
            return False
        if "ip" not in body:  # say where it comes from (the receiver trusts only that)
            src = self._from.get(addr[0])
            if src is None:
                src = local_ip_for(addr[0])
                if len(self._from) > 256:
                    self._from.clear()
                self._from[addr[0]] = src
            if src is None:
                logger.debug("%s: no route to %s", self.name, addr[0])
                return False
            body = dict(body, ip=src)
        try:
            self.transport.sendto(encode_datagram(kind, body, self.key, now=time.time()), addr)
        except (OSError, ValueError) as exc:
            logger.debug("%s: cannot send to %s:%s: %s", self.name, addr[0], addr[1], exc)
            return False
        return True

    def broadcast(self, kind: DatagramKind, body: dict, port: int, targets: list[str]) -> int:
        """Send to each broadcast address in ``targets``; return how many went."""
        return sum(self.send(kind, body, (t, port)) for t in targets)

    def multicast(self, kind: DatagramKind, body: dict, port: int, bind=None) -> int:
        """Send to ``MULTICAST_GROUP`` once out of each local interface (those of
        ``bind`` when given); return how many went."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return 0
        sent = 0
        for iface in interfaces(bind):
            try:
                sock.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(str(iface.ip))
                )
            except OSError as exc:
                logger.debug("%s: no multicast out of %s: %s", self.name, iface.ip, exc)
                continue
            stamped = body if "ip" in body else dict(body, ip=str(iface.ip))
            sent += self.send(kind, stamped, (MULTICAST_GROUP, port))
        return sent

    def join_multicast(self, bind=None) -> int:
        """Hear ``MULTICAST_GROUP`` on each local interface (those of ``bind`` when
        given); return on how many.  Not in a guarded namespace: joining sends
        IGMP reports onto the network."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return 0
        if guarded():
            logger.debug("%s: not joining %s: %s is set", self.name, MULTICAST_GROUP, GUARD_ENV)
            return 0
        joined = 0
        group = socket.inet_aton(MULTICAST_GROUP)
        for iface in interfaces(bind):
            try:
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_ADD_MEMBERSHIP,
                    group + socket.inet_aton(str(iface.ip)),
                )
                joined += 1
            except OSError as exc:  # EADDRINUSE: joined on that interface already
                logger.debug(
                    "%s: cannot join %s on %s: %s", self.name, MULTICAST_GROUP, iface.ip, exc
                )
        return joined

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def device_of(ips: list[str]) -> str | None:
    """The one network interface holding every address of ``ips`` (None when
    they are wildcards, on several interfaces, or not this host's)."""
    want = {ip for ip in ips if ip not in ("", "0.0.0.0", "::")}
    if not want:
        return None
    import psutil

    names = {
        name
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family == socket.AF_INET and a.address in want
    }
    return names.pop() if len(names) == 1 else None


async def open_endpoint(
    key: bytes,
    on_datagram: Callable,
    host: str = "0.0.0.0",
    port: int = 0,
    *,
    reuse: bool = False,
    name: str = "discovery",
    device: str | None = None,
) -> Endpoint:
    """A bound ``Endpoint`` (SO_BROADCAST on; SO_REUSEADDR when ``reuse``, so
    several programs on one host can all hear broadcasts on a shared port).

    ``device``: hear only what arrives on that interface (``SO_BINDTODEVICE``;
    a socket bound to one unicast address would not hear broadcasts at all).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if device is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            except (OSError, AttributeError) as exc:  # not Linux, or not allowed
                logger.info(
                    "%s: cannot listen on %s only (%s): filtering by address", name, device, exc
                )
        sock.bind((host or "0.0.0.0", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    ep = Endpoint(key, on_datagram, name)
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: ep, sock=sock)
    return ep
