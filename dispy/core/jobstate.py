"""Job states and every transition between them, in one table.

Theory of operation: a job is *Created* when submitted and waits in the
client's queue, or on a node it was sent to ahead; *Running* once a CPU of
that node is free for it (``scheduler``); it may report
*ProvisionalResult*s while running; it ends exactly once, in one of the four
terminal states.  A job whose node is lost goes back to *Created* if it may
run again (reentrant, not pinned to that node), else it is *Abandoned*.

Everything that changes a job's status goes through ``next_status``; a
(status, event) pair that is not in the table is a bug or a late message, and
the caller must ignore it (never a second end for a job).
"""

from __future__ import annotations

# dispy's documented values (user code compares with them)
Created = 5
Running = 6
ProvisionalResult = 7
Cancelled = 8
Terminated = 9
Abandoned = 10
Finished = 11

NAMES = {
    Created: "Created",
    Running: "Running",
    ProvisionalResult: "ProvisionalResult",
    Cancelled: "Cancelled",
    Terminated: "Terminated",
    Abandoned: "Abandoned",
    Finished: "Finished",
}

TERMINAL = frozenset({Cancelled, Terminated, Abandoned, Finished})

# events
DISPATCH = "dispatch"  # sent to a node
PROVISIONAL = "provisional"  # node reported a provisional result
FINISH = "finish"  # node: the computation returned
FAIL = "fail"  # node: the computation raised, its process died, or the result was unusable
CANCEL = "cancel"  # user cancelled (queued job, or node confirmed a running one)
REQUEUE = "requeue"  # node lost, job may run again
ABANDON = "abandon"  # node lost (or no node can run it), job may not run again

_LIVE = (Running, ProvisionalResult)

TRANSITIONS: dict[tuple[int, str], int] = {
    (Created, DISPATCH): Running,
    (Created, CANCEL): Cancelled,
    (Created, ABANDON): Abandoned,
    (Created, FAIL): Terminated,  # e.g. its node rejected the arguments before starting it
    # a late result from a node declared dead, for a job requeued but not yet run again
    (Created, FINISH): Finished,
    # sent to a node, not started: the node was lost, or handed it back
    (Created, REQUEUE): Created,
    (Created, PROVISIONAL): ProvisionalResult,  # it did start there
    **{(s, PROVISIONAL): ProvisionalResult for s in _LIVE},
    **{(s, FINISH): Finished for s in _LIVE},
    **{(s, FAIL): Terminated for s in _LIVE},
    **{(s, CANCEL): Cancelled for s in _LIVE},
    **{(s, REQUEUE): Created for s in _LIVE},
    **{(s, ABANDON): Abandoned for s in _LIVE},
}


class InvalidTransition(Exception):
    """(status, event) is not in the table: a late or duplicate message."""


def next_status(status: int, event: str) -> int:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(f"{NAMES.get(status, status)} --{event}-->") from None
