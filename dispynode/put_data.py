"""``cluster.put()`` data on the node: written once (to the node's
shared-memory folder when there is room, linked from the computation's
folder), or hard-linked from a file a client on this host wrote."""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

from dispy import _data as data

logger = logging.getLogger("dispynode")


def store_data(
    folder: str, name: str, version: int, segs, shm: str | None = None, cid: str = ""
) -> None:
    """Write put() data where the job processes map it: in the node's shared-memory
    folder (a link to it in the computation's folder) when there is room, as
    LensKit's invoker does; else in the computation's folder on disk."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = data.data_path(folder, name, version)
    size = sum(memoryview(s).nbytes for s in segs)
    stored = False
    if shm is not None and size < psutil.virtual_memory().available // 4:
        target = data.data_path(shm, f"{cid}-{name}", version)
        try:
            data.write(target, segs)
            os.symlink(target, path)
            stored = True
        except OSError as exc:  # full (ENOSPC), or gone: on disk instead
            logger.info("put data %r not in shared memory (%s); on disk", name, exc)
            for leftover in (target, target + ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
    if not stored:
        data.write(path, segs)
    drop_older(folder, name, version)


def link_data(
    folder: str, name: str, version: int, handed: str, size: int, shm: str | None, cid: str
) -> None:
    """put() data that a client on this host wrote to shared memory and named:
    a hard link to that file, no copy (checked through a descriptor, and the
    link checked to be that very file).  ValueError when it cannot be: the
    client then sends the bytes."""
    if shm is None:
        raise ValueError("this node has no shared-memory folder to link handed data into")
    fd = data.open_handed_file(handed, size)
    try:
        checked = os.fstat(fd)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        target = data.data_path(shm, f"{cid}-{name}", version)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)  # a put() of this version again
        try:
            os.link(handed, target, follow_symlinks=False)
        except OSError as exc:  # another file system (EXDEV)...
            raise ValueError(f"handed data file {handed!r} cannot be linked here: {exc}") from None
        linked = os.lstat(target)
        if (linked.st_dev, linked.st_ino) != (checked.st_dev, checked.st_ino):
            os.unlink(target)  # replaced between the check and the link
            raise ValueError(f"handed data file {handed!r} changed while it was linked")
    finally:
        os.close(fd)
    path = data.data_path(folder, name, version)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.symlink(target, path)
    drop_older(folder, name, version)


def drop_older(folder: str, name: str, version: int) -> None:
    for entry in os.listdir(folder):  # older versions: job processes keep their mappings
        stem, _, ver = entry.rpartition(".")
        if stem == name and ver.isdigit() and int(ver) < version:
            remove_data(os.path.join(folder, entry))


def remove_data(path: str) -> None:
    """A data file, and its shared-memory file if it is a link to one."""
    with contextlib.suppress(OSError):
        if os.path.islink(path):
            os.unlink(os.readlink(path))
    with contextlib.suppress(OSError):
        os.unlink(path)
