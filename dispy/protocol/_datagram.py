"""Discovery datagrams: the UDP messages of node discovery.  No I/O here.

Layout of one datagram (all integers big-endian)::

    header   31 bytes  magic b"DSPYD" | layout version u8 | kind u8
                       | timestamp u64 (milliseconds since the epoch) | nonce 16 bytes
    body     a msgpack map with string keys (never pickle), at least 1 byte
    tag      32 bytes: HMAC-SHA256(datagram key, header | body)

The whole datagram is at most ``max_size`` bytes (1400 by default, so it
fits one Ethernet frame without IP fragmentation), on both sides.

The datagram key is derived from the 32-byte key that ``derive_key(secret)``
gives, under its own label (``datagram_key``), so a UDP tag is never made
with the key of the TCP handshake, and nothing the TCP side sends (proofs,
tags) can be taken for a datagram tag.

A datagram is checked in this order, and nothing past a failed step is
looked at: size, magic and layout version (``ProtocolError``), then the tag
(``AuthenticationFailed``, compared in constant time), then the timestamp
and the nonce (``ReplayedDatagram``), and only then is the body parsed
(``ProtocolError``).  Bytes from a peer that lacks the key never reach
msgpack.

Replay protection
-----------------
UDP has no connection to chain tags to, so each datagram carries the
sender's clock and a fresh random nonce.  The receiver accepts a datagram
only if its timestamp is within ``window`` seconds of its own clock (either
way) and its nonce is not in the ``ReplayCache`` of the nonces it has
accepted.  The cache is bounded: a nonce leaves it when its timestamp falls
out of the window, or, when the cache is full, the one with the oldest
timestamp leaves to make room.  Either way the cache raises its *floor* to
that timestamp, and a datagram stamped at or below the floor is refused:
every accepted nonce is in the cache or below the floor, so a datagram is
accepted at most once, whatever the cache size and even if the caller's
clock steps back.  (The cost of a full cache is that an honest datagram
older than every remembered one is refused; senders simply send again.)
"""

from __future__ import annotations

import heapq
import hmac
import math
import os
import struct
from enum import IntEnum

from ..errors import AuthenticationFailed, ProtocolError
from ._messages import pack_ctl, unpack_map

MAGIC = b"DSPYD"
LAYOUT_VERSION = 1
HEADER = struct.Struct("!5sBBQ16s")
HEADER_SIZE = HEADER.size  # 31
NONCE_SIZE = 16
TAG_SIZE = 32
#: The smallest well-formed datagram: a header, a one-byte body (an empty map) and a tag.
MIN_SIZE = HEADER_SIZE + 1 + TAG_SIZE
#: Default size limit, on encode and decode: fits an Ethernet MTU with IP and UDP headers.
MAX_SIZE = 1400
#: Default replay window, in seconds either side of the receiver's clock.
WINDOW = 60.0
#: Default number of accepted nonces remembered.
CACHE_SIZE = 4096

_LABEL = b"dispy-datagram-key-v1"
_MAX_MS = 2**64 - 1


class DatagramKind(IntEnum):
    """What a datagram is for."""

    DISCOVER = 1  # a client asks the nodes that hear it to answer
    ANNOUNCE = 2  # a node advertises itself
    RELAY = 3  # forwarded by a relay


class ReplayedDatagram(AuthenticationFailed):
    """An authentic datagram seen before, or stamped outside the replay window."""


def datagram_key(key: bytes) -> bytes:
    """The key that tags datagrams, derived from ``derive_key(secret)``'s 32-byte key."""
    _check_key(key)
    return hmac.digest(key, _LABEL, "sha256")


def _check_key(key) -> None:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("datagrams need the 32-byte key that derive_key(secret) gives")


def _check_now(now) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


def encode_datagram(
    kind: int,
    body: dict,
    key: bytes,
    *,
    now: float,
    nonce: bytes | None = None,
    max_size: int = MAX_SIZE,
) -> bytes:
    """One datagram of ``kind`` carrying ``body``, tagged under ``key`` (see ``derive_key``).

    ``now`` is the sender's clock in seconds since the epoch; ``nonce`` (16
    bytes) is random unless given (tests only: a nonce must never be reused).
    Raises ``ValueError`` for bad arguments or a datagram over ``max_size``
    bytes, ``TypeError`` for a body msgpack cannot carry.
    """
    try:
        kind = DatagramKind(kind)
    except ValueError:
        raise ValueError(f"unknown datagram kind {kind!r}") from None
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise TypeError("a datagram body must be a dict with string keys")
    now = _check_now(now)
    ms = round(now * 1000)
    if not 0 <= ms <= _MAX_MS:
        raise ValueError(f"now={now!r} is not a time a datagram can carry")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
    packed = pack_ctl(body)
    size = HEADER_SIZE + len(packed) + TAG_SIZE
    if size > max_size:
        raise ValueError(f"datagram of {size} bytes exceeds the limit of {max_size} bytes")
    signed = HEADER.pack(MAGIC, LAYOUT_VERSION, kind, ms, nonce) + packed
    return signed + hmac.digest(datagram_key(key), signed, "sha256")


class ReplayCache:
    """The nonces of accepted datagrams, at most ``capacity`` of them (see the module doc).

    Timestamps are integers in milliseconds, like on the wire.
    """

    def __init__(self, capacity: int = CACHE_SIZE, window: float = WINDOW) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError("the replay cache needs a capacity of at least 1")
        window = _check_now(window)
        if window <= 0:
            raise ValueError("the replay window must be positive")
        self.capacity = capacity
        self.window_ms = round(window * 1000)
        self.floor = -1  # datagrams stamped at or below this are refused
        self._seen: dict[bytes, int] = {}  # nonce -> timestamp
        self._heap: list[tuple[int, bytes]] = []  # (timestamp, nonce), one per nonce in _seen

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, nonce) -> bool:
        return nonce in self._seen

    def check(self, nonce: bytes, ts_ms: int) -> None:
        """Raise ``ReplayedDatagram`` if a datagram with this nonce and timestamp
        may have been accepted already."""
        if nonce in self._seen:
            raise ReplayedDatagram("datagram replayed: its nonce was accepted already")
        if ts_ms <= self.floor:
            raise ReplayedDatagram(
                "datagram older than every nonce the replay cache remembers: refused "
                "as a possible replay"
            )

    def add(self, nonce: bytes, ts_ms: int, now: float) -> None:
        """Remember an accepted nonce (``check`` must have passed); forget expired ones."""
        self.check(nonce, ts_ms)
        self.prune(now)
        while len(self._seen) >= self.capacity:
            self._pop()
        self._seen[nonce] = ts_ms
        heapq.heappush(self._heap, (ts_ms, nonce))

    def prune(self, now: float) -> None:
        """Forget the nonces whose timestamps are out of the window at ``now``."""
        oldest = math.floor(_check_now(now) * 1000) - self.window_ms
        while self._heap and self._heap[0][0] < oldest:
            self._pop()

    def _pop(self) -> None:
        ts, nonce = heapq.heappop(self._heap)
        del self._seen[nonce]
        self.floor = max(self.floor, ts)


class DatagramDecoder:
    """Checks received datagrams and remembers their nonces; one per receiving socket.

    ``key`` is the 32-byte key of ``derive_key(secret)``; ``window`` is the
    largest clock difference accepted, in seconds; ``cache_size`` bounds the
    nonces remembered; ``max_size`` the datagram size.
    """

    def __init__(
        self,
        key: bytes,
        *,
        window: float = WINDOW,
        cache_size: int = CACHE_SIZE,
        max_size: int = MAX_SIZE,
    ) -> None:
        self._dkey = datagram_key(key)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < MIN_SIZE:
            raise ValueError(f"max_size must be an integer of at least {MIN_SIZE}")
        self.window = _check_now(window)
        self.max_size = max_size
        self.cache = ReplayCache(cache_size, window)

    def decode(self, data, now: float) -> tuple[DatagramKind, dict]:
        """Check one received datagram; return its kind and body.

        ``now`` is the receiver's clock in seconds since the epoch.  Raises
        ``ProtocolError`` for a datagram that is not a well-formed dispy
        datagram, ``AuthenticationFailed`` for a bad tag (another secret, or
        tampered with), ``ReplayedDatagram`` for one accepted before or stamped
        outside the window.  A datagram is accepted (returned) at most once.
        """
        now = _check_now(now)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a datagram is bytes, not {type(data).__name__}")
        size = memoryview(data).nbytes
        if size > self.max_size:
            raise ProtocolError(
                f"datagram of {size} bytes exceeds the limit of {self.max_size} bytes"
            )
        if size < MIN_SIZE:
            raise ProtocolError(f"datagram of {size} bytes is too short to be a dispy datagram")
        data = bytes(data)
        magic, version, kind, ts_ms, nonce = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError(f"not a dispy datagram: starts with {magic!r}")
        if version != LAYOUT_VERSION:
            raise ProtocolError(
                f"unknown datagram layout version {version} (this side speaks {LAYOUT_VERSION})"
            )
        signed, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(hmac.digest(self._dkey, signed, "sha256"), tag):
            raise AuthenticationFailed(
                "datagram failed authentication (sent with another secret, or tampered with)"
            )
        skew = ts_ms / 1000 - now
        if abs(skew) > self.window:
            raise ReplayedDatagram(
                f"datagram stamped {skew:+.3f} s from this clock, outside the window of "
                f"±{self.window:g} s: replayed, or the clocks differ"
            )
        self.cache.check(nonce, ts_ms)
        body = _unpack_body(signed[HEADER_SIZE:])
        try:
            kind = DatagramKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown datagram kind {kind}") from None
        self.cache.add(nonce, ts_ms, now)
        return kind, body


def _unpack_body(data: bytes) -> dict:
    """A datagram body: one msgpack map with string keys, nothing after it."""
    return unpack_map(data, "datagram body")
