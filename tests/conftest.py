"""Shared fixtures: real dispynode daemons on 127.0.0.1 with free ports.

Every process a test starts is stopped by PID when the test ends; nothing
listens beyond loopback and nothing broadcasts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import dispy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture
def node_factory():
    """Start dispynode daemons: ``node_factory(cpus=2, secret=None, extra_args=())``."""
    started: list[dispy.LocalNode] = []

    def make(cpus: int = 2, secret: str | None = None, extra_args=()) -> dispy.LocalNode:
        node = dispy.LocalNode(cpus=cpus, secret=secret, extra_args=extra_args).start()
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
