"""Figures of the node's result store and the client's recover file; prints ONE JSON object.

    python benchmarks/store.py                # full run (seconds)
    python benchmarks/store.py --quick        # smoke run
    python benchmarks/store.py --only tiny    # a subset (repeatable, or comma separated)
    python benchmarks/store.py --dir /data    # where the files go (default: a temporary folder)

Groups (for ``--only``):

* ``tiny``: ``put`` of 20,000 tiny results (an info dict of 5 keys, one
  100-byte segment) from one thread, then ``flush()``: results per second
  including the flush, and the number of commits the writer made.
* ``large``: ``put`` of 20 results of one 20 MB segment each, then
  ``flush()``: MB/s written.
* ``read``: ``pending()`` of a computation with 1,000 tiny results: ms.
* ``recover``: ``RecoverFile.add_jobs`` of 20,000 jobs (100-byte blobs), then
  ``jobs_done`` of all, each followed by ``flush()``: jobs per second.

Every round uses a new file (removed after it); the best round is the
figure, all rounds are in ``*_runs``.  MB = 2**20 bytes.  The files go to
``--dir``: the disk it is on decides the ``large`` figure.  Logs go to
stderr; stdout carries only the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import time
import traceback

import dispy
from dispy._recover_file import RecoverFile
from dispynode.store import ResultStore

log = logging.getLogger("bench")
MB = 1 << 20
WAIT_S = 300.0

GROUPS = ("tiny", "large", "read", "recover")
FULL = {
    "tiny": 20_000,
    "large_n": 20,
    "large_mb": 20,
    "read": 1_000,
    "recover": 20_000,
    "rounds": 3,
}
QUICK = {"tiny": 2_000, "large_n": 4, "large_mb": 5, "read": 200, "recover": 2_000, "rounds": 1}


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def tiny_info(jid: int) -> dict:
    """The info dict of a tiny result: about what the node keeps per job."""
    return {
        "status": 5,
        "start": 1_700_000_000.25,
        "end": 1_700_000_000.5,
        "host": "n1",
        "jid": jid,
    }


class Files:
    """New file paths in one folder; every file made there is removed at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.n = 0

    def new(self, name: str) -> str:
        self.n += 1
        path = os.path.join(self.folder, f"bench-{os.getpid()}-{self.n}-{name}")
        ResultStore.remove(path)
        return path


# -- measurements -------------------------------------------------------------------------
def bench_tiny(cfg: dict, files: Files) -> dict:
    n = cfg["tiny"]
    payload = os.urandom(100)
    rates, commits = [], []
    for _ in range(cfg["rounds"]):
        path = files.new("tiny.db")
        with ResultStore(path) as store:
            t0 = time.perf_counter()
            for jid in range(n):
                store.put("c", jid, tiny_info(jid), [payload])
            assert store.flush(WAIT_S)
            dt = time.perf_counter() - t0
            commits.append(store.stats["commits"])
        ResultStore.remove(path)
        rates.append(n / dt)
        log.info("tiny: %d puts + flush in %.3f s: %.0f/s", n, dt, n / dt)
    return {
        "tiny_puts_per_s": r(max(rates), 0),
        "tiny_puts_per_s_runs": [r(x, 0) for x in rates],
        "tiny_commits_runs": commits,
        "tiny_results": n,
    }


def bench_large(cfg: dict, files: Files) -> dict:
    n, size = cfg["large_n"], cfg["large_mb"] * MB
    segs = [os.urandom(size) for _ in range(n)]
    rates = []
    for _ in range(cfg["rounds"]):
        path = files.new("large.db")
        with ResultStore(path) as store:
            t0 = time.perf_counter()
            for jid, seg in enumerate(segs):
                store.put("c", jid, tiny_info(jid), [seg])
            assert store.flush(WAIT_S)
            dt = time.perf_counter() - t0
        ResultStore.remove(path)
        rates.append(n * size / MB / dt)
        log.info("large: %d x %d MB + flush in %.3f s", n, size // MB, dt)
    return {
        "large_mb_per_s": r(max(rates), 1),
        "large_mb_per_s_runs": [r(x, 1) for x in rates],
        "large_results": n,
        "large_result_mb": size // MB,
    }


def bench_read(cfg: dict, files: Files) -> dict:
    n = cfg["read"]
    payload = os.urandom(100)
    path = files.new("read.db")
    times = []
    with ResultStore(path) as store:
        for jid in range(n):
            store.put("c", jid, tiny_info(jid), [payload])
        store.put("other", 1, tiny_info(1), [payload])
        assert store.flush(WAIT_S)
        for _ in range(max(3, cfg["rounds"])):
            t0 = time.perf_counter()
            got = store.pending("c")
            times.append((time.perf_counter() - t0) * 1e3)
            assert len(got) == n
    ResultStore.remove(path)
    return {
        "pending_ms": r(min(times), 2),
        "pending_ms_runs": [r(x, 2) for x in times],
        "pending_results": n,
    }


def bench_recover(cfg: dict, files: Files) -> dict:
    n = cfg["recover"]
    blob = os.urandom(100)
    rates = []
    for _ in range(cfg["rounds"]):
        path = files.new("cluster.recover")
        rf = RecoverFile.create(path, {"cid": "c", "key": os.urandom(32), "nodes": []})
        try:
            t0 = time.perf_counter()
            rf.add_jobs([(uid, blob) for uid in range(n)])
            assert rf.flush(WAIT_S)
            rf.jobs_done(range(n))
            assert rf.flush(WAIT_S)
            dt = time.perf_counter() - t0
        finally:
            rf.close(remove=True)
        rates.append(n / dt)
        log.info("recover: %d jobs added, done in %.3f s", n, dt)
    return {
        "recover_jobs_per_s": r(max(rates), 0),
        "recover_jobs_per_s_runs": [r(x, 0) for x in rates],
        "recover_jobs": n,
    }


BENCHES = {"tiny": bench_tiny, "large": bench_large, "read": bench_read, "recover": bench_recover}


# -- main ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these groups ({', '.join(GROUPS)}); repeatable or a,b",
    )
    p.add_argument(
        "--dir", default=None, help="folder for the files (default: a new temporary folder)"
    )
    args = p.parse_args(argv)
    groups = []
    for item in args.only:
        for name in filter(None, (s.strip() for s in item.split(","))):
            if name not in BENCHES:
                p.error(f"--only {name}: unknown; choose from {', '.join(GROUPS)}")
            if name not in groups:
                groups.append(name)
    args.groups = [g for g in GROUPS if g in groups] if groups else list(GROUPS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    cfg = QUICK if args.quick else FULL
    out: dict = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dispy": dispy.__version__,
        "quick": args.quick,
    }
    errors: dict = {}
    durations: dict = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dispy-bench-store-", dir=args.dir) as folder:
        files = Files(folder)
        for g in args.groups:
            log.info("== %s", g)
            t0 = time.perf_counter()
            try:
                out.update(BENCHES[g](cfg, files))
            except Exception as exc:
                log.error("%s failed:\n%s", g, traceback.format_exc())
                errors[g] = f"{type(exc).__name__}: {exc}"
            durations[g] = r(time.perf_counter() - t0, 2)
    out["seconds"] = durations
    out["total_s"] = r(time.perf_counter() - t_start, 2)
    if errors:
        out["errors"] = errors
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
