"""The coverage-guided fuzz targets run (briefly) and find nothing.

``fuzz/run.py --runs 2000`` runs each atheris target on 2,000 inputs, from a
seed corpus: frames and datagrams (the wire protocol), client sessions into a
node's and a scheduler's handlers (in memory), HTTP requests into the web
monitor, ``--config`` files into the daemons' reader (about 15 s in all); the
long runs are described in fuzz/README.md.  Skipped where atheris is not
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fuzz_targets_run_without_crashing(tmp_path):
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "fuzz", "run.py"),
            "--runs",
            "2000",
            "--crash-dir",
            str(tmp_path / "crashes"),
            "--seed",  # printed in the run's header (conftest): a failure replays
            os.environ["DISPY_FUZZ_SEED"],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for target in ("frames", "datagram", "node_handlers", "scheduler_handlers", "http", "config"):
        assert any(line.split()[:2] == [target, "ok"] for line in lines), proc.stdout
