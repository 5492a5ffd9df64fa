"""Guards for the servers' doors: what keeps misbehaving peers cheap.

``GuessDelay`` slows an address that keeps failing the handshake (guessing
the secret), ``LogThrottle`` keeps a flood of bad connections from flooding
the log too, and ``peer_uid`` tells which local user is on the other end of a
unix socket (a node serves its own user's processes only).  Used by
``dispy.transport``'s ``serve`` and ``serve_unix`` and by the node daemon.
They decide whom to let in (and what to log); ``dispy.transport`` moves the
bytes.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
import time


class GuessDelay:
    """Slows down guessing the secret online: after FREE failed handshakes from
    one address within WINDOW seconds, each new connection from it waits before
    the server speaks, twice as long after each further failure, up to MAX_S
    (below the handshake deadline).  With the per-address cap on connections
    authenticating, one address then gets about one guess a second, not
    thousands.  A handshake that succeeds clears its address."""

    FREE = 3
    FIRST_S = 0.05
    MAX_S = 4.0
    WINDOW = 600.0
    MAX_ADDRESSES = 4096

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._failed: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def _count(self, host: str) -> int:
        n, last = self._failed.get(host, (0, 0.0))
        if n and self._clock() - last > self.WINDOW:
            del self._failed[host]
            return 0
        return n

    def delay(self, host: str) -> float:
        n = self._count(host) - self.FREE
        return 0.0 if n < 0 else min(self.MAX_S, self.FIRST_S * 2**n)

    def failed(self, host: str) -> None:
        self._failed[host] = (self._count(host) + 1, self._clock())
        self._failed.move_to_end(host)
        while len(self._failed) > self.MAX_ADDRESSES:
            self._failed.popitem(last=False)

    def succeeded(self, host: str) -> None:
        self._failed.pop(host, None)


class LogThrottle:
    """Log lines about misbehaving peers, at most ``burst`` per ``period`` seconds;
    how many were left out is said in the next line that is logged."""

    def __init__(self, log: logging.Logger, what: str, burst: int = 10, period: float = 60.0):
        self.log, self.what, self.burst, self.period = log, what, burst, period
        self.window_start = 0.0
        self.in_window = 0
        self.suppressed = 0

    def note(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start > self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        if self.suppressed:
            msg += f" (and {self.suppressed} more {self.what} not logged)"
            self.suppressed = 0
        self.log.log(level, msg, *args)


def peer_uid(sock) -> int | None:
    """The user id of a local socket's peer (``SO_PEERCRED``), None if unknown."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    return _PEERCRED.unpack(creds)[1]


_PEERCRED = struct.Struct("3i")  # pid, uid, gid
