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

Input layout of ``fuzz_node_handlers.py`` and ``fuzz_scheduler_handlers.py``:
up to MAX_MESSAGES records, each ::

    kind u8 | ctl_len u16 | ctl (msgpack) | payload_len u16 | payload

(big-endian lengths; a length past the end takes what is left).  The kind
byte ``b`` is ``SESSION_KINDS[b % 16]`` below 0xF0 (the ten kinds a client
sends a node, then five it never sends: INFO, RESULTS, ERROR, W_RESULT and
31), else ``b`` itself (an unknown kind).

Input layout of ``fuzz_http.py``: the bytes a browser would send on one
connection (request line, headers, body), as they are.

Input layout of ``fuzz_config.py``: the content of a ``--config`` file, as it is.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
import re
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


# -- client sessions (node_handlers, scheduler_handlers) ------------------------------
#: The kinds of the kind byte's low 4 bits: what a client sends a node, then kinds a
#: client never sends (a node's replies, a job process's, one not defined).
SESSION_KINDS = (
    Kind.INFO_REQ,
    Kind.COMPUTE,
    Kind.FILE,
    Kind.JOBS,
    Kind.ACK,
    Kind.CANCEL,
    Kind.CLOSE,
    Kind.PING,
    Kind.DATA,
    Kind.RESUME,
    Kind.INFO,
    Kind.RESULTS,
    Kind.ERROR,
    Kind.W_RESULT,
    31,
    Kind.INFO_REQ,  # (16 slots: the most common request twice)
)
MAX_MESSAGES = 24
_U16 = struct.Struct("!H")


def session_kind(byte: int) -> int:
    return int(SESSION_KINDS[byte % 16]) if byte < 0xF0 else byte


def session_input(messages) -> bytes:
    """``messages``: (kind, control map or raw bytes, payload bytes) triples."""
    out = b""
    for kind, ctl, payload in messages:
        byte = SESSION_KINDS.index(kind) if kind in SESSION_KINDS else kind
        raw = ctl if isinstance(ctl, bytes) else pack_ctl(ctl)
        out += bytes([byte]) + _U16.pack(len(raw)) + raw + _U16.pack(len(payload)) + payload
    return out


def parse_session_input(data: bytes):
    """Yield (kind, control bytes, payload bytes) from a fuzz input (see the module doc)."""
    pos, end = 0, len(data)
    for _ in range(MAX_MESSAGES):
        if pos >= end:
            return
        kind = session_kind(data[pos])
        pos += 1
        n = _U16.unpack_from(data, pos)[0] if end - pos >= 2 else 0
        pos += 2
        ctl = data[pos : pos + n]
        pos += n
        n = _U16.unpack_from(data, pos)[0] if end - pos >= 2 else 0
        pos += 2
        payload = data[pos : pos + n]
        pos += n
        yield kind, ctl, payload


#: The handler targets' node (and scheduler) limit on a file's size.
MAX_FILE_SIZE = 4096
CID = "c0ffee42"


def _jobs(cid: str, entries, segs) -> tuple:
    lens = [len(s) for s in segs]
    return (Kind.JOBS, {"c": cid, "j": entries, "s": lens}, b"".join(segs))


def session_seeds(scheduler: bool = False) -> list[bytes]:
    """Valid requests of every kind, alone and in the orders a client sends them, and
    some that must be refused."""
    c = CID
    file1 = (Kind.FILE, {"c": c, "n": "compute", "p": "data/in.txt", "m": 0o640}, b"a" * 100)
    file2 = (Kind.FILE, {"c": c, "n": "compute", "p": "data/in.txt", "o": 100}, b"b" * 60)
    compute = (Kind.COMPUTE, {"c": c, "n": "compute", "sa": 5}, b"\x80\x05specN.args.")
    if scheduler:
        compute = (
            Kind.COMPUTE,
            {"c": c, "n": "compute", "sa": 5, "x": False, "r": True, "np": ["127.0.0.*", "n1"]},
            b"\x80\x05specN.args.",
        )
    jobs = _jobs(c, [[1, 1], [2, 2, {"t": 5}], [3, 2, {"f": [["dep.txt", 0o644]]}]],
                 [b"N.", b"ab", b"cd", b"dep", b"ef"])  # fmt: skip
    pinned = _jobs(c, [[4, 1, {"n": "127.0.0.2"}], [5, 1, {"n": "nowhere:1"}]], [b"N.", b"N."])
    padded = (Kind.JOBS, {"c": c, "j": [[6, 2]], "s": [4, -60, 3]}, b"abcd" + bytes(60) + b"efg")
    ack = (Kind.ACK, {"c": c, "j": [1, 2, 3]}, b"")
    cancel = (Kind.CANCEL, {"c": c, "j": [2, 3, 99]}, b"")
    data = (Kind.DATA, {"c": c, "n": "table", "v": 1, "s": [4, 3], "t": 7}, b"\x80\x05N.xyz")
    close = (Kind.CLOSE, {"c": c, "t": False}, b"")
    close_t = (Kind.CLOSE, {"c": c, "t": True}, b"")
    resume = (Kind.RESUME, {"c": c}, b"")
    info = (Kind.INFO_REQ, {}, b"")
    info_pulse = (Kind.INFO_REQ, {"pulse": 5.0}, b"")
    ping = (Kind.PING, {"t": 1.5}, b"")
    sessions = [
        [info],
        [info_pulse, ping],
        [ping],
        [file1],
        [file1, file2, compute, jobs, ack, close],
        [compute, jobs, cancel, ack, data, close_t],
        [compute, data, pinned, padded, resume, close],
        [jobs, ack, jobs, cancel],
        [resume],
        [file1, resume, close],
        [compute, compute, close, resume],
        [info, file1, file2, compute, jobs, data, ack, cancel, resume, ping, close],
        # refused: too big, leaving the folder, bad ids, bad segment lengths
        [(Kind.FILE, {"c": c, "p": "big.bin"}, bytes(MAX_FILE_SIZE + 1))],
        [(Kind.FILE, {"c": c, "p": "x", "o": MAX_FILE_SIZE}, b"z")],
        [(Kind.FILE, {"c": c, "p": "../outside.txt"}, b"x")],
        [(Kind.FILE, {"c": c, "p": "/tmp/outside.txt"}, b"x")],
        [(Kind.FILE, {"c": c, "p": "sub/../../x"}, b"x")],
        [(Kind.FILE, {"c": "not/alnum", "p": "x"}, b"x")],
        [(Kind.COMPUTE, {"c": "x" * 65, "n": "n"}, b"")],
        [(Kind.COMPUTE, {"c": c, "n": "compute", "sa": 99}, b"short")],
        [(Kind.JOBS, {"c": c, "j": [[1, 1]], "s": [5]}, b"abc")],
        [(Kind.JOBS, {"c": c, "j": [[1, 0]], "s": []}, b"")],
        [(Kind.JOBS, {"c": c, "j": [[1, 1, []]], "s": [1]}, b"x")],
        [(Kind.DATA, {"c": c, "n": ".hidden", "v": 1, "s": [1]}, b"x")],
        [(Kind.ACK, {"c": c, "j": []}, b""), (Kind.CANCEL, {"c": "other", "j": [1]}, b"")],
        [(Kind.INFO_REQ, {"pulse": -1}, b""), (Kind.INFO_REQ, {"pulse": True}, b"")],
        # kinds a client never sends, and a control part that is not a map
        [(Kind.INFO, {}, b""), ping],
        [(Kind.RESULTS, {"r": [], "s": []}, b"")],
        [(0xF7, {}, b"")],
        [(Kind.PING, b"\x92\x01\x02", b"")],
    ]
    return [session_input(s) for s in sessions]


def node_seeds() -> list[bytes]:
    return session_seeds(scheduler=False)


def scheduler_seeds() -> list[bytes]:
    return session_seeds(scheduler=True)


# -- the HTTP monitor ---------------------------------------------------------------
#: The token of the monitor that fuzz_http.py builds, and its port (the cookie's name).
HTTP_TOKEN = "fuzz-Token_0123456789.abc~XYZ"
HTTP_PORT = 8181
HTTP_COOKIE = f"dispy_token_{HTTP_PORT}"


def _request(line: str, headers=(), body: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    head = [line, *(f"{k}: {v}" for k, v in headers)]
    if body and not any(k.lower() == "content-length" for k, _ in headers):
        head.append(f"Content-Length: {len(body)}")
    return eol.join(h.encode("latin-1") for h in head) + eol + eol + body


def http_seeds() -> list[bytes]:
    t = HTTP_TOKEN
    cookie = ("Cookie", f"other=1; {HTTP_COOKIE}={t}")
    bearer = ("Authorization", f"Bearer {t}")
    xtoken = ("X-Dispy-Token", t)
    host = ("Host", "127.0.0.1:8181")
    json_ = ("Content-Type", "application/json")
    seeds = [
        _request("GET / HTTP/1.1", [host]),
        _request(f"GET /?token={t} HTTP/1.1", [host]),
        _request(f"GET /?token={t}x&token=a HTTP/1.1", [host]),
        _request("GET /?token= HTTP/1.0"),
        _request("GET / HTTP/1.1", [host, cookie]),
        _request("GET / HTTP/1.1", [host, bearer, ("Connection", "keep-alive")]),
        _request("GET /api/status HTTP/1.1", [host, bearer]),
        _request("GET /api/status HTTP/1.1", [host, cookie]),
        _request("GET /api/status HTTP/1.1", [host]),
        _request("GET /api/status?token=" + t + " HTTP/1.1", [host]),
        _request("GET /api/status HTTP/1.1", [host, ("Cookie", f"{HTTP_COOKIE}=wrong")]),
        _request("GET /api/status HTTP/1.1", [host, ("Authorization", "Basic abc")]),
        _request("GET /static/monitor.js HTTP/1.1", [host, cookie]),
        _request("GET /static/monitor.css HTTP/1.1", [host, bearer]),
        _request("GET /static/../httpd.py HTTP/1.1", [host, bearer]),
        _request("GET /static/%2e%2e%2fhttpd.py HTTP/1.1", [host, bearer]),
        _request("GET /static/index.html HTTP/1.1", [host, bearer]),
        _request("GET /elsewhere HTTP/1.1", [host, bearer]),
        _request("GET //api/status HTTP/1.1", [host, bearer]),
        _request("POST /api/cancel HTTP/1.1", [host, bearer, json_], b'{"uid": 1}'),
        _request("POST /api/cancel HTTP/1.1", [host, cookie, xtoken, json_], b'{"uid": 3}'),
        _request("POST /api/cancel HTTP/1.1", [host, cookie, json_], b'{"uid": 1}'),
        _request("POST /api/cancel HTTP/1.1", [host, json_], b'{"uid": 1}'),
        _request("POST /api/cancel HTTP/1.1", [host, bearer], b'{"uid": true}'),
        _request("POST /api/cancel HTTP/1.1", [host, bearer], b'{"uid": 123456789}'),
        _request(
            "POST /api/node HTTP/1.1",
            [host, bearer],
            b'{"node": "127.0.0.2:51348", "action": "deallocate"}',
        ),
        _request(
            "POST /api/node HTTP/1.1", [host, bearer], b'{"node": "node-a", "action": "close"}'
        ),
        _request("POST /api/node HTTP/1.1", [host, bearer], b'{"node": "x", "action": "y"}'),
        _request("POST /api/node HTTP/1.1", [host, bearer], b"[1, 2]"),
        _request("POST /api/node HTTP/1.1", [host, bearer], b"\xff\xfe"),
        _request("POST /api/nothing HTTP/1.1", [host, bearer], b"{}"),
        _request("POST /api/cancel HTTP/1.1", [host, bearer]),
        _request("POST /api/cancel HTTP/1.1", [host, bearer, ("Content-Length", "-1")]),
        _request("POST /api/cancel HTTP/1.1", [host, bearer, ("Content-Length", "99999")]),
        _request("POST /api/cancel HTTP/1.1", [host, bearer, ("Content-Length", "4")], b"{}"),
        _request("HEAD / HTTP/1.1", [host, bearer]),
        _request("PUT /api/cancel HTTP/1.1", [host, bearer]),
        _request("GET / HTTP/2.0", [host]),
        _request("GET / HTTP/1.1 extra", [host]),
        _request("GET / FOO/1.1", [host]),
        _request("GET /", []),
        _request("GET / HTTP/1.1", [host, ("X-Long", "a" * 3000)]),
        _request("GET / HTTP/1.1", [host, bearer], eol=b"\n"),
        b"GET\r\n\r\n",
        b"\r\n",
        b"",
    ]
    return seeds


# -- --config files -----------------------------------------------------------------
CONFIG_SEEDS = [
    # dispynode
    'cpus = 4\nnode_port = 51348\nname = "node-1"\nip_addr = ["127.0.0.1", "::1"]\n'
    'zombie_interval = 60.0\ndest_path = "/tmp/dispy"\nsecret_file = "/etc/dispy.key"\n'
    "max_file_size = 1048576\nserve = -1\ndaemon = true\nno_discovery = false\n"
    'service_start = "08:00"\nservice_stop = "18:30"\nhandshake_timeout = 10.0\n',
    'certfile = "node.pem"\nkeyfile = "node.key"\ncafile = "ca.pem"\nclient_port = 51347\n'
    'scheduler_host = "sched.example"\nipv4_udp_multicast = true\nmax_unauth = 128\n',
    # dispyscheduler
    'nodes = ["127.0.0.2", "10.0.0.*"]\nport = 51349\nnode_port = 51348\n'
    'node_secret_file = "/etc/n.key"\ncluster_secret_file = "/etc/c.key"\n'
    "pulse_interval = 2.0\nping_interval = 30.0\nhttpd = true\nhttpd_port = 8181\n"
    'httpd_host = "127.0.0.1"\nfair_cluster_scheduler = true\ndest_path = "/tmp/s"\n',
    # refused: secrets, unknown or unsaved options, wrong types, a table
    'secret = "hunter2"\n',
    'node_secret = "hunter2"\n',
    'cluster_secret = "x"\nadmin_secret = "y"\n',
    'config = "other.toml"\n',
    'policy = "fair"\n',
    "msg_timeout = 5\n",
    "no_such_option = 1\n",
    'cpus = "4"\n',
    "zombie_interval = 5\n",
    "cpus = 4.5\n",
    "port = 1e3\n",
    "[node]\ncpus = 1\n",
    "cpus = 2\ncpus = 3\n",
    'ip_addr = "127.0.0.1"\n',
    'name = { first = "a", second = [1, 2.5, true] }\n',
    "dest_path = 1979-05-27T07:32:00Z\n",
    'name = """multi\nline"""\nsecret_file = \'C:\\keys\\k\'\n',
    "cpus = 0x10\nmax_file_size = 1_000_000\n",
    "# only a comment\n",
    "",
    "cpus = \n",
    'name = "caf\u00e9 \\u00e9"\n',
]


def config_seeds() -> list[bytes]:
    # and a file that is not UTF-8
    return [s.encode() for s in CONFIG_SEEDS] + [b'name = "caf\xe9"\n']


# -- a mutator that knows the session layout ------------------------------------------
#: The control fields the handlers read, and values worth trying in them.
CTL_KEYS = ("c", "n", "p", "o", "m", "sa", "j", "s", "t", "v", "f", "z", "x", "r", "np", "pulse")
ODD_VALUES = (
    None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.5,
    float("nan"), float("inf"), -0.0, "", CID, "other1", "x" * 65, "a/b", "../x", "/tmp/x",
    ".", "a\x00b", b"", b"\x00\x01", [], {}, [0], [1, 1], [[1, 1]], [[1, 1, {}]],
    [[2, 1, {"t": 1}]], [[3, 2, {"f": [["f.txt", 420]]}]], [[1]], [{}], {"t": 1}, {"m": 1},
    msgpack.ExtType(1, b"x"),
)  # fmt: skip


def _containers(value, out: list) -> list:
    """The maps and lists in ``value`` (itself included), depth first."""
    if isinstance(value, dict | list):
        out.append(value)
        for v in value.values() if isinstance(value, dict) else value:
            _containers(v, out)
    return out


def _mutate_message(rng, msgs: list) -> None:
    msg = msgs[rng.randrange(len(msgs))]
    op = rng.randrange(9)
    if not isinstance(msg[1], dict):  # not a map (or not msgpack): start one
        msg[1] = {}
        op = 1
    places = _containers(msg[1], [])
    if op == 0 and msg[1]:  # drop a field
        del msg[1][rng.choice(list(msg[1]))]
    elif op == 1:  # set a field the handlers read
        msg[1][rng.choice(CTL_KEYS)] = _odd(rng)
    elif op == 2:  # replace a value anywhere (a job entry's id, a length, an option...)
        place = rng.choice(places)
        if place:
            key = rng.choice(list(place)) if isinstance(place, dict) else rng.randrange(len(place))
            place[key] = _odd(rng)
    elif op == 3:  # a list grows or shrinks (jobs, lengths, ids)
        lists = [p for p in places if isinstance(p, list)]
        if lists:
            lst = rng.choice(lists)
            if lst and rng.random() < 0.5:
                lst.append(lst[rng.randrange(len(lst))])
            elif lst:
                del lst[rng.randrange(len(lst))]
            else:
                lst.append(_odd(rng))
    elif op == 4:  # another payload, and segment lengths that add up (or not)
        n = rng.choice((0, 1, 2, 3, 60, 100, MAX_FILE_SIZE - 1, MAX_FILE_SIZE + 1))
        msg[2] = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) + bytes(max(0, n - 64))
        cuts = sorted(rng.randrange(n + 1) for _ in range(rng.randrange(4)))
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        if rng.random() < 0.3 and lens:
            lens[rng.randrange(len(lens))] += rng.choice((-1, 1, -64))
        msg[1]["s"] = lens
    elif op == 5:  # a message again, or one less
        i = rng.randrange(len(msgs))
        if rng.random() < 0.5 and len(msgs) < MAX_MESSAGES:
            msgs.insert(rng.randrange(len(msgs) + 1), [msgs[i][0], _copy(msgs[i][1]), msgs[i][2]])
        elif len(msgs) > 1:
            del msgs[i]
    elif op == 6:  # two messages change places
        i, j = rng.randrange(len(msgs)), rng.randrange(len(msgs))
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif op == 7:  # another kind, the same fields
        msg[0] = rng.choice(SESSION_KINDS) if rng.random() < 0.9 else 0xF0 + rng.randrange(16)
    else:  # a field of another message (its cid, its job list...)
        src = msgs[rng.randrange(len(msgs))][1]
        if isinstance(src, dict) and src:
            key = rng.choice(list(src))
            msg[1][key] = _copy(src[key])


def _odd(rng):
    return copy.deepcopy(rng.choice(ODD_VALUES))  # (the lists and maps get changed later)


def _copy(value):
    return copy.deepcopy(value)


def session_mutator(data: bytes, max_size: int, seed: int, byte_mutate) -> bytes:
    """Half of the time libFuzzer's own mutation of the bytes (``byte_mutate``);
    otherwise one to three changes of the messages' structure: a field dropped, set
    or given an odd value, a list grown or shrunk, a payload and its segment
    lengths, a message repeated, dropped, moved or given another kind.  The
    control parts stay msgpack, so what the handlers see past ``unpack_ctl`` is
    explored, not only msgpack's errors."""
    import random

    rng = random.Random(seed)
    if rng.random() < 0.5:
        return byte_mutate(data, max_size)
    msgs = []
    for kind, raw, payload in parse_session_input(data):
        try:
            ctl = msgpack.unpackb(raw, raw=False, strict_map_key=False) if raw else {}
        except Exception:  # (msgpack raises several types)
            ctl = raw  # kept as it is
        msgs.append([kind, ctl, payload])
    if not msgs:
        msgs = [[Kind.PING, {}, b""]]
    try:
        for _ in range(1 + rng.randrange(3)):
            _mutate_message(rng, msgs)
        out = session_input(msgs)
    except (TypeError, ValueError, OverflowError, RecursionError):  # not encodable, too deep
        return byte_mutate(data, max_size)
    return out if len(out) <= max_size else byte_mutate(data, max_size)


# -- a mutator that knows TOML (config) ----------------------------------------------
CONFIG_ODD_VALUES = (
    True, False, 0, 1, -1, 4, 2**63 - 1, -(2**63), 0.0, 5.5, float("nan"), float("inf"),
    "", "x", "127.0.0.1", "/tmp/k", "08:00", [], ["a"], [1, "a"], [[]], {}, {"a": 1},
)  # fmt: skip
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def toml_value(value) -> str:
    """``value`` in TOML (the types tomllib reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # (nan, inf and -inf are TOML too)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # datetime, date, time


def _key_variant(rng, key: str) -> str:
    op = rng.randrange(6)
    if op == 0:
        return key.replace("_", "-") if "_" in key else key.replace("-", "_")
    if op == 1:
        return key.upper() if key.islower() else key.lower()
    if op == 2:
        return key + rng.choice(("_file", "s", "_", "x"))
    if op == 3:
        return key[: -rng.randrange(1, 3)] or key
    if op == 4:
        return rng.choice(("node_", "cluster_", "admin_", "")) + key
    return key.replace(rng.choice(key), "", 1) if key else key


def config_mutator(data: bytes, max_size: int, seed: int, byte_mutate, options) -> bytes:
    """Half of the time libFuzzer's own mutation of the bytes; otherwise, if the file
    is TOML, one to three changes of its options (``options``: the parsers' option
    names): one set to an odd value, dropped, renamed (dashes, case, suffixes,
    prefixes), or given another's value; written back as TOML."""
    import random
    import tomllib

    rng = random.Random(seed)
    if rng.random() < 0.5:
        return byte_mutate(data, max_size)
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return byte_mutate(data, max_size)
    for _ in range(1 + rng.randrange(3)):
        op = rng.randrange(5)
        keys = list(doc)
        if op == 0 or not keys:
            doc[rng.choice(options)] = copy.deepcopy(rng.choice(CONFIG_ODD_VALUES))
        elif op == 1:
            del doc[rng.choice(keys)]
        elif op == 2:
            key = rng.choice(keys)
            doc[_key_variant(rng, key)] = doc.pop(key)
        elif op == 3:
            doc[rng.choice(keys)] = copy.deepcopy(doc[rng.choice(keys)])
        else:
            doc[rng.choice(keys)] = copy.deepcopy(rng.choice(CONFIG_ODD_VALUES))
    try:
        out = "".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items()).encode()
    except (TypeError, ValueError, RecursionError):
        return byte_mutate(data, max_size)
    return out if len(out) <= max_size else byte_mutate(data, max_size)
