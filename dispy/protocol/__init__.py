"""The dispy wire protocol, without I/O: frames, handshake, message kinds.

Everything that parses bytes from the network lives in this package, so it
can be tested and fuzzed with no sockets.
"""

from ._connection import (
    PROTOCOL_VERSIONS,
    Connection,
    HandshakeComplete,
    Message,
    derive_key,
)
from ._datagram import (
    DatagramDecoder,
    DatagramKind,
    ReplayCache,
    ReplayedDatagram,
    datagram_key,
    encode_datagram,
)
from ._framing import Frame, FrameDecoder, FrameEncoder, FrameWriter
from ._messages import (
    IDS_PER_FRAME,
    JOBS_PER_FRAME,
    RESULTS_CTL_BYTES,
    RESULTS_PER_FRAME,
    Kind,
    field,
    job_id,
    job_ids,
    join_segments,
    pack_ctl,
    result_entries,
    split_segments,
    started_jobs,
    texts_in,
    texts_out,
    unpack_ctl,
)

__all__ = [
    "IDS_PER_FRAME",
    "JOBS_PER_FRAME",
    "RESULTS_CTL_BYTES",
    "RESULTS_PER_FRAME",
    "PROTOCOL_VERSIONS",
    "Connection",
    "DatagramDecoder",
    "DatagramKind",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameWriter",
    "HandshakeComplete",
    "Kind",
    "Message",
    "ReplayCache",
    "ReplayedDatagram",
    "datagram_key",
    "derive_key",
    "encode_datagram",
    "field",
    "job_id",
    "job_ids",
    "join_segments",
    "pack_ctl",
    "result_entries",
    "started_jobs",
    "split_segments",
    "texts_in",
    "texts_out",
    "unpack_ctl",
]
