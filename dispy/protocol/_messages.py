"""Message kinds and the helpers that pack and check control parts.

A control part is a msgpack map (never pickle): parsing it cannot run code.
User data (computations, arguments, results) travels in the payload as a
list of *segments* (a pickle stream and its out-of-band buffers); the
control part names each segment's length under the key ``"s"``.
"""

from __future__ import annotations

from enum import IntEnum

import msgpack

from ..errors import ProtocolError
from ._framing import ALIGN, ALIGN_MIN


class Kind(IntEnum):
    """Frame kinds.  Below 16: the handshake, the only kinds read before authentication."""

    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    AUTH_FAIL = 4

    # client <-> node, after authentication
    INFO_REQ = 16  # client asks for the node's description
    INFO = 17  # node: name, cpus, platform, resources
    COMPUTE = 18  # client: a computation (pickled spec) to set up
    COMPUTE_REPLY = 19  # node: set up, or why not
    FILE = 20  # a file: client -> node for a computation, node -> client from a job
    JOBS = 21  # client: a batch of jobs
    RESULTS = 22  # node: a batch of job ends
    ACK = 23  # client: these results are safe here, drop them
    CANCEL = 24  # client: cancel these jobs
    CLOSE = 25  # client: close a computation
    CLOSED = 26  # node: computation closed
    STATUS = 27  # node: a provisional result, or (no job) a pulse with its resources
    PING = 28
    PONG = 29
    ERROR = 30  # either side: a request failed; ``r`` says why
    DATA = 32  # client: an object for every job on the node (cluster.put)
    DATA_OK = 33  # node: stored (or why not)
    RESUME = 34  # client: take over a computation of an earlier connection (or a crashed client's)
    RESUMED = 35  # node: known or not, its jobs queued/running and ended-but-unacked

    # node daemon <-> its computation process and job processes (local socket pairs)
    C_LOAD = 48  # daemon: load this computation and run setup
    C_READY = 49  # computation process: setup done (or failed)
    C_FORK = 50  # daemon: fork one job process per passed socket
    C_FORKED = 51  # computation process: pids of the new job processes
    C_EXITED = 52  # computation process: a job process ended, with its status
    C_CLEANUP = 53  # daemon: run cleanup and exit
    W_JOB = 56  # daemon -> job process: run this job
    W_RESULT = 57  # job process: the job's end
    W_HELLO = 58  # job process: my pid
    W_PROVISIONAL = 59  # job process: a provisional result of the running job
    W_SENDFILE = 60  # job process: a file for the client (dispy_send_file)


HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.AUTH, Kind.AUTH_OK, Kind.AUTH_FAIL})


def pack_ctl(ctl: dict) -> bytes:
    return msgpack.packb(ctl, use_bin_type=True)


def unpack_map(data: bytes, what: str) -> dict:
    """Decode one msgpack map with string keys (nothing after it); else ProtocolError."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is a {type(value).__name__}, expected a map")
    if not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"{what} has a key that is not a string")
    return value


def unpack_ctl(data: bytes) -> dict:
    """Decode a control part (empty means an empty map)."""
    return unpack_map(data, "control part") if data else {}


def field(ctl: dict, name: str, types, *, default=...):
    """Read one field of a control map, checking its type."""
    try:
        value = ctl[name]
    except KeyError:
        if default is not ...:
            return default
        raise ProtocolError(f"message lacks field {name!r}") from None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


_ZEROS = bytes(ALIGN)


def join_segments(groups) -> tuple[list[int], list]:
    """Flatten groups of buffers into (lengths, buffers) for a payload.

    A segment of ALIGN_MIN bytes or more is preceded by padding (a negative
    length) so it starts at an ALIGN boundary of the payload; the receiver's
    payload is aligned too, so arrays rebuilt from it are aligned.
    """
    lens: list[int] = []
    flat: list = []
    pos = 0
    for group in groups:
        for buf in group:
            mv = buf if isinstance(buf, memoryview) else memoryview(buf)
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
            n = mv.nbytes
            if n >= ALIGN_MIN and pos % ALIGN:
                pad = ALIGN - pos % ALIGN
                lens.append(-pad)
                flat.append(_ZEROS[:pad])
                pos += pad
            lens.append(n)
            flat.append(mv)
            pos += n
    return lens, flat


def split_segments(payload: memoryview, lens) -> list[memoryview]:
    """Cut a payload into the segments its control part announced (checked);
    negative lengths are padding, skipped."""
    if not isinstance(lens, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > -ALIGN for n in lens
    ):
        raise ProtocolError(f"segment lengths must be a list of integers (padding above -{ALIGN})")
    total = sum(abs(n) for n in lens)
    if total != len(payload):
        raise ProtocolError(
            f"segment lengths add up to {total} bytes but the payload has {len(payload)}"
        )
    out, pos = [], 0
    for n in lens:
        if n >= 0:
            out.append(payload[pos : pos + n])
        pos += abs(n)
    return out


def result_entries(ctl: dict, payload):
    """The ``(entry, segments)`` pairs of a RESULTS message, in order: each entry is
    a map whose ``n`` says how many of the payload's segments are its own."""
    segs = split_segments(payload, field(ctl, "s", list))
    pos = 0
    for entry in field(ctl, "r", list):
        if not isinstance(entry, dict):
            raise ProtocolError("result entry is not a map")
        n = field(entry, "n", int)
        yield entry, segs[pos : pos + n]
        pos += n
