"""dispy 4.15's command-line options and programming habits, on the installed
product in network namespaces.

The daemons are started by their console-script names from the wheel's venv
(``tests/installed.py``) with the options a dispy user's scripts give them,
and each option is checked for what it does: multicast discovery
(``--ipv4_udp_multicast`` on node, scheduler and ``JobCluster``); a node that
announces itself to a scheduler in another network (``--scheduler_host``); a
relay that brings its network's nodes to a scheduler (``--scheduler_node``);
the ``dispy`` command line through a scheduler (``--scheduler_node``); a node
that runs an ``--init`` file, keeps files under ``--dest_path_prefix`` and
exits when its client is done (``--client_shutdown``); service hours.  Then
programs written the way dispy's examples are (no nodes list, no secret in the
code, names used without importing them, ``job.finish.wait()``,
``dispy.logger.DEBUG``, ``job.stdout.decode()`` in a callback,
``SharedJobCluster(scheduler_host=)``), run from their own folder.
(Service hours' behaviour over a day is tested with a fake clock in
``test_node_service.py``.)
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest

from .netns import NetnsUnavailable, Network, wait_for_line
from .test_installed import Hosts

TIMEOUT = 180

COMPUTE_IPS = """
import sys, dispy

def compute(n):
    return n * n

kind = sys.argv[1]
if kind == "multicast":
    cluster = dispy.JobCluster(compute, ipv4_udp_multicast=True)
elif kind == "shared":
    cluster = dispy.SharedJobCluster(compute, scheduler_host=sys.argv[2])
else:
    cluster = dispy.JobCluster(compute, nodes=sys.argv[2:])
jobs = [cluster.submit(i) for i in range(8)]
print([job() for job in jobs], sorted({job.ip_addr for job in jobs}))
cluster.close()
"""
SQUARES = "[0, 1, 4, 9, 16, 25, 36, 49]"


class OptionHosts(Hosts):
    """Subnet a: client host ``c`` (the scheduler runs there too), ``m1`` and
    ``b1`` (nodes started by the tests), ``x`` (a node for one test at a time);
    subnet b behind a router: ``f1``, ``f2`` and ``relay``."""

    def __init__(self, installed, base: Path):
        self.installed = installed
        self.base = base
        self.net = Network()
        net = self.net
        self.c = net.add_host("oc", "a")
        self.m1 = net.add_host("om1", "a")
        self.b1 = net.add_host("ob1", "a")
        self.x = net.add_host("ox", "a")
        net.add_router("or", ("a", "b"))
        self.f1 = net.add_host("of1", "b")
        self.f2 = net.add_host("of2", "b")
        self.relay = net.add_host("orelay", "b")
        self.nodes = {}

    def node(self, host, *extra: str, cpus: int = 2, ready=None):
        proc = host.popen(
            [self.installed.script("dispynode"), "-c", str(cpus), "--daemon",
             "--dest_path", str(self.base / f"dest-{host.name}-{len(self.nodes)}"), *extra],
            env=self.env(), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.nodes[f"{host.name}#{len(self.nodes)}"] = proc
        wait_for_line(proc, ready or rf"^dispynode ready: .*cpus={cpus}", timeout=60)
        return proc

    def scheduler(self, *extra: str):
        proc = self.daemon(
            self.c,
            [self.installed.script("dispyscheduler"), "--daemon",
             "--dest_path", str(self.base / f"sched-{len(self.nodes)}"), *extra],
            r"^dispyscheduler ready",
        )  # fmt: skip
        self.nodes[f"scheduler#{len(self.nodes)}"] = proc
        return proc

    def client(self, name: str, text: str, *args: str, **env) -> str:
        work = self.workdir(name)
        (work / "client.py").write_text(text)
        return self.run([self.installed.python, "client.py", *args], cwd=work, **env).stdout

    def stop_all(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                self.stop(proc)
        self.nodes.clear()


@pytest.fixture(scope="module")
def opts(installed, tmp_path_factory):
    try:
        h = OptionHosts(installed, tmp_path_factory.mktemp("options"))
    except NetnsUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield h
    finally:
        h.net.close()


@pytest.fixture
def hosts(opts):
    yield opts
    opts.stop_all()


@pytest.mark.netns
def test_multicast_discovery_finds_the_nodes_in_the_group_only(hosts):
    """Nodes started with --ipv4_udp_multicast join dispy's group; a client or
    scheduler with it asks the group, so a node that only hears broadcasts is
    not found (b1), the multicast one is (m1)."""
    hosts.node(hosts.m1, "--ipv4_udp_multicast")
    hosts.node(hosts.b1)
    out = hosts.client("multicast", COMPUTE_IPS, "multicast")
    assert out.strip() == f"{SQUARES} ['{hosts.m1.ip}']", out
    hosts.scheduler("--ipv4_udp_multicast")
    out = hosts.client("multicast-shared", COMPUTE_IPS, "shared", hosts.c.ip)
    assert out.strip() == f"{SQUARES} ['{hosts.m1.ip}']", out
    # the broadcast node was there all along: a client without the option finds it
    # (a wildcard matching b1 alone: it is found by broadcast, then filtered)
    net, last = hosts.b1.ip.rsplit(".", 1)
    out = hosts.client("broadcast", COMPUTE_IPS, "named", f"{net}.[{last[0]}]{last[1:]}")
    assert out.strip() == f"{SQUARES} ['{hosts.b1.ip}']", out


@pytest.mark.netns
def test_nodes_of_another_network_announced_to_a_scheduler(hosts):
    """A scheduler on subnet a looks for subnet b's nodes (a wildcard: its
    broadcast does not cross the router).  f1 announces itself to it
    (--scheduler_host); f2 is brought in by a relay on b (--scheduler_node).
    Then dispy's command line runs through the scheduler (--scheduler_node)."""
    wildcard = hosts.f1.ip.rsplit(".", 1)[0] + ".*"
    sched = hosts.scheduler("-n", wildcard)
    hosts.node(hosts.f1, "--scheduler_host", hosts.c.ip)
    wait_for_line(sched, rf"node \S+ \({re.escape(hosts.f1.ip)}:\d+\) ready", timeout=60)
    hosts.node(hosts.f2)
    relay = hosts.daemon(
        hosts.relay,
        [hosts.installed.script("dispynetrelay"), "--daemon", "--dispy_port", "51347",
         "--scheduler_node", hosts.c.ip],
        r"^dispynetrelay ready",
    )  # fmt: skip
    hosts.nodes["relay"] = relay
    wait_for_line(sched, rf"node \S+ \({re.escape(hosts.f2.ip)}:\d+\) ready", timeout=60)

    work = hosts.workdir("cli-through-scheduler")
    prog = work / "hello.sh"
    prog.write_text('#!/bin/sh\necho "hello $1 from $(hostname)"\n')
    prog.chmod(0o755)
    argv = [hosts.installed.script("dispy"), "--scheduler_node", hosts.c.ip]
    for i in range(4):
        argv += ["-a", str(i)]
    out = hosts.run([*argv, "hello.sh"], cwd=work).stdout
    ran_on = set(re.findall(r"^=== job \d+ \(hello\.sh \d\) on (\S+): exit status 0$", out, re.M))
    assert len(re.findall(r"^hello \d from ", out, re.M)) == 4, out
    assert ran_on and ran_on <= {hosts.f1.ip, hosts.f2.ip}, out


INIT_FILE = """
import os

def init():
    with open({marker!r} + "-init", "w") as f:
        f.write(str(os.getpid()))

def close():
    with open({marker!r} + "-close", "w") as f:
        f.write(str(os.getpid()))
"""

CWD_CLIENT = """
import sys, dispy

def compute(n):
    import os
    return os.getcwd()

cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]])
print(cluster.submit(1)())
cluster.close()
"""


@pytest.mark.netns
def test_init_file_dest_path_prefix_and_client_shutdown(hosts):
    """dispy's service-unit line: the node runs --init's init() before serving,
    keeps the computation's files under --dest_path_prefix, exits on its own
    once its client has closed (--client_shutdown) and runs close() then."""
    marker = str(hosts.base / "init-marker")
    init = hosts.base / "node_init.py"
    init.write_text(INIT_FILE.format(marker=marker))
    prefix = hosts.base / "prefix"
    node = hosts.node(
        hosts.x, "--init", str(init), "--client_shutdown", "--dest_path_prefix", str(prefix)
    )
    assert Path(marker + "-init").read_text() == str(node.pid)
    out = hosts.client("client-shutdown", CWD_CLIENT, hosts.x.ip)
    assert out.strip().startswith(str(prefix) + "/"), out
    assert node.wait(60) == 0
    assert Path(marker + "-close").read_text() == str(node.pid)


def _hhmm(delta_hours: float) -> str:
    t = dt.datetime.now() + dt.timedelta(hours=delta_hours)
    return t.strftime("%H:%M")


@pytest.mark.netns
def test_service_hours_options_start_the_node(hosts):
    """A node inside its hours serves; one outside them says so at start and
    answers no discovery (its behaviour through a day: test_node_service.py)."""
    hosts.node(hosts.x, "--service_start", _hhmm(-2), "--service_stop", _hhmm(2),
               "--service_end", _hhmm(3))  # fmt: skip
    out = hosts.client("in-hours", COMPUTE_IPS, "named", hosts.x.ip)
    assert out.strip() == f"{SQUARES} ['{hosts.x.ip}']", out
    late = hosts.node(hosts.b1, "--service_start", _hhmm(4), "--service_end", _hhmm(6),
                      ready=r"service hours: taking no new jobs now")  # fmt: skip
    wait_for_line(late, r"^dispynode ready: ", timeout=30)


HABITS = """
import dispy

def compute(n):  # os and time are not imported: dispy's nodes provide them
    time.sleep(0.01)
    return (n, os.getpid())

if __name__ == '__main__':
    cluster = dispy.{cls}(compute, loglevel=dispy.logger.DEBUG{extra})
    jobs = [cluster.submit(i) for i in range(6)]
    for job in jobs:
        assert job.finish.wait(120), job.id
        n, pid = job.result
        print('job %s: %s from pid %s on %s' % (job.id, n, pid, job.ip_addr))
    cluster.print_status()
    cluster.close()
"""

PROGRAM_CALLBACK = """
import dispy, threading

done = threading.Event()
lines = []

def cluster_status(status, node, job):
    if status == dispy.DispyJob.Finished:
        lines.append(job.stdout.decode().strip())
        if len(lines) == 3:
            done.set()

if __name__ == '__main__':
    cluster = dispy.JobCluster('./greet.sh', cluster_status=cluster_status)
    for i in range(3):
        cluster.submit(str(i))
    assert done.wait(120)
    print(sorted(lines))
    cluster.close()
"""


@pytest.mark.netns
def test_programs_written_like_dispys_examples(hosts):
    """Nodes found by broadcast, the secret in $DISPY_SECRET, each program run
    from its folder: a function using os/time unimported, loglevel with
    dispy.logger.DEBUG, job.finish.wait(); a program computation whose
    cluster_status callback decodes job.stdout; the same function through
    SharedJobCluster(scheduler_host=)."""
    hosts.node(hosts.m1)
    hosts.node(hosts.b1)
    node_ips = {hosts.m1.ip, hosts.b1.ip}
    out = hosts.client("habits", HABITS.format(cls="JobCluster", extra=""))
    got = re.findall(r"^job (\d+): (\d+) from pid \d+ on (\S+)$", out, re.M)
    assert sorted(int(n) for _, n, _ in got) == list(range(6)), out
    assert len({i for i, *_ in got}) == 6, out  # job.id: a number of each job's own
    assert {ip for *_, ip in got} <= node_ips, out

    work = hosts.workdir("program-callback")
    (work / "greet.sh").write_text('#!/bin/sh\necho "greetings $1"\n')
    (work / "greet.sh").chmod(0o755)
    (work / "client.py").write_text(PROGRAM_CALLBACK)
    out = hosts.run([hosts.installed.python, "client.py"], cwd=work).stdout
    assert out.strip() == "['greetings 0', 'greetings 1', 'greetings 2']", out

    hosts.scheduler()
    extra = f", scheduler_host={hosts.c.ip!r}"
    out = hosts.client("habits-shared", HABITS.format(cls="SharedJobCluster", extra=extra))
    got = re.findall(r"^job (\d+): (\d+) from pid \d+ on (\S+)$", out, re.M)
    assert sorted(int(n) for _, n, _ in got) == list(range(6)), out
    assert {ip for *_, ip in got} <= node_ips, out
