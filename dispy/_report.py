"""What a cluster tells its user about itself: the statistics per node
(``JobCluster.stats``), dispy's table of them (``print_status``) and the
progress line of ``wait``/``map``."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from ._client import JobCluster

#: Seconds between redraws of the progress line.
PROGRESS_REFRESH = 0.2


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """One line on stderr: a bar, done/total, failed, running, jobs per second."""

    def __init__(self, cluster: JobCluster, stream=None) -> None:
        self.cluster = cluster
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.start = cluster.counts()["ended"]

    def draw(self, final: bool = False) -> None:
        c = self.cluster.counts()
        total = max(c["submitted"], 1)
        width = 30
        fill = int(width * c["ended"] / total)
        rate = (c["ended"] - self.start) / max(time.monotonic() - self.t0, 1e-9)
        line = (
            f"\r[{'#' * fill}{'.' * (width - fill)}] {c['ended']}/{c['submitted']} done, "
            f"{c['failed']} failed, {c['running']} running, {rate:.1f} jobs/s"
        )
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


def stats(links: dict, start_time: float) -> dict:
    """``JobCluster.stats()`` from the cluster's node links."""
    wall = time.time() - start_time
    per_node = {}
    for (_host, port), lk in list(links.items()):
        n = lk.node
        if not (lk.ready or n.jobs_done):
            continue
        per_node[f"{n.ip_addr}:{port}"] = {
            "name": n.name,
            "cpus": n.cpus,
            "jobs": n.jobs_done,
            "sec_per_job": n.cpu_time / n.jobs_done if n.jobs_done else 0.0,
            "node_time": n.cpu_time,
            "bytes_sent": n.tx + (lk.chan.bytes_sent if lk.chan else 0),
            "bytes_received": n.rx + (lk.chan.bytes_received if lk.chan else 0),
        }
    cpu = sum(v["node_time"] for v in per_node.values())
    return {
        "nodes": per_node,
        "jobs": sum(v["jobs"] for v in per_node.values()),
        "total_job_time": cpu,
        "wall_time": wall,
        "speedup": cpu / wall if wall > 0 else 0.0,
    }


def print_status(s: dict, wall_time: float | None = None) -> None:
    """dispy's table: per node CPUs, jobs, seconds per job, node time, bytes sent and
    received; then the total job time, wall time and speedup."""
    print()
    print(
        f"{'Node':>28} | {'CPUs':>4} | {'Jobs':>6} | {'Sec/Job':>8} | {'Node Time Sec':>13}"
        f" | {'Sent':>9} | {'Rcvd':>9}"
    )
    print("-" * 97)
    for addr, n in s["nodes"].items():
        label = f"{n['name']} ({addr})" if n["name"] not in addr else addr
        print(
            f"{label[-28:]:>28} | {n['cpus']:>4} | {n['jobs']:>6} | "
            f"{n['sec_per_job']:>8.3f} | {n['node_time']:>13.3f} | "
            f"{size_text(n['bytes_sent']):>9} | {size_text(n['bytes_received']):>9}"
        )
    print()
    wall = wall_time if wall_time is not None else s["wall_time"]
    print(
        f"Total job time: {s['total_job_time']:.3f} sec, wall time: {wall:.3f} sec, "
        f"speedup: {s['total_job_time'] / wall if wall > 0 else 0:.3f}"
    )
    print()
