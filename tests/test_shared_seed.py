"""The README's tutorial program with ``SharedJobCluster``: a dispyscheduler on
this host, on the default scheduler port (51349), and the program as printed
(Python 3, ``dispy.JobCluster(compute)`` replaced by
``dispy.SharedJobCluster(compute)``), which names no scheduler and no secret.

A client given no secret authenticates with ``$DISPY_SECRET``, else
``$DISPY_SECRET_FILE``, else the per-user key file (``dispy.keys``); a
dispyscheduler given no ``--cluster_secret`` asks clients for its node secret,
found the same way.  So the scheduler here is started with no
``--cluster_secret`` (``--cluster_secret ''`` would ask for the empty secret,
which no client sends), and the program finds the same secret as the
scheduler and the nodes: ``$DISPY_SECRET`` exported for all three, or the
per-user key file when nobody is given a secret.

Only loopback: the nodes and the scheduler listen on 127.0.0.1 and the
scheduler gets its nodes by address (``-n``), so nothing broadcasts.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from dispy import config

from .installed import program

NODE_SECRET = "seed-004-node-secret"
TIMEOUT = 120.0

# The tutorial program of seed 004 in Python 3 (print() function), with the one
# change the README asks for when a dispyscheduler runs on the same host:
# SharedJobCluster instead of JobCluster.
PROGRAM = """\
def compute(n):
    import time, socket
    host = socket.gethostname()
    return (host, n)

if __name__ == '__main__':
    import dispy, random
    cluster = dispy.SharedJobCluster(compute)
    jobs = []
    for n in range(20):
        job = cluster.submit(random.randint(5,20))
        job.id = n
        # fix: the seed never appends the job, so the loop below printed nothing
        jobs.append(job)
    # cluster.wait()
    for job in jobs:
        host, n = job()
        print('%s executed job %s at %s with %s' % (host, job.id, job.start_time, n))
        # other fields of 'job' that may be useful:
        # print(job.stdout, job.stderr, job.exception, job.ip_addr, job.start_time, job.end_time)
"""

LINE = re.compile(r"^(\S+) executed job (\d+) at (\S+) with (\d+)$")


def _port_taken(port: int) -> str | None:
    """Why ``port`` cannot be listened on at 127.0.0.1 (None if it can), bound
    the way asyncio binds (SO_REUSEADDR), so TIME_WAIT does not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError as exc:
            return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return None


class DefaultPortScheduler:
    """``dispyscheduler`` on 127.0.0.1, default port, in front of ``nodes``;
    stopped by its PID in ``stop()``."""

    def __init__(self, nodes, dest_path, env) -> None:
        self.lines: list[str] = []  # stdout and stderr, as they come
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*program("dispyscheduler"), "--daemon", "-i", "127.0.0.1",
             "--dest_path", str(dest_path), *[a for n in nodes for a in ("-n", n.address)]],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()  # end of output: wake waiters to see the exit

    def wait_for(self, pred, timeout: float) -> bool:
        """Wait until ``pred(lines)`` holds or the scheduler exited; True if it holds."""
        with self._cond:
            return bool(
                self._cond.wait_for(
                    lambda: pred(self.lines) or self.proc.poll() is not None, timeout=timeout
                )
                and pred(self.lines)
            )

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this PID: the scheduler shuts down
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        for t in self._readers:
            t.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def default_port_free():
    why = _port_taken(config.SCHEDULER_PORT)
    if why:
        pytest.skip(
            f"the default scheduler port 127.0.0.1:{config.SCHEDULER_PORT} is taken ({why}); "
            "the tutorial program names no port, so it needs this one"
        )


@pytest.mark.parametrize("secret_from", ["DISPY_SECRET", "key file"])
def test_tutorial_program_with_shared_job_cluster(
    default_port_free, node_factory, tmp_path, secret_from
):
    t0 = time.monotonic()
    env = dict(os.environ)  # DISPY_KEY_FILE: the tests' own key file (conftest), not ~/.config
    env.pop("DISPY_SECRET_FILE", None)
    if secret_from == "DISPY_SECRET":
        # the user exported the nodes' secret; nodes, scheduler and program all read it
        nodes = [node_factory(cpus=1, secret=NODE_SECRET) for _ in range(2)]
        env["DISPY_SECRET"] = NODE_SECRET
    else:
        # nobody is given a secret: all three use the per-user key file (same user, one host)
        nodes = [node_factory(cpus=1, secret="") for _ in range(2)]
        env.pop("DISPY_SECRET", None)
    sched = DefaultPortScheduler(nodes, tmp_path / "sched", env)
    try:
        ready = sched.wait_for(
            lambda lines: any(ln.startswith("dispyscheduler ready") for ln in lines), TIMEOUT
        )
        if not ready and "cannot listen on port" in sched.log():
            pytest.skip(f"the default scheduler port was taken meanwhile:\n{sched.log()}")
        assert ready, f"dispyscheduler did not start:\n{sched.log()}"
        assert f"addr=127.0.0.1:{config.SCHEDULER_PORT} " in sched.log()
        # both nodes set up before the program starts: its jobs may then use both
        assert sched.wait_for(
            lambda lines: sum("ready with" in ln for ln in lines) >= len(nodes), TIMEOUT
        ), f"the scheduler did not get both nodes:\n{sched.log()}"

        (tmp_path / "tutorial.py").write_text(PROGRAM)
        proc = subprocess.run(
            [sys.executable, "tutorial.py"],
            cwd=tmp_path,  # its recover file goes there
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}\n{sched.log()}"
        lines = proc.stdout.splitlines()
        assert len(lines) == 20, proc.stdout + proc.stderr[-3000:]
        host = socket.gethostname()
        for i, line in enumerate(lines):
            m = LINE.match(line)
            assert m, line
            assert m[1] == host and int(m[2]) == i, line
            assert 5 <= int(m[4]) <= 20, line
            assert float(m[3]) > 0, line  # start_time: set when the job ran
    finally:
        sched.stop()
    assert time.monotonic() - t0 < TIMEOUT
