"""Atheris target: an authenticated client's messages into the node daemon.

Each input is a sequence of messages (layout in ``_common.py``: ``kind u8 |
ctl_len u16 | ctl | payload_len u16 | payload``, up to 24) fed to a fresh
``dispynode.session.Session`` of a fresh in-process ``NodeServer`` (never
started: it listens nowhere, announces nothing, keeps no spare process; one
CPU, ``max_file_size`` 4096, its ``dest_path`` in a scratch folder).  Its
result store (a ``ResultStore``, ``results.db`` in ``dest_path``, as
``start()`` opens it) is opened once for the process; the results an input
left are committed at its end (as the node does within its write delay),
then acknowledged.  The session sits on a ``FakeChannel``: each message's control part is decoded with
``unpack_ctl`` as the real connection does (a ``ProtocolError`` there ends
the input, as it ends a connection), then handed to ``on_message`` as a
``Message``; after each message the event loop (one for the whole process)
runs until the session's request queue is drained (FILE, COMPUTE, CLOSE,
DATA, RESUME, and the files of jobs, handled in order).  At the end the
session is closed (``on_close``) and every task it left is run to its end.

No process is ever started and no fuzz byte unpickled:
``Computation.setup`` is replaced by a coroutine that leaves the
computation not ready, with an error saying why, so COMPUTE is answered
"not set up", JOBS get "not set up" results and DATA is refused.

A crash is:

* an exception from ``on_message`` that is not a ``DispyError`` (the
  transport turns those into a clean close; anything else is a handler bug);
* a request that ends in the session's ``except Exception`` branch (the
  ``"request ... failed"`` record that ``logger.exception`` writes, caught
  by a logging handler on the ``dispynode`` logger), or any other record of
  ``dispynode`` or ``dispy`` logged with a traceback;
* an exception in a loop callback or task that nobody retrieves;
* a message sent to the client of a kind a node does not send, or whose
  control part does not encode;
* an input after which the result store cannot be written (its ``flush``
  fails: a write that can never succeed blocks all the later ones);
* a file written (or removed, renamed, chmod-ed) outside the node's
  ``dest_path``, any network use, any process started (an audit hook
  refuses them);
* a request still running after 20 s, or the session still registered
  with the node after its close.

Findings already reported (``KNOWN``, README.md) are handled as the transport
handles a failing handler (the connection closes) unless ``DISPY_FUZZ_KNOWN=crash``.

Mutations: half libFuzzer's own (bytes), half ``_common.session_mutator``'s
(a field dropped, set or given an odd value, a list grown or shrunk, a
payload and its segment lengths, messages repeated, dropped, moved or given
another kind), which keeps the control parts msgpack.

Run through ``run.py``; alone:
``python fuzz/fuzz_node_handlers.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys

import atheris

with atheris.instrument_imports(include=["dispy", "dispynode"]):
    import _common as C
    import _harness as H

    from dispy.protocol import Kind
    from dispynode.handles import Computation
    from dispynode.server import STORE_FILE, NodeServer
    from dispynode.session import Session
    from dispynode.store import ResultStore, StoreError

#: What a node sends a client.
REPLIES = frozenset(
    {Kind.INFO, Kind.COMPUTE_REPLY, Kind.FILE, Kind.RESULTS, Kind.CLOSED, Kind.STATUS,
     Kind.PONG, Kind.ERROR, Kind.DATA_OK, Kind.RESUMED}
)  # fmt: skip

SCRATCH = H.scratch_folder("node_handlers")
DEST = os.path.join(SCRATCH, "dest")
os.makedirs(DEST, mode=0o700, exist_ok=True)
NODE_ARGS = dict(
    ip_addrs=["127.0.0.1"],
    port=0,
    secret="fuzz",
    cpus=1,
    dest_path=DEST,
    name="fuzz-node",
    max_file_size=C.MAX_FILE_SIZE,
    discover=False,
)
STORE_FILES = {STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"}
#: The node's result store, as start() opens it (in dest_path), shared by the inputs.
STORE = H.SqliteFile(ResultStore, os.path.join(DEST, STORE_FILE))


async def _setup_refused(self, spec: bytes, nargs: int = 0) -> None:
    """``Computation.setup`` here: no computation process, nothing unpickled."""
    self.error = (
        f"setup of computation {self.name!r} failed on node {self.node.name}: "
        "the fuzz harness starts no computation process"
    )


Computation.setup = _setup_refused

platform.platform()  # cached from now on: its first call runs `uname -p` (node.info())
#: Real bugs found and not fixed yet: handled as the surrounding code would (README.md).
KNOWN = H.Known()  # the findings of the first runs are fixed (README.md); none known now
GUARD = H.Guard([DEST])
LOG = H.ErrorLog("dispynode", "dispy")
LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
LOOP_ERRORS = H.LoopErrors(LOOP)


def test_one_input(data: bytes) -> None:
    node = NodeServer(**NODE_ARGS)
    node.store = STORE.file
    try:
        LOOP.run_until_complete(H.run_session(node, Session, REPLIES, data, KNOWN, "node"))
    finally:
        H.clear_folder(DEST, keep=STORE_FILES)
    GUARD.check()
    # the results the input left: written (as the node does within its WRITE_DELAY, in
    # one commit), then acknowledged, so that the store does not grow
    STORE.check(KNOWN, StoreError)
    for cid, owed in node.unacked.items():
        STORE.file.ack(cid, list(owed))
    STORE.check(KNOWN, StoreError)
    LOG.check(KNOWN)
    LOOP_ERRORS.check()


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    return C.session_mutator(data, max_size, seed, atheris.Mutate)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
