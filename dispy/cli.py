"""``dispy``: run a standalone program on the cluster, once per argument set.

    dispy -f /some/file1 -f file2 -a "arg11 arg12" -a "arg21 arg22" -a "arg3" /some/program

sends the program and the files to the nodes, runs the program with each
``-a`` argument set in parallel, and prints each run's output and status.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from . import config
from ._client import JobCluster
from ._job import DispyJob
from .errors import DispyError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dispy",
        description="Run a program on dispy nodes, once per -a argument set.",
    )
    p.add_argument("program", help="the program to distribute and run")
    p.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        default=[],
        help="file the program needs (repeatable)",
    )
    p.add_argument(
        "-a",
        "--args",
        dest="args",
        action="append",
        default=[],
        help='arguments of one run, e.g. -a "x y" (repeatable)',
    )
    p.add_argument(
        "-n",
        "--nodes",
        action="append",
        default=[],
        help="node name or address (repeatable; default: $DISPY_NODES or '*'); 'local' starts one here",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="run the jobs on a dispynode started on this machine for this run",
    )
    p.add_argument(
        "--scheduler_node",
        "--scheduler_host",
        dest="scheduler_node",
        metavar="HOST",
        help="run through the dispyscheduler on HOST (SharedJobCluster) instead of finding nodes",
    )
    p.add_argument(
        "--scheduler_port",
        type=int,
        default=config.SCHEDULER_PORT,
        help="the dispyscheduler's port (default %(default)s)",
    )
    p.add_argument("--node_port", type=int, default=config.NODE_PORT)
    p.add_argument("-i", "--ip_addr", default=None, help="client address")
    p.add_argument("-p", "--port", type=int, default=None, help="client port")
    p.add_argument("-s", "--secret", default="", help="shared secret (or $DISPY_SECRET)")
    p.add_argument("--dest_path", default=None)
    p.add_argument("--certfile", help="TLS certificate (mutual TLS with the nodes)")
    p.add_argument("--keyfile", help="TLS private key, if not in --certfile")
    p.add_argument("--cafile", help="CA the nodes' certificates are signed by")
    p.add_argument("-d", "--debug", action="store_true")
    args = p.parse_args(argv)
    if args.scheduler_node and (args.nodes or args.local):
        p.error("--scheduler_node runs on the scheduler's nodes: drop -n/--local")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("dispy").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if not os.path.isfile(args.program):
        print(f"dispy: program {args.program!r} not found", file=sys.stderr)
        return 2
    try:
        if args.scheduler_node:
            from ._shared_cluster import SharedJobCluster

            cluster = SharedJobCluster(
                args.program,
                depends=args.files,
                scheduler_host=args.scheduler_node,
                scheduler_port=args.scheduler_port,
                ip_addr=args.ip_addr,
                secret=args.secret,
                dest_path=args.dest_path,
                certfile=args.certfile,
                keyfile=args.keyfile,
                cafile=args.cafile,
            )
        else:
            cluster = JobCluster(
                args.program,
                nodes=(args.nodes or []) + ["local"] if args.local else (args.nodes or None),
                depends=args.files,
                node_port=args.node_port,
                ip_addr=args.ip_addr,
                port=args.port,
                secret=args.secret,
                dest_path=args.dest_path,
                certfile=args.certfile,
                keyfile=args.keyfile,
                cafile=args.cafile,
            )
    except DispyError as exc:
        print(f"dispy: {exc}", file=sys.stderr)
        return 2
    failed = 0
    with cluster:
        jobs = []
        for i, argset in enumerate(args.args or [""]):
            job = cluster.submit(*shlex.split(argset))
            job.id = i
            jobs.append((argset, job))
        for argset, job in jobs:
            job()
            ok = job.status == DispyJob.Finished and job.result == 0
            failed += not ok
            print(
                f"=== job {job.id} ({args.program} {argset}) on {job.ip_addr}: "
                + (
                    f"exit status {job.result}"
                    if job.status == DispyJob.Finished
                    else f"{job.exception}"
                )
            )
            for output in (job.stdout, job.stderr):  # a program's own bytes
                if output:
                    sys.stdout.flush()
                    sys.stdout.buffer.write(output)
                    sys.stdout.buffer.flush()
        cluster.print_status()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
