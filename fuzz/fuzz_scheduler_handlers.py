"""Atheris target: an authenticated client's messages into the shared scheduler.

Each input is a sequence of messages (layout in ``_common.py``, the same as
``fuzz_node_handlers.py``'s) fed to a fresh
``dispyscheduler.clients.ClientSession`` (the scheduler's side of a
``SharedJobCluster`` connection) of a fresh in-process ``SchedulerServer``
that is never started: it listens nowhere, looks for no node and has none,
so no computation is ever set up anywhere and no process started.  Its
``dest_path`` is a scratch folder; its state file (``SchedulerState``,
``scheduler.db`` there, as ``start()`` makes it) is opened once for the
process and shared by the inputs; what an input left in it (its
computations, their jobs) is dropped at the input's end.

Control parts are decoded with ``unpack_ctl`` (a ``ProtocolError`` ends the
input, as it ends a connection); after each message the event loop (one for
the whole process) runs until the session's request queue is drained (FILE,
COMPUTE, CLOSE, DATA, RESUME, handled in order: COMPUTE stores the spec and
commits it to the state file; with no node it is answered at once; DATA is
accepted once COMPUTE was).  At the end the session is closed
(``on_close``) and every task it left is run to its end.

A crash is:

* an exception from ``on_message`` that is not a ``DispyError``;
* a request that ends in the session's ``except Exception`` branch (the
  ``"request ... failed"`` record of ``logger.exception``, caught by a
  logging handler on the ``dispyscheduler`` logger), or any other record of
  ``dispyscheduler`` or ``dispy`` logged with a traceback (the state file's
  writer thread logs its failures there);
* an exception in a loop callback or task that nobody retrieves;
* a message sent to the client of a kind a node does not send, or whose
  control part does not encode;
* an input after which the state file cannot be written (its ``flush``
  fails: a write that can never succeed blocks all the later ones);
* a file written (or removed, renamed...) outside the scheduler's
  ``dest_path``, any network use, any process started (an audit hook
  refuses them);
* a request still running after 20 s, or the session still registered
  with the server after its close.

Findings already reported (``KNOWN``, README.md) are handled as the transport
handles a failing handler (the connection closes; a state file whose writes
fail is opened again) unless ``DISPY_FUZZ_KNOWN=crash``.

Mutations: half libFuzzer's own (bytes), half ``_common.session_mutator``'s
(a field dropped, set or given an odd value, a list grown or shrunk, a
payload and its segment lengths, messages repeated, dropped, moved or given
another kind), which keeps the control parts msgpack.

Run through ``run.py``; alone:
``python fuzz/fuzz_scheduler_handlers.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys

import atheris

with atheris.instrument_imports(include=["dispy", "dispyscheduler"]):
    import _common as C
    import _harness as H

    from dispy.protocol import Kind, derive_key
    from dispyscheduler.clients import ClientSession
    from dispyscheduler.server import STATE_FILE, SchedulerServer
    from dispyscheduler.state import SchedulerState, StateError

#: What a scheduler sends a client (the node's kinds: clients take it for a node).
REPLIES = frozenset(
    {Kind.INFO, Kind.COMPUTE_REPLY, Kind.FILE, Kind.RESULTS, Kind.CLOSED, Kind.STATUS,
     Kind.PONG, Kind.ERROR, Kind.DATA_OK, Kind.RESUMED}
)  # fmt: skip

SCRATCH = H.scratch_folder("scheduler_handlers")
DEST = os.path.join(SCRATCH, "dest")
os.makedirs(DEST, mode=0o700, exist_ok=True)
STATE_FILES = {STATE_FILE, STATE_FILE + "-wal", STATE_FILE + "-shm"}
KEY = derive_key("fuzz")
SERVER_ARGS = dict(
    cluster_key=KEY,
    node_key=KEY,
    ip_addrs=["127.0.0.1"],
    port=0,
    dest_path=DEST,
    max_file_size=C.MAX_FILE_SIZE,
)
STATE = H.SqliteFile(SchedulerState, os.path.join(DEST, STATE_FILE))

#: Real bugs found and not fixed yet: handled as the surrounding code would (README.md).
KNOWN = H.Known()  # the findings of the first runs are fixed (README.md); none known now
platform.platform()  # cached from now on: its first call runs `uname -p` (server.info())
GUARD = H.Guard([DEST])
LOG = H.ErrorLog("dispyscheduler", "dispy")
LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
LOOP_ERRORS = H.LoopErrors(LOOP)


def test_one_input(data: bytes) -> None:
    server = SchedulerServer(**SERVER_ARGS)
    server.state = STATE.file
    try:
        LOOP.run_until_complete(
            H.run_session(server, ClientSession, REPLIES, data, KNOWN, "server")
        )
    finally:
        for cid in list(server.comps) + list(server.retired):
            server.state.drop_comp(cid)
        H.clear_folder(DEST, keep=STATE_FILES)
    GUARD.check()
    STATE.check(KNOWN, StateError)
    LOG.check(KNOWN)
    LOOP_ERRORS.check()


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    return C.session_mutator(data, max_size, seed, atheris.Mutate)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
