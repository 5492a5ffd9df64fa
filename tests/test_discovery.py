"""Discovery on loopback: the datagram conversation with a real dispynode, the
rules for broadcast targets and the network guard.  Broadcast itself is
tested in network namespaces (tests/test_multihost.py).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

import dispy
from dispy import discovery
from dispy.protocol import derive_key
from dispy.protocol._datagram import DatagramDecoder, DatagramKind, encode_datagram
from dispy.runtime.finder import NodeFinder

from . import jobs


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- pure rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("192.168.2.*", "192.168.2.255"),
        ("10.*.*.*", "10.255.255.255"),
        ("10.1.*.5", None),
        ("*", None),
        ("10.1.2.3", None),
        ("host*", None),
        ("300.1.1.*", None),
    ],
)
def test_pattern_broadcast(pattern, expected):
    assert discovery.pattern_broadcast(pattern) == expected


def test_wildcards_match_addresses():
    assert discovery.matches("192.168.2.7", ["192.168.2.*"])
    assert not discovery.matches("192.168.3.7", ["192.168.2.*"])
    assert discovery.matches("10.0.0.1", ["*"])
    from dispy.engine.specs import is_wildcard

    assert is_wildcard("10.0.0.?") and not is_wildcard("node1")


def test_parse_nodes_splits_names_and_wildcards():
    from dispy.engine import parse_nodes

    specs, patterns, local = parse_nodes(["n1", "10.0.0.*", "n2:4000", "*"], 51348)
    assert specs == [("n1", 51348, None), ("n2", 4000, None)]
    assert [(p, port) for p, port, _ in patterns] == [("10.0.0.*", 51348), ("*", 51348)]
    assert not local
    with pytest.raises(ValueError, match="empty host name"):
        parse_nodes([":51348"], 51348)


def test_guard_refuses_beyond_loopback_in_own_namespace():
    """The suite's safety net: from the machine's namespace nothing leaves loopback."""
    assert os.environ.get(discovery.GUARD_ENV)
    assert discovery.guarded()  # pytest runs in the machine's own namespace

    async def go():
        ep = await discovery.open_endpoint(derive_key("k"), lambda *a: None, "127.0.0.1", 0)
        try:
            assert not ep.send(DatagramKind.DISCOVER, {"port": 1}, ("10.231.254.255", 9))
            assert ep.broadcast(DatagramKind.DISCOVER, {"port": 1}, 9, ["192.0.2.255"]) == 0
            assert ep.refused == 2
        finally:
            ep.close()

    import asyncio

    asyncio.run(go())


# -- the node's side of the conversation -------------------------------------------------


class Asker:
    """A raw UDP socket that speaks (or garbles) discovery to a node."""

    def __init__(self, secret: str) -> None:
        self.key = derive_key(secret)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.decoder = DatagramDecoder(self.key)

    def ask(
        self, port: int, key: bytes | None = None, raw: bytes | None = None, ip="127.0.0.1"
    ) -> None:
        body = {"port": self.sock.getsockname()[1]}
        if ip is not None:
            body["ip"] = ip  # where to answer: a datagram's source address is never used
        data = raw or encode_datagram(DatagramKind.DISCOVER, body, key or self.key, now=time.time())
        self.sock.sendto(data, ("127.0.0.1", port))

    def answer(self, timeout: float) -> dict | None:
        """The node's ANNOUNCE, or None if none came within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(2048)
        except TimeoutError:
            return None
        kind, body = self.decoder.decode(data, time.time())
        assert kind == DatagramKind.ANNOUNCE
        return body

    def close(self) -> None:
        self.sock.close()


def test_node_answers_only_authenticated_requests(node_factory):
    node = node_factory(cpus=1, discoverable=True)
    asker = Asker(node.secret)
    try:
        asker.ask(node.port)
        body = asker.answer(10)
        assert body["port"] == node.port and body["cpus"] == 1
        assert body["ip"] == "127.0.0.1" and isinstance(body["nid"], str)
        # another secret, garbage, a truncated datagram: no answer, and the node serves on
        asker.ask(node.port, key=derive_key("not the secret"))
        asker.ask(node.port, raw=b"\x00" * 64)
        asker.ask(node.port, raw=b"DSPYD\x01\x01")
        asker.ask(node.port, raw=os.urandom(1400))
        assert asker.answer(0.5) is None
        asker.ask(node.port)
        again = asker.answer(10)
        assert again["nid"] == body["nid"]
        # and a replayed (recorded) request is refused
        data = encode_datagram(
            DatagramKind.DISCOVER,
            {"port": asker.sock.getsockname()[1], "ip": "127.0.0.1"},
            asker.key,
            now=time.time(),
        )
        asker.ask(node.port, raw=data)
        assert asker.answer(10) is not None
        asker.ask(node.port, raw=data)
        assert asker.answer(0.5) is None
    finally:
        asker.close()
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret=node.secret) as cluster:
        assert cluster.submit(21)() == 42


def test_only_the_address_a_datagram_states_is_used(node_factory):
    """#18 finding 5: anyone may send again, from their own address, a datagram
    they heard; so a request that does not state (under the cluster's HMAC)
    where to answer is not answered, and an announcement that does not state the
    node's address is not followed, whatever its source."""
    node = node_factory(cpus=1, discoverable=True)
    asker = Asker(node.secret)
    try:
        asker.ask(node.port, ip=None)
        assert asker.answer(0.5) is None
        asker.ask(node.port)
        assert asker.answer(10)["ip"] == "127.0.0.1"  # a node states its own address too
    finally:
        asker.close()

    found = []
    finder = NodeFinder(derive_key("k"), lambda *a: found.append(a), ip_addrs=[])
    finder.patterns = [("*", 51348, None)]
    for body, source in (
        ({"nid": "n1", "port": 6000}, ("10.231.9.66", 51347)),  # no address: not from source
        ({"nid": "n1", "port": 6000, "ip": "127.0.0.5"}, ("10.231.9.66", 51347)),
    ):
        with pytest.raises(ValueError):
            finder._on_datagram(DatagramKind.ANNOUNCE, body, source)
    finder._on_datagram(
        DatagramKind.ANNOUNCE, {"nid": "n1", "port": 6000, "ip": "10.231.9.7"}, ("10.231.9.66", 1)
    )
    assert found == [("10.231.9.7", 6000, "n1", None)]


def test_private_node_does_not_answer(node_factory):
    node = node_factory(cpus=1)  # LocalNode default: --no_discovery
    asker = Asker(node.secret)
    try:
        asker.ask(node.port)
        assert asker.answer(0.5) is None
    finally:
        asker.close()


# -- JobCluster finding nodes ---------------------------------------------------------------


def test_wildcard_finds_node_on_this_host(node_factory):
    node = node_factory(cpus=2, discoverable=True)
    cluster = dispy.JobCluster(
        jobs.double, nodes=[f"*:{node.port}"], secret=node.secret, port=free_udp_port()
    )
    try:
        assert [cluster.submit(i)() for i in range(4)] == [0, 2, 4, 6]
        nodes = cluster.status()[0]
        assert [(n.ip_addr, n.port) for n in nodes] == [("127.0.0.1", node.port)]
    finally:
        cluster.close()


def test_wildcard_that_matches_nothing_finds_nothing(node_factory):
    node = node_factory(cpus=1, discoverable=True)
    cluster = dispy.JobCluster(
        jobs.double, nodes=[f"10.231.99.*:{node.port}"], secret=node.secret, port=free_udp_port()
    )
    try:
        cluster.discover_nodes([f"*:{node.port}"])  # '*' matches it; the first pattern did not
        job = cluster.submit(5)
        assert job() == 10
        assert job.ip_addr == "127.0.0.1"
    finally:
        cluster.close()


def test_node_started_after_client_announces_itself(node_factory):
    """The client listens on its port; a node that starts later announces to it."""
    cport = free_udp_port()
    secret = "late-node-secret"
    # the node's port is not known before it starts: the client asks on a port no node
    # uses, so only the node's own announcement can bring it in
    cluster = dispy.JobCluster(jobs.double, nodes=["*:1"], secret=secret, port=cport)
    try:
        job = cluster.submit(8)
        node_factory(
            cpus=1, secret=secret, discoverable=True, extra_args=["--client_port", str(cport)]
        )
        assert job(timeout=60) == 16
    finally:
        cluster.close()
