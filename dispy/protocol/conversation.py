"""The node protocol's conversation, as tables: what each side may say after the
handshake, how the other side takes it, which reply answers which request, and
the phases of one computation on the side that serves it.

The side that asks is a client (``JobCluster``'s node link, a dispyscheduler's
link to its nodes, ``recover_jobs``); the side that serves is a node
(``dispynode``, or a dispyscheduler, which its clients take for a node).  Each
receiver looks a message up here first: a kind missing from its table is a
``ProtocolError`` (the peer is not speaking this protocol), whatever its
contents.

To a node::

    kind      taken     answered by
    INFO_REQ  at once   INFO
    PING      at once   PONG
    JOBS      at once   (RESULTS, later)
    ACK       at once
    CANCEL    at once
    FILE      in order  ERROR if refused
    COMPUTE   in order  COMPUTE_REPLY {c}
    DATA      in order  DATA_OK {c, t}
    CLOSE     in order  CLOSED {c}
    RESUME    in order  RESUMED {c}

"In order" requests touch the disk or wait on processes: they run one at a time
in arrival order.  A request refused outright is answered with ERROR carrying
the request's kind (``k``), which fails whoever waits for its reply.

To a client: RESULTS (jobs' ends; and ``g``, the jobs that started since the
last frame, from a node whose INFO says ``starts``), STATUS (a pulse, or a
provisional result) and FILE (from a job) arrive unasked (``STREAM``); the
others answer a request (``REPLY``) and go to the waiter filed under
``reply_key``.

A computation on the serving side (``CompPhase``)::

    NEW --setup--> STARTING --set_up--> READY --died--> FAILED
                       |                                  ^
                       +-----------failed-----------------+
    every phase --close--> CLOSED

Only a READY computation takes jobs; a job for one in any other phase ends
Terminated with the reason at once.
"""

from __future__ import annotations

import enum

from ..errors import ProtocolError
from ._messages import Kind


class Take(enum.Enum):
    AT_ONCE = "at once"  # handled as it arrives
    IN_ORDER = "in order"  # queued behind the requests before it
    STREAM = "stream"  # arrives unasked
    REPLY = "reply"  # answers a request


#: What a node takes from its client, and how.
TO_NODE: dict[Kind, Take] = {
    Kind.INFO_REQ: Take.AT_ONCE,
    Kind.PING: Take.AT_ONCE,
    Kind.JOBS: Take.AT_ONCE,
    Kind.ACK: Take.AT_ONCE,
    Kind.CANCEL: Take.AT_ONCE,
    Kind.FILE: Take.IN_ORDER,
    Kind.COMPUTE: Take.IN_ORDER,
    Kind.DATA: Take.IN_ORDER,
    Kind.CLOSE: Take.IN_ORDER,
    Kind.RESUME: Take.IN_ORDER,
}

#: What a client takes from a node, and how.
TO_CLIENT: dict[Kind, Take] = {
    Kind.RESULTS: Take.STREAM,
    Kind.STATUS: Take.STREAM,
    Kind.FILE: Take.STREAM,
    Kind.INFO: Take.REPLY,
    Kind.PONG: Take.REPLY,
    Kind.COMPUTE_REPLY: Take.REPLY,
    Kind.DATA_OK: Take.REPLY,
    Kind.CLOSED: Take.REPLY,
    Kind.RESUMED: Take.REPLY,
    Kind.ERROR: Take.REPLY,
}

#: A request, the reply that answers it and the reply's fields that name the request.
REPLIES: dict[Kind, tuple[Kind, tuple[str, ...]]] = {
    Kind.INFO_REQ: (Kind.INFO, ()),
    Kind.PING: (Kind.PONG, ()),
    Kind.COMPUTE: (Kind.COMPUTE_REPLY, ("c",)),
    Kind.DATA: (Kind.DATA_OK, ("c", "t")),
    Kind.CLOSE: (Kind.CLOSED, ("c",)),
    Kind.RESUME: (Kind.RESUMED, ("c",)),
}
_NAMED_BY = {reply: names for reply, names in REPLIES.values()}


def taken_by_node(kind) -> Take:
    """How a node takes ``kind`` from a client; ProtocolError if it never would."""
    try:
        return TO_NODE[kind]
    except KeyError:
        raise ProtocolError(f"unexpected message kind {kind} from a client") from None


def taken_by_client(kind) -> Take:
    """How a client takes ``kind`` from a node; ProtocolError if it never would."""
    try:
        return TO_CLIENT[kind]
    except KeyError:
        raise ProtocolError(f"unexpected message kind {kind} from a node") from None


def request_key(kind, ctl: dict) -> tuple:
    """The key a request's waiter is filed under: its reply's kind and the fields
    of the request that the reply repeats."""
    reply, names = REPLIES[kind]
    return (reply, *(ctl.get(n) for n in names))


def reply_key(kind, ctl: dict) -> tuple | None:
    """The waiter a reply goes to (as ``request_key`` filed it); for an ERROR
    naming the refused request (``k``), that request's waiter; else None."""
    if kind == Kind.ERROR:
        refused = ctl.get("k")
        if not isinstance(refused, int) or refused not in REPLIES:
            return None
        kind = REPLIES[refused][0]
    names = _NAMED_BY.get(kind)
    if names is None:
        return None
    return (kind, *(ctl.get(n) for n in names))


class CompPhase(enum.Enum):
    """A computation on the side that serves it."""

    NEW = "new"  # files may arrive; COMPUTE not yet
    STARTING = "starting"  # its process is loading it and running setup
    READY = "ready"  # takes jobs
    FAILED = "failed"  # setup failed, or its process died: jobs end at once
    CLOSED = "closed"  # CLOSE ran: cleanup done, processes gone


#: (phase, event) -> next phase; anything else is a bug of the caller.
COMP_TRANSITIONS: dict[tuple[CompPhase, str], CompPhase] = {
    (CompPhase.NEW, "setup"): CompPhase.STARTING,
    (CompPhase.STARTING, "set_up"): CompPhase.READY,
    (CompPhase.STARTING, "failed"): CompPhase.FAILED,
    (CompPhase.READY, "died"): CompPhase.FAILED,
    **{(phase, "close"): CompPhase.CLOSED for phase in CompPhase},
}


def next_comp_phase(phase: CompPhase, event: str) -> CompPhase:
    try:
        return COMP_TRANSITIONS[(phase, event)]
    except KeyError:
        raise ValueError(f"a computation cannot go from {phase.value} by {event!r}") from None
