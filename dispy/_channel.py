"""The trusted local channel for plain blocking code: a node's computation and
job processes talk to their daemon through it.  Apart from ``transport`` so that
those processes (every job process of a node is a fork of one) import no asyncio.
"""

from __future__ import annotations

import collections
import select
import socket

from .errors import ConnectionClosed
from .protocol import Connection, Message

#: Send buffer (bytes) of a node's local sockets (the daemon's ends and the job
#: processes'; the kernel caps it at net.core.wmem_max): a 100 MB job went over
#: the default 208 KiB in 0.1-0.6 s, with 4 MiB in 0.09-0.13 s.
LOCAL_SNDBUF = 4 << 20


class BlockingChannel:
    """The trusted local channel for plain blocking code (job processes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = Connection("client", None, trusted=True)
        self._events: collections.deque = collections.deque()
        # whether the socket holds anything, without a failed read (recv_nowait runs
        # after every job: the failed read cost a raised exception each time)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def send(self, kind: int, ctl: dict, payload=()) -> None:
        self.conn.send(kind, ctl, payload)
        # (an empty buffer, such as an empty file's payload, is left out: sendmsg
        # of nothing but empty buffers sends 0 bytes, and this loop never ended)
        bufs = [m for m in (memoryview(b).cast("B") for b in self.conn.take_output()) if m.nbytes]
        while bufs:
            n = self.sock.sendmsg(bufs[:512])
            while n:
                if n >= bufs[0].nbytes:
                    n -= bufs[0].nbytes
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0

    def recv(self) -> Message:
        """The next message; raises ConnectionClosed at end of stream."""
        while not self._events:
            buf = self.conn.get_buffer()
            n = self.sock.recv_into(buf)
            del buf  # a view left alive would stop a large frame's buffer growing in place
            if n == 0:
                raise ConnectionClosed("local channel closed")
            self._events.extend(self.conn.buffer_updated(n))
        return self._events.popleft()

    def recv_available(self) -> list:
        """One read from the socket; the messages it completed (maybe none)."""
        buf = self.conn.get_buffer()
        n = self.sock.recv_into(buf)
        del buf
        if n == 0:
            raise ConnectionClosed("local channel closed")
        events = list(self._events) + self.conn.buffer_updated(n)
        self._events.clear()
        return events

    def recv_nowait(self) -> list:
        """The messages received and not yet returned, reading what the socket holds
        now without waiting for more (maybe none)."""
        events = list(self._events)
        self._events.clear()
        while self._poll.poll(0):
            buf = self.conn.get_buffer()
            try:
                n = self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return events
            finally:
                del buf
            if n == 0:
                raise ConnectionClosed("local channel closed")
            events.extend(self.conn.buffer_updated(n))
        return events

    def close(self) -> None:
        self.sock.close()
