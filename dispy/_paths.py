"""Paths a peer names: checked to stay inside the folder they are for (node and scheduler)."""

from __future__ import annotations

import os


def safe_relpath(path: str) -> str:
    """A client-given file path, checked to stay inside the computation's folder."""
    norm = os.path.normpath(path)
    if not path or os.path.isabs(path) or norm.startswith("..") or "\0" in path:
        raise ValueError(f"file path {path!r} must be relative and stay inside the computation")
    return norm


def write_chunk(folder: str, rel: str, offset: int, data, mode: int) -> None:
    """Write one chunk of the file ``rel`` (from ``safe_relpath``) inside ``folder``,
    at ``offset`` (0 starts the file anew), with file mode ``mode``.  Blocks: run it
    in a thread.  Refuses a path that leads out of ``folder`` (through a symlink)."""
    path = os.path.join(folder, rel)
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(folder) + os.sep):
        raise ValueError(f"file path {rel!r} escapes the computation's folder")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
    fd = os.open(path, flags, mode)
    try:
        os.pwrite(fd, data, offset)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
