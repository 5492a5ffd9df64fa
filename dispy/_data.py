"""Data placed once per node: ``cluster.put(obj)`` and the ``NodeData`` handle.

::

    client: put(obj) -> pickle (protocol 5, buffers out of band) -> DATA to each node
    node:   writes it once, to <computation>/.dispy_data/<name>.<version>
            (header, then each buffer at a 64-byte aligned offset)
    job:    handle.get() maps the file read-only and unpickles it; numpy arrays
            are views of the mapping, so every job process on the node shares one
            copy in memory (the page cache), with no copy per job

A handle is tiny (name and version) and travels in job arguments.  Each job
process keeps what it loaded, so only the first job there pays for the load.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct

import msgpack

from .errors import DispyError

ALIGN = 64
_HEAD = struct.Struct("!8sI")  # magic, header length
_MAGIC = b"DISPYDAT"

#: Set in job processes: the computation's data folder.
DATA_DIR: str | None = None
_loaded: dict[str, tuple[int, object, mmap.mmap]] = {}
#: On the client: objects put by this process, by (name, version), for get() there.
_local: dict[tuple[str, int], object] = {}


class NodeData:
    """A handle to an object that ``cluster.put`` placed on every node.

    Pass it to jobs; ``get()`` on the node returns the object (arrays
    read-only, shared by the node's job processes).  On the client, ``get()``
    returns the object that was put.
    """

    __slots__ = ("name", "version")

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version

    def __reduce__(self):
        return (NodeData, (self.name, self.version))

    def __repr__(self) -> str:
        return f"NodeData({self.name!r}, version={self.version})"

    def get(self):
        if DATA_DIR is None:
            try:
                return _local[(self.name, self.version)]
            except KeyError:
                raise DispyError(
                    f"{self!r} is not in this process: get() works in jobs on the nodes"
                ) from None
        cached = _loaded.get(self.name)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        path = data_path(DATA_DIR, self.name, self.version)
        try:
            obj, mm = load(path)
        except FileNotFoundError:
            raise DispyError(
                f"{self!r} is not on this node: it was replaced by a newer put() "
                "of the same name, or the cluster's put() did not reach this node"
            ) from None
        _loaded[self.name] = (self.version, obj, mm)
        return obj


def data_path(folder: str, name: str, version: int) -> str:
    return os.path.join(folder, f"{name}.{version}")


def check_name(name: str) -> str:
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"data name {name!r}: use 1-100 letters, digits, '-', '_' or '.'")
    if name.startswith("."):
        raise ValueError(f"data name {name!r} must not start with '.'")
    return name


def write(path: str, segments) -> None:
    """Write pickle segments (pickle, buffers...) to ``path`` atomically, buffers aligned."""
    lens = [memoryview(s).nbytes for s in segments]
    head = msgpack.packb({"s": lens})
    offsets, pos = [], _HEAD.size + len(head)
    for n in lens:
        pos += -pos % ALIGN
        offsets.append(pos)
        pos += n
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, _HEAD.pack(_MAGIC, len(head)) + head, 0)
        for off, seg in zip(offsets, segments, strict=True):
            view = memoryview(seg).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done : done + (64 << 20)], off + done)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: str):
    """(object, mapping) from a file ``write`` made; arrays are views of the mapping."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    magic, hlen = _HEAD.unpack(view[: _HEAD.size])
    if magic != _MAGIC:
        raise DispyError(f"{path} is not a dispy data file")
    lens = msgpack.unpackb(view[_HEAD.size : _HEAD.size + hlen])["s"]
    segs, pos = [], _HEAD.size + hlen
    for n in lens:
        pos += -pos % ALIGN
        segs.append(view[pos : pos + n])
        pos += n
    return pickle.loads(segs[0], buffers=segs[1:]), mm
