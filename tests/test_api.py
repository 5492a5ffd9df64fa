"""dispy's client API beyond the basics: callbacks, provisional results, files
back, per-job files and timeouts, node control, and the seed examples 6.7-6.9."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

import dispy
from dispy import DispyJob, DispyNode

from . import jobs
from .conftest import EXAMPLES, run_example


def cluster_for(node, computation, **kw):
    return dispy.JobCluster(computation, nodes=[node.address], secret=node.secret, **kw)


# -- seed examples ------------------------------------------------------------------------


def test_example_files_to_client(node, tmp_path):
    env = dict(os.environ, DISPY_NODES=node.address, DISPY_SECRET=node.secret)
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "files_to_client.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = [ln.rsplit(" ", 1)[1] for ln in proc.stdout.splitlines() if "results in file" in ln]
    assert len(names) == 20
    for name in names:
        n = int(name.split(".")[0])
        assert (tmp_path / name).read_text() == f"{n} squared is {n * n}\n"


def test_example_job_scheduler(node, tmp_path):
    for i in range(4):
        (tmp_path / f"data{i:03d}").write_bytes(os.urandom(50_000 + i))
    env = dict(os.environ, DISPY_NODES=node.address, DISPY_SECRET=node.secret)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, "job_scheduler.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        lines = []
        timer = threading.Timer(60, proc.kill)  # bound the wait for the 4 results
        timer.start()
        for line in proc.stdout:
            lines.append(line.rstrip())
            if sum("sha1sum for" in ln for ln in lines) == 4:
                break
        timer.cancel()
        out, err = proc.communicate("quit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    import hashlib

    # the node was announced before the first job (submitted from the callback)
    first_job = next(i for i, ln in enumerate(lines) if "sha1sum" in ln)
    assert any("with 2 CPUs available" in ln for ln in lines[:first_job])
    for i in range(4):
        name = f"data{i:03d}"
        digest = hashlib.sha1((tmp_path / name).read_bytes()).hexdigest()
        assert f"sha1sum for {name}: {digest}" in lines


def test_example_bounded_submit(node):
    out = run_example("bounded_submit.py", node)
    line = next(ln for ln in out.splitlines() if ln.startswith("submitted"))
    assert line.startswith("submitted 100 jobs")
    assert int(line.split("at most ")[1].split()[0]) <= 10


# -- callbacks and provisional results --------------------------------------------------------


def test_provisional_results_reach_the_callback(node):
    seen = []
    done = threading.Event()

    def cb(job):
        seen.append((job.status, job.result))
        if job.status == DispyJob.Finished:
            done.set()

    with cluster_for(node, jobs.provisional_steps, callback=cb) as cluster:
        job = cluster.submit(3)
        assert job(timeout=30) == ("done", 3)
        assert done.wait(30)
    provisional = [r for st, r in seen if st == DispyJob.ProvisionalResult]
    assert provisional == [("step", 0), ("step", 1), ("step", 2)]
    assert seen[-1] == (DispyJob.Finished, ("done", 3))


def test_unpicklable_provisional_result_is_reported(node):
    with cluster_for(node, jobs.provisional_unpicklable) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) == ("rc", -1)
        assert "cannot be pickled" in job.stderr


def test_result_the_client_cannot_unpickle_fails_the_job(node):
    """The job ends Terminated with the reason, and the cluster goes on."""
    with cluster_for(node, jobs.result_the_client_cannot_load) as cluster:
        job = cluster.submit()
        assert job(timeout=30) is None
        assert job.status == DispyJob.Terminated
        assert "cannot be unpickled on the client" in job.exception
        assert "invalid literal for int()" in job.exception
        assert job.ip_addr and job.end_time >= job.start_time
        assert cluster.submit()(timeout=30) is None  # the link still works


def test_callback_that_raises_is_logged_and_jobs_go_on(node, caplog):
    def cb(job):
        raise RuntimeError("callback broke")

    with cluster_for(node, jobs.double, callback=cb) as cluster:
        results = [j(timeout=30) for j in [cluster.submit(i) for i in range(5)]]
        assert cluster.wait(30)
    assert results == [0, 2, 4, 6, 8]
    errors = [r for r in caplog.records if "callback raised" in r.getMessage()]
    assert errors and errors[0].exc_info and "callback broke" in str(errors[0].exc_info[1])


def test_cluster_status_sees_nodes_jobs_and_avail_info(node):
    events = []
    got_avail = threading.Event()

    def status(st, n, job):
        events.append((st, job))
        if st == DispyNode.AvailInfo:
            got_avail.set()

    with cluster_for(node, jobs.double, cluster_status=status, pulse_interval=0.2) as cluster:
        job = cluster.submit(4)
        assert job(timeout=30) == 8
        assert got_avail.wait(30)
        nodes, _ = cluster.status()
        info = nodes[0].avail_info
        assert info.memory > 0 and info.disk > 0 and 0 <= info.cpu <= 100
    kinds = [st for st, _ in events]
    assert kinds.index(DispyNode.Initialized) < kinds.index(DispyJob.Running)
    assert (DispyJob.Finished, job) in events


# -- inside a job ---------------------------------------------------------------------------------


def test_node_globals_and_logger(node):
    with cluster_for(node, jobs.node_globals) as cluster:
        job = cluster.submit("x")
        name, ip, in_job_path = job(timeout=30)
    assert name and ip == node.ip_addr and in_job_path
    assert "logged x" in job.stderr


# -- per-job files and timeouts -------------------------------------------------------------------


def test_job_depends_files(node, tmp_path):
    f = tmp_path / "input.txt"
    f.write_text("per job")
    with cluster_for(node, jobs.read_file) as cluster:
        job = cluster.submit("input.txt", dispy_job_depends=[str(f)])
        assert job(timeout=30) == "per job"
        with pytest.raises(dispy.SubmitError, match="cannot be read"):
            cluster.submit("x", dispy_job_depends=[str(tmp_path / "missing.txt")])


def test_job_timeout_terminates_overrunning_job(node):
    with cluster_for(node, jobs.sleep_for) as cluster:
        job = cluster.submit(60, dispy_job_timeout=0.5)
        quick = cluster.submit(0.01, dispy_job_timeout=30)
        assert job(timeout=30) is None
        assert job.status == DispyJob.Terminated and "time limit of 0.5 s" in job.exception
        assert quick() == 0.01
        assert cluster.submit(0.02)(timeout=30) == 0.02


def test_cluster_job_timeout_default(node):
    with cluster_for(node, jobs.sleep_for, job_timeout=0.5) as cluster:
        job = cluster.submit(60)
        assert job(timeout=30) is None and "time limit" in job.exception


# -- cancel -------------------------------------------------------------------------------------------


def test_cancel_kills_the_job_process(node, tmp_path):
    pidfile = tmp_path / "pid"
    with cluster_for(node, jobs.pid_then_sleep) as cluster:
        job = cluster.submit(str(pidfile), 60)
        probe = cluster.submit(str(tmp_path / "probe"), 0)
        assert probe(timeout=30) == 0
        # the long job runs beside the probe: wait until it has written its pid
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the long job never wrote its pid"
            time.sleep(0.01)  # polling a file another process writes, with a deadline
        pid = int(pidfile.read_text())
        proc = psutil.Process(pid)
        assert cluster.cancel(job) == 0
        assert job(timeout=30) is None and job.status == DispyJob.Cancelled
        proc.wait(timeout=30)  # raises if the process is still there
        assert not psutil.pid_exists(pid) or proc.status() == psutil.STATUS_ZOMBIE


# -- node control --------------------------------------------------------------------------------------


def test_submit_node_unknown_node_returns_none(node, caplog):
    caplog.set_level(logging.WARNING, logger="dispy")
    with cluster_for(node, jobs.double) as cluster:
        assert cluster.submit_node("10.9.9.9", 1) is None
    assert "not a node of this cluster" in caplog.text


def nodes_ready(count):
    """A cluster_status callback and an event set once ``count`` nodes are initialized."""
    ready = threading.Event()
    seen = set()

    def status(st, node, job):
        if st == DispyNode.Initialized:
            seen.add((node.ip_addr, node.port))
            if len(seen) >= count:
                ready.set()

    return status, ready


def test_submit_node_pins_jobs_and_submit_job_id(node_factory):
    a, b = node_factory(cpus=1, secret="p"), node_factory(cpus=1, secret="p")
    status, ready = nodes_ready(2)
    with dispy.JobCluster(
        jobs.whoami, nodes=[a.address, b.address], secret="p", cluster_status=status
    ) as cluster:
        assert ready.wait(30)
        nodes, _ = cluster.status()
        assert len(nodes) == 2
        target = nodes[1]
        pinned = [
            cluster.submit_node(
                target,
            )
            for _ in range(4)
        ]
        for j in pinned:
            j()
        assert {j.ip_addr for j in pinned} == {target.ip_addr}
        counts = {(n.ip_addr, n.port): n.jobs_done for n in cluster.status()[0]}
        assert counts[(target.ip_addr, target.port)] >= 4
        # job_node names a job's node as submit_node takes it
        assert {cluster.job_node(j) for j in pinned} == {f"{target.ip_addr}:{target.port}"}
        again = cluster.submit_node(cluster.job_node(pinned[0]))
        again()
        assert cluster.job_node(again) == cluster.job_node(pinned[0])
        job = cluster.submit_job_id("my-id")
        assert job.id == "my-id" and job(timeout=30)


def test_node_allocate_override_setup_args_and_depends(node_factory, tmp_path):
    a, b = node_factory(cpus=2, secret="na"), node_factory(cpus=2, secret="na")
    extra = tmp_path / "only-on-a.txt"
    extra.write_text("for a")

    class OnlyOneCpu(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            return 1

    allocs = [
        OnlyOneCpu(a.address.split(":")[0], port=a.port, depends=[str(extra)], setup_args=(1, 2)),
        dispy.NodeAllocate(b.ip_addr, port=b.port, cpus=0, setup_args=(3, 4)),
    ]
    status, ready = nodes_ready(2)
    with dispy.JobCluster(
        jobs.read_setup_args,
        nodes=allocs,
        secret="na",
        setup=jobs.setup_with_args,
        cluster_status=status,
    ) as cluster:
        assert ready.wait(30)
        nodes = {n.port: n for n in cluster.status()[0]}
        assert nodes[a.port].cpus == 1 and nodes[b.port].cpus == 2
        results = {}
        for n in (a, b):
            j = cluster.submit_node(n.address, 0)
            results[n.port] = j(timeout=30)
        assert results == {a.port: (1, 2), b.port: (3, 4)}
    with dispy.JobCluster(
        jobs.read_file, nodes=[allocs[0]], secret="na", setup=jobs.setup_with_args
    ) as cluster:
        assert cluster.submit("only-on-a.txt")(timeout=30) == "for a"


def test_node_control(node_factory, tmp_path):
    a, b = node_factory(cpus=1, secret="nc"), node_factory(cpus=1, secret="nc")
    status, ready = nodes_ready(2)
    with dispy.JobCluster(
        jobs.read_stamp,
        nodes=[a.address],
        secret="nc",
        setup=jobs.setup_stamp,
        cluster_status=status,
    ) as cluster:
        first = cluster.submit(0)(timeout=30)
        # resetup runs setup again
        assert cluster.resetup_node(a.address) == 0
        assert cluster.submit(0)(timeout=30) > first
        # allocate another node while running
        assert cluster.allocate_node(b.address) == 1
        assert ready.wait(30)
        job_b = cluster.submit_node(b.address, 0)
        assert job_b is not None and job_b(timeout=30)
        # set_node_cpus, node_jobs
        assert cluster.set_node_cpus(a.address, 1) == 1
        assert cluster.node_jobs("no-such-node") == []
        # send_file into the computation's folder
        f = tmp_path / "sent.txt"
        f.write_text("sent later")
        assert cluster.send_file(str(f), a.address) == 0
        assert cluster.send_file(str(tmp_path / "missing"), a.address) == -1
        # deallocate a: new jobs go to b only
        assert cluster.deallocate_node(a.address) == 0
        js = [cluster.submit(0) for _ in range(4)]
        assert all(j(timeout=30) for j in js)
        assert {j.ip_addr for j in js} == {b.ip_addr}
        stats = cluster.stats()
        assert stats["nodes"][b.address]["jobs"] >= 4
        assert stats["nodes"][a.address]["bytes_sent"] > 0
        assert cluster.close_node(b.address) == 0
        assert cluster.close_node("no-such-node") == -1


def test_close_node_moves_unstarted_jobs(node_factory):
    a, b = node_factory(cpus=1, secret="cn"), node_factory(cpus=1, secret="cn")
    with dispy.JobCluster(jobs.sleep_for, nodes=[a.address, b.address], secret="cn") as cluster:
        js = [cluster.submit(0.2) for _ in range(8)]
        assert js[0](timeout=30) == 0.2
        assert cluster.close_node(a.address) == 0  # its queued jobs go back to the queue
        for j in js:
            assert j(timeout=60) == 0.2 and j.status == DispyJob.Finished


def test_a_cluster_without_a_ready_node_says_so_once(monkeypatch, node):
    """A cluster whose nodes never become ready (here: nothing listens at the one
    named) says, once, what it waits for and what to do; one with a node does not."""
    from dispy.engine import engine

    monkeypatch.setattr(engine, "NO_NODE_WARNING_S", 0.3)
    said = []
    heard = threading.Event()

    class Catch(logging.Handler):
        def emit(self, record):
            if "no node ready" in record.getMessage():
                said.append(record.getMessage())
                heard.set()

    handler = Catch(logging.WARNING)
    logging.getLogger("dispy").addHandler(handler)
    try:
        with dispy.JobCluster(jobs.double, nodes=[node.address], secret=node.secret) as ok:
            assert ok.submit(1)(timeout=60) == 2
            # a cluster with a node has been up past the delay, and said nothing
            assert not heard.wait(1.0)
        with dispy.JobCluster(jobs.double, nodes=["127.0.0.9:1"], secret="s" * 24) as lonely:
            assert heard.wait(30), "no warning"
            job = lonely.submit(3)
            assert job.status == DispyJob.Created
            lonely.cancel(job)  # (close() waits for the jobs submitted)
    finally:
        logging.getLogger("dispy").removeHandler(handler)
    assert len(said) == 1, said
    assert "127.0.0.9:1" in said[0] and "nodes='local'" in said[0], said[0]
