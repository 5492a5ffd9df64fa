"""``JobCluster.map``: the computation over an iterable, lazily, with a bounded
window of jobs in flight (chunks of items per job with ``chunksize``)."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import sys

from ._report import Progress


def map_jobs(
    cluster,
    iterable,
    max_pending: int | None = None,
    ordered: bool = True,
    star: bool = False,
    progress: bool | None = False,
    chunksize: int = 1,
):
    """``JobCluster.map`` (its docstring says what each argument does)."""
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be a positive integer, not {chunksize!r}")
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = Progress(cluster) if progress else None
    if max_pending is None:
        cpus = sum(n.cpus for n in cluster.status()[0])
        max_pending = max(16, 2 * cpus)
    if max_pending < 1:
        raise ValueError("max_pending must be at least 1")
    items = iter(iterable)
    window: collections.deque = collections.deque()

    def fill() -> None:
        while len(window) < max_pending:
            if chunksize > 1:
                chunk = list(itertools.islice(items, chunksize))
                if not chunk:
                    return
                calls = [tuple(item) for item in chunk] if star else [(i,) for i in chunk]
                window.append(cluster._submit(None, (calls,), {}, more_opts={"m": 1}))
                continue
            try:
                item = next(items)
            except StopIteration:
                return
            window.append(cluster.submit(*item) if star else cluster.submit(item))

    fill()
    while window:
        if ordered:
            job = window.popleft()
        else:
            done, _ = concurrent.futures.wait(
                [j.future for j in window], return_when=concurrent.futures.FIRST_COMPLETED
            )
            job = next(j for j in window if j.future in done)
            window.remove(job)
        job._end.wait()
        fill()
        if bar is not None:
            bar.draw(final=not window)
        if chunksize > 1:
            yield from job.future.result()
        else:
            yield job.future.result()
