"""What the scheduler holds for its clients: their computations (``Comp``) and
jobs (``SJob``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from dispy.core import jobstate
from dispy.errors import ProtocolError

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .clients import ClientSession
    from .server import SchedulerServer

logger = logging.getLogger("dispyscheduler")


class SJob:
    """A client's job as the scheduler holds it (the scheduler core's job interface)."""

    __slots__ = ("_uid", "status", "_pinned", "_node", "_cluster", "_seq", "_reentrant",
                 "cjid", "segs", "opts", "comp")  # fmt: skip

    def __init__(self, uid: int, comp: Comp, cjid: int, segs: list, opts) -> None:
        self._uid = uid
        self.status = jobstate.Created
        self._pinned = None
        self._node = None
        self._cluster = comp.cid
        self._seq = None
        self._reentrant = comp.reentrant
        self.cjid = cjid
        self.segs = segs
        self.opts = opts
        self.comp = comp


class Comp:
    """One client's computation: its files, spec, options, jobs and owed results."""

    def __init__(self, server: SchedulerServer, session: ClientSession, cid: str, name: str):
        if len(cid) > 64 or not cid.isalnum():
            raise ProtocolError("computation id must be alphanumeric, at most 64 characters")
        self.server = server
        self.session: ClientSession | None = session
        self.cid = cid
        self.name = name
        self.dir = os.path.join(server.dest_path, cid)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.files: dict[str, int] = {}  # relative path -> mode, in arrival order
        self.spec: bytes | None = None
        self.setup_args = b""
        self.exclusive = False
        self.reentrant = False
        self.patterns: list[str] = ["*"]
        self.jobs: dict[int, SJob] = {}  # client job id -> job (until acknowledged)
        self.owed: dict[int, tuple[dict, list]] = {}  # client job id -> (entry, segments)
        self.ready_on: set = set()  # node keys where it is set up
        self.setting_up: set = set()
        self.failed: dict = {}  # node key -> why its setup failed
        self.data: dict[
            str, tuple[int, list, object]
        ] = {}  # cluster.put: name -> (v, lens, payload)
        self.compute_reply: asyncio.Future | None = None
        self.detached_at: float | None = None
        self.closed = False
        self.restored = False  # from the state file: jobs wait until the nodes said theirs

    def meta(self) -> dict:
        """What the state file keeps of it (its files stay in its folder)."""
        return {
            "name": self.name, "spec": self.spec, "sa": self.setup_args, "x": self.exclusive,
            "r": self.reentrant, "np": self.patterns, "files": self.files,
            "data": {k: list(v) for k, v in self.data.items()},
        }  # fmt: skip

    @classmethod
    def from_meta(cls, server: SchedulerServer, cid: str, meta: dict) -> Comp:
        comp = cls(server, None, cid, meta["name"])
        comp.spec, comp.setup_args = meta["spec"], meta["sa"]
        comp.exclusive, comp.reentrant, comp.patterns = meta["x"], meta["r"], meta["np"]
        comp.files = dict(meta["files"])
        comp.data = {k: tuple(v) for k, v in meta["data"].items()}
        comp.restored = True
        comp.detached_at = time.monotonic()  # its client has zombie_interval to come back
        return comp

    def deliver(self, entry: dict, segs) -> None:
        """A job's end for the client: kept until it acknowledges, sent if connected."""
        self.owed[entry["j"]] = (entry, segs)
        self.server.job_ended(self, entry)
        if self.session is not None:
            self.session.queue_result(entry, segs)
