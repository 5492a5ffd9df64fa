"""Loopback integration: real dispynode daemons on 127.0.0.1, real JobClusters.

The seed examples 6.2-6.6 run unchanged as programs; the rest of the
foundation's promises are checked through the API.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

import numpy as np
import pytest

import dispy
from dispy import DispyJob

from . import jobs
from .conftest import EXAMPLES, run_example


def cluster_for(node, computation, **kw):
    return dispy.JobCluster(computation, nodes=[node.address], secret=node.secret, **kw)


# -- the seed examples, as programs ----------------------------------------------------


def test_example_program(node):
    out = run_example("program.py", node)
    lines = [ln for ln in out.splitlines() if ": exit " in ln]
    assert len(lines) == 50
    for ln in lines:
        i, rest = ln.split(": exit ")
        assert rest == f"0, output {int(i) ** 2}"


def test_example_canonical(node):
    out = run_example("sample.py", node)
    pat = re.compile(r"^(\S+) executed job (\d+) at ([\d.]+) with (\d+)$")
    found = [pat.match(ln) for ln in out.splitlines() if " executed job " in ln]
    assert len(found) == 20 and all(found)
    assert sorted(int(m.group(2)) for m in found) == list(range(20))
    assert all(5 <= int(m.group(4)) <= 20 for m in found)
    assert "speedup" in out  # print_status ran


def test_example_objects(node):
    out = run_example("obj_instances.py", node)
    lines = [ln for ln in out.splitlines() if " / " in ln]
    assert len(lines) == 10
    for ln in lines:
        head, stdout = ln.split(" / ")
        # job.stdout holds what obj.show() printed on the node
        assert stdout == head


def test_example_setup_cleanup(node):
    data_file = os.path.join(EXAMPLES, "node_setup.py")
    out = run_example("node_setup.py", node)
    with open(data_file, "rb") as f:
        data = f.read()
    algs = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))
    lines = [ln for ln in out.splitlines() if " : " in ln]
    assert len(lines) == 10
    for ln in lines:
        n, alg, digest = ln.split(" : ")[0].split(": ") + [ln.split(" : ")[1]]
        assert alg == algs[int(n) % len(algs)]
        assert digest == hashlib.new(alg, data).hexdigest()


def test_example_shared_variable(node):
    out = run_example("node_shvars.py", node)
    values = [int(ln.split(": ")[1]) for ln in out.splitlines() if re.match(r"^\d+: \d+$", ln)]
    assert len(values) == 10
    # each job adds 1..10 to one counter shared by all jobs on the node
    assert max(values) >= 10 + 1


# -- the API ----------------------------------------------------------------------------


def test_submit_and_results(node):
    with cluster_for(node, jobs.add) as cluster:
        js = []
        for i in range(30):
            job = cluster.submit(i, b=100)
            job.id = i
            js.append(job)
        assert cluster.wait(timeout=60)
        for job in js:
            assert job.status == DispyJob.Finished
            assert job() == job.id + 100
            assert job.start_time <= job.end_time
            assert job.ip_addr == node.ip_addr
        nodes, pending = cluster.status()
        assert pending == 0 and nodes[0].jobs_done == 30


def test_stdout_stderr_and_exception(node):
    with cluster_for(node, jobs.echo_print) as cluster:
        job = cluster.submit(7)
        assert job() == 7
        assert job.stdout == "out 7\n" and job.stderr == "err 7\n"
    with cluster_for(node, jobs.fail) as cluster:
        job = cluster.submit("boom")
        assert job() is None
        assert job.status == DispyJob.Terminated
        assert "ValueError: boom" in job.exception and "Traceback" in job.exception


def test_crashing_job_does_not_take_node_down(node):
    with cluster_for(node, jobs.crash) as cluster:
        job = cluster.submit(3)
        assert job(timeout=60) is None
        assert job.status == DispyJob.Terminated
        assert "exited with status 3" in job.exception
    # the node serves on
    with cluster_for(node, jobs.double) as cluster:
        assert cluster.submit(21)(timeout=60) == 42


def test_warm_processes_are_reused(node):
    with cluster_for(node, jobs.whoami) as cluster:
        pids = [cluster.submit()() for _ in range(20)]
    assert len(set(pids)) <= 2  # 2 CPUs: the same two job processes ran all 20 jobs


def test_numpy_arrays_both_ways(node):
    arr = np.random.default_rng(1).random(2_000_000)
    with cluster_for(node, jobs.array_double) as cluster:
        out = cluster.submit(arr)(timeout=60)
    assert isinstance(out, np.ndarray) and np.array_equal(out, arr * 2)


def test_setup_globals_and_cleanup(node, tmp_path):
    marker = tmp_path / "cleanup-ran"
    cluster = cluster_for(
        node,
        jobs.read_setup_global,
        setup=functools.partial(jobs.setup_global, "from setup"),
        cleanup=functools.partial(jobs.write_marker, str(marker)),
    )
    assert [cluster.submit(i)() for i in range(3)] == [("from setup", i) for i in range(3)]
    cluster.close()
    assert marker.read_text() == "cleanup ran"


def test_shared_ctypes_from_setup(node):
    with cluster_for(node, jobs.bump_counter, setup=jobs.setup_counter) as cluster:
        results = [j() for j in [cluster.submit(0.05) for _ in range(10)]]
    assert sorted(v for _, v in results) == list(range(1, 11))
    assert len({pid for pid, _ in results}) == 2  # two processes, one counter


def test_depends_file_in_job_directory(node, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello node")
    with cluster_for(node, jobs.read_file, depends=[str(data)]) as cluster:
        assert cluster.submit("data.txt")(timeout=60) == "hello node"


def test_depends_class_from_module(node):
    with cluster_for(node, jobs.point_norm2, depends=[jobs.Point]) as cluster:
        assert cluster.submit(jobs.Point(3, 4))(timeout=60) == 25


def test_two_nodes_on_one_host(node_factory):
    a, b = node_factory(cpus=1, secret="two"), node_factory(cpus=1, secret="two")
    with dispy.JobCluster(jobs.sleep_for, nodes=[a.address, b.address], secret="two") as cluster:
        js = [cluster.submit(0.1) for _ in range(8)]
        cluster.wait(timeout=60)
        ports = {j.ip_addr for j in js}
        nodes, _ = cluster.status()
    assert all(j.status == DispyJob.Finished for j in js)
    assert ports == {a.ip_addr, b.ip_addr}  # both ran jobs
    assert sorted(n.jobs_done for n in nodes) and all(n.jobs_done > 0 for n in nodes)


def test_cancel_queued_job(node):
    with cluster_for(node, jobs.sleep_for) as cluster:
        running = [cluster.submit(0.5) for _ in range(4)]  # fills 2 CPUs x prefetch 2
        queued = cluster.submit(0.5)
        assert cluster.cancel(queued) == 0
        assert queued(timeout=30) is None
        assert queued.status == DispyJob.Cancelled
        assert all(j(timeout=30) == 0.5 for j in running)


def test_context_manager_does_not_swallow(node):
    with pytest.raises(KeyError), cluster_for(node, jobs.double) as cluster:
        cluster.submit(1)
        raise KeyError("mine")


def test_print_status(node, capsys):
    with cluster_for(node, jobs.double) as cluster:
        for i in range(4):
            cluster.submit(i)
        cluster.wait()
        cluster.print_status()
    out = capsys.readouterr().out
    assert node.address in out and "speedup" in out


# -- errors a user must understand ----------------------------------------------------------


def test_unpicklable_argument_is_a_clear_error(node):
    import threading

    with cluster_for(node, jobs.double) as cluster:
        with pytest.raises(dispy.SubmitError, match="argument 0 of submit"):
            cluster.submit(threading.Lock())


def test_unpicklable_result(node):
    with cluster_for(node, jobs.unpicklable_result) as cluster:
        job = cluster.submit(1)
        assert job(timeout=60) is None
        assert job.status == DispyJob.Terminated
        assert "result cannot be pickled" in job.exception


def test_missing_depends_file():
    with pytest.raises(dispy.ComputationError, match="depends file .*no-such-file.* not found"):
        dispy.JobCluster(jobs.double, nodes=["127.0.0.1:1"], depends=["no-such-file.dat"])


def test_wrong_secret_abandons_jobs_with_reason(node):
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret="not-it") as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None
        assert job.status == DispyJob.Abandoned
        assert "secret" in job.exception


def test_unknown_node_name(node):
    with dispy.JobCluster(jobs.double, nodes=["no-such-host.invalid"]) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None
        assert job.status == DispyJob.Abandoned
        assert "unknown host name" in job.exception


def test_failing_setup_is_reported(node):
    with cluster_for(node, jobs.double, setup=jobs.bad_setup) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None
        assert job.status == DispyJob.Abandoned
        assert "setup raised" in job.exception and "setup exploded" in job.exception


def test_long_outputs_arrive_whole(daemon):
    """A job's stdout, stderr and exception of many MB, and a batch of results
    whose outputs add up to more than a control part may hold, reach the client
    whole, from a node and through a scheduler (#18 finding 6: they travel as
    payload segments; the control part's limit is 2 MiB)."""
    cluster = daemon.cluster(jobs.print_lots)
    big = 24 << 20
    with cluster:
        many = [cluster.submit(4000) for _ in range(600)]
        job = cluster.submit(big)
        failing = cluster.submit(5_000_001)
        assert job(timeout=120) == big
        assert job.stdout == "o\u00e9" * (big // 2) and job.stderr == "e" * (big // 3)
        assert failing(timeout=120) is None and failing.status == DispyJob.Terminated
        assert "v" * 2_500_000 in failing.exception and len(failing.stdout) == 5_000_000
        for j in many:
            assert j(timeout=120) == 4000 and j.stdout == "o\u00e9" * 2000


def _computation_processes(daemon) -> set:
    return {
        p.pid for p in daemon.children() if any("dispynode._process_main" in a for a in p.cmdline())
    }


def _wait_for(condition, timeout=30.0, what="condition"):
    import time

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling a process table: there is nothing to wait on
    return value


def test_a_computation_process_waits_ready_for_the_first_client(node_factory):
    """A node with no computation keeps one computation process started ahead
    (its interpreter and imports done), so a client's COMPUTE does not wait for
    them; none is kept while a computation runs (no idle memory then); none
    is left when the node stops (#16/#22 start-up)."""
    import psutil

    node = node_factory(cpus=1)
    daemon = psutil.Process(node.proc.pid)
    (spare,) = _wait_for(lambda: _computation_processes(daemon), what="a spare process")
    with cluster_for(node, jobs.parent_pid) as cluster:
        assert cluster.submit()(timeout=30) == spare  # the one started ahead
        assert _computation_processes(daemon) == {spare}  # no new spare meanwhile
    (again,) = _wait_for(
        lambda: _computation_processes(daemon) - {spare}, what="a new spare process"
    )
    assert psutil.pid_exists(again)
    node.stop()
    assert not psutil.pid_exists(again) or psutil.Process(again).status() == "zombie"


def test_a_named_node_that_starts_later_is_used_when_it_announces(
    node_factory, monkeypatch, caplog
):
    """#16: a client waiting for a named node connects when the node announces
    itself at its start, not at its next retry (here set 60 s away)."""
    import socket
    import time

    from dispy.runtime.link import LinkBase

    monkeypatch.setattr(LinkBase, "FIRST_BACK_OFF", 60.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "a later node's secret"
    with dispy.JobCluster(jobs.double, nodes=[f"127.0.0.1:{port}"], secret=secret) as cluster:
        job = cluster.submit(21)
        deadline = time.monotonic() + 30
        while not any("retrying" in r.getMessage() for r in caplog.records):  # first try failed
            assert time.monotonic() < deadline, "the client never tried the node"
            time.sleep(0.02)
        node_factory(
            cpus=1, secret=secret, discoverable=True, extra_args=["--node_port", str(port)]
        )
        assert job(timeout=20) == 42  # long before the 60 s retry


def test_job_processes_import_no_client_or_asyncio(node):
    """A node's computation process (every job process is a fork of it) imports
    neither dispy's client nor asyncio and ssl: 3 MiB less per node's processes,
    which brought a node running tiny jobs under 40 MiB PSS (#16)."""
    names = ["asyncio", "ssl", "dispy._client", "dispy.engine", "dispy.httpd", "dispy.transport"]
    with cluster_for(node, jobs.modules_loaded) as cluster:
        assert cluster.submit(names)(timeout=30) == []
