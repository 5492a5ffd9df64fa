"""Frames: the unit that crosses every dispy connection.  No I/O here.

Layout of one frame (all integers big-endian)::

    header   20 bytes  magic b"DSPY" | layout version u8 | kind u8 | flags u16
                       | control length u32 | body length u64
    body     body-length bytes: control part (a msgpack map) then payload
    tag      32 bytes, only once the connection is authenticated:
             HMAC-SHA256(direction key, sequence number u64 | header | body);
             for a body of POLY_BODY bytes or more, the body's Poly1305 tag
             (under a key for that frame alone: HMAC-SHA256(direction key,
             "dispy-poly1305" | sequence number)) stands in for the body

The sequence number is not sent: each side counts the frames of each
direction, so a replayed, dropped or reordered frame fails its tag.
Poly1305 hashes about six times faster than HMAC-SHA256 here (10 vs 1.7
GB/s), which a 100 MB array feels on both sides; the header, which says the
body's length, keeps the two forms of tag apart.

``FrameDecoder`` receives bytes through a buffer interface
(``get_buffer`` / ``buffer_updated``), made for ``asyncio.BufferedProtocol``
and for blocking ``socket.recv_into``: small frames are parsed out of one
staging buffer (many frames per system call), and the body of a large frame
is received straight into a buffer of its own size, so a 100 MB array is
never copied on the way in.  Its tag is checked incrementally as the bytes
arrive; no frame is handed up before its tag has been verified.
"""

from __future__ import annotations

import ctypes
import hmac
import mmap
import struct
import sys
from dataclasses import dataclass
from hashlib import sha256

from ..errors import FrameTooLarge, ProtocolError

MAGIC = b"DSPY"
LAYOUT_VERSION = 1
HEADER = struct.Struct("!4sBBHIQ")
HEADER_SIZE = HEADER.size
TAG_SIZE = 32
_SEQ = struct.Struct("!Q")

#: Body size above which a frame gets a buffer of its own (received in place).
BIG_BODY = 128 * 1024
#: Size of the staging buffer that holds small frames; must exceed BIG_BODY + header + tag.
STAGING_SIZE = 512 * 1024
#: Its size before authentication (handshake frames are at most 4 KiB).
UNAUTH_STAGING_SIZE = 8 * 1024
#: Its size once authenticated, until a frame needs more (then STAGING_SIZE): a
#: node keeps one per connection and per job process, and tiny jobs never need
#: more (the full size cost a node 0.5 MiB per job process, zero-filled).
AUTH_STAGING_SIZE = 64 * 1024


#: Payloads are received at addresses that are multiples of this, and the
#: sender pads large segments to multiples of it, so arrays that pickle
#: protocol 5 rebuilds in place are aligned (numpy and BLAS need it).
ALIGN = 64
#: Segments of at least this many bytes start at an ALIGN boundary in the payload.
ALIGN_MIN = 1024
#: Receive buffers of at least this many bytes are not zero-filled (see aligned_buffer).
EMPTY_MIN = 1 << 20
#: A frame body larger than this is not reserved whole when its header arrives:
#: its buffer starts at this size and doubles as the bytes come (``GrowingBuffer``),
#: so a peer announcing 4 GiB and sending little costs little.
GROW_ABOVE = 32 << 20


def aligned_buffer(size: int, offset: int) -> memoryview:
    """A writable buffer of ``size`` bytes whose byte ``offset`` sits at an ALIGN boundary.

    Large buffers are not filled by this process (zero-filling 100 MB that the
    socket overwrites at once cost more than receiving it, 59 ms vs 12 ms):
    ``numpy.empty`` where numpy is loaded (a client; the allocator reuses freed
    memory), else an anonymous memory map (a node's daemon, which imported
    numpy for its first large frame before: a job's first 8 MB result took 75
    ms longer).  Nothing in them is handed up before every byte has been
    received.
    """
    if size >= EMPTY_MIN:
        numpy = sys.modules.get("numpy")  # (loaded already: its heap memory is reused)
        if numpy is not None:
            arr = numpy.empty(size + ALIGN, dtype=numpy.uint8)
            shift = (-(arr.ctypes.data + offset)) % ALIGN
            return memoryview(arr)[shift : shift + size]
        shift = (-offset) % ALIGN  # (a map starts on a page boundary)
        # private: as malloc's memory (a shared anonymous map is shmem)
        mm = mmap.mmap(-1, shift + size, flags=mmap.MAP_PRIVATE)
        _huge(mm)
        return memoryview(mm)[shift : shift + size]
    raw = bytearray(size + ALIGN)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    shift = (-(addr + offset)) % ALIGN
    return memoryview(raw)[shift : shift + size]


def _huge(mm: mmap.mmap) -> None:
    """Transparent huge pages for a large map, as numpy asks for its large arrays:
    they fault in far fewer steps (measured on 100 MB: 0.12 s without, 0.08 s with)."""
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        pass


class GrowingBuffer:
    """The receive buffer of a very large frame body: an anonymous memory map
    that starts at GROW_ABOVE bytes and doubles (``mremap``: no copy) whenever
    the bytes received fill it, up to ``size``.  Its byte ``offset`` sits at an
    ALIGN boundary, as with ``aligned_buffer``.

    It hands out fresh views (``view``) instead of keeping one, because a map
    with views alive cannot be resized; if one is still alive anyway, the body
    is copied into a new, larger map (correct, only slower).
    """

    __slots__ = ("size", "copies", "_shift", "_map", "_cap")

    def __init__(self, size: int, offset: int) -> None:
        self.size = size
        self.copies = 0  # times it had to be copied to grow (a view was alive)
        self._shift = (-offset) % ALIGN  # a map starts on a page boundary
        self._cap = min(size, GROW_ABOVE)
        # private: a shared anonymous map cannot grow (its pages past the first
        # size have no backing and fault with SIGBUS)
        self._map = mmap.mmap(-1, self._shift + self._cap, flags=mmap.MAP_PRIVATE)
        self._huge()

    @property
    def capacity(self) -> int:
        return self._cap

    def view(self, start: int = 0, stop: int | None = None) -> memoryview:
        end = self._shift + (self._cap if stop is None else stop)
        return memoryview(self._map)[self._shift + start : end]

    def ensure(self, needed: int) -> None:
        """Make room for at least ``needed`` bytes (at most ``size``)."""
        if needed <= self._cap:
            return
        cap = min(self.size, max(needed, 2 * self._cap))
        try:
            self._map.resize(self._shift + cap)
        except (BufferError, OSError, SystemError, ValueError):
            bigger = mmap.mmap(-1, self._shift + cap, flags=mmap.MAP_PRIVATE)
            n = self._shift + self._cap
            with memoryview(bigger) as dst, memoryview(self._map) as src:
                dst[:n] = src[:n]
            self._map = bigger
            self.copies += 1
        self._cap = cap
        self._huge()

    def _huge(self) -> None:
        _huge(self._map)


@dataclass(slots=True)
class Frame:
    """One decoded frame: ``ctl`` is the raw control part, ``payload`` the rest."""

    kind: int
    ctl: bytes
    payload: memoryview


#: Body size from which a frame's tag covers the body's Poly1305 tag, not the body.
POLY_BODY = 1 << 20


class _BodyHashedMac:
    """The tag of a large frame: the body goes through Poly1305 under a one-time
    key, and its 16-byte tag into the frame's HMAC (``digest`` once only)."""

    __slots__ = ("_mac", "_poly")

    def __init__(self, mac, key: bytes, seq: int) -> None:
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        self._mac = mac
        self._poly = Poly1305(hmac.digest(key, b"dispy-poly1305" + _SEQ.pack(seq), "sha256"))

    def update(self, data) -> None:
        self._poly.update(data)

    def digest(self) -> bytes:
        self._mac.update(self._poly.finalize())
        return self._mac.digest()


class FrameWriter:
    """Writes one frame in pieces: ``head`` first, then payload chunks, then ``tag()``.

    Lets a transport stream a large payload while the tag is computed chunk
    by chunk, instead of hashing 100 MB in one call on the event loop.
    """

    __slots__ = ("head", "_mac")

    def __init__(self, head: bytes, mac) -> None:
        self.head = head
        self._mac = mac

    def update(self, chunk) -> None:
        if self._mac is not None:
            self._mac.update(chunk)

    def tag(self) -> bytes:
        return self._mac.digest() if self._mac is not None else b""


class _Keyed:
    """The direction key of an encoder or a decoder (None: no tags), and an HMAC
    keyed with it once, which each frame's tag starts from (a copy)."""

    _key: bytes | None = None
    _base = None

    @property
    def key(self) -> bytes | None:
        return self._key

    @key.setter
    def key(self, key: bytes | None) -> None:
        """Set when the handshake completes: frames carry tags from now on."""
        self._key = key
        self._base = None if key is None else hmac.new(key, digestmod=sha256)
        self._keyed()

    def _keyed(self) -> None:
        pass

    def _start_mac(self, header, body_len: int):
        """The tag of frame ``seq`` so far, its header in (a copy of the keyed HMAC:
        no key setup per frame)."""
        mac = self._base.copy()
        mac.update(_SEQ.pack(self.seq))
        mac.update(header)
        if body_len >= POLY_BODY:
            return _BodyHashedMac(mac, self._key, self.seq)
        return mac


class FrameEncoder(_Keyed):
    """Builds outgoing frames and counts their sequence numbers."""

    def __init__(self) -> None:
        self.seq = 0

    def start(self, kind: int, ctl: bytes, payload_len: int) -> FrameWriter:
        if not 0 <= kind <= 255:
            raise ValueError(f"frame kind {kind} out of range 0..255")
        header = HEADER.pack(MAGIC, LAYOUT_VERSION, kind, 0, len(ctl), len(ctl) + payload_len)
        mac = None
        if self._key is not None:
            mac = self._start_mac(header, len(ctl) + payload_len)
            mac.update(ctl)
            self.seq += 1
        return FrameWriter(header + ctl, mac)

    def encode(self, kind: int, ctl: bytes, payload=()) -> list:
        """The whole frame as a list of buffers (payload buffers are not copied)."""
        w = self.start(kind, ctl, sum(_nbytes(p) for p in payload))
        out = [w.head]
        for p in payload:
            w.update(p)
            out.append(p)
        tag = w.tag()
        if tag:
            out.append(tag)
        return out


def _nbytes(buf) -> int:
    # len() of a numpy array or array.array counts items, not bytes
    return memoryview(buf).nbytes


class FrameDecoder(_Keyed):
    """Turns received bytes into ``Frame`` objects, checking sizes and tags.

    ``key`` is None before authentication (then only ``max_body_unauth``-sized
    frames are accepted and no tag is expected) and the direction key after.
    ``trusted=True`` is only for local socket pairs between a node and its
    own job processes: no tag, full size limit.
    """

    def __init__(
        self,
        max_body: int,
        max_ctl: int,
        *,
        max_body_unauth: int = 4096,
        trusted: bool = False,
        limited: bool = False,
    ) -> None:
        self.max_body = max_body
        #: a trusted local channel whose peer has not shown its token yet: small
        #: frames only, as before authentication (``lift_limit`` once it has)
        self.limited = trusted and limited
        self.max_ctl = max_ctl
        self.max_body_unauth = max_body_unauth
        self.trusted = trusted
        self.seq = 0
        # small until the peer authenticates: an unauthenticated connection costs little
        first = max(UNAUTH_STAGING_SIZE, max_body_unauth + HEADER_SIZE + TAG_SIZE)
        self._buf = bytearray(
            min(AUTH_STAGING_SIZE if trusted and not self.limited else first, STAGING_SIZE)
        )
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # a large frame being received into its own buffer
        self._big: memoryview | GrowingBuffer | None = None
        self._big_pos = 0
        self._big_head: tuple | None = None  # (kind, ctl_len)
        self._big_mac = None
        self._awaiting_tag = False
        self.bytes_received = 0

    def _keyed(self) -> None:
        self._grow(min(AUTH_STAGING_SIZE, STAGING_SIZE))  # authenticated: full-size frames

    def lift_limit(self) -> None:
        """The local peer proved itself (its token): full-size frames from now on."""
        self.limited = False
        self._grow(min(AUTH_STAGING_SIZE, STAGING_SIZE))

    def _grow(self, size: int) -> None:
        if len(self._buf) < size:
            pending = self._view[self._start : self._end]
            buf = bytearray(size)
            buf[: len(pending)] = pending
            self._end -= self._start
            self._start = 0
            self._buf, self._view = buf, memoryview(buf)

    # -- buffer interface ---------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes must be written."""
        if self._big is not None and not self._awaiting_tag:
            big = self._big
            if isinstance(big, GrowingBuffer):
                big.ensure(self._big_pos + 1)  # grows only once the bytes have filled it
                return big.view(self._big_pos)
            return big[self._big_pos :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written into the last ``get_buffer()``."""
        self.bytes_received += nbytes
        if self._big is not None and not self._awaiting_tag:
            big, pos = self._big, self._big_pos
            growing = isinstance(big, GrowingBuffer)
            if self._big_mac is not None:
                new = big.view(pos, pos + nbytes) if growing else big[pos : pos + nbytes]
                self._big_mac.update(new)
                new.release()
            self._big_pos += nbytes
            if self._big_pos == (big.size if growing else len(big)):
                self._awaiting_tag = True
        else:
            self._end += nbytes

    def feed(self, data) -> list[Frame]:
        """Convenience for tests and blocking code: copy ``data`` in, return whole frames."""
        frames = []
        data = memoryview(data).cast("B")
        while data:
            buf = self.get_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            del buf  # no view kept: a growing frame buffer is then resized in place
            self.buffer_updated(n)
            data = data[n:]
            while (f := self.next_frame()) is not None:
                frames.append(f)
        return frames

    @property
    def reserved(self) -> int:
        """Bytes of buffer held for the large frame being received (0 if none)."""
        big = self._big
        if big is None:
            return 0
        return big.capacity if isinstance(big, GrowingBuffer) else len(big)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return (self._end - self._start) + (self._big_pos if self._big is not None else 0)

    # -- parsing ------------------------------------------------------------
    def next_frame(self) -> Frame | None:
        """The next complete, verified frame, or None if more bytes are needed.

        Raises ``ProtocolError`` (or ``FrameTooLarge``) for a bad frame; the
        connection must then be closed, nothing more from it is trustworthy.
        """
        tag_size = self._tag_size()
        if self._big is not None:
            if not self._awaiting_tag or self._end - self._start < tag_size:
                return None
            frame = self._finish_big(tag_size)
            return frame
        start = self._start
        avail = self._end - start
        if avail < HEADER_SIZE:
            self._maybe_reset()
            return None
        view = self._view
        header = view[start : start + HEADER_SIZE]
        kind, ctl_len, body_len = self._check_header(header)
        total = HEADER_SIZE + body_len + tag_size
        if avail >= total:
            b0 = start + HEADER_SIZE
            b1 = b0 + ctl_len
            b2 = b0 + body_len
            if tag_size:
                mac = self._start_mac(header, body_len)
                mac.update(view[b0:b2])
                self._verify(mac, view[b2 : b2 + tag_size])
            ctl = bytes(view[b0:b1])
            if body_len - ctl_len >= ALIGN_MIN:  # may hold an array: align its payload
                payload = aligned_buffer(body_len - ctl_len, 0)
                payload[:] = view[b1:b2]
            else:
                payload = memoryview(bytes(view[b1:b2]))
            self._start += total
            self._maybe_reset()
            return Frame(kind, ctl, payload)
        if body_len > BIG_BODY:
            self._begin_big(header, kind, ctl_len, body_len)
            return None
        if total > len(self._buf):  # a small frame, larger than the buffer so far
            self._grow(STAGING_SIZE)
        elif self._start + total > len(self._buf):
            self._compact()
        return None

    def _tag_size(self) -> int:
        return TAG_SIZE if (self.key is not None and not self.trusted) else 0

    def _check_header(self, header: bytes) -> tuple[int, int, int]:
        magic, version, kind, flags, ctl_len, body_len = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError(
                f"not a dispy peer: frame starts with {magic!r}, expected {MAGIC!r}"
            )
        if version != LAYOUT_VERSION:
            raise ProtocolError(f"unknown frame layout version {version} (this side speaks 1)")
        if flags != 0:
            raise ProtocolError(f"frame has unknown flags 0x{flags:04x}")
        full = (self.key is not None or self.trusted) and not self.limited
        limit = self.max_body if full else self.max_body_unauth
        if body_len > limit:
            raise FrameTooLarge(
                f"frame of {body_len} bytes exceeds the limit of {limit} bytes"
                + ("" if full else " before authentication")
            )
        if ctl_len > body_len:
            raise ProtocolError(f"control part ({ctl_len} bytes) longer than body ({body_len})")
        if ctl_len > self.max_ctl:
            raise FrameTooLarge(
                f"control part of {ctl_len} bytes exceeds the limit of {self.max_ctl} bytes"
            )
        return kind, ctl_len, body_len

    def _begin_big(self, header: bytes, kind: int, ctl_len: int, body_len: int) -> None:
        have = min(self._end - self._start - HEADER_SIZE, body_len)
        b0 = self._start + HEADER_SIZE
        received = self._view[b0 : b0 + have]
        if body_len > GROW_ABOVE:  # reserved as the bytes arrive, not on the header's word
            big = GrowingBuffer(body_len, ctl_len)
            with big.view(0, have) as start:
                start[:] = received
        else:
            big = aligned_buffer(body_len, ctl_len)
            big[:have] = received
        mac = None
        if self._tag_size():
            mac = self._start_mac(header, body_len)
            mac.update(received)
        self._big, self._big_pos, self._big_head, self._big_mac = big, have, (kind, ctl_len), mac
        self._awaiting_tag = have == body_len
        self._start = b0 + have
        self._maybe_reset()

    def _finish_big(self, tag_size: int) -> Frame:
        big, (kind, ctl_len), mac = self._big, self._big_head, self._big_mac
        if tag_size:
            self._verify(mac, self._view[self._start : self._start + tag_size])
            self._start += tag_size
        self._big = self._big_head = self._big_mac = None
        self._big_pos = 0
        self._awaiting_tag = False
        self._maybe_reset()
        if isinstance(big, GrowingBuffer):
            with big.view(0, ctl_len) as ctl:
                return Frame(kind, bytes(ctl), big.view(ctl_len, big.size))
        return Frame(kind, bytes(big[:ctl_len]), big[ctl_len:])

    def _verify(self, mac, tag) -> None:
        if not hmac.compare_digest(mac.digest(), bytes(tag)):
            raise ProtocolError(
                f"frame {self.seq} failed authentication (tampered, replayed, reordered, "
                "or sent with another key)"
            )
        self.seq += 1

    def _maybe_reset(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
