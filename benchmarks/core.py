"""Core figures of dispy on one local node; prints ONE JSON object to stdout.

    python benchmarks/core.py                 # full run (under a minute on 2 idle cores)
    python benchmarks/core.py --quick         # smoke run, a few seconds
    python benchmarks/core.py --only latency  # a subset (repeatable, or comma separated)
    python benchmarks/core.py --only jobs --profile   # cProfile of the client, to stderr

Every node is a ``dispynode`` on 127.0.0.1 started with ``dispy.LocalNode``
(and stopped by it, by PID); every cluster and node is closed by ``with``.
Logs go to stderr; stdout carries only the JSON.  This is a measurement,
not a pass/fail test: ``targets`` says which figures meet their goal.

Groups (for ``--only``): jobs, latency, to_node, from_node, speedup,
node_start, new_client, local_pool.  Sizes: MB = 2**20 bytes.

The machine may be shared: before each group the script waits (``--settle``
seconds at most) for other programs to go quiet, and reports the CPUs they
used (``other_programs_cpus_before``; during the speedup runs:
``speedup_cpu_load``).  ``speedup_2cpu_local_pool`` is the same CPU work on
a ``ProcessPoolExecutor`` of 1 and 2 processes: what this machine gives two
processes at that moment, the ceiling for ``speedup_2cpu``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import cProfile
import datetime
import io
import json
import logging
import os
import platform
import pstats
import sys
import threading
import time
import traceback

import numpy as np
import psutil

import dispy

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
import _bench_jobs  # noqa: E402  (a user module: dispy ships it to the node)

log = logging.getLogger("bench")
MB = 1 << 20

#: Longest any single wait may block (a job, a round, a node start).
WAIT_S = 120.0

GROUPS = (
    "jobs",
    "latency",
    "to_node",
    "from_node",
    "speedup",
    "node_start",
    "new_client",
    "local_pool",
)
ALIASES = {
    "jobs_per_s": "jobs",
    "node_pss_mib_peak": "jobs",
    "latency_ms_p50": "latency",
    "latency_ms_p99": "latency",
    "mb_per_s_to_node": "to_node",
    "mb_per_s_from_node": "from_node",
    "speedup_2cpu": "speedup",
    "node_start_to_result_s": "node_start",
    "new_client_to_result_s": "new_client",
    "local_pool_jobs_per_s": "local_pool",
    "local_pool_latency_ms_p50": "local_pool",
}

FULL = {
    "jobs": 5000,
    "jobs_warmup": 200,
    "jobs_rounds": 3,
    "lat_n": 2000,
    "lat_warmup": 200,
    "xfer_mb": 100,
    "xfer_warmup_mb": 10,
    "xfer_rounds": 3,
    "speedup_jobs": 40,
    "speedup_job_s": 0.25,
    "start_rounds": 3,
    "client_rounds": 5,
}
QUICK = {
    "jobs": 500,
    "jobs_warmup": 50,
    "jobs_rounds": 2,
    "lat_n": 50,
    "lat_warmup": 5,
    "xfer_mb": 10,
    "xfer_warmup_mb": 1,
    "xfer_rounds": 2,
    "speedup_jobs": 8,
    "speedup_job_s": 0.05,
    "start_rounds": 1,
    "client_rounds": 1,
}

TARGETS = {
    "jobs_per_s": (">=", 2500),
    "latency_ms_p50": ("<=", 1.0),
    "latency_ms_p99": ("<=", 5),
    "mb_per_s_to_node": (">=", 400),
    "mb_per_s_from_node": (">=", 400),
    "speedup_2cpu": (">=", 1.9),
    "node_start_to_result_s": ("<=", 0.5),
    "node_pss_mib_peak": ("<=", 40),
    "new_client_to_result_s": ("<=", 0.1),
}


# -- helpers ---------------------------------------------------------------------------


#: ``--node``: (address, secret) of a running dispynode to use instead of a LocalNode
#: (benchmarks/core_netns.py: one in another network namespace); None: our own.
EXTERNAL: tuple[str, str] | None = None
#: The groups that can use such a node (the others start and stop their own).
EXTERNAL_GROUPS = ("jobs", "latency", "to_node", "from_node", "local_pool")


@contextlib.contextmanager
def node_cluster(func, cpus: int = 2):
    """A fresh dispynode with ``cpus`` CPUs on 127.0.0.1 and a JobCluster on it
    (or the ``--node`` given: node None)."""
    if EXTERNAL is not None:
        with dispy.JobCluster(func, nodes=[EXTERNAL[0]], secret=EXTERNAL[1]) as cluster:
            yield None, cluster
        return
    with dispy.LocalNode(cpus=cpus).start(timeout=WAIT_S) as node:
        with dispy.JobCluster(func, nodes=[node.address], secret=node.secret) as cluster:
            yield node, cluster


def check_job(job, what: str):
    """The result of a job that must have finished; raises if it did not."""
    result = job(timeout=WAIT_S)
    if job.status != dispy.DispyJob.Finished:
        raise RuntimeError(f"{what}: job ended with status {job.status}: {job.exception}")
    return result


def run_round(cluster, n: int) -> float:
    """Submit ``double(i)`` for i < n, then wait; seconds from first submit to wait()."""
    t0 = time.perf_counter()
    jobs = [cluster.submit(i) for i in range(n)]
    if not cluster.wait(timeout=WAIT_S):
        raise RuntimeError(f"{n} jobs did not end within {WAIT_S:g} s")
    dt = time.perf_counter() - t0
    bad = sum(1 for j in jobs if j.status != dispy.DispyJob.Finished)
    total = sum(j.result for j in jobs if j.status == dispy.DispyJob.Finished)
    if bad or total != n * (n - 1):
        raise RuntimeError(f"{bad} of {n} jobs failed (sum {total}, expected {n * (n - 1)})")
    return dt


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


# -- measurements ----------------------------------------------------------------------


class NodeMemory:
    """Samples the PSS of a node daemon and every process under it (its
    computation process and job processes) on a thread, every ``period``
    seconds while in a ``with``; ``peak`` is the largest sum seen, with its parts."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.pid, self.period = pid, period
        self.peak, self.parts = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-memory", daemon=True)

    def _sample(self) -> None:
        try:
            daemon = psutil.Process(self.pid)
            procs = [daemon, *daemon.children(recursive=True)]
        except psutil.Error:
            return
        parts = {}
        for p in procs:
            try:
                role = "daemon" if p.pid == self.pid else p.cmdline()[-1]
                parts[f"{p.pid} {role}"] = p.memory_full_info().pss
            except (psutil.Error, IndexError):
                continue
        if sum(parts.values()) > self.peak:
            self.peak, self.parts = sum(parts.values()), parts

    def _run(self) -> None:
        # (at once, then each period: a round of 5,000 tiny jobs now takes about one
        # period, and some runs took no sample at all: "0.0 MiB")
        self._sample()
        while not self._stop.wait(self.period):  # a sampling period, not a wait for a condition
            self._sample()

    def __enter__(self) -> NodeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the round's end: every process it used is still there


def bench_jobs(cfg) -> dict:
    n, rounds = cfg["jobs"], cfg["jobs_rounds"]
    with node_cluster(_bench_jobs.double) as (node, cluster):
        w = run_round(cluster, cfg["jobs_warmup"])
        log.info("jobs: warm-up %d jobs in %.3f s", cfg["jobs_warmup"], w)
        rates = []
        for i in range(rounds):
            dt = run_round(cluster, n)
            rates.append(n / dt)
            log.info("jobs: round %d: %d jobs in %.3f s = %.0f jobs/s", i + 1, n, dt, n / dt)
        out = {
            "jobs_per_s": r(max(rates), 1),
            "jobs_per_s_runs": [r(x, 1) for x in rates],
            "jobs_per_round": n,
        }
        if node is None:  # (--node: its processes are not ours to read)
            return out
        with NodeMemory(node.proc.pid) as mem:  # one more round, untimed: sampling costs CPU
            run_round(cluster, n)
        log.info("jobs: node PSS peak %.1f MiB: %s", mem.peak / MB, mem.parts)
    # the node's daemon, computation process and job processes while the jobs ran
    out["node_pss_mib_peak"] = r(mem.peak / MB, 1)
    out["node_pss_mib_parts"] = {k: r(v / MB, 1) for k, v in sorted(mem.parts.items())}
    return out


def bench_latency(cfg) -> dict:
    with node_cluster(_bench_jobs.double) as (_node, cluster):
        for i in range(cfg["lat_warmup"]):
            check_job(cluster.submit(i), "latency warm-up")
        times = []
        for i in range(cfg["lat_n"]):
            t0 = time.perf_counter()
            job = cluster.submit(i)
            res = job(timeout=WAIT_S)
            times.append(time.perf_counter() - t0)
            if res != 2 * i:
                raise RuntimeError(f"latency: job {i} returned {res!r} ({job.exception})")
    ms = [t * 1e3 for t in times]
    log.info("latency: p50 %.3f ms, p99 %.3f ms, max %.3f ms", pct(ms, 50), pct(ms, 99), max(ms))
    return {
        "latency_ms_p50": r(pct(ms, 50)),
        "latency_ms_p99": r(pct(ms, 99)),
        "latency_ms_min": r(min(ms)),
        "latency_ms_max": r(max(ms)),
        "latency_round_trips": len(ms),
    }


def bench_to_node(cfg) -> dict:
    rates = []
    with node_cluster(_bench_jobs.array_len) as (_node, cluster):
        warm = np.ones(cfg["xfer_warmup_mb"] * MB // 8)
        if check_job(cluster.submit(warm), "to_node warm-up") != warm.shape[0]:
            raise RuntimeError("to_node warm-up: wrong result")
        del warm
        arr = np.ones(cfg["xfer_mb"] * MB // 8)
        for i in range(cfg["xfer_rounds"]):
            t0 = time.perf_counter()
            res = check_job(cluster.submit(arr), "to_node")
            dt = time.perf_counter() - t0
            if res != arr.shape[0]:
                raise RuntimeError(f"to_node: node saw {res} elements, sent {arr.shape[0]}")
            rates.append(cfg["xfer_mb"] / dt)
            log.info(
                "to_node: round %d: %d MB in %.3f s = %.0f MB/s",
                i + 1,
                cfg["xfer_mb"],
                dt,
                rates[-1],
            )
    return {"mb_per_s_to_node": r(max(rates), 1), "mb_per_s_to_node_runs": [r(x, 1) for x in rates]}


def bench_from_node(cfg) -> dict:
    rates = []
    with node_cluster(_bench_jobs.make) as (_node, cluster):
        n_warm = cfg["xfer_warmup_mb"] * MB // 8
        if check_job(cluster.submit(n_warm), "from_node warm-up").shape != (n_warm,):
            raise RuntimeError("from_node warm-up: wrong result")
        n = cfg["xfer_mb"] * MB // 8
        for i in range(cfg["xfer_rounds"]):
            t0 = time.perf_counter()
            job = cluster.submit(n)
            res = check_job(job, "from_node")
            dt = time.perf_counter() - t0
            if res.shape != (n,) or res.dtype != np.float64:
                raise RuntimeError(f"from_node: got {res.shape} {res.dtype}")
            job.result = res = None  # free the 100 MB before the next round
            rates.append(cfg["xfer_mb"] / dt)
            log.info(
                "from_node: round %d: %d MB in %.3f s = %.0f MB/s",
                i + 1,
                cfg["xfer_mb"],
                dt,
                rates[-1],
            )
    return {
        "mb_per_s_from_node": r(max(rates), 1),
        "mb_per_s_from_node_runs": [r(x, 1) for x in rates],
        "transfer_mb": cfg["xfer_mb"],
    }


def calibrate(job_s: float) -> int:
    """Iterations of busy() that take about ``job_s`` seconds in this process."""
    n = 10_000
    for _ in range(30):  # grow until one run takes >= 50 ms
        t0 = time.perf_counter()
        _bench_jobs.busy(n)
        dt = time.perf_counter() - t0
        if dt >= 0.05:
            break
        n *= 2
    n = max(1, int(n * job_s / dt))
    best = min(_timed(_bench_jobs.busy, n) for _ in range(3))
    return max(1, int(n * job_s / best))


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


class CpuMeter:
    """CPU used during a ``with`` block: by this process and its descendants (the
    node daemon, its job processes, pool workers), and by the whole machine
    (/proc/stat), so that load from other programs shows in the figures."""

    def __init__(self) -> None:
        self.ours_cpus = self.machine_cpus = self.wall = float("nan")

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        total = 0.0
        for p in (me, *me.children(recursive=True)):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _machine() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return float("nan")
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuMeter:
        self._t0, self._o0, self._m0 = time.perf_counter(), self._ours(), self._machine()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self.ours_cpus = (self._ours() - self._o0) / self.wall
        self.machine_cpus = (self._machine() - self._m0) / self.wall

    def figures(self) -> dict:
        return {
            "ours_cpus": r(self.ours_cpus, 2),
            "others_cpus": r(max(0.0, self.machine_cpus - self.ours_cpus), 2),
        }


def wait_quiet(max_s: float, window: float = 0.5, limit: float = 0.3) -> float:
    """Wait (at most ``max_s``) until other programs use less than ``limit`` CPUs
    over a ``window``; return the last load seen (CPUs used by others)."""
    deadline = time.perf_counter() + max_s
    while True:
        with CpuMeter() as meter:
            time.sleep(window)
        others = max(0.0, meter.machine_cpus - meter.ours_cpus)
        if others < limit or time.perf_counter() + window > deadline:
            return others
        log.info("machine busy with other programs (%.2f CPUs); waiting", others)


def bench_speedup(cfg) -> dict:
    n_iter = calibrate(cfg["speedup_job_s"])
    local_s = min(_timed(_bench_jobs.busy, n_iter) for _ in range(2))
    log.info("speedup: busy(%d) takes %.3f s here", n_iter, local_s)
    n_jobs = cfg["speedup_jobs"]
    out = {"speedup_busy_iterations": n_iter, "speedup_job_s_local": r(local_s)}
    times, pool_times, load = {}, {}, {}
    for cpus in (1, 2):
        with node_cluster(_bench_jobs.busy, cpus=cpus) as (_node, cluster):
            check_job(cluster.submit(1000), "speedup warm-up")
            with CpuMeter() as meter:
                t0 = time.perf_counter()
                jobs = [cluster.submit(n_iter) for _ in range(n_jobs)]
                if not cluster.wait(timeout=WAIT_S):
                    raise RuntimeError(f"speedup: jobs on {cpus} CPU(s) did not end in time")
                dt = time.perf_counter() - t0
            bad = [j for j in jobs if j.status != dispy.DispyJob.Finished]
            if bad:
                raise RuntimeError(f"speedup: {len(bad)} jobs failed: {bad[0].exception}")
            on_node = [j.end_time - j.start_time for j in jobs if j.start_time and j.end_time]
        times[cpus] = dt
        load[f"dispy_{cpus}cpu"] = meter.figures()
        log.info("speedup: %d jobs on %d CPU(s): %.3f s %s", n_jobs, cpus, dt, meter.figures())
        out[f"speedup_t_{cpus}cpu_s"] = r(dt)
        if on_node:
            out[f"speedup_job_s_on_node_{cpus}cpu"] = r(sum(on_node) / len(on_node))
    # the same work on a local process pool: what this machine gives two processes now
    for workers in (1, 2):
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            list(pool.map(_bench_jobs.busy, [1000] * workers, timeout=WAIT_S))
            with CpuMeter() as meter:
                t0 = time.perf_counter()
                list(pool.map(_bench_jobs.busy, [n_iter] * n_jobs, timeout=WAIT_S))
                pool_times[workers] = time.perf_counter() - t0
        load[f"local_pool_{workers}"] = meter.figures()
        log.info(
            "speedup: %d jobs on a local pool of %d: %.3f s %s",
            n_jobs,
            workers,
            pool_times[workers],
            meter.figures(),
        )
    out["speedup_2cpu"] = r(times[1] / times[2])
    out["speedup_2cpu_local_pool"] = r(pool_times[1] / pool_times[2])
    out["speedup_cpu_load"] = load
    return out


def bench_node_start(cfg) -> dict:
    runs, parts = [], []
    for i in range(cfg["start_rounds"]):
        t0 = time.perf_counter()
        with dispy.LocalNode(cpus=2).start(timeout=WAIT_S) as node:
            t1 = time.perf_counter()
            with dispy.JobCluster(
                _bench_jobs.double, nodes=[node.address], secret=node.secret
            ) as cluster:
                t2 = time.perf_counter()
                res = check_job(cluster.submit(21), "node_start")
                t3 = time.perf_counter()
        if res != 42:
            raise RuntimeError(f"node_start: got {res!r}")
        runs.append(t3 - t0)
        parts.append(
            {"node_ready_s": r(t1 - t0), "cluster_s": r(t2 - t1), "first_result_s": r(t3 - t2)}
        )
        log.info("node_start: round %d: %.3f s (%s)", i + 1, t3 - t0, parts[-1])
    best = min(range(len(runs)), key=runs.__getitem__)
    return {
        "node_start_to_result_s": r(runs[best]),
        "node_start_to_result_s_runs": [r(x) for x in runs],
        "node_start_parts_best": parts[best],
    }


#: A new client program: import dispy, make a cluster on a node that is up, one job.
#: argv: address secret; prints the wall-clock time of the result and each part's seconds.
_NEW_CLIENT = """
import sys, time
t0 = time.perf_counter()
import dispy
from _bench_jobs import double
t1 = time.perf_counter()
with dispy.JobCluster(double, nodes=[sys.argv[1]], secret=sys.argv[2]) as cluster:
    t2 = time.perf_counter()
    assert cluster.submit(21)(timeout=60) == 42
    t3 = time.perf_counter()
    print(time.time(), t1 - t0, t2 - t1, t3 - t2, flush=True)
"""
#: The same for a local process pool: start it, one job.
_NEW_POOL = """
import concurrent.futures, time
from _bench_jobs import double
with concurrent.futures.ProcessPoolExecutor(2) as pool:
    assert pool.submit(double, 21).result(timeout=60) == 42
    print(time.time(), flush=True)
"""


def _timed_program(code: str, *args: str) -> tuple[float, list[float]]:
    """Run ``python -c code args``: seconds from its start to the time it prints
    first (its first result), and the rest it prints."""
    import subprocess

    path = [_HERE, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
        timeout=WAIT_S,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"program failed (exit {done.returncode}): {done.stderr[-2000:]}")
    at, *rest = (float(x) for x in done.stdout.split())
    return at - t0, rest


def bench_new_client(cfg) -> dict:
    """A new client process's first result with the node up (from the process's
    start: Python's start included), and the same program on a local process pool."""
    runs, parts, pool_runs = [], [], []
    with dispy.LocalNode(cpus=2).start(timeout=WAIT_S) as node:
        _timed_program(_NEW_CLIENT, node.address, node.secret)  # (the page cache warm)
        for i in range(cfg["client_rounds"]):
            dt, (imp, ctor, first) = _timed_program(_NEW_CLIENT, node.address, node.secret)
            runs.append(dt)
            parts.append({"import_s": r(imp), "cluster_s": r(ctor), "first_result_s": r(first)})
            log.info("new_client: round %d: %.3f s (%s)", i + 1, dt, parts[-1])
    _timed_program(_NEW_POOL)
    for _ in range(cfg["client_rounds"]):
        pool_runs.append(_timed_program(_NEW_POOL)[0])
    mid = sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]
    return {
        "new_client_to_result_s": r(runs[mid]),
        "new_client_to_result_s_runs": [r(x) for x in runs],
        "new_client_parts_median": parts[mid],
        "new_client_local_pool_s": r(sorted(pool_runs)[len(pool_runs) // 2]),
        # what the interpreter's own start costs here (its .pth files, site packages)
        "python_start_s": r(
            min(_timed_program("import time; print(time.time())")[0] for _ in range(3))
        ),
    }


def bench_local_pool(cfg) -> dict:
    n = cfg["jobs"]
    rates = []
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        futs = [pool.submit(_bench_jobs.double, i) for i in range(cfg["jobs_warmup"])]
        concurrent.futures.wait(futs, timeout=WAIT_S)
        for i in range(cfg["jobs_rounds"]):
            t0 = time.perf_counter()
            futs = [pool.submit(_bench_jobs.double, k) for k in range(n)]
            done, not_done = concurrent.futures.wait(futs, timeout=WAIT_S)
            dt = time.perf_counter() - t0
            if not_done or sum(f.result() for f in futs) != n * (n - 1):
                raise RuntimeError("local pool: jobs failed or did not end in time")
            rates.append(n / dt)
            log.info("local_pool: round %d: %d jobs in %.3f s = %.0f jobs/s", i + 1, n, dt, n / dt)
        for i in range(cfg["lat_warmup"]):
            pool.submit(_bench_jobs.double, i).result(timeout=WAIT_S)
        times = []
        for i in range(cfg["lat_n"]):
            t0 = time.perf_counter()
            pool.submit(_bench_jobs.double, i).result(timeout=WAIT_S)
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "local_pool_jobs_per_s": r(max(rates), 1),
        "local_pool_jobs_per_s_runs": [r(x, 1) for x in rates],
        "local_pool_latency_ms_p50": r(pct(times, 50)),
        "local_pool_latency_ms_p99": r(pct(times, 99)),
    }


BENCHES = {
    "jobs": bench_jobs,
    "latency": bench_latency,
    "to_node": bench_to_node,
    "from_node": bench_from_node,
    "speedup": bench_speedup,
    "node_start": bench_node_start,
    "new_client": bench_new_client,
    "local_pool": bench_local_pool,
}


# -- main ------------------------------------------------------------------------------


def prefault(gib: float) -> float:
    """Touch ``gib`` GiB of memory once, in a child process; the seconds it took.

    A virtual machine's host may back guest memory only when the guest first
    touches it: here 4 GiB took 8.2 s the first time, 1.5 s after.  A 100 MB
    transfer into memory never touched before then measured the host (160-300
    MB/s in its first rounds, 800-1,000 after); touched once, it measures dispy.
    """
    import subprocess

    code = f"x = b'\\1' * {int(gib * (1 << 30))}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT_S)
    return time.perf_counter() - t0


def add_prefault_argument(p: argparse.ArgumentParser) -> None:
    """``--prefault-gib`` (see ``prefault``), for this and the other benchmarks."""
    p.add_argument(
        "--prefault-gib",
        type=float,
        default=2.0,
        help="first touch this many GiB of memory in a child process (0: do not)",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer jobs: a smoke run of a few seconds")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these groups ({', '.join(GROUPS)}) or metrics; repeatable or a,b",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the client side of each group; top functions go to stderr",
    )
    p.add_argument(
        "--budget", type=float, default=240.0, help="skip groups that would start after this many s"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="before each group, wait up to this many s for other programs to go quiet",
    )
    p.add_argument(
        "--node",
        metavar="HOST:PORT",
        help="use this running dispynode (2 CPUs) instead of starting one: groups "
        + ", ".join(EXTERNAL_GROUPS),
    )
    p.add_argument("--secret", default="", help="the --node's secret")
    add_prefault_argument(p)
    args = p.parse_args(argv)
    groups = []
    for item in args.only:
        for name in filter(None, (s.strip() for s in item.split(","))):
            g = ALIASES.get(name, name)
            if g not in BENCHES:
                p.error(f"--only {name}: unknown; choose from {', '.join(GROUPS)}")
            if g not in groups:
                groups.append(g)
    args.groups = [g for g in GROUPS if g in groups] if groups else list(GROUPS)
    if args.node:
        args.groups = [g for g in args.groups if g in EXTERNAL_GROUPS]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    cfg = QUICK if args.quick else FULL
    global EXTERNAL
    EXTERNAL = (args.node, args.secret) if args.node else None
    if args.quick:
        args.settle = min(args.settle, 1.0)
    out: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dispy": dispy.__version__,
        "quick": args.quick,
    }
    errors: dict = {}
    durations: dict = {}
    load_before: dict = {}
    if args.prefault_gib > 0 and not args.quick:
        out["memory_prefault_s"] = r(prefault(args.prefault_gib), 2)
    t_start = time.perf_counter()
    # anything a library prints goes to stderr: stdout is the JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        for g in args.groups:
            if time.perf_counter() - t_start > args.budget:
                errors[g] = f"skipped: time budget of {args.budget:g} s used up"
                continue
            others = wait_quiet(args.settle)
            load_before[g] = r(others, 2)
            log.info("== %s (other programs use %.2f CPUs)", g, others)
            t0 = time.perf_counter()
            prof = cProfile.Profile() if args.profile else None
            try:
                if prof is not None:
                    prof.enable()
                try:
                    out.update(BENCHES[g](cfg))
                finally:
                    if prof is not None:
                        prof.disable()
            except Exception as exc:
                log.error("%s failed:\n%s", g, traceback.format_exc())
                errors[g] = f"{type(exc).__name__}: {exc}"
            durations[g] = r(time.perf_counter() - t0, 2)
            if prof is not None:
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
                print(f"---- cProfile of {g} (client side, by tottime)\n{s.getvalue()}")

    if "jobs_per_s" in out and out.get("local_pool_jobs_per_s"):
        out["jobs_per_s_vs_local_pool"] = r(out["jobs_per_s"] / out["local_pool_jobs_per_s"])
    targets = {}
    for name, (op, goal) in TARGETS.items():
        value = out.get(name)
        if value is None:
            continue
        ok = value >= goal if op == ">=" else value <= goal
        targets[name] = {"value": value, "target": f"{op} {goal}", "met": bool(ok)}
    out["targets"] = targets
    out["seconds"] = durations
    out["other_programs_cpus_before"] = load_before
    out["total_s"] = r(time.perf_counter() - t_start, 2)
    if errors:
        out["errors"] = errors
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
