"""Discovery across hosts made of network namespaces (tests/netns.py): broadcast
on a subnet, wildcards, a node that comes late, dispynetrelay across a router,
a node behind NAT (--ext_ip_addr), forged datagrams, and dispy's MapReduce
example with two clusters.  All traffic stays inside the namespaces.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import EXAMPLES
from .installed import program
from .netns import read_lines, wait_for_line

pytestmark = pytest.mark.netns

SECRET = "multihost-secret"
ENV = {"DISPY_SECRET": SECRET, "DISPY_NODES": None, "PYTHONUNBUFFERED": "1"}

# A client: JobCluster(compute, nodes=argv[1] (JSON; null: the default)); prints
# "node up IP" as nodes are set up, waits until argv[2] nodes are (at most argv[3]
# seconds), runs argv[4] jobs and prints one JSON line: the nodes and each job's node.
CLIENT = r"""
import json, sys, threading
import dispy

def compute(x):
    return x * x

nodes, want, wait, njobs = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
kw = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
up = set()
cond = threading.Condition()

def status(st, node, job):
    if st == dispy.DispyNode.Initialized:
        with cond:
            up.add(node.ip_addr)
            print("node up", node.ip_addr, flush=True)
            cond.notify_all()

if nodes is None:
    cluster = dispy.JobCluster(compute, cluster_status=status, **kw)
else:
    cluster = dispy.JobCluster(compute, nodes=nodes, cluster_status=status, **kw)
print("cluster up", flush=True)
with cond:
    cond.wait_for(lambda: len(up) >= want, timeout=wait)
    found = sorted(up)
out = {"found": found, "ran": []}
if len(found) >= want and njobs:
    jobs = [cluster.submit(i) for i in range(njobs)]
    out["results"] = [j() for j in jobs]
    out["ran"] = sorted({j.ip_addr for j in jobs})
    out["exceptions"] = [j.exception for j in jobs if j.exception]
    cluster.close()
else:
    cluster.close(terminate=True)
print(json.dumps(out), flush=True)
"""


def start_node(host, *args):
    proc = host.popen(
        [
            *program("dispynode"),
            "--daemon",
            "-c",
            "1",
            "--dest_path",
            f"/tmp/dispy-test-{host.ns}",
            *args,
        ],
        env=ENV,
        stderr=subprocess.STDOUT,
    )
    wait_for_line(proc, r"dispynode ready", timeout=30)
    return proc


def start_client(host, nodes, want, wait=30, njobs=6, **kw):
    args = [json.dumps(nodes), str(want), str(wait), str(njobs)]
    if kw:
        args.append(json.dumps(kw))
    proc = host.popen_python(CLIENT, *args, env=ENV, stderr=subprocess.STDOUT)
    wait_for_line(proc, r"cluster up", timeout=30)
    return proc


def client_result(proc, timeout=90) -> dict:
    m = wait_for_line(proc, r"^(\{.*\})$", timeout=timeout)
    proc.wait(timeout=30)
    return json.loads(m.group(1))


def test_three_nodes_found_by_broadcast_with_no_names(netns):
    nodes = [netns.add_host(f"n{i}") for i in range(3)]
    client = netns.add_host("c")
    for h in nodes:
        start_node(h)
    out = client_result(start_client(client, None, want=3, njobs=9))
    assert out["found"] == sorted(h.ip for h in nodes)
    assert out["results"] == [i * i for i in range(9)]


def test_node_started_after_the_client_is_found(netns):
    late = netns.add_host("late")
    client = netns.add_host("c")
    proc = start_client(client, ["*"], want=1, wait=60)
    start_node(late)  # it announces itself by broadcast to the client port
    wait_for_line(proc, rf"node up {late.ip}", timeout=30)
    out = client_result(proc)
    assert out["ran"] == [late.ip]


def test_wildcard_filters_nodes(netns):
    hosts = [netns.add_host(f"n{i}") for i in range(3)]  # .2 .3 .4
    client = netns.add_host("c")
    for h in hosts:
        start_node(h)
    wanted = [h.ip for h in hosts[1:]]
    pattern = hosts[0].ip.rsplit(".", 1)[0] + ".[34]"
    out = client_result(start_client(client, [pattern], want=2, njobs=8))
    assert out["found"] == sorted(wanted)
    assert set(out["ran"]) <= set(wanted)
    # a pattern naming a network with no nodes finds none
    out = client_result(start_client(client, ["10.231.77.*"], want=1, wait=3, njobs=0))
    assert out["found"] == []


def relay_topology(netns):
    client = netns.add_host("c", "a")
    near = netns.add_host("near", "a")  # on the client's network, not matching the wildcard
    netns.add_router("r", ("a", "b"))
    relay = netns.add_host("relay", "b")
    far = [netns.add_host(f"far{i}", "b") for i in range(2)]
    return client, near, relay, far


def test_relay_brings_in_nodes_of_another_network(netns):
    client, near, relay, far = relay_topology(netns)
    for h in (near, *far):
        start_node(h)
    net_b = far[0].ip.rsplit(".", 1)[0] + ".*"
    # without the relay: the broadcast does not cross the router
    out = client_result(start_client(client, [net_b], want=1, wait=3, njobs=0))
    assert out["found"] == []
    rproc = relay.popen([*program("dispynetrelay"), "--daemon"], env=ENV, stderr=subprocess.STDOUT)
    wait_for_line(rproc, r"dispynetrelay ready", timeout=30)
    proc = start_client(client, [relay.ip, net_b], want=3, wait=60, njobs=8)
    ups = {wait_for_line(proc, r"node up (\S+)", timeout=30).group(1) for _ in far}
    assert ups == {h.ip for h in far}
    late = netns.add_host("far-late", "b")  # announces on b; the relay tells the client
    start_node(late)
    out = client_result(proc)
    assert out["found"] == sorted(h.ip for h in (*far, late))
    assert near.ip not in out["ran"] and out["results"] == [i * i for i in range(8)]
    assert relay.ip not in out["found"]  # the relay is not taken for a node


def test_relay_with_ip_addr_relays_only_that_network(netns):
    """A relay on two networks, given ``-i`` on one (b), relays the nodes of b to
    a far client and not those of its other network (c): it listens for
    announcements on b's interface only (#18 finding 5; it used to bind every
    interface and relay both)."""
    client = netns.add_host("c", "a")
    r = netns.add_router("r", ("a", "b"))
    relay = netns.add_router("relay", ("b", "c"))
    route = ["ip", "route", "add", netns.subnet("a").cidr, "via", r.ips["b"]]
    assert relay.run(route).returncode == 0  # it answers clients beyond r
    on_b, on_c = netns.add_host("nb", "b"), netns.add_host("nc", "c")
    rproc = relay.popen(
        [*program("dispynetrelay"), "--daemon", "-i", relay.ips["b"]],
        env=ENV,
        stderr=subprocess.STDOUT,
    )
    wait_for_line(rproc, r"dispynetrelay ready", timeout=30)
    nets = [netns.subnet(s).prefix + ".*" for s in ("b", "c")]
    start_client(client, [relay.ips["b"], *nets], want=2, wait=60, njobs=0)
    wait_for_line(rproc, r"relayed discovery for client", timeout=30)
    start_node(on_c)  # announces (broadcast on c) before it says it is ready
    start_node(on_b)
    wait_for_line(rproc, rf"node {on_b.ip} announced; told 1 client", timeout=30)
    lines = "\n".join(read_lines(rproc))
    assert on_c.ip not in lines


@pytest.mark.parametrize("flag", ["--ext_ip_addr", "--ext_host"])  # dispy 4.15's name
def test_node_behind_nat_advertises_ext_ip_addr(netns, flag):
    node = netns.add_host("natted")
    client = netns.add_host("c")
    public = node.ip.rsplit(".", 1)[0] + ".200"
    assert node.run(["ip", "addr", "add", f"{public}/24", "dev", "eth0"]).returncode == 0
    start_node(node, flag, public)
    out = client_result(start_client(client, ["*"], want=1))
    assert out["found"] == [public] and out["ran"] == [public]


FORGER = r"""
import os, socket, sys, threading, time
from dispy.protocol import derive_key
from dispy.protocol._datagram import DatagramKind, encode_datagram
bcast, me = sys.argv[1], sys.argv[2]
accepts = []
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("", 51348)); srv.listen(8)
threading.Thread(target=lambda: [accepts.append(srv.accept()) for _ in range(100)], daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
wrong = derive_key("not the cluster secret")
print("forging", flush=True)
for _ in range(int(sys.argv[3])):
    now = time.time()
    u.sendto(encode_datagram(DatagramKind.ANNOUNCE, {"nid": "evil", "port": 51348, "ip": me, "name": "evil", "cpus": 64}, wrong, now=now), (bcast, 51347))
    u.sendto(os.urandom(200), (bcast, 51347))
    u.sendto(encode_datagram(DatagramKind.DISCOVER, {"port": 51347, "ip": me}, wrong, now=now), (bcast, 51348))
    sys.stdin.readline()
print("accepts", len(accepts), flush=True)
"""


def test_forged_datagrams_are_ignored(netns):
    good = netns.add_host("good")
    evil = netns.add_host("evil")
    client = netns.add_host("c")
    start_node(good)
    forger = evil.popen_python(
        FORGER,
        evil.broadcast,
        evil.ip,
        "5",
        env=ENV,
        stdin=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for_line(forger, "forging", timeout=30)
    proc = start_client(client, ["*"], want=1, njobs=6)
    for _ in range(5):  # forged announcements while the client discovers
        forger.stdin.write("\n")
        forger.stdin.flush()
    out = client_result(proc)
    assert out["found"] == [good.ip] and out["ran"] == [good.ip]
    m = wait_for_line(forger, r"accepts (\d+)", timeout=30)
    assert m.group(1) == "0"  # nobody connected to the forger's "node"


def test_mapreduce_example_with_two_clusters(netns, tmp_path):
    """dispy's 6.13: mappers on node1/node2 (by name), reducers on any node ('*')."""
    node1, node2, node3 = (netns.add_host(f"node{i}") for i in (1, 2, 3))
    client = netns.add_host("client")
    docs = {
        f"doc{i}": " ".join(["alpha beta gamma", "delta alpha", "epsilon alpha beta"][: i % 3 + 1])
        * (i + 1)
        for i in range(1, 6)
    }
    expected = collections.Counter()
    for text in docs.values():
        expected.update(w.lower() for w in text.split() if len(w) > 3 and w.isalpha())
    # the example reads /tmp/doc1..5, a fixed place: another test run on this
    # machine (CI runs the suite on two Pythons at once) must not use them meanwhile
    with open("/tmp/dispy-test-mapreduce.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hosts_dir = f"/etc/netns/{client.ns}"  # ip netns exec mounts this over /etc/hosts
        os.makedirs(hosts_dir, exist_ok=True)
        try:
            with open("/etc/hosts") as f:
                base = f.read()
            with open(os.path.join(hosts_dir, "hosts"), "w") as f:
                f.write(base + f"\n{node1.ip} node1\n{node2.ip} node2\n")
            for name, text in docs.items():
                with open(os.path.join("/tmp", name), "w") as f:
                    f.write(text + "\n")
            for h in (node1, node2, node3):
                start_node(h)
            proc = client.popen(
                [sys.executable, os.path.join(EXAMPLES, "mapreduce.py")], env=ENV, cwd=str(tmp_path)
            )
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            counts = {w: int(c) for w, c in (ln.split() for ln in out.splitlines())}
            assert counts == dict(expected)
        finally:
            shutil.rmtree(hosts_dir, ignore_errors=True)
            for name in docs:
                try:
                    os.remove(os.path.join("/tmp", name))
                except FileNotFoundError:
                    pass
