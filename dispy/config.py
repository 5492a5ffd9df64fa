"""Defaults shared by the client and the daemons."""

from __future__ import annotations

import os
import tempfile

#: TCP/UDP ports documented by dispy: client, node, shared scheduler.
CLIENT_PORT = 51347
NODE_PORT = 51348
SCHEDULER_PORT = 51349
#: Seconds a SharedJobCluster waits for its dispyscheduler to come back (restart)
#: before its jobs there are treated as lost.
SCHEDULER_RECONNECT_S = 600.0

#: Largest frame body accepted after authentication (bytes); configurable
#: per connection.  Large enough for a multi-GB numpy array, bounded so a
#: hostile length field cannot make us allocate without limit.
MAX_FRAME_SIZE = 4 << 30
#: Largest control (msgpack) part of a frame.  What can be large travels in the
#: payload (job outputs: protocol.texts_out) and batches are cut to stay far
#: below it (protocol.RESULTS_CTL_BYTES, JOBS_PER_FRAME, IDS_PER_FRAME); the
#: largest legitimate one is a RESUMED listing up to MAX_QUEUED_JOBS job ids twice.
MAX_CONTROL_SIZE = 2 << 20
#: Seconds a peer has to complete the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Most connections a daemon lets authenticate at once; more are dropped at once.
MAX_UNAUTHENTICATED = 128
#: Most jobs a client may have queued on a node (a real client keeps ~2 x cpus).
MAX_QUEUED_JOBS = 100_000
#: Most pending file/setup/close requests of one client connection.
MAX_PENDING_OPS = 4096

#: Where a node keeps computations' files unless --dest_path says otherwise.
# (a folder named like a package, e.g. /tmp/dispy, would shadow it for programs run from /tmp)
# per user: a folder of another user's is refused (dispy._paths.private_dir)
DEFAULT_DEST_PATH = os.path.join(tempfile.gettempdir(), f"dispy-node-{os.geteuid()}")
SCHEDULER_DEST_PATH = os.path.join(tempfile.gettempdir(), f"dispy-scheduler-{os.geteuid()}")
