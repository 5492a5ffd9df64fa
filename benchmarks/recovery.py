"""Recovery figures on local nodes; prints ONE JSON object to stdout.

    python benchmarks/recovery.py            # a full run, well under a minute
    python benchmarks/recovery.py --quick    # fewer rounds and jobs

Figures (seconds, median over rounds):

* ``dead_node_killed_s``: from ``kill -9`` of a node's dispynode to its
  running (non-reentrant) job ending Abandoned at the client: the refused
  reconnection tells at once;
* ``dead_node_silent_s``: from freezing a node (SIGSTOP: its connection stays
  open, it just stops answering) to the job ending Abandoned, with
  ``pulse_interval=0.5`` (the liveness window is 5 pulses: 2.5 s);
* ``reentrant_rerun_s``: from ``kill -9`` of the node running a reentrant job
  to that job's end on the other node, minus the job's own run time;
* ``recover_jobs_s`` for ``recover_n`` (1,000) results: a client sends that
  many jobs, is killed -9, the node finishes them, and a new process's
  ``dispy.recover_jobs()`` collects them all.

Every process here is started by this script and stopped by PID; nodes listen
on 127.0.0.1 only and do not answer discovery.  Logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import dispy

log = logging.getLogger("bench")
WAIT_S = 120.0


def sleeper(seconds):
    import time

    time.sleep(seconds)
    return seconds


def _wait_running(job, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while job.status != dispy.DispyJob.Running:  # polled: the client has no "started" event
        if time.monotonic() > deadline:
            raise RuntimeError("job did not start")
        time.sleep(0.005)
    # Running at the client means sent; give the node a moment to start the process
    time.sleep(0.2)


def dead_node(sig: int, pulse: float) -> float:
    with dispy.LocalNode(cpus=1, secret="bench-dead").start() as node:
        with dispy.JobCluster(
            sleeper, nodes=[node.address], secret=node.secret, pulse_interval=pulse,
            recover_file=False,
        ) as cluster:  # fmt: skip
            job = cluster.submit(60)
            _wait_running(job)
            t0 = time.monotonic()
            os.kill(node.proc.pid, sig)
            job(timeout=WAIT_S)
            took = time.monotonic() - t0
            if job.status != dispy.DispyJob.Abandoned:
                raise RuntimeError(f"job ended {job.status}, not Abandoned")
            if sig == signal.SIGSTOP:
                os.kill(node.proc.pid, signal.SIGCONT)
            cluster.close(terminate=True)
    return took


def reentrant_rerun(run_s: float = 0.3) -> float:
    a = dispy.LocalNode(cpus=1, secret="bench-re").start()
    b = dispy.LocalNode(cpus=1, secret="bench-re").start()
    try:
        with dispy.JobCluster(
            sleeper, nodes=[a.address, b.address], secret="bench-re", reentrant=True,
            recover_file=False,
        ) as cluster:  # fmt: skip
            for j in [cluster.submit(0) for _ in range(4)]:  # both nodes set up
                j(timeout=WAIT_S)
            job = cluster.submit(run_s)
            _wait_running(job)
            victim = a if job._node == ("127.0.0.1", a.port) else b
            t0 = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGKILL)
            if job(timeout=WAIT_S) != run_s:
                raise RuntimeError(f"rerun failed: {job.status} {job.exception}")
            return time.monotonic() - t0 - run_s
    finally:
        a.stop()
        b.stop()


CLIENT = r"""
import sys, dispy
def compute(i, go):
    import os, time
    while not os.path.exists(go):   # the job waits for the benchmark's signal
        time.sleep(0.005)
    return i
addr, secret, path, go, n = sys.argv[1:6]
cluster = dispy.JobCluster(compute, nodes=[addr], secret=secret, recover_file=path)
cluster._engine.sched.prefetch = 10_000  # send every job at once (the node queues them)
for i in range(int(n)):
    job = cluster.submit(i, go)
    job.id = i
print("submitted", flush=True)
sys.stdin.readline()
"""

RECOVER = r"""
import sys, time, dispy
t = time.perf_counter()
jobs = dispy.recover_jobs(sys.argv[1])
took = time.perf_counter() - t
ok = sorted(j.result for j in jobs if j.status == dispy.DispyJob.Finished)
print(took, len(ok), ok == list(range(int(sys.argv[2]))))
"""


def _count(db: str, sql: str) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn, conn:
            return conn.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return -1


def recover_jobs_time(n: int) -> float:
    with (
        tempfile.TemporaryDirectory() as tmp,
        dispy.LocalNode(cpus=2, secret="bench-rec").start() as node,
    ):
        path, go = os.path.join(tmp, "rec"), os.path.join(tmp, "go")
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, node.address, node.secret, path, go, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp,
        )  # fmt: skip
        try:
            assert client.stdout.readline().strip() == "submitted"
            deadline = time.monotonic() + WAIT_S
            while _count(path, "SELECT count(*) FROM jobs") < n:  # the rows are committed
                if time.monotonic() > deadline:
                    raise RuntimeError("recover file not written")
                time.sleep(0.02)
        finally:
            client.kill()
            client.wait(30)
            client.stdout.close()
            client.stdin.close()
        open(go, "w").close()  # now the node runs them, with no client
        store = os.path.join(node._dir, "results.db")
        deadline = time.monotonic() + WAIT_S
        while _count(store, "SELECT count(*) FROM results") < n:
            if time.monotonic() > deadline:
                raise RuntimeError("node did not finish the jobs")
            time.sleep(0.02)
        out = subprocess.run(
            [sys.executable, "-c", RECOVER, path, str(n)], capture_output=True, text=True,
            timeout=WAIT_S, cwd=tmp,
        )  # fmt: skip
        took, got, ok = out.stdout.split()
        if int(got) != n or ok != "True":
            raise RuntimeError(f"recovered {got} of {n} results: {out.stderr[-2000:]}")
        return float(took)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rounds = 1 if args.quick else 3
    n = 200 if args.quick else 1000
    t0 = time.monotonic()
    killed = [dead_node(signal.SIGKILL, 2.0) for _ in range(rounds)]
    silent = [dead_node(signal.SIGSTOP, 0.5) for _ in range(rounds)]
    rerun = [reentrant_rerun() for _ in range(rounds)]
    recov = [recover_jobs_time(n) for _ in range(rounds)]
    out = {
        "dispy": dispy.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "dead_node_killed_s": round(statistics.median(killed), 3),
        "dead_node_silent_s": round(statistics.median(silent), 3),
        "dead_node_silent_window_s": 2.5,
        "reentrant_rerun_s": round(statistics.median(rerun), 3),
        "recover_n": n,
        "recover_jobs_s": round(statistics.median(recov), 3),
        "runs": {"killed": killed, "silent": silent, "rerun": rerun, "recover": recov},
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
