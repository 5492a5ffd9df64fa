"""Computations for benchmarks/core.py.

A small user module: dispy ships its source to the node, where the jobs
import it; the local ProcessPoolExecutor baseline imports it the same way.
"""


def double(x):
    return x * 2


def array_len(arr):
    return arr.shape[0]


def make(n):
    import numpy as np

    return np.ones(n, dtype="f8")


def busy(n):
    """Pure-Python CPU work: ``n`` loop iterations."""
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


def best_item(items, u):
    """LensKit-style batch scoring (benchmarks/invoker.py): the top item for ``u``."""
    import numpy as np

    return int(np.argmax(items @ u))


def sleep_for(seconds):
    import time

    time.sleep(seconds)
    return seconds


def identity(x):
    return x
