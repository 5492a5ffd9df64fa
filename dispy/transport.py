"""The one connection type every dispy program uses: TCP (or a local socket
pair) on asyncio, carrying the sans-IO ``protocol.Connection``.

::

    peer bytes --> ChannelProtocol.get_buffer/buffer_updated  (zero-copy for big frames)
                     --> protocol.Connection (handshake, sizes, tags)
                     --> Channel.on_message(Message)          (owner's callback)
    owner --> Channel.send(kind, ctl, payload)
                     small frames are gathered and written once per loop turn;
                     a payload above STREAM_THRESHOLD is streamed in chunks
                     (tag computed chunk by chunk, write flow control honoured)

Errors: a frame that breaks the protocol closes this channel only, with the
reason logged and passed to ``on_close``; the process serves on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable

from . import config
from ._channel import (
    LOCAL_SNDBUF,
    BlockingChannel,  # noqa: F401  (its home before; tests import it here)
)
from ._peer_guards import GuessDelay, LogThrottle, peer_uid
from ._tasks import spawn
from .errors import AuthenticationFailed, ConnectionClosed, DispyError, ProtocolError
from .protocol import Connection, HandshakeComplete, Message

logger = logging.getLogger("dispy.transport")

#: Payloads above this many bytes are streamed in chunks instead of queued at once.
STREAM_THRESHOLD = 1 << 20
CHUNK = 1 << 20


class ChannelProtocol(asyncio.BufferedProtocol):
    """asyncio glue: moves bytes between the socket and the sans-IO connection."""

    def __init__(
        self, conn: Connection, peer_hint: str = "", on_made=None, admit=None, refused=None
    ) -> None:
        self.conn = conn
        self._on_made = on_made
        # admit(protocol) -> seconds: told of the peer before anything is sent; says how
        # long to wait before the first frame
        self._admit = admit
        # refused(protocol): the peer failed authentication; told at once, before any
        # other event (its next connection) can be handled
        self._refused = refused
        self.peer_host = ""
        self.channel: Channel | None = None
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        # nobody may be waiting any more when it fails: mark its error as seen
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.peer = peer_hint
        self._pending_msgs: list = []

    # asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and not self.peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        if isinstance(peer, tuple):
            self.peer_host = peer[0]
        delay = self._admit(self) if self._admit is not None else 0.0
        if self.conn.trusted:
            self.handshake.set_result(None)
            if self._on_made is not None:
                self._on_made(self)
        elif delay:  # an address that has been guessing the secret: answer it later
            asyncio.get_running_loop().call_later(delay, self._hello)
        else:
            self._hello()

    def _hello(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.conn.initiate()
            self._flush_conn()

    def get_buffer(self, sizehint: int):
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.conn.buffer_updated(nbytes)
        except (ProtocolError, AuthenticationFailed) as exc:
            self._flush_conn()
            self._fail(exc)
            return
        self._flush_conn()
        for ev in events:
            if isinstance(ev, Message):
                if self.channel is not None:
                    self.channel._deliver(ev)
                else:  # arrived in the same read as the handshake's end
                    self._pending_msgs.append(ev)
            elif isinstance(ev, HandshakeComplete) and not self.handshake.done():
                self.handshake.set_result(ev.version)

    def eof_received(self):
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        self._can_write.set()
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionClosed(f"connection to {self.peer} closed during the handshake")
            )
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.channel is not None:
            self.channel._lost(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # helpers ---------------------------------------------------------------
    def _flush_conn(self) -> None:
        out = self.conn.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def _fail(self, exc: Exception) -> None:
        logger.warning("closing connection with %s: %s", self.peer or "peer", exc)
        if isinstance(exc, AuthenticationFailed) and self._refused is not None:
            self._refused(self)
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.channel is not None:
            self.channel.error = exc
        if self.transport is not None:
            self.transport.close()


class Channel:
    """An open (authenticated, or trusted local) connection.

    Set ``on_message(msg)`` and ``on_close(exc)`` to receive; call ``send``.
    """

    def __init__(self, proto: ChannelProtocol) -> None:
        self._proto = proto
        self.conn = proto.conn
        self.peer = proto.peer
        self.on_message: Callable[[Message], None] | None = None
        self.on_close: Callable[[Exception | None], None] | None = None
        self.error: Exception | None = None
        self._queue: collections.deque = collections.deque()
        self._flush_scheduled = False
        self._streaming = False
        self._loop = asyncio.get_running_loop()
        self.bytes_sent = 0
        proto.channel = self
        self._held = proto._pending_msgs
        proto._pending_msgs = []

    @property
    def bytes_received(self) -> int:
        return self.conn.decoder.bytes_received

    def lift_limit(self) -> None:
        """A local peer proved itself: take full-size frames from it now."""
        self.conn.decoder.lift_limit()

    def start(self) -> None:
        """Deliver messages that arrived before ``on_message`` was set."""
        held, self._held = self._held, []
        for msg in held:
            self._deliver(msg)
        if self._proto.closed.done():
            self._lost(self._proto.closed.result())

    @property
    def is_closed(self) -> bool:
        t = self._proto.transport
        return t is None or t.is_closing()

    def send(
        self, kind: int, ctl: dict, payload=(), sent: Callable[[], None] | None = None
    ) -> None:
        """Queue a message; it is written at the end of this loop turn, in order.

        ``sent()``, if given, is called once the message is handed to the
        transport (a large payload: once its last byte is), or the connection
        ended before that."""
        if self.is_closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        self._queue.append((kind, ctl, payload, sent))
        if not self._flush_scheduled and not self._streaming:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now, not at the end of this loop turn: for a caller
        that has just sent its whole batch (a turn's results, jobs), it saves the
        peer waiting one more turn of this loop."""
        if self._queue and not self._streaming:
            self._flush()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self._proto._can_write.wait()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._streaming:
            return
        transport = self._proto.transport
        if transport is None or transport.is_closing():
            self._drop_queue()
            return
        out = []
        done = []
        while self._queue:
            kind, ctl, payload, sent = self._queue[0]
            size = sum(memoryview(p).nbytes for p in payload)
            if size > STREAM_THRESHOLD:
                break
            self._queue.popleft()
            self.conn.send(kind, ctl, payload)
            out.extend(self.conn.take_output())
            if sent is not None:
                done.append(sent)
        if out:
            data = b"".join(out)
            self.bytes_sent += len(data)
            transport.write(data)
        for sent in done:
            _call(sent)
        if self._queue:  # a large payload is next
            self._streaming = True
            spawn(self._stream_next(), f"streaming to {self.peer}", logger)

    async def _stream_next(self) -> None:
        sent = None
        try:
            kind, ctl, payload, sent = self._queue.popleft()
            views = [memoryview(p).cast("B") for p in payload]
            writer = self.conn.start_frame(kind, ctl, sum(v.nbytes for v in views))
            transport = self._proto.transport
            transport.write(writer.head)
            for v in views:
                for pos in range(0, v.nbytes, CHUNK):
                    chunk = v[pos : pos + CHUNK]
                    writer.update(chunk)
                    await self._proto._can_write.wait()
                    if transport.is_closing():
                        return
                    transport.write(chunk)
                    self.bytes_sent += chunk.nbytes
            tag = writer.tag()
            if tag:
                transport.write(tag)
        except Exception as exc:  # a broken channel must not be half-written silently
            logger.warning("sending to %s failed: %s", self.peer, exc)
            self.close()
        finally:
            self._streaming = False
            if sent is not None:
                _call(sent)
            if self._queue and not self.is_closed:
                self._flush()
            elif self._queue:
                self._drop_queue()

    def _drop_queue(self) -> None:
        """The connection ended: what was queued is not sent (its ``sent`` is told)."""
        queued = list(self._queue)
        self._queue.clear()
        for *_, sent in queued:
            if sent is not None:
                _call(sent)

    def _deliver(self, msg: Message) -> None:
        if self.on_message is None:
            self._held.append(msg)
            return
        try:
            self.on_message(msg)
        except DispyError as exc:
            self._proto._fail(exc)
        except Exception:
            logger.exception("handling message %s from %s failed", msg.kind, self.peer)
            self._proto._fail(ProtocolError(f"message {msg.kind} could not be handled"))

    def _lost(self, exc) -> None:
        if not self._streaming:  # (a stream in progress tells its own, then the rest)
            self._drop_queue()
        cb, self.on_close = self.on_close, None
        if cb is not None:
            cb(self.error or exc)

    def close(self) -> None:
        t = self._proto.transport
        if t is not None and not t.is_closing():
            # write what is queued first, so a final message is not lost
            if self._queue and not self._streaming:
                self._flush()
            t.close()

    def abort(self) -> None:
        t = self._proto.transport
        if t is not None:
            t.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._proto.closed)


def _call(sent: Callable[[], None]) -> None:
    try:
        sent()
    except Exception:  # the owner's bug must not break the connection's writing
        logger.exception("a message's sent() callback failed")


def _tune(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            # Already closed: the peer broke the protocol (or hung up) before we got
            # here.  The handshake future holds the real reason; let the caller see it.
            pass


async def connect(
    host: str,
    port: int,
    key: bytes,
    *,
    timeout: float = config.HANDSHAKE_TIMEOUT,
    max_frame: int = config.MAX_FRAME_SIZE,
    ssl=None,
) -> Channel:
    """Open a TCP connection and authenticate; raises AuthenticationFailed,
    ProtocolError, ConnectionClosed or OSError (refused, unreachable...)."""
    loop = asyncio.get_running_loop()
    conn = Connection("client", key, max_frame=max_frame)
    transport, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: ChannelProtocol(conn, f"{host}:{port}"), host, port, ssl=ssl
        ),
        timeout,
    )
    _tune(transport.get_extra_info("socket"))
    try:
        await asyncio.wait_for(asyncio.shield(proto.handshake), timeout)
    except TimeoutError:
        transport.abort()
        raise ConnectionClosed(
            f"{host}:{port} did not complete the dispy handshake in {timeout:g} s "
            "(is it a dispynode?"
            + (")" if ssl is not None else " if it uses TLS, give certfile/cafile)")
        ) from None
    except ConnectionClosed:
        transport.abort()
        hint = "" if ssl is not None else " (if the node uses TLS, give certfile/cafile)"
        raise ConnectionClosed(
            f"{host}:{port} closed the connection during the dispy handshake{hint}"
        ) from None
    except BaseException:
        transport.abort()
        raise
    return Channel(proto)


async def serve(
    host: str | list[str] | None,
    port: int,
    key: bytes,
    on_channel: Callable[[Channel], None],
    *,
    timeout: float = config.HANDSHAKE_TIMEOUT,
    max_frame: int = config.MAX_FRAME_SIZE,
    max_unauth: int = config.MAX_UNAUTHENTICATED,
    ssl=None,
) -> asyncio.Server:
    """Listen; call ``on_channel`` with each peer that authenticates.

    Peers that fail the handshake or stay silent past ``timeout`` are
    dropped with a logged reason; at most ``max_unauth`` connections may be
    authenticating at once (more are closed at once), so a flood of silent
    or garbage connections costs bounded memory.  The server keeps serving.
    """
    loop = asyncio.get_running_loop()
    #: connections still authenticating, oldest first; and the same by address
    waiting: collections.OrderedDict[ChannelProtocol, None] = collections.OrderedDict()
    per_host: dict[str, collections.deque] = {}
    host_limit = max(4, max_unauth // 8)  # one address cannot take every slot
    failures = LogThrottle(logger, "connections dropped before authenticating")
    guesses = GuessDelay()

    def evict(proto: ChannelProtocol, why: str) -> None:
        """Make room by dropping the oldest connection still authenticating: a
        flood then only delays itself, a real peer (whose handshake takes
        milliseconds) still gets in."""
        failures.note(logging.WARNING, "%s: dropped %s, authenticating the longest", why,
                      proto.peer or "a connection")  # fmt: skip
        forget(proto)
        if proto.transport is not None:
            proto.transport.abort()

    def forget(proto: ChannelProtocol) -> None:
        waiting.pop(proto, None)
        q = per_host.get(proto.peer_host)
        if q is not None and proto in q:
            q.remove(proto)
            if not q:
                del per_host[proto.peer_host]

    def factory():
        if len(waiting) >= max_unauth:
            evict(next(iter(waiting)), f"{max_unauth} connections authenticating (limit)")
        proto = ChannelProtocol(
            Connection("server", key, max_frame=max_frame), admit=admit, refused=refused
        )
        waiting[proto] = None
        spawn(_await_handshake(proto), "a handshake", logger)
        return proto

    def admit(proto: ChannelProtocol) -> float:
        q = per_host.setdefault(proto.peer_host, collections.deque())
        if len(q) >= host_limit:  # (q keeps host_limit - 1 >= 3 of them: it stays)
            evict(q[0], f"{proto.peer_host} has {host_limit} connections authenticating "
                  "(limit per address)")  # fmt: skip
        q.append(proto)
        return guesses.delay(proto.peer_host)

    def refused(proto: ChannelProtocol) -> None:
        # counted here, not when _await_handshake wakes: the peer, told at once, may
        # connect again before that task runs, and its next guess must wait
        guesses.failed(proto.peer_host)

    async def _await_handshake(proto: ChannelProtocol) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(proto.handshake), timeout)
        except TimeoutError:
            failures.note(
                logging.WARNING, "%s did not authenticate in %g s; dropped", proto.peer, timeout
            )
            if proto.transport is not None:
                proto.transport.abort()
            return
        except Exception as exc:
            failures.note(logging.INFO, "connection from %s rejected: %s", proto.peer, exc)
            return
        finally:
            forget(proto)
        guesses.succeeded(proto.peer_host)
        _tune(proto.transport.get_extra_info("socket"))
        on_channel(Channel(proto))

    return await loop.create_server(
        factory,
        host,
        port,
        ssl=ssl,
        reuse_address=True,
        ssl_handshake_timeout=timeout if ssl is not None else None,
    )


async def serve_unix(
    path: str, on_channel: Callable[[Channel], None], on_refused=None
) -> asyncio.Server:
    """Listen on a local (unix) socket for a node's own job processes.

    Only processes of this user may stay connected (``SO_PEERCRED``; another
    local user is cut off at once, ``on_refused(uid)`` told).  The channel is
    trusted framing (no handshake) but takes small frames only until the owner
    has checked the token in the first message (``Channel.lift_limit``): only
    the node's computation process knows it.
    """
    loop = asyncio.get_running_loop()
    me = os.geteuid()

    def made(proto: ChannelProtocol) -> None:
        sock = proto.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SNDBUF)
        uid = peer_uid(sock)
        if uid != me:
            proto.transport.abort()
            if on_refused is not None:
                on_refused(uid)
            return
        on_channel(Channel(proto))

    def factory():
        conn = Connection("server", None, trusted=True, limited=True)
        return ChannelProtocol(conn, "local", on_made=made)

    return await loop.create_unix_server(factory, path)


async def open_local(sock: socket.socket) -> Channel:
    """Wrap one end of a local socket pair (node daemon <-> its own processes)."""
    loop = asyncio.get_running_loop()
    conn = Connection("server", None, trusted=True)
    _, proto = await loop.create_unix_connection(lambda: ChannelProtocol(conn, "local"), sock=sock)
    return Channel(proto)
