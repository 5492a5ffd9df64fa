"""Start ``dispynode`` daemons on this machine (loopback only) for a cluster.

``JobCluster(compute, nodes='local')`` (or ``DISPY_NODES=local``) uses this,
so a program runs with no daemon started by hand.  The node listens on
127.0.0.1 on a free port, with a fresh random secret, and exits when this
process closes it or dies (its standard input is a pipe from us).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from .errors import DispyError

logger = logging.getLogger("dispy.localnode")


class LocalNode:
    """One dispynode process on a loopback address (``ip_addr``, default
    127.0.0.1), owned by this process.

    ``address`` is ``'127.0.0.1:PORT'`` (the address given) and ``secret`` its secret once
    ``start()`` returned: a fresh random one unless given; ``secret=''`` lets
    the node find its own (the key file, see ``dispy.keys``).  Use as a context manager, or call ``stop()``.
    """

    def __init__(
        self,
        cpus: int | None = None,
        secret: str | None = None,
        extra_args=(),
        discoverable: bool = False,
        ip_addr: str = "127.0.0.1",
    ) -> None:
        try:
            loopback = ipaddress.ip_address(ip_addr).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise DispyError(
                f"LocalNode(ip_addr={ip_addr!r}): a local node listens on a loopback "
                "address only (127.0.0.1, 127.0.0.2, ...); start dispynode for others"
            )
        self.ip_addr = ip_addr
        self.cpus = cpus
        self.discoverable = discoverable
        self.secret = secret if secret is not None else secrets.token_hex(16)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.port = 0
        self._dir: str | None = None
        self._threads: list[threading.Thread] = []

    def start(self, timeout: float = 30.0) -> LocalNode:
        self._dir = tempfile.mkdtemp(prefix="dispy-local-")
        cmd = [
            sys.executable,
            "-m",
            "dispynode",
            "-i",
            self.ip_addr,
            "--node_port",
            "0",
            "--daemon",
            "--quit_on_eof",
            "--dest_path",
            self._dir,
            *self.extra_args,
        ]
        if not self.discoverable:
            cmd.append("--no_discovery")  # a private node: found by its address only
        if self.cpus:
            cmd += ["--cpus", str(self.cpus)]
        env = dict(os.environ)
        if "--insecure" in self.extra_args or self.secret == "":
            # insecure, or: the node finds its secret itself (key file, $DISPY_SECRET_FILE)
            env.pop("DISPY_SECRET", None)
        else:
            env["DISPY_SECRET"] = self.secret  # not on the command line (ps)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        line = self._read_ready(timeout)
        addr = line.split("addr=", 1)[1].split()[0]
        self.address = addr
        self.port = int(addr.rsplit(":", 1)[1])
        for stream, level in ((self.proc.stdout, logging.DEBUG), (self.proc.stderr, None)):
            t = threading.Thread(target=_forward, args=(stream, level), daemon=True)
            t.start()
            self._threads.append(t)
        _live.add(self)
        return self

    def _read_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise DispyError(f"local dispynode did not start within {timeout:g} s")
                line = self.proc.stdout.readline().decode(errors="replace")
                if not line:
                    err = self.proc.stderr.read().decode(errors="replace").strip()
                    self.stop()
                    raise DispyError(f"local dispynode failed to start: {err[-2000:]}")
                if line.startswith("dispynode ready:"):
                    return line
        finally:
            sel.close()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is not None:
            try:
                proc.stdin.close()  # the node quits on end of input
            except OSError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        for t in self._threads:
            t.join(1.0)
        self._threads = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def dest_path(self) -> str | None:
        """The node's folder (its ``--dest_path``) while it runs."""
        return self._dir

    def __enter__(self) -> LocalNode:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _forward(stream, level) -> None:
    try:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            lvl = level
            if lvl is None:
                lvl = (
                    logging.WARNING if (" WARNING " in line or " ERROR " in line) else logging.DEBUG
                )
            logger.log(lvl, "%s", line)
    except (OSError, ValueError):
        pass


_live: set[LocalNode] = set()


@atexit.register
def _stop_all() -> None:
    for node in list(_live):
        node.stop()
