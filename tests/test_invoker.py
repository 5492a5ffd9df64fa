"""dispy.invoker: LensKit's model-op invoker over the cluster (issue 22).

``func(model, *args)`` gets the model object itself; results come in input
order; on a cluster the model is placed once per node and its arrays are the
node's shared read-only copy; errors say which task; leaving the ``with``
block frees the model on every node."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import psutil
import pytest

import dispy

from . import jobs
from .test_recovery_netns import wait_until


def _model(n_items=2000, k=8, seed=5):
    rng = np.random.default_rng(seed)
    return {"items": rng.standard_normal((n_items, k)), "name": "factors"}


def _users(n=40, k=8, seed=6):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(k) for _ in range(n)]


def _expected(model, users):
    return [int(np.argmax(model["items"] @ u)) for u in users]


def test_one_job_runs_in_this_process():
    model, users = _model(), _users()
    with dispy.invoker(model, jobs.best_item, n_jobs=1) as inv:
        assert isinstance(inv, dispy._invoker.InProcessInvoker)
        out = list(inv.map(users))
    assert [b for b, _ in out] == _expected(model, users)
    assert not any(ro for _, ro in out)  # the model itself, as is


def _data_files(folder):
    """The files cluster.put left in ``folder`` (a node's dest_path)."""
    return [
        os.path.join(root, f)
        for root, _, fs in os.walk(folder)
        if root.endswith(".dispy_data")
        for f in fs
    ]


def test_local_processes_share_one_read_only_copy():
    model, users = _model(), _users()
    with dispy.invoker(model, jobs.best_item, n_jobs=2) as inv:
        node = inv._local
        pid = node.proc.pid
        assert node.cpus == 2
        out = list(inv.map(users))
        assert len(_data_files(node._dir)) == 1  # one copy on the node
    assert [b for b, _ in out] == _expected(model, users)
    assert all(ro for _, ro in out)  # the node's mapped copy, not a copy per job
    assert inv.cluster is None and inv._local is None  # shut down: its node stopped
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_two_nodes_each_get_the_model_once(node_factory):
    nodes = [node_factory(cpus=1, secret="inv") for _ in range(2)]
    model, users = _model(), _users(60)
    with dispy.invoker(
        model, jobs.best_item, nodes=[n.address for n in nodes], secret="inv"
    ) as inv:
        # nodes join as they come (a loaded machine may take a while to set one
        # up, while the other runs every task): wait for both, holding the model
        wait_until(lambda: len(inv.cluster.status().nodes) == 2, 60, "both nodes ready")
        out = list(inv.map(users))
        # one copy of the model per node, in its computation's data folder
        assert [len(_data_files(n.dest_path)) for n in nodes] == [1, 1]
    assert [b for b, _ in out] == _expected(model, users)
    for n in nodes:  # leaving the block freed the model on every node
        assert _data_files(n.dest_path) == []


def test_a_failing_task_is_named(node_factory):
    node = node_factory(cpus=1, secret="inv")
    with dispy.invoker({"x": 1}, jobs.model_fails, nodes=[node.address], secret="inv") as inv:
        results = inv.map(range(6))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(dispy.JobFailed, match=r"invoker task 3 \(arguments 3\) failed") as e:
            next(results)
        assert "no score for user 3" in str(e.value)


def test_a_failing_task_in_a_chunk_is_named(node_factory):
    node = node_factory(cpus=1, secret="inv")
    with dispy.invoker({"x": 1}, jobs.model_fails, nodes=[node.address], secret="inv") as inv:
        results = inv.map(range(-8, 40), chunksize=8)
        assert [next(results) for _ in range(8)] == list(range(-8, 0))
        with pytest.raises(dispy.JobFailed, match=r"invoker task 11 \(arguments 3\) failed") as e:
            next(results)  # the chunk 0..7 failed at its item 3
        assert "no score for user 3" in str(e.value) and "of the chunk" not in str(e.value)
        assert list(inv.map(range(5, 400), chunksize=4)) == list(range(5, 400))


def test_a_model_that_cannot_be_pickled_fails_at_invoker():
    lock = threading.Lock()  # not picklable
    with pytest.raises(TypeError, match="invoker\\(\\): the model cannot be sent to the nodes"):
        dispy.invoker({"lock": lock}, jobs.best_item, n_jobs=2)
    with pytest.raises(TypeError):
        pickle.dumps(lock)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_jobs must be at least 1"):
        dispy.invoker({}, jobs.best_item, n_jobs=0)
    with pytest.raises(TypeError, match="func must be callable"):
        dispy.invoker({}, "not a function", n_jobs=2)


def test_proc_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DISPY_NUM_PROCS", "3")
    assert dispy.proc_count() == 3
    monkeypatch.delenv("DISPY_NUM_PROCS")
    monkeypatch.setenv("LK_NUM_PROCS", "5,2")
    assert dispy.proc_count() == 5
    monkeypatch.delenv("LK_NUM_PROCS")
    assert dispy.proc_count() == max(1, (os.cpu_count() or 1) // 2)
    assert dispy.proc_count(max_default=1) == 1


def test_lenskit_example_runs():
    import subprocess
    import sys

    from .conftest import EXAMPLES

    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "lenskit_invoker.py"), "--items", "3000",
         "--users", "12"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("user ") == 3 and "scored 3000 items for 12 users" in proc.stdout
