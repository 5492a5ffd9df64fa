"""The network-namespace harness (tests/netns.py) itself: real traffic, only
between namespaces it builds, and nothing changed in the machine's own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from .netns import (
    PREFIX,
    NetnsUnavailable,
    Network,
    WaitTimeout,
    cleanup_stale,
    find_ip,
    wait_for_line,
)

pytestmark = pytest.mark.netns

PORT = 47011

TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
for _ in range(200):
    c, addr = s.accept()
    c.sendall(b"hello from server")
    print("accepted", addr[0], flush=True)
    c.close()
"""

TCP_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.recv(100).decode())
except OSError as e:
    print("failed:", repr(e))
    sys.exit(1)
"""

# Collects datagrams until one equal to argv[2] (b"end") arrives, then 0.2 s more.
UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(3.0)
got = []
try:
    while len(got) < 20:
        data, addr = s.recvfrom(100)
        got.append(data.decode())
        if data == b"end":
            s.settimeout(0.2)
except socket.timeout:
    pass
print("got", " ".join(got), flush=True)
"""

UDP_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
port = int(sys.argv[1])
for arg in sys.argv[2:]:
    data, addr = arg.split("@")
    s.sendto(data.encode(), (addr, port))
"""


def _root_state() -> dict[str, str]:
    """The machine's own network namespace, as ``ip`` shows it (lifetimes dropped)."""
    ip = find_ip()
    out = {}
    for what in (["-o", "addr"], ["-o", "link"], ["route"], ["-6", "route"], ["rule"]):
        res = subprocess.run([ip, *what], capture_output=True, text=True, check=True)
        text = re.sub(r"\s(valid|preferred)_lft \S+", "", res.stdout)
        text = re.sub(r"\sexpires \S+", "", text)
        out[" ".join(what)] = text
    return out


def _tcp_server(host, port=PORT):
    proc = host.popen_python(TCP_SERVER, str(port))
    wait_for_line(proc, "^ready$", timeout=10)
    return proc


def test_tcp_between_two_hosts(netns):
    h1, h2 = netns.add_host("h1"), netns.add_host("h2")
    assert (h1.ip, h2.ip) == ("10.231.1.2", "10.231.1.3")
    assert (h1.subnet, h1.broadcast, h1.ns) == ("a", "10.231.1.255", f"{PREFIX}h1")
    server = _tcp_server(h2)
    res = h1.python(TCP_CLIENT, h2.ip, str(PORT), "2", timeout=10)
    assert res.returncode == 0 and "hello from server" in res.stdout, res
    assert wait_for_line(server, r"^accepted (\S+)", timeout=5).group(1) == h1.ip
    # inside a host: its own namespace, not the machine's; only lo and eth0
    res = h1.python("import os; print(os.stat('/proc/self/ns/net').st_ino)")
    assert int(res.stdout) != os.stat("/proc/self/ns/net").st_ino, res
    links = h1.run([find_ip(), "-o", "link"]).stdout
    assert re.findall(r"^\d+: (\w+)", links, re.M) == ["lo", "eth0"]


def test_popen_keeps_the_pid(netns):
    h = netns.add_host("h1")
    proc = h.popen_python("import os; print(os.getpid())")
    assert int(wait_for_line(proc, r"^\d+$", timeout=10).group(0)) == proc.pid
    assert proc.wait(10) == 0


def test_wait_for_line_reports_what_it_read(netns):
    h = netns.add_host("h1")
    proc = h.popen_python("print('one'); print('two'); import sys; sys.exit('boom')")
    with pytest.raises(WaitTimeout) as e:
        wait_for_line(proc, "three", timeout=10)
    msg = str(e.value)
    assert "output ended" in msg and "| one" in msg and "| two" in msg and "boom" in msg
    # and a real deadline while the program goes on printing nothing
    proc = h.popen_python("import time; print('start'); time.sleep(30)")
    t = time.monotonic()
    with pytest.raises(WaitTimeout, match="0.3 s passed"):
        wait_for_line(proc, "never", timeout=0.3)
    assert time.monotonic() - t < 2


def test_broadcast_stays_on_its_subnet(netns):
    h1, h2, h3 = (netns.add_host(n) for n in ("h1", "h2", "h3"))
    far = netns.add_host("far", subnet="b")
    netns.add_router("r", ("a", "b"))
    assert far.broadcast == "10.231.2.255"
    receivers = {h: h.popen_python(UDP_RECEIVER, str(PORT)) for h in (h2, h3, far)}
    for proc in receivers.values():
        wait_for_line(proc, "^ready$", timeout=10)
    # the broadcast first, then an "end" unicast to each (through the router to far)
    sent = h1.python(
        UDP_SENDER, str(PORT), f"bcast@{h1.broadcast}", *(f"end@{h.ip}" for h in receivers)
    )
    assert sent.returncode == 0, sent
    got = {h.name: wait_for_line(p, "^got (.*)", timeout=10).group(1) for h, p in receivers.items()}
    assert got == {"h2": "bcast end", "h3": "bcast end", "far": "end"}


def test_router_forwards_unicast(netns):
    near = netns.add_host("near", subnet="a")
    router = netns.add_router("r", ("a", "b"))
    far = netns.add_host("far", subnet="b")  # added after the router: still routed
    assert router.ips == {"a": "10.231.1.1", "b": "10.231.2.1"}
    assert (near.ip, far.ip) == ("10.231.1.2", "10.231.2.2")
    server = _tcp_server(far)
    res = near.python(TCP_CLIENT, far.ip, str(PORT), "2", timeout=10)
    assert res.returncode == 0 and "hello from server" in res.stdout, res
    # routed, not NATed: the server sees the client's own address
    assert wait_for_line(server, r"^accepted (\S+)", timeout=5).group(1) == near.ip


POLL_CONNECT = """
import socket, sys, time
deadline = time.monotonic() + 5
for attempt in range(100):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
        print("connected after", attempt, "failures")
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("never connected")
"""


def test_link_down_and_up(netns):
    h1, h2 = netns.add_host("h1"), netns.add_host("h2")
    _tcp_server(h2)
    assert h1.python(TCP_CLIENT, h2.ip, str(PORT), "2").returncode == 0
    h2.link_down()
    t = time.monotonic()
    res = h1.python(TCP_CLIENT, h2.ip, str(PORT), "1")
    assert res.returncode == 1 and "timed out" in res.stdout, res
    assert time.monotonic() - t < 5
    # the host keeps its address; its eth0 just has no carrier
    assert "NO-CARRIER" in h2.run([find_ip(), "link", "show", "eth0"]).stdout
    h2.link_up()
    res = h1.python(POLL_CONNECT, h2.ip, str(PORT), timeout=10)
    assert res.returncode == 0, res


def test_close_kills_programs_and_removes_namespaces():
    ip = find_ip()
    net = Network()
    try:
        h1 = net.add_host("c1")
        net.add_router("cr", ("a", "b"))
        net.add_host("c2", subnet="b")
        namespaces = [*(h.ns for h in net.hosts.values()), *(s.ns for s in net.subnets.values())]
        listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
        assert all(ns in listed for ns in namespaces)
        # a program and a child of it that the harness never saw
        parent = h1.popen_python(
            "import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(c.pid)\n"
            "time.sleep(60)\n"
        )
        child = int(wait_for_line(parent, r"^\d+$", timeout=10).group(0))
    finally:
        net.close()
    net.close()  # idempotent
    assert parent.returncode is not None and parent.stdout.closed
    assert not _alive(child)
    listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in listed.split()]
    with pytest.raises(RuntimeError, match="closed"):
        h1.popen(["true"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_root_namespace_unchanged():
    before = _root_state()
    with Network() as net:
        hosts = [net.add_host(f"s{i}") for i in range(3)]
        net.add_router("sr", ("a", "b"))
        hosts.append(net.add_host("sb", subnet="b"))
        hosts[0].link_down()
        hosts[0].link_up()
        assert _root_state() == before
    assert _root_state() == before


def test_stale_namespaces_are_removed(netns):
    live = netns.add_host("live")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not os.path.exists(f"/proc/{dead.pid}")
    ip = find_ip()
    stale = f"dspy{dead.pid}-stale"
    subprocess.run([ip, "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
    finally:
        subprocess.run([ip, "netns", "del", stale], capture_output=True)
    listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout.split()
    assert stale not in listed and live.ns in listed


def test_unavailable_says_what_to_fix():
    with pytest.raises(NetnsUnavailable, match="iproute2"):
        Network(ip="/nonexistent/ip")
