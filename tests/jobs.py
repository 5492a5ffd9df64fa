"""Computations used by the tests (a user module: dispy ships its source to nodes)."""

import os
import time


def double(x):
    return x * 2


def add(a, b=0):
    return a + b


def echo_print(x):
    print("out", x)
    import sys

    print("err", x, file=sys.stderr)
    return x


def fail(msg):
    raise ValueError(msg)


def crash(code):
    os._exit(code)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def array_sum(arr):
    return float(arr.sum())


def array_double(arr):
    return arr * 2


def big_bytes(n):
    return b"\x07" * n


def make_array(n):
    import numpy as np

    return np.arange(n, dtype="f8")


def unpicklable_result(x):
    import threading

    return threading.Lock()


def setup_global(value):
    global SETUP_VALUE
    SETUP_VALUE = value
    return 0


def read_setup_global(x):
    return (SETUP_VALUE, x)


def bad_setup():
    raise RuntimeError("setup exploded")


def read_file(name):
    with open(name) as f:
        return f.read()


def whoami():
    return os.getpid()


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm2(self):
        return self.x * self.x + self.y * self.y


def point_norm2(p):
    return p.norm2()


def setup_counter():
    import multiprocessing.sharedctypes

    global counter
    counter = multiprocessing.sharedctypes.Value("i", 0)  # with an RLock
    return 0


def bump_counter(delay):
    time.sleep(delay)
    with counter.get_lock():
        counter.value += 1
        return (os.getpid(), counter.value)


def write_marker(path):
    with open(path, "w") as f:
        f.write("cleanup ran")


def provisional_steps(n):
    for i in range(n):
        dispy_provisional_result(("step", i))  # noqa: F821 (provided on the node)
    return ("done", n)


def provisional_unpicklable(x):
    import threading

    rc = dispy_provisional_result(threading.Lock())  # noqa: F821
    return ("rc", rc)


def pid_then_sleep(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def node_globals(x):
    dispynode_logger.info("logged %s", x)  # noqa: F821
    return (dispy_node_name, dispy_node_ip_addr, os.getcwd() == dispy_job_path)  # noqa: F821


def setup_with_args(a, b):
    global SETUP_ARGS
    SETUP_ARGS = (a, b)
    return 0


def read_setup_args(x):
    return SETUP_ARGS


def setup_stamp():
    global STAMP
    STAMP = time.time()
    return 0


def read_stamp(x):
    return STAMP


def data_info(handle):
    arr = handle.get()
    return (float(arr.sum()), arr.flags.writeable, arr.flags.aligned, os.getpid())


def data_value(handle):
    return handle.get()


def logged_sleep(folder, i, seconds):
    """Sleep, leaving one line per run in ``folder/<i>`` (how often did job i run?)."""
    with open(os.path.join(folder, str(i)), "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return i


def send_back(name, text):
    """Write ``name`` in the job's folder and send it to the client."""
    os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
    with open(name, "w") as f:
        f.write(text)
    return dispy_send_file(name)  # noqa: F821 (provided on the node)


def where(x):
    """The job's working folder (inside its node's folder)."""
    return os.path.realpath(os.getcwd())


def gated(folder, i):
    """Leave one line per run in ``folder/<i>``, then wait until ``folder/open-<i>``
    exists (the test decides when the job may end)."""
    with open(os.path.join(folder, str(i)), "a") as f:
        f.write(f"{os.getpid()}\n")
    while not os.path.exists(os.path.join(folder, f"open-{i}")):
        time.sleep(0.02)  # polls a condition the test sets
    return i * 10


def best_item(model, u):
    """LensKit-style scoring: the index of the item that scores highest for ``u``,
    and whether the model's items came as a read-only (shared) array."""
    import numpy as np

    items = model["items"]
    return int(np.argmax(items @ np.asarray(u))), bool(not items.flags.writeable)


def model_fails(model, i):
    if i == 3:
        raise ValueError(f"no score for user {i}")
    return i


def print_lots(n):
    """Prints ``n`` characters to stdout and n // 3 to stderr, then fails with a
    message of n // 2 characters if ``n`` is odd."""
    import sys

    sys.stdout.write("o\u00e9" * (n // 2))
    sys.stderr.write("e" * (n // 3))
    if n % 2:
        raise ValueError("v" * (n // 2))
    return n


def parent_pid(x=None):
    """The job process's parent: the node's computation process."""
    return os.getppid()


def modules_loaded(names):
    """Which of ``names`` the job process has imported."""
    import sys

    return [n for n in names if n in sys.modules]


class _LoadsBadly:
    """Pickles fine on the node; its unpickling raises on the client."""

    def __reduce__(self):
        return (int, ("not a number",))


def result_the_client_cannot_load():
    return _LoadsBadly()


def mark(folder, name, seconds=0.0, crash=False):
    """Leave a file ``name`` in ``folder`` as it starts (it ran), then sleep
    ``seconds`` (or die: ``crash``); its process id."""
    with open(os.path.join(folder, name), "w") as f:
        f.write(str(os.getpid()))
    if crash:
        os._exit(3)
    time.sleep(seconds)
    return os.getpid()


def outlives_sigterm(folder, name, wait=True):
    """Block SIGTERM, leave a file ``name`` in ``folder`` and (``wait``) wait at
    most 20 s for a SIGTERM, then end normally: a job that ends just as its
    node stops its process.  Its process id."""
    import signal

    if wait:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with open(os.path.join(folder, name), "w") as f:
        f.write(str(os.getpid()))
    if wait:
        signal.sigtimedwait({signal.SIGTERM}, 20.0)
    return os.getpid()
