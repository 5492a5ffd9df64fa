"""cluster.put(): data placed once per node and shared by its job processes."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import dispy
from dispy import DispyJob, DispyNode
from dispy import _data as data
from dispy.engine import engine as engine_mod
from dispy.engine import link as link_mod

from . import jobs


def test_put_array_once_shared_read_only(node):
    arr = np.arange(2_000_000, dtype="f8")  # 16 MB
    with dispy.JobCluster(jobs.data_info, nodes=[node.address], secret=node.secret) as cluster:
        handle = cluster.put(arr, name="big")
        assert handle.get() is arr  # on the client: the object itself
        first = cluster.submit(handle)(timeout=60)  # the node is set up, data placed
        assert first[0] == float(arr.sum())
        sent_before = cluster.stats()["nodes"][node.address]["bytes_sent"]
        results = [j(timeout=60) for j in [cluster.submit(handle) for _ in range(20)]]
        sent = cluster.stats()["nodes"][node.address]["bytes_sent"] - sent_before
    assert all(r[0] == float(arr.sum()) for r in results)
    assert all(r[1] is False and r[2] is True for r in results)  # read-only view, aligned
    assert len({r[3] for r in results}) == 2  # both job processes read the one copy
    assert sent < 100_000  # 20 jobs carried handles, not 16 MB each


def test_put_replaces_by_name(node):
    with dispy.JobCluster(jobs.data_value, nodes=[node.address], secret=node.secret) as cluster:
        old = cluster.put({"pass": 1}, name="model")
        assert cluster.submit(old)(timeout=30) == {"pass": 1}
        new = cluster.put({"pass": 2}, name="model")
        assert cluster.submit(new)(timeout=30) == {"pass": 2}
        stale = cluster.submit(old)
        assert stale(timeout=30) is None and stale.status == DispyJob.Terminated
        assert "replaced" in stale.exception


def test_nodes_that_join_later_get_the_data(node_factory):
    a, b = node_factory(cpus=1, secret="d"), node_factory(cpus=1, secret="d")
    ready = threading.Event()

    def status(st, node, job):
        if st == DispyNode.Initialized and node.port == b.port:
            ready.set()

    with dispy.JobCluster(
        jobs.data_value, nodes=[a.address], secret="d", cluster_status=status
    ) as cluster:
        h = cluster.put([1, 2, 3], name="late")
        assert cluster.allocate_node(b.address) == 1
        assert ready.wait(30)
        assert cluster.submit_node(b.address, h)(timeout=30) == [1, 2, 3]


def test_bad_data_name(node):
    import pytest

    with dispy.JobCluster(jobs.data_value, nodes=[node.address], secret=node.secret) as cluster:
        with pytest.raises(ValueError, match="data name"):
            cluster.put(1, name="../escape")


@pytest.fixture(params=["handed over", "sent"])
def put_path(request, monkeypatch):
    """put() to a node on this host: handed over by file name, or (as to a node on
    another host) sent over the connection."""
    if request.param == "sent":
        monkeypatch.setattr(link_mod, "HAND_OVER_DATA", False)
    return request.param


def test_the_node_daemon_does_not_keep_a_copy_of_put_data(node_factory, put_path):
    """The daemon writes put() data to its file and lets the received buffer go:
    a node holds one copy of a model (mapped by its job processes), not two
    (it used to keep the last request's payload until the next request came)."""
    import psutil

    node = node_factory(cpus=1)
    daemon = psutil.Process(node.proc.pid)
    before = daemon.memory_full_info().pss
    arr = np.arange(12 << 20, dtype="f8")  # 96 MiB
    with dispy.JobCluster(jobs.data_info, nodes=[node.address], secret=node.secret) as cluster:
        handle = cluster.put(arr)
        assert cluster.submit(handle)()[0] == float(arr.sum())  # on the node, read by a job
        grown = daemon.memory_full_info().pss - before
    assert grown < 32 << 20, f"the node daemon grew by {grown >> 20} MiB for 96 MiB of data"


def test_put_data_lives_in_shared_memory_and_goes_with_the_computation(node_factory, put_path):
    """Where /dev/shm is usable, put() data is written there (5x faster than a
    disk's page cache; parinvoke does the same), in a private folder of the
    node's, linked from the computation's folder; closing the cluster removes
    it, stopping the node removes the folder."""
    import os

    import pytest

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine: put() data goes to disk")
    node = node_factory(cpus=1)
    shm = f"/dev/shm/dispy-node-{os.geteuid()}-{node.proc.pid}"
    assert os.path.isdir(shm) and (os.stat(shm).st_mode & 0o777) == 0o700
    arr = np.arange(1 << 20, dtype="f8")
    with dispy.JobCluster(jobs.data_info, nodes=[node.address], secret=node.secret) as cluster:
        handle = cluster.put(arr)
        assert cluster.submit(handle)()[0] == float(arr.sum())
        assert len(os.listdir(shm)) == 1
    assert os.listdir(shm) == []
    node.stop()
    assert not os.path.exists(shm)


def test_put_to_a_node_on_this_host_is_one_file_handed_over(node_factory):
    """#22: a node on this host, of this user, gets put() data by file name: the
    client writes it once to its shared-memory folder and the node hard-links
    that very file (one inode, no bytes on the connection, no copy)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    node = node_factory(cpus=1)
    shm = f"/dev/shm/dispy-node-{os.geteuid()}-{node.proc.pid}"
    arr = np.arange(1 << 20, dtype="f8")
    with dispy.JobCluster(jobs.data_info, nodes=[node.address], secret=node.secret) as cluster:
        handle = cluster.put(arr)
        assert cluster.submit(handle)()[0] == float(arr.sum())
        (name,) = os.listdir(shm)
        at_node = os.stat(os.path.join(shm, name))
        (mine,) = [p for p in _shm_files_of(cluster)]
        assert os.stat(mine).st_ino == at_node.st_ino and at_node.st_nlink == 2
        assert cluster._engine.links[(node.ip_addr, node.port)].chan.bytes_sent < 1 << 20
        handle2 = cluster.put(arr * 2, name=handle.name)  # a new version: a new file
        assert cluster.submit(handle2)()[0] == 2 * float(arr.sum())
        assert len(_shm_files_of(cluster)) == 1 and len(os.listdir(shm)) == 1
    assert os.listdir(shm) == [] and _shm_files_of(cluster) == []


def _shm_files_of(cluster) -> list:
    folder = data.client_shm_folder()
    cid = cluster._engine.cid
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(cid)]


def test_a_handed_file_the_node_refuses_is_sent_instead(node_factory, monkeypatch):
    """A node that cannot take the named file (here: its size is not the one
    announced; elsewhere: another mount namespace) says why, and the client
    sends the bytes: the job still gets its data."""
    node = node_factory(cpus=1)
    real = engine_mod.Engine._write_shm

    def lying(self, *args):
        path, size = real(self, *args)
        return path, size + 1

    monkeypatch.setattr(engine_mod.Engine, "_write_shm", lying)
    arr = np.arange(1000, dtype="f8")
    with dispy.JobCluster(jobs.data_info, nodes=[node.address], secret=node.secret) as cluster:
        handle = cluster.put(arr)
        assert cluster.submit(handle)()[0] == float(arr.sum())
        assert not cluster._engine.links[(node.ip_addr, node.port)].same_host


def test_handed_files_are_checked(tmp_path):
    """What a node checks before it links a file a client named."""
    good = str(tmp_path / "good")
    data.write(good, [b"pickle", b"x" * 100])
    size = os.path.getsize(good)
    os.close(data.open_handed_file(good, size))
    link = str(tmp_path / "link")
    os.symlink(good, link)
    other = str(tmp_path / "other")
    data.write(other, [b"p"])
    os.chown(other, 65534, 65534)
    plain = str(tmp_path / "plain")
    with open(plain, "wb") as f:
        f.write(b"\0" * size)
    for path, n, why in [
        ("relative/path", size, "not an absolute path"),
        (link, size, "cannot be opened"),
        (str(tmp_path / "missing"), size, "cannot be opened"),
        (str(tmp_path), size, "not a file of this user's"),
        (other, os.path.getsize(other), "not a file of this user's"),
        (good, size + 1, "bytes, not"),
        (plain, size, "not a dispy data file"),
    ]:
        with pytest.raises(ValueError, match=why):
            data.open_handed_file(path, n)


@pytest.mark.skipif(not os.access(data.SHM_BASE, os.W_OK), reason="no writable /dev/shm")
def test_shared_memory_folders_of_gone_processes_are_removed():
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    prefix = os.path.join(data.SHM_BASE, f"dispy-testrole-{os.geteuid()}-")
    stale, alive = prefix + str(gone.pid), prefix + str(os.getppid())
    mine = None
    try:
        os.mkdir(stale)
        os.mkdir(alive)
        mine = data.shared_memory_folder("testrole")
        assert mine == prefix + str(os.getpid())
        assert not os.path.exists(stale)
        assert os.path.isdir(alive)  # its process (our parent) is still there
    finally:
        for path in (stale, alive, mine):
            if path and os.path.isdir(path):
                os.rmdir(path)
