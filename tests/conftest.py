"""Shared fixtures: real dispynode daemons on loopback addresses with free ports.

Every process a test starts is stopped by PID when the test ends; nothing
listens beyond loopback and nothing broadcasts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import subprocess
import sys
import threading

import pytest

import dispy
from dispy import discovery

# Network safety: in the machine's own network namespace no test (nor any
# program a test starts: the variable is inherited) may send a datagram
# beyond loopback; broadcast discovery runs only inside test namespaces.
os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture
def node_factory():
    """Start dispynode daemons on loopback, each on an address of its own
    (127.0.0.2, 127.0.0.3, ...: a job's ``ip_addr`` tells which node ran it;
    a ``discoverable`` one on 127.0.0.1, where a client looks on this host):
    ``node_factory(cpus=2, secret=None, extra_args=(), discoverable=False)``."""
    started: list[dispy.LocalNode] = []

    def make(
        cpus: int = 2, secret: str | None = None, extra_args=(), discoverable: bool = False
    ) -> dispy.LocalNode:
        node = dispy.LocalNode(
            cpus=cpus,
            secret=secret,
            extra_args=extra_args,
            discoverable=discoverable,
            # found by discovery: where the client probes this host, 127.0.0.1
            ip_addr="127.0.0.1" if discoverable else f"127.0.0.{len(started) + 2}",
        ).start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


class Daemon:
    """What a client program talks to, for tests that attack both: a dispynode,
    or a dispyscheduler in front of one.  ``cluster(computation)`` is a client of
    it (a JobCluster, or a SharedJobCluster); ``serves()`` checks that a real
    client still gets a result through it."""

    def __init__(self, kind, ip_addr, port, secret, dest_path, pid):
        self.kind, self.ip_addr, self.port, self.secret = kind, ip_addr, port, secret
        self.pid = pid  # the daemon's process
        self.dest_path = dest_path
        self.address = f"{ip_addr}:{port}"

    def __repr__(self) -> str:
        return f"<{self.kind} {self.address}>"

    def cluster(self, computation, **kw):
        if self.kind == "dispynode":
            return dispy.JobCluster(computation, nodes=[self.address], secret=self.secret, **kw)
        return dispy.SharedJobCluster(
            computation, scheduler_node=self.ip_addr, scheduler_port=self.port,
            secret=self.secret, recover_file=False, **kw,
        )  # fmt: skip

    def serves(self) -> None:
        from . import jobs

        with self.cluster(jobs.double) as c:
            assert c.submit(21)(timeout=30) == 42


@pytest.fixture(params=["dispynode", "dispyscheduler"])
def daemon(request, node_factory, tmp_path):
    """A dispynode (2 CPUs), or a dispyscheduler (installed console script) in
    front of one: the client-facing side of each daemon."""
    from .test_shared import CLUSTER_SECRET, NODE_SECRET, Scheduler

    if request.param == "dispynode":
        node = node_factory(cpus=2)
        yield Daemon(
            "dispynode", node.ip_addr, node.port, node.secret, node.dest_path, node.proc.pid
        )
        return
    node = node_factory(cpus=2, secret=NODE_SECRET)
    sched = Scheduler([node], tmp_path)
    try:
        yield Daemon(
            "dispyscheduler", "127.0.0.1", sched.port, CLUSTER_SECRET, str(tmp_path / "sched"),
            sched.proc.pid,
        )  # fmt: skip
    finally:
        sched.stop()


@pytest.fixture
def node(node_factory):
    """One dispynode with 2 CPUs on 127.0.0.2."""
    return node_factory(cpus=2)


def run_example(name: str, node: dispy.LocalNode, *args, timeout: float = 120) -> str:
    """Run examples/<name> unchanged against ``node``; return its stdout."""
    env = dict(os.environ, DISPY_NODES=node.address, DISPY_SECRET=node.secret)
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# Threads that live as long as the process, by design: the client's event loop
# and its pool for blocking calls (asyncio.to_thread), and the output readers
# of the namespace hosts a module shares.
_PROCESS_THREADS = ("dispy-loop", "asyncio_", "netns-")


@pytest.fixture(autouse=True)
def _recover_files_in_the_tests_folder(monkeypatch, tmp_path):
    """A cluster's default recover file (``_dispy_<time>_<id>`` in the current
    folder, as dispy's) goes to the test's own folder, not the checkout: the
    3.11 and 3.13 suites share the checkout in CI, and one's files vanishing
    under the other's copy of it once failed a run."""
    from dispy import _recover_jobs

    monkeypatch.setattr(
        _recover_jobs, "default_path", lambda cid: str(tmp_path / f"_dispy_{cid[:8]}")
    )


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """A test leaves no thread of its own running (every fixture's teardown has run
    by then: this one is set up first, so it is torn down last)."""
    before = set(threading.enumerate())
    yield
    new = [
        t
        for t in threading.enumerate()
        if t not in before and not t.name.startswith(_PROCESS_THREADS)
    ]
    for t in new:
        t.join(5.0)  # one that is on its way out: let it end
    left = [t.name for t in new if t.is_alive()]
    assert not left, f"threads left running by this test: {left}"


@pytest.fixture(autouse=True)
def _quiet_local_node_logs(caplog):
    caplog.set_level(logging.INFO, logger="dispy")
    yield


_real_getaddrinfo = socket.getaddrinfo
_LOCAL_NAMES = {"localhost", socket.gethostname()}


@pytest.fixture(autouse=True)
def _no_dns(monkeypatch):
    """Network safety: no test may make this machine ask a DNS server anything.

    Numeric addresses and local names (answered from /etc/hosts) pass; any
    other name fails here as an unknown host, as it would with no resolver.
    """

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in _LOCAL_NAMES:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        return _real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@pytest.fixture(autouse=True, scope="session")
def _key_file_in_tmp(tmp_path_factory):
    """Tests never read or create the user's real key file (~/.config/dispy)."""
    path = tmp_path_factory.mktemp("keys") / "cluster.key"
    old = {k: os.environ.pop(k, None) for k in ("DISPY_SECRET", "DISPY_SECRET_FILE")}
    os.environ["DISPY_KEY_FILE"] = str(path)
    yield path
    os.environ.pop("DISPY_KEY_FILE", None)
    for k, v in old.items():
        if v is not None:
            os.environ[k] = v


# The wheel installed in a fresh venv (tests/installed.py): the ``installed``
# fixture.  Private networks of network namespaces (tests/netns.py): the
# ``netns`` fixture and the ``netns`` marker for tests that use it (they need
# root and iproute2).
from .installed import installed  # noqa: E402,F401
from .netns import netns  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "netns: builds private network namespaces (needs root and iproute2)"
    )


# -- what CI must be able to read off a run --------------------------------------------------
#
# Seeds: the chaos tests and the fuzz smoke run draw from DISPY_CHAOS_SEED and
# DISPY_FUZZ_SEED (random unless set; .ci/run pins them); hypothesis runs
# derandomized under DISPY_HYPOTHESIS_DERANDOMIZE=1.  All three are printed in
# the header, so a failure can be replayed.
os.environ.setdefault("DISPY_CHAOS_SEED", str(random.randrange(1 << 30)))
os.environ.setdefault("DISPY_FUZZ_SEED", str(random.randrange(1, 1 << 30)))
if os.environ.get("DISPY_HYPOTHESIS_DERANDOMIZE") == "1":
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("pinned", derandomize=True)
    _hyp_settings.load_profile("pinned")


def pytest_report_header(config):
    hyp = "derandomized" if os.environ.get("DISPY_HYPOTHESIS_DERANDOMIZE") == "1" else "random"
    return [
        f"seeds: DISPY_CHAOS_SEED={os.environ['DISPY_CHAOS_SEED']} "
        f"DISPY_FUZZ_SEED={os.environ['DISPY_FUZZ_SEED']} hypothesis={hyp}"
    ]


# Network-namespace tests (the netns marker, or the netns fixture): counted, and
# the count printed at the end; with DISPY_REQUIRE_NETNS=1 (as in .ci/run) the run
# fails unless every one of them ran and passed: none skipped, none deselected.
_netns_count = {"collected": 0, "deselected": 0, "passed": 0, "failed": 0, "skipped": 0}


def _is_netns(item) -> bool:
    return item.get_closest_marker("netns") is not None or "netns" in getattr(
        item, "fixturenames", ()
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "netns" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.netns)
    _netns_count["collected"] = sum(_is_netns(i) for i in items)


def pytest_deselected(items):
    _netns_count["deselected"] += sum(_is_netns(i) for i in items)


def pytest_runtest_logreport(report):
    if "netns" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _netns_count["passed"] += 1
    elif report.failed:
        _netns_count["failed"] += 1
    elif report.skipped:
        _netns_count["skipped"] += 1


def _netns_problem() -> str | None:
    c = _netns_count
    if os.environ.get("DISPY_REQUIRE_NETNS") != "1":
        return None
    if c["collected"] == 0:
        return "no network-namespace test was collected"
    if c["deselected"] or c["skipped"] or c["passed"] != c["collected"] - c["deselected"]:
        return "not every network-namespace test ran and passed"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    c = _netns_count
    ran = c["collected"] - c["deselected"]
    terminalreporter.write_line(
        f"network-namespace tests: {c['collected']} collected, {c['deselected']} deselected, "
        f"{ran} to run: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    )
    problem = _netns_problem()
    if problem:
        terminalreporter.write_line(f"DISPY_REQUIRE_NETNS=1: {problem}", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    if _netns_problem() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
