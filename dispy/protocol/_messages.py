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
    RESUMED = 35  # node: known or not, its jobs queued/running/started, ended-but-unacked

    # node daemon <-> its computation process and job processes (local socket pairs)
    C_LOAD = 48  # daemon: load this computation and run setup
    C_READY = 49  # computation process: setup done (or failed)
    C_FORK = 50  # daemon: fork n more job processes
    C_EXITED = 52  # computation process: a job process ended, with its status
    C_CLEANUP = 53  # daemon: run cleanup and exit
    W_JOB = 56  # daemon -> job process: run this job
    W_RESULT = 57  # job process: the job's end
    W_HELLO = 58  # job process: my pid
    W_PROVISIONAL = 59  # job process: a provisional result of the running job
    W_SENDFILE = 60  # job process: a file for the client (dispy_send_file)
    W_SKIP = 61  # daemon -> job process: drop this job sent ahead, if not started


HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.AUTH, Kind.AUTH_OK, Kind.AUTH_FAIL})


def pack_ctl(ctl: dict) -> bytes:
    return msgpack.packb(ctl, use_bin_type=True)


#: Most maps and arrays one control part may hold.  A byte of msgpack can be an
#: empty map, 72 bytes once decoded: without a budget 2 MiB of them cost 145 MiB.
#: The largest real control parts (a RESULTS batch of RESULTS_PER_FRAME entries,
#: a JOBS batch of JOBS_PER_FRAME) hold far fewer.
MAX_CONTAINERS = 1 << 16
#: Most entries of one RESULTS frame, and about the most bytes of its control part.
RESULTS_PER_FRAME = 4096
RESULTS_CTL_BYTES = 512 << 10
#: Most jobs in one JOBS frame, and job ids in one ACK or CANCEL frame.
JOBS_PER_FRAME = 8192
IDS_PER_FRAME = 32768


class _Budget:
    """msgpack's object/list hook: counts the containers decoded, refuses past the budget."""

    __slots__ = ("left",)

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, value):
        self.left -= 1
        if self.left < 0:
            raise ProtocolError(f"more than {MAX_CONTAINERS} maps and arrays in one message")
        return value


def unpack_map(data: bytes, what: str) -> dict:
    """Decode one msgpack map with string keys (nothing after it); else ProtocolError.

    Bounded: at most MAX_CONTAINERS maps and arrays, each no longer than the
    data could hold, so what a message costs once decoded stays in proportion
    to its size (at most about 20 bytes per byte, on top of the containers).
    """
    n = len(data)
    limits = {"max_str_len": n, "max_bin_len": n, "max_array_len": n, "max_map_len": n // 2,
              "max_ext_len": n}  # fmt: skip
    if n > MAX_CONTAINERS:
        # each map or array takes a byte at least: shorter data cannot hold too many,
        # and is decoded without counting them (a Python call per container)
        limits["object_hook"] = limits["list_hook"] = _Budget(MAX_CONTAINERS)
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, **limits)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{what} is not valid msgpack: {exc}") from None
    if type(value) is not dict:
        raise ProtocolError(f"{what} is a {type(value).__name__}, expected a map")
    for k in value:
        if type(k) is not str:
            raise ProtocolError(f"{what} has a key that is not a string")
    return value


def unpack_ctl(data: bytes) -> dict:
    """Decode a control part (empty means an empty map)."""
    return unpack_map(data, "control part") if data else {}


_ABSENT = object()


def field(ctl: dict, name: str, types, *, default=...):
    """Read one field of a control map, checking its type."""
    value = ctl.get(name, _ABSENT)  # (not ctl[name]: a raised KeyError cost more)
    if value is _ABSENT:
        if default is not ...:
            return default
        raise ProtocolError(f"message lacks field {name!r}")
    if not isinstance(value, types) or (type(value) is bool and bool not in _tuple(types)):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


#: Job ids are counters: what SQLite stores as an integer (a larger one made a
#: daemon's state file refuse every later write; found by fuzzing).
MAX_JOB_ID = (1 << 63) - 1


def job_id(value) -> int:
    """``value`` as a job id (an int from 0 to MAX_JOB_ID), else ProtocolError."""
    if type(value) is not int or not 0 <= value <= MAX_JOB_ID:
        raise ProtocolError(f"job id {value!r:.40} is not an integer from 0 to 2**63-1")
    return value


def job_ids(ctl: dict, name: str = "j") -> list[int]:
    """The list of job ids in field ``name`` (each checked)."""
    return [job_id(v) for v in field(ctl, name, list)]


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


#: A job's texts: its stdout, stderr and exception.  One longer than INLINE_TEXT
#: travels as a payload segment, not in the control part, so a job printing
#: 100 MB needs no 100 MB control part (whose limit is MAX_CONTROL_SIZE).
TEXT_FIELDS = ("o", "e", "x")
INLINE_TEXT = 128


def texts_out(entry: dict, segs) -> tuple[dict, list]:
    """A job's end ready to send: its long texts moved out of ``entry`` into
    segments placed before ``segs``; the entry's ``tx`` names them, in order
    (1: text, 0: bytes).  ``entry`` itself is not changed."""
    moved: dict = {}
    texts: list = []
    for name in TEXT_FIELDS:
        value = entry.get(name)
        if isinstance(value, str | bytes) and len(value) > INLINE_TEXT:
            is_text = isinstance(value, str)
            moved[name] = int(is_text)
            texts.append(value.encode("utf-8", "surrogatepass") if is_text else value)
    if not moved:
        return entry, list(segs)
    entry = {k: v for k, v in entry.items() if k not in moved}
    entry["tx"] = moved
    return entry, texts + list(segs)


def texts_in(entry: dict, segs: list) -> tuple[dict, list]:
    """The inverse of ``texts_out`` on a received entry and its segments (checked)."""
    moved = entry.get("tx")
    if moved is None:
        return entry, segs
    if (
        not isinstance(moved, dict)
        or len(moved) > len(TEXT_FIELDS)
        or not all(k in TEXT_FIELDS and v in (0, 1) for k, v in moved.items())
    ):
        raise ProtocolError(f"bad text fields {moved!r} in a job's end")
    if len(segs) < len(moved):
        raise ProtocolError("a job's end names more texts than it has segments")
    entry = dict(entry)
    del entry["tx"]
    for (name, is_text), seg in zip(moved.items(), segs[: len(moved)], strict=True):
        entry[name] = bytes(seg).decode("utf-8", "surrogatepass") if is_text else bytes(seg)
    return entry, segs[len(moved) :]


def started_jobs(ctl: dict) -> dict[str, list[int]]:
    """The jobs a RESULTS message says started (``g``): computation id -> job ids
    (ids that are not integers are left out)."""
    return {
        cid: [jid for jid in jids if type(jid) is int]
        for cid, jids in field(ctl, "g", dict, default={}).items()
        if isinstance(jids, list)
    }


def result_entries(ctl: dict, payload):
    """The ``(entry, segments)`` pairs of a RESULTS message, in order: each entry is
    a map whose ``n`` says how many of the payload's segments are its result's,
    after the segments of its long texts (``tx``, see ``texts_out``)."""
    segs = split_segments(payload, field(ctl, "s", list))
    pos = 0
    for entry in field(ctl, "r", list):
        if not isinstance(entry, dict):
            raise ProtocolError("result entry is not a map")
        n = field(entry, "n", int)
        if n < 0:
            raise ProtocolError("result entry with a negative segment count")
        moved = entry.get("tx")
        n += len(moved) if isinstance(moved, dict) else 0
        if pos + n > len(segs):
            raise ProtocolError("result entries name more segments than the payload has")
        yield texts_in(entry, segs[pos : pos + n])
        pos += n
