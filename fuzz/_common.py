"""What the fuzz targets share with ``run.py``: keys, recorded sessions, seeds.

Everything here is deterministic (fixed keys and nonces), so the seed
corpus that ``run.py`` writes and the expectations a target checks against
are the same bytes in every process.

Input layout of ``fuzz_frames.py``::

    byte 0    bits 0-2: what is fed: 0 a server Connection, 1 a client
              Connection, 2 a bare FrameDecoder with a key, 3 a trusted one
              (no tags: the node's local channels), 4 one before
              authentication (no key), 5-7 all five;
              bit 3: small geometry for this input (see SMALL_GEOMETRY): the
              thresholds of the frame decoder are lowered, so the path of
              large frames (received in a buffer of their own, tag checked
              incrementally) and the compaction of a full staging buffer are
              reached with inputs of a few KiB
    byte 1    number of read sizes that follow, minus one (low 3 bits)
    ...       the read sizes, one byte each, cycled: 0 = as much as the
              buffer takes, n = 1 + n*n // 8 bytes; after MAX_READS reads
              the rest goes in as fast as the buffers take it (so an input
              costs at most a few hundred reads)
    rest      the stream

Input layout of ``fuzz_datagram.py``: up to 8 records, each
``now offset u8 | length u16 | datagram``, decoded in turn by one
``DatagramDecoder`` (a cache of 4 nonces) at ``NOW + (offset - 128) / 2``
seconds; a short last record takes what is left.
"""

from __future__ import annotations

import hmac
import os
import struct
import sys

import msgpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dispy.errors import AuthenticationFailed, ProtocolError  # noqa: E402
from dispy.protocol import (  # noqa: E402
    Connection,
    DatagramKind,
    FrameEncoder,
    Kind,
    Message,
    _connection,
    _framing,
    derive_key,
    encode_datagram,
    pack_ctl,
)

ALLOWED = (ProtocolError, AuthenticationFailed)
KEY = derive_key("fuzz-secret")
SERVER_NONCE = bytes(range(_connection.NONCE_SIZE))
CLIENT_NONCE = bytes(range(100, 100 + _connection.NONCE_SIZE))
DECODER_KEY = bytes(range(200, 232))
#: Limits of the fuzzed connections: a mutated length field must not allocate 4 GiB.
MAX_FRAME = 1 << 20
MAX_CTL = 1 << 16
#: _framing's sizes when the SMALL bit of the selector is set.  They keep its invariant
#: (the staging buffer holds any small frame: STAGING_SIZE > BIG_BODY + 20 + 32);
#: what changes is that frames above 512 bytes, even unauthenticated ones, take
#: the big-frame path, which production sizes reach only with 128 KiB frames.
SMALL_GEOMETRY = {"BIG_BODY": 512, "STAGING_SIZE": 1024, "UNAUTH_STAGING_SIZE": 768}
PRODUCTION_GEOMETRY = {name: getattr(_framing, name) for name in SMALL_GEOMETRY}


def set_geometry(small: bool) -> None:
    """Set _framing's sizes (read when a decoder is made and as it parses)."""
    for name, value in (SMALL_GEOMETRY if small else PRODUCTION_GEOMETRY).items():
        setattr(_framing, name, value)


SERVER, CLIENT, DECODER, TRUSTED, UNKEYED, ALL = range(6)
SMALL = 8  # the selector bit of the small geometry
MAX_READS = 256


# -- frames ---------------------------------------------------------------------
def connection(role: str) -> Connection:
    """A connection with a fixed nonce, so a recorded stream replays to it."""
    conn = Connection(role, KEY, max_frame=MAX_FRAME, max_ctl=MAX_CTL)
    conn._nonce = SERVER_NONCE if role == "server" else CLIENT_NONCE
    if role == "server":
        conn.initiate()
        conn.take_output()
    return conn


def norm(ev):
    if isinstance(ev, Message):
        return ("msg", ev.kind, ev.ctl, bytes(ev.payload))
    return ev


C2S = [
    (Kind.INFO_REQ, {}, []),
    (Kind.JOBS, {"ids": [1, 2], "s": [3, 4]}, [b"abc", b"defg"]),
    (Kind.PING, {"t": 1.5}, []),
    (Kind.FILE, {"name": "data.bin"}, [bytes(range(256)) * 3]),  # big when BIG_BODY is lowered
    (Kind.ACK, {"ids": [1]}, []),
    (Kind.JOBS, {"s": [300, -12, 400]}, [b"j" * 300, bytes(12), b"k" * 400]),
    (Kind.FILE, {"name": "aligned"}, [b"\x00" * 5, bytes(range(256)) * 5]),  # >= ALIGN_MIN
    (Kind.CLOSE, {}, []),
    # many small frames of assorted sizes: with any read sizes, some frame boundary
    # falls a few bytes short of the end of the staging buffer
    *((Kind.PING, {"n": i, "x": "x" * (i * 7 % 29)}, []) for i in range(24)),
]
S2C = [
    (Kind.INFO, {"name": "node-1", "cpus": 4, "mem": 2**40}, []),
    (Kind.RESULTS, {"s": [5]}, [b"hello"]),
    (Kind.STATUS, {"p": None}, [bytes(600)]),
    (Kind.PONG, {}, []),
    (Kind.ERROR, {"r": "no such job"}, []),
    *((Kind.PONG, {"n": i}, [b"y" * (i * 11 % 37)]) for i in range(24)),
]


def record_session():
    """Run a whole session between fixed-nonce peers.

    Returns (c2s frames, s2c frames, events at the server, events at the client),
    frames as bytes in order (handshake first), events normalised.
    """
    server = Connection("server", KEY, max_frame=MAX_FRAME, max_ctl=MAX_CTL)
    client = Connection("client", KEY, max_frame=MAX_FRAME, max_ctl=MAX_CTL)
    server._nonce, client._nonce = SERVER_NONCE, CLIENT_NONCE
    server.initiate()
    s2c, c2s, at_server, at_client = [], [], [], []

    def move(src, dst, frames, events):
        data = b"".join(bytes(b) for b in src.take_output())
        frames.append(data)
        events.extend(norm(e) for e in dst.receive(data))

    move(server, client, s2c, at_client)  # HELLO
    move(client, server, c2s, at_server)  # AUTH
    move(server, client, s2c, at_client)  # AUTH_OK
    for kind, ctl, payload in C2S:
        client.send(kind, ctl, payload)
        move(client, server, c2s, at_server)
    for kind, ctl, payload in S2C:
        server.send(kind, ctl, payload)
        move(server, client, s2c, at_client)
    return c2s, s2c, at_server, at_client


def evil_tails(conn: Connection) -> list[bytes]:
    """Frames that a peer holding the key could send next, each of which must be refused."""
    out = []
    for kind, ctl in [
        (Kind.HELLO, pack_ctl({"p": "dispy", "v": [1, 1], "n": SERVER_NONCE})),
        (Kind.AUTH_FAIL, pack_ctl({"r": "late"})),
        (Kind.PING, b"\xc1"),  # control part not msgpack
        (Kind.PING, b"\x92\x01\x02"),  # not a map
        (Kind.PING, b"\x81\x01\x02"),  # a key that is not a string
        (Kind.PING, b"\x80\x80"),  # trailing bytes
    ]:
        seq = conn.encoder.seq
        out.append(b"".join(bytes(b) for b in conn.encoder.encode(kind, ctl)))
        conn.encoder.seq = seq
    return out


def handshake_variants() -> dict[int, list[bytes]]:
    """Unauthenticated handshake streams that end in a refusal, per role fed."""
    plain = FrameEncoder()

    def frame(kind, ctl, payload=()):
        return b"".join(bytes(b) for b in plain.encode(kind, pack_ctl(ctl), payload))

    hello = frame(Kind.HELLO, {"p": "dispy", "v": [1, 1], "n": SERVER_NONCE})
    auth = {"v": 1, "n": CLIENT_NONCE, "m": bytes(32)}
    return {
        CLIENT: [
            hello + frame(Kind.AUTH_FAIL, {"r": "wrong secret"}),
            frame(Kind.HELLO, {"p": "dispy", "v": [2, 3], "n": SERVER_NONCE}),
            frame(Kind.HELLO, {"p": "other", "v": [1, 1], "n": SERVER_NONCE}),
            frame(Kind.HELLO, {"p": "dispy", "v": [1, True], "n": SERVER_NONCE}),
            hello + frame(Kind.AUTH_OK, {"m": bytes(32)}),
            hello + frame(Kind.HELLO, {"p": "dispy", "v": [1, 1], "n": SERVER_NONCE}),
            frame(Kind.PING, {}),
            frame(Kind.HELLO, {}, [b"payload"]),
        ],
        SERVER: [
            frame(Kind.AUTH, auth),
            frame(Kind.AUTH, {**auth, "v": 7}),
            frame(Kind.AUTH, {**auth, "n": b"short"}),
            frame(Kind.AUTH_FAIL, {"r": "no"}),
            frame(Kind.AUTH_OK, {"m": bytes(32)}),
        ],
    }


def plain_frames() -> list[bytes]:
    """The session's messages as untagged frames (as a trusted channel carries them)."""
    enc = FrameEncoder()
    return [
        b"".join(bytes(b) for b in enc.encode(kind, pack_ctl(ctl), payload))
        for kind, ctl, payload in C2S + S2C
    ]


def decoder_frames():
    """Frames tagged under DECODER_KEY from sequence number 0, and what they decode to."""
    enc = FrameEncoder()
    enc.key = DECODER_KEY
    frames, expected = [], []
    for kind, ctl, payload in C2S + S2C:
        ctl_bytes = pack_ctl(ctl)
        frames.append(b"".join(bytes(b) for b in enc.encode(kind, ctl_bytes, payload)))
        expected.append((int(kind), ctl_bytes, b"".join(payload)))
    return frames, expected


def frames_input(selector: int, sizes: list[int], stream: bytes) -> bytes:
    assert 1 <= len(sizes) <= 8
    return bytes([selector, len(sizes) - 1, *sizes]) + stream


def frames_seeds() -> list[bytes]:
    c2s, s2c, _, _ = record_session()
    tails = _session_tails()
    dec, _ = decoder_frames()
    streams = {
        SERVER: c2s,
        CLIENT: s2c,
        DECODER: dec,
    }
    sizes = [[0], [1], [20, 7, 3], [90, 255, 31], [200]]
    seeds = []
    for target, frames in streams.items():
        for small_big in (0, SMALL):
            for i, sz in enumerate(sizes):
                seeds.append(frames_input(target | small_big, sz, b"".join(frames)))
                # prefixes: the handshake alone, the handshake and one message
                seeds.append(frames_input(target | small_big, sz, b"".join(frames[: 1 + i % 4])))
    seeds.append(frames_input(ALL, [0], b"".join(c2s)))
    seeds.append(frames_input(ALL | SMALL, [40, 3], b"".join(s2c)))
    plain = plain_frames()
    for target in (TRUSTED, UNKEYED):
        for small_big in (0, SMALL):
            for i, sz in enumerate(sizes):
                seeds.append(frames_input(target | small_big, sz, b"".join(plain[i:])))
    for target, frames in ((SERVER, c2s), (CLIENT, s2c)):
        for i, tail in enumerate(tails[target]):
            seeds.append(frames_input(target | (i & 1) * SMALL, [0], b"".join(frames) + tail))
    for target, streams in handshake_variants().items():
        for i, stream in enumerate(streams):
            seeds.append(frames_input(target, [0] if i & 1 else [3, 1], stream))
    # headers at the limits: a body of exactly MAX_FRAME (received in place, in an
    # uninitialised buffer), a control part over MAX_CTL
    for ctl_len, body_len in ((0, MAX_FRAME), (MAX_CTL + 1, MAX_CTL + 10), (10, MAX_FRAME + 1)):
        head = _framing.HEADER.pack(_framing.MAGIC, 1, Kind.PING, 0, ctl_len, body_len)
        seeds.append(frames_input(DECODER, [0], head + bytes(300)))
    # handshake frames padded past the lowered BIG_BODY: the whole session still works
    plain = FrameEncoder()
    hello = {"p": "dispy", "v": [1, 1], "n": SERVER_NONCE, "pad": b"h" * 700}
    padded = b"".join(bytes(b) for b in plain.encode(Kind.HELLO, pack_ctl(hello)))
    seeds.append(frames_input(CLIENT | SMALL, [0], padded + b"".join(s2c[1:])))
    seeds.append(frames_input(CLIENT | SMALL, [50, 9], padded + b"".join(s2c[1:])))
    auth = msgpack.unpackb(_unframe(c2s[0]))
    padded = b"".join(
        bytes(b) for b in plain.encode(Kind.AUTH, pack_ctl({**auth, "pad": "a" * 900}))
    )
    seeds.append(frames_input(SERVER | SMALL, [0], padded + b"".join(c2s[1:])))
    return seeds


def _unframe(frame: bytes) -> bytes:
    """The control part of one untagged frame."""
    *_, ctl_len, _ = _framing.HEADER.unpack_from(frame)
    return frame[_framing.HEADER_SIZE : _framing.HEADER_SIZE + ctl_len]


def _session_tails() -> dict[int, list[bytes]]:
    """evil_tails() of each side at the end of the recorded session."""
    server = Connection("server", KEY, max_frame=MAX_FRAME, max_ctl=MAX_CTL)
    client = Connection("client", KEY, max_frame=MAX_FRAME, max_ctl=MAX_CTL)
    server._nonce, client._nonce = SERVER_NONCE, CLIENT_NONCE
    server.initiate()
    client.receive(b"".join(bytes(b) for b in server.take_output()))
    server.receive(b"".join(bytes(b) for b in client.take_output()))
    client.receive(b"".join(bytes(b) for b in server.take_output()))
    client.encoder.seq, server.encoder.seq = len(C2S), len(S2C)
    return {SERVER: evil_tails(client), CLIENT: evil_tails(server)}


# -- datagrams ------------------------------------------------------------------
NOW = 1_700_000_000.0
CACHE_SIZE = 4
_RECORD = struct.Struct("!BH")


def _raw_datagram(kind: int, body: bytes, ts_ms: int, nonce: bytes) -> bytes:
    """A datagram with a correct tag around whatever is given (to reach the body checks)."""
    from dispy.protocol._datagram import HEADER, LAYOUT_VERSION, MAGIC, datagram_key

    signed = HEADER.pack(MAGIC, LAYOUT_VERSION, kind, ts_ms, nonce) + body
    return signed + hmac.digest(datagram_key(KEY), signed, "sha256")


def datagrams() -> dict[bytes, tuple[float, tuple | None]]:
    """Datagrams tagged under KEY: each maps to (its timestamp minus NOW, (kind, body)),
    or to (0, None) if it is malformed under its tag."""
    return {data: (offset, expected) for data, offset, expected in _datagram_table()}


def _datagram_table() -> list[tuple[bytes, float, tuple | None]]:
    """(datagram, its timestamp minus NOW, (kind, body) if well-formed else None)."""
    table = []
    bodies = [
        {},
        {"name": "node-1", "port": 51348, "cpus": 8, "addrs": ["10.0.0.5", "::1"]},
        {"via": "relay", "inner": [1, {"x": None, "y": b"\x00\x01"}], "t": 1.5, "neg": -7},
        {"pad": b"p" * 1300},  # near the size limit
    ]
    n = 0
    for offset in (0, -50, 50, -10, 10, -70, 70):
        for kind in DatagramKind:
            for body in bodies if offset == 0 else bodies[:2]:
                n += 1
                data = encode_datagram(
                    kind, body, KEY, now=NOW + offset, nonce=n.to_bytes(16, "big")
                )
                table.append((data, offset, (kind, body)))
    ms = int(NOW * 1000)
    raw = [(1, body) for body in (b"\xc1", b"\x81\xa1x", b"\x92\x01\x02", b"\x81\x01\x02")]
    raw += [
        (1, b"\x80\x80"),
        (1, b"\x81\xc4\x01k\x01"),
        (1, b"\x81\xa1x" + b"\x91" * 1200 + b"\xc0"),
    ]
    raw += [(kind, b"\x80") for kind in (0, 4, 255)]
    raw += [(2, pack_ctl({"pad": b"q" * 1400}))]  # over the size limit
    for kind, body in raw:
        n += 1
        table.append((_raw_datagram(kind, body, ms, n.to_bytes(16, "big")), 0, None))
    return table


def _valid_at(offset: float) -> list[bytes]:
    """Well-formed datagrams stamped NOW + offset."""
    return [d for d, o, expected in _datagram_table() if o == offset and expected is not None]


def datagram_input(records) -> bytes:
    """``records``: (now offset in seconds, datagram) pairs."""
    out = b""
    for seconds, data in records:
        out += _RECORD.pack(max(0, min(255, round(seconds * 2) + 128)), len(data)) + data
    return out


def parse_datagram_input(data: bytes):
    """Yield (now, datagram) records from a fuzz input (see the module doc)."""
    pos = 0
    for _ in range(8):
        if len(data) - pos < _RECORD.size:
            return
        offset, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        yield NOW + (offset - 128) / 2, data[pos : pos + length]
        pos += length


def datagram_seeds() -> list[bytes]:
    table = _datagram_table()
    now0, past, future = _valid_at(0), _valid_at(-50), _valid_at(50)
    seeds = [datagram_input([(0, d)]) for d, _, _ in table]
    seeds += [
        datagram_input([(0, now0[0]), (0, now0[0])]),  # a replay
        datagram_input([(0, d) for d in now0[:7]] + [(0, now0[1])]),  # a full cache
        datagram_input([(-10, past[0]), (20, now0[0]), (-10, past[0])]),  # expiry, then floor
        datagram_input([(10, future[0]), (-10, past[1]), (30, now0[2]), (30, future[0])]),
        datagram_input([(63, past[0]), (-64, future[0])]),  # stale, future
        b"",
    ]
    return seeds
