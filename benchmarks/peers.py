"""dispy beside its best peer, Dask distributed, and a local process pool, in one
run on this machine; prints ONE JSON object to stdout.

    python -m pip install -e '.[bench]'     # brings dask[distributed]
    python benchmarks/peers.py              # about a minute on 2 idle cores
    python benchmarks/peers.py --quick      # a smoke run

Each system gets 2 worker CPUs on 127.0.0.1 and runs the same work in a child
process of its own (a fresh interpreter, nothing shared):

- ``dispy``: one ``dispynode -c 2`` (``dispy.LocalNode``) and a ``JobCluster``;
- ``dask``: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)``
  (worker processes, as for Python work) and a ``Client``; an array goes to a
  worker the way Dask's documentation says, ``client.scatter`` then ``submit``;
- ``local_pool``: ``concurrent.futures.ProcessPoolExecutor(2)``.

Figures, each the best of ``rounds`` (every run listed too): tiny jobs per
second (submit one by one, then wait for all), the round trip of one tiny job
(p50 / p99), a 100 MB float64 array to a worker (its length back) and from a
worker (made there), and the start of a worker: from starting its process
(``dispynode`` / ``dask worker``) to the first result of a client that is
ready for it.  ``ratios`` divides dispy's figure by the peer's (above 1: dispy
is faster; for times, the peer's time by dispy's).

Network: everything on loopback; nothing broadcasts (dispy's local node does
not, and Dask's cluster is told 127.0.0.1).  Every process started here is
stopped here, by its handle.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import _bench_jobs  # noqa: E402
import numpy as np  # noqa: E402

MB = 1 << 20
WAIT_S = 120.0
SYSTEMS = ("dispy", "dask", "local_pool")

FULL = {"jobs": 3000, "rounds": 3, "trips": 400, "xfer_mb": 100, "starts": 3}
QUICK = {"jobs": 300, "rounds": 1, "trips": 50, "xfer_mb": 20, "starts": 1}

log = logging.getLogger("peers")


def pct(values, q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def best(rates: list[float], key: str, higher: bool = True) -> dict:
    pick = max(rates) if higher else min(rates)
    return {
        key: r(pick, 1 if higher else 3),
        f"{key}_runs": [r(x, 1 if higher else 3) for x in rates],
    }


# -- one measurement, written once against a small adapter per system -------------------


class Runner:
    """What the measurements need of a system: submit, result, wait for many."""

    def submit(self, func, *args):
        raise NotImplementedError

    def result(self, handle):
        raise NotImplementedError

    def wait_all(self, handles) -> list:
        return [self.result(h) for h in handles]

    def to_worker(self, arr):
        return self.result(self.submit(_bench_jobs.array_len, arr))


def measure(run: Runner, cfg: dict) -> dict:
    out: dict = {}
    n = cfg["jobs"]
    run.wait_all([run.submit(_bench_jobs.double, i) for i in range(min(n, 500))])  # warm-up
    rates = []
    for _ in range(cfg["rounds"]):
        t0 = time.perf_counter()
        handles = [run.submit(_bench_jobs.double, i) for i in range(n)]
        results = run.wait_all(handles)
        dt = time.perf_counter() - t0
        if sum(results) != n * (n - 1):
            raise RuntimeError(f"tiny jobs: wrong sum {sum(results)}")
        rates.append(n / dt)
    out.update(best(rates, "tiny_jobs_per_s"))
    log.info("tiny jobs: %s", [round(x) for x in rates])

    for i in range(30):
        run.result(run.submit(_bench_jobs.double, i))
    trips = []
    for i in range(cfg["trips"]):
        t0 = time.perf_counter()
        res = run.result(run.submit(_bench_jobs.double, i))
        trips.append((time.perf_counter() - t0) * 1e3)
        if res != 2 * i:
            raise RuntimeError(f"round trip: got {res!r}")
    out["round_trip_ms_p50"] = pct(trips, 50)
    out["round_trip_ms_p99"] = pct(trips, 99)
    log.info("round trip: p50 %s ms", out["round_trip_ms_p50"])

    mb = cfg["xfer_mb"]
    n_items = mb * MB // 8
    arr = np.ones(n_items)
    run.to_worker(np.ones(MB))  # warm-up
    rates = []
    for _ in range(cfg["rounds"]):
        t0 = time.perf_counter()
        got = run.to_worker(arr)
        rates.append(mb / (time.perf_counter() - t0))
        if got != n_items:
            raise RuntimeError(f"to worker: it saw {got} items")
    out.update(best(rates, "mb_per_s_to_worker"))
    del arr
    run.result(run.submit(_bench_jobs.make, MB // 8))  # warm-up
    rates = []
    for _ in range(cfg["rounds"]):
        t0 = time.perf_counter()
        got = run.result(run.submit(_bench_jobs.make, n_items))
        rates.append(mb / (time.perf_counter() - t0))
        if got.shape != (n_items,):
            raise RuntimeError(f"from worker: got {got.shape}")
        del got
    out.update(best(rates, "mb_per_s_from_worker"))
    out["transfer_mb"] = mb
    log.info(
        "to / from worker: %s / %s MB/s", out["mb_per_s_to_worker"], out["mb_per_s_from_worker"]
    )
    return out


# -- dispy -------------------------------------------------------------------------------


class DispyRunner(Runner):
    """A JobCluster per computation (dispy ships one function per cluster), one
    at a time, as a program with one computation has it."""

    def __init__(self, address: str, secret: str) -> None:
        self.address, self.secret = address, secret
        self.func = self.cluster = None

    def submit(self, func, *args):
        if func is not self.func:
            import dispy

            self.close()
            self.cluster = dispy.JobCluster(func, nodes=[self.address], secret=self.secret)
            self.func = func
        return self.cluster.submit(*args)

    def result(self, job):
        res = job(timeout=WAIT_S)
        if job.status != job.Finished:
            raise RuntimeError(f"dispy job ended {job.status}: {job.exception}")
        return res

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = self.func = None


def run_dispy(cfg: dict) -> dict:
    import dispy

    with dispy.LocalNode(cpus=2).start(timeout=WAIT_S) as node:
        run = DispyRunner(node.address, node.secret)
        try:
            out = measure(run, cfg)
        finally:
            run.close()
    starts = []
    for _ in range(cfg["starts"]):
        t0 = time.perf_counter()
        with dispy.LocalNode(cpus=2).start(timeout=WAIT_S) as node:
            with dispy.JobCluster(
                _bench_jobs.double, nodes=[node.address], secret=node.secret
            ) as cluster:
                job = cluster.submit(21)
                if job(timeout=WAIT_S) != 42:
                    raise RuntimeError(f"dispy start: {job.status} {job.exception}")
                starts.append(time.perf_counter() - t0)
    out.update(best(starts, "worker_start_to_result_s", higher=False))
    out["version"] = dispy.__version__
    return out


# -- Dask distributed ---------------------------------------------------------------------


class DaskRunner(Runner):
    def __init__(self, client) -> None:
        self.client = client

    def submit(self, func, *args):
        return self.client.submit(func, *args, pure=False)

    def result(self, fut):
        return fut.result(timeout=WAIT_S)

    def wait_all(self, futs) -> list:
        return self.client.gather(futs)

    def to_worker(self, arr):
        # Dask's way for large data: scatter it (hash=False: each round moves it)
        data = self.client.scatter(arr, hash=False)
        return self.result(self.client.submit(_bench_jobs.array_len, data, pure=False))


def run_dask(cfg: dict) -> dict:
    import dask
    import distributed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as lc,
        distributed.Client(lc) as client,
    ):
        client.upload_file(os.path.join(_HERE, "_bench_jobs.py"))
        out = measure(DaskRunner(client), cfg)
    # a worker's start: the scheduler and a client up and waiting, then the
    # worker's process is started (as `dask worker`, a nanny and a worker)
    starts = []
    for _ in range(cfg["starts"]):
        with (
            distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as lc,
            distributed.Client(lc) as client,
        ):
            t0 = time.perf_counter()
            worker = subprocess.Popen(
                [
                    sys.executable, "-m", "distributed.cli.dask_worker", lc.scheduler_address,
                    "--nthreads", "2", "--nworkers", "1", "--host", "127.0.0.1",
                    "--no-dashboard",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONPATH=_HERE),  # (it imports _bench_jobs)
            )  # fmt: skip
            try:
                client.wait_for_workers(1, timeout=WAIT_S)
                if client.submit(_bench_jobs.identity, 42, pure=False).result(WAIT_S) != 42:
                    raise RuntimeError("dask start: wrong result")
                starts.append(time.perf_counter() - t0)
            finally:
                worker.terminate()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait(10)
    out.update(best(starts, "worker_start_to_result_s", higher=False))
    out["version"] = f"dask {dask.__version__}, distributed {distributed.__version__}"
    return out


# -- the local process pool ------------------------------------------------------------------


class PoolRunner(Runner):
    def __init__(self, pool) -> None:
        self.pool = pool

    def submit(self, func, *args):
        return self.pool.submit(func, *args)

    def result(self, fut):
        return fut.result(timeout=WAIT_S)


def run_local_pool(cfg: dict) -> dict:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        out = measure(PoolRunner(pool), cfg)
    starts = []
    for _ in range(cfg["starts"]):
        t0 = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            if pool.submit(_bench_jobs.double, 21).result(WAIT_S) != 42:
                raise RuntimeError("pool start: wrong result")
            starts.append(time.perf_counter() - t0)
    out.update(best(starts, "worker_start_to_result_s", higher=False))
    return out


RUNS = {"dispy": run_dispy, "dask": run_dask, "local_pool": run_local_pool}


# -- the driver ------------------------------------------------------------------------------

HIGHER = ("tiny_jobs_per_s", "mb_per_s_to_worker", "mb_per_s_from_worker")
LOWER = ("round_trip_ms_p50", "round_trip_ms_p99", "worker_start_to_result_s")


def ratios(ours: dict, peer: dict) -> dict:
    out = {}
    for k in HIGHER:
        if ours.get(k) and peer.get(k):
            out[k] = r(ours[k] / peer[k], 2)
    for k in LOWER:
        if ours.get(k) and peer.get(k):
            out[k] = r(peer[k] / ours[k], 2)
    return out


def main(argv=None) -> int:
    import core  # its --prefault-gib: this VM backs memory at first touch (see there)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds each")
    p.add_argument("--only", action="append", choices=SYSTEMS, help="these systems (repeatable)")
    core.add_prefault_argument(p)
    p.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # a child's work
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    cfg = QUICK if args.quick else FULL
    if args.one:
        json.dump(RUNS[args.one](cfg), sys.stdout)
        return 0
    os.environ.setdefault("DISPY_BROADCAST_ONLY_IN_NETNS", "all")  # never broadcast here
    prefault_s = core.prefault(args.prefault_gib) if args.prefault_gib > 0 else 0.0
    report: dict = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "config": cfg,
        "memory_prefault_s": r(prefault_s),
    }
    for name in args.only or SYSTEMS:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=1800)
        if proc.returncode != 0:
            report[name] = {"error": f"exited {proc.returncode} (its log is above, on stderr)"}
            continue
        report[name] = json.loads(proc.stdout)
        report[name]["seconds"] = r(time.perf_counter() - t0, 1)
    if "dispy" in report and "dask" in report:
        report["ratios_dispy_vs_dask"] = ratios(report["dispy"], report["dask"])
    if "dispy" in report and "local_pool" in report:
        report["ratios_dispy_vs_local_pool"] = ratios(report["dispy"], report["local_pool"])
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
