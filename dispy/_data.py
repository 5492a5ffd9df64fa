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

import atexit
import functools
import logging
import mmap
import os
import pickle
import shutil
import stat
import struct

import msgpack

from ._paths import private_dir
from .errors import DispyError

logger = logging.getLogger("dispy")

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


# -- shared memory, and handing a file over on one host ----------------------------------

#: Where put() data goes when it fits in memory (tmpfs): written 5x faster than
#: to a disk's page cache, and mapped by job processes all the same.
SHM_BASE = "/dev/shm"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 tests it; psutil is not imported for
    this, so that job processes, which import this module, stay small)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return pid > 0


def shared_memory_folder(role: str) -> str | None:
    """This process's private folder in shared memory, ``dispy-<role>-<uid>-<pid>``
    (None if there is none to use); the folders of this user's processes of the
    same role that are gone are removed."""
    if not os.path.isdir(SHM_BASE) or not os.access(SHM_BASE, os.W_OK):
        return None
    prefix = f"dispy-{role}-{os.geteuid()}-"
    for entry in os.listdir(SHM_BASE):
        pid = entry[len(prefix) :]
        if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            path = os.path.join(SHM_BASE, entry)
            try:  # (another process starting now may be removing it too)
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
    try:
        return private_dir(os.path.join(SHM_BASE, prefix + str(os.getpid())), "shared memory")
    except (DispyError, OSError) as exc:
        logger.warning("put() data goes to disk: %s", exc)
        return None


_client_shm: list = []  # [folder or None], once per process


def client_shm_folder() -> str | None:
    """The client process's folder for put() data handed to nodes on this host
    (made on first use, removed at exit)."""
    if not _client_shm:
        folder = shared_memory_folder("client")
        if folder is not None:
            atexit.register(shutil.rmtree, folder, True)
        _client_shm.append(folder)
    return _client_shm[0]


@functools.cache
def host_id() -> str | None:
    """The same for two processes that may hand each other put() data by file
    name: this boot of this machine, and this user.  (Processes in other mount
    namespaces share it but not /dev/shm: the node then refuses the name and
    the client sends the bytes.)"""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return f"{boot}:{os.geteuid()}" if boot else None


def open_handed_file(path: str, size: int) -> int:
    """Open a data file a client of this host named instead of sending it (read
    only, no symlink followed) and check it: a regular file of this user's, of
    the size announced, in the data file format.  Returns the descriptor;
    ``ValueError`` says what is wrong."""
    if not os.path.isabs(path):
        raise ValueError(f"handed data file {path!r} is not an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"handed data file {path!r} cannot be opened here: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError(f"handed data file {path!r} is not a file of this user's")
        if st.st_size != size:
            raise ValueError(f"handed data file {path!r} has {st.st_size} bytes, not {size}")
        head = os.pread(fd, _HEAD.size, 0)
        if len(head) != _HEAD.size or _HEAD.unpack(head)[0] != _MAGIC:
            raise ValueError(f"handed data file {path!r} is not a dispy data file")
    except BaseException:
        os.close(fd)
        raise
    return fd
