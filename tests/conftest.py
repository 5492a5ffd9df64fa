"""Shared fixtures: real dispynode daemons on 127.0.0.1 with free ports.

Every process a test starts is stopped by PID when the test ends; nothing
listens beyond loopback and nothing broadcasts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys

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
    """Start dispynode daemons on 127.0.0.1:
    ``node_factory(cpus=2, secret=None, extra_args=(), discoverable=False)``."""
    started: list[dispy.LocalNode] = []

    def make(
        cpus: int = 2, secret: str | None = None, extra_args=(), discoverable: bool = False
    ) -> dispy.LocalNode:
        node = dispy.LocalNode(
            cpus=cpus, secret=secret, extra_args=extra_args, discoverable=discoverable
        ).start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory):
    """One dispynode with 2 CPUs on 127.0.0.1."""
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


# Private networks of network namespaces (tests/netns.py): the ``netns`` fixture
# and the ``netns`` marker for tests that use it (they need root and iproute2).
from .netns import netns  # noqa: E402,F401

# The wheel installed in a fresh venv (tests/installed.py): the ``installed`` fixture.
from .installed import installed  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "netns: builds private network namespaces (needs root and iproute2)"
    )
