"""Run dispy's coverage-guided fuzz targets (atheris / libFuzzer).

    python fuzz/run.py                              # 20,000 inputs per target
    python fuzz/run.py --runs 1000000 --target all  # the long run (see README.md)

Each target runs in its own process (libFuzzer exits when it is done),
starting from a seed corpus (valid frames, datagrams, client sessions, HTTP
requests, config files) written to a temporary directory, which also
receives the inputs that reach new coverage; the handler targets keep their
scratch files (DISPY_FUZZ_SCRATCH) in another one, in /dev/shm where there is
one.  Both are removed at the end.  Exit status 0 when no target
found a crash; otherwise the crashing inputs are copied to fuzz/crashes/
(--crash-dir) and the end of each failing target's log (with the traceback)
is printed.  Findings already reported (README.md, "Known findings") are
not crashes, unless --strict; the summary names those that were hit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

TARGETS = {
    # name: (script, seeds, max input length)
    "frames": ("fuzz_frames.py", _common.frames_seeds, 8192),
    "datagram": ("fuzz_datagram.py", _common.datagram_seeds, 4096),
    "node_handlers": ("fuzz_node_handlers.py", _common.node_seeds, 8192),
    "scheduler_handlers": ("fuzz_scheduler_handlers.py", _common.scheduler_seeds, 8192),
    "http": ("fuzz_http.py", _common.http_seeds, 4096),
    "config": ("fuzz_config.py", _common.config_seeds, 4096),
}


def write_seeds(directory: str, seeds) -> int:
    os.makedirs(directory, exist_ok=True)
    for seed in seeds:
        name = hashlib.sha1(seed).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(seed)
    return len(os.listdir(directory))


def run_target(name: str, args, work: str) -> dict:
    script, seeds, max_len = TARGETS[name]
    corpus = args.corpus and os.path.join(args.corpus, name)
    if not corpus:
        corpus = os.path.join(work, name, "corpus")
    nseeds = write_seeds(corpus, seeds())
    artifacts = os.path.join(work, name, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    log_path = os.path.join(work, name, "log.txt")
    cmd = [
        sys.executable,
        os.path.join(HERE, script),
        f"-runs={args.runs}",
        f"-max_len={max_len}",
        "-timeout=30",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}{os.sep}",
        corpus,
    ]
    if args.seed:
        cmd.insert(2, f"-seed={args.seed}")
    if args.max_time:
        cmd.insert(2, f"-max_total_time={args.max_time}")
    print(f"[{name}] {nseeds} seed inputs, {args.runs} runs: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, DISPY_FUZZ_SCRATCH=os.path.join(args.scratch, name))
    if args.strict:
        env["DISPY_FUZZ_KNOWN"] = "crash"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=work,
            env=env,
            text=True,
            errors="replace",
        )
        for line in proc.stdout:
            log.write(line)
            if args.verbose:
                print(line, end="", flush=True)
        proc.wait()
    elapsed = time.monotonic() - start
    with open(log_path, errors="replace") as log:
        text = log.read()
    result = {
        "target": name,
        "rc": proc.returncode,
        "seconds": elapsed,
        "runs": _last_int(r"Done (\d+) runs", text)
        or _last_int(r"stat::number_of_executed_units:\s+(\d+)", text),
        "cov": _last_int(r"\bcov: (\d+)", text),
        "ft": _last_int(r"\bft: (\d+)", text),
        "corpus": len(os.listdir(corpus)),
        "crashes": [],
        "known": sorted(set(re.findall(r"fuzz: known finding (\S+)", text))),
    }
    found = [f for f in os.listdir(artifacts) if not f.startswith(".")]
    if proc.returncode != 0 or found:
        dest = args.crash_dir
        os.makedirs(dest, exist_ok=True)
        for f in found:
            shutil.copy(os.path.join(artifacts, f), os.path.join(dest, f"{name}-{f}"))
            result["crashes"].append(os.path.join(dest, f"{name}-{f}"))
        if not args.verbose:
            print(f"[{name}] FAILED (exit {proc.returncode}); the end of its log:")
            print("\n".join(text.splitlines()[-80:]))
    return result


def _last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", type=int, default=20_000, help="inputs per target (default 20000; -1: no limit)"
    )
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    p.add_argument(
        "--max-time", type=int, default=0, help="stop each target after this many seconds"
    )
    p.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: a random one)")
    p.add_argument("--corpus", help="keep the corpus in this directory (default: a temporary one)")
    p.add_argument(
        "--crash-dir",
        default=os.path.join(HERE, "crashes"),
        help="where crashing inputs are copied (default: fuzz/crashes)",
    )
    p.add_argument("--verbose", action="store_true", help="show libFuzzer's output as it runs")
    p.add_argument(
        "--strict",
        action="store_true",
        help="the known findings (README.md) are crashes too (DISPY_FUZZ_KNOWN=crash)",
    )
    args = p.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    names = list(TARGETS) if args.target == "all" else [args.target]
    results = []
    # the handler targets' files (computations' folders, SQLite files): in memory
    # (tmpfs) where there is one, a quarter faster than a disk's page cache
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with (
        tempfile.TemporaryDirectory(prefix="dispy-fuzz-") as work,
        tempfile.TemporaryDirectory(prefix="dispy-fuzz-scratch-", dir=shm) as scratch,
    ):
        args.scratch = scratch
        for name in names:
            results.append(run_target(name, args, work))
    print()
    print(
        f"{'target':18} {'result':8} {'runs':>9} {'seconds':>8} {'runs/s':>7} {'cov':>5} {'ft':>6} {'corpus':>6}"
    )
    for r in results:
        ok = "ok" if r["rc"] == 0 and not r["crashes"] else "CRASH"
        print(
            f"{r['target']:18} {ok:8} {r['runs'] or '?':>9} {r['seconds']:8.1f} "
            f"{(r['runs'] or 0) / r['seconds']:7.0f} {r['cov'] or '?':>5} {r['ft'] or '?':>6} "
            f"{r['corpus']:>6}"
        )
        if r["known"]:
            print(f"    known findings hit (not crashes): {', '.join(r['known'])}")
        for c in r["crashes"]:
            print(f"    input saved as {c}; reproduce: python fuzz/{TARGETS[r['target']][0]} {c}")
    return 0 if all(r["rc"] == 0 and not r["crashes"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
