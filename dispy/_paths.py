"""Paths a peer names: checked to stay inside the folder they are for (node and
scheduler); and the daemons' own folders, checked to be theirs alone."""

from __future__ import annotations

import fcntl
import os
import stat

from .errors import DispyError


def private_dir(path: str, option: str = "--dest_path") -> str:
    """Make sure ``path`` is a folder of this user's that no one else may write in
    (created with mode 0700, with its parents, if needed); returns its absolute path.

    A daemon keeps results, keys and computations' files there: a folder that
    another local user made first (the defaults are in the shared /tmp), or a
    symlink in its place, could let that user read or replace them.  Such a
    folder is refused with a ``DispyError`` saying what to do, never used.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DispyError(
            f"{option} {path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a folder'}: "
            "it must be a folder of this user's own; remove it or choose another " + option
        )
    if st.st_uid != me:
        raise DispyError(
            f"{option} {path} belongs to user {st.st_uid}, not to this user ({me}): another "
            f"user may have made it to read or replace what is kept there; remove it or "
            f"choose another {option}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:  # ours, but others could put (or swap) files in it: not any more
        os.chmod(path, mode & ~0o022)
    return path


#: The file in a daemon's folder whose lock says the folder is in use (and by whom).
LOCK_FILE = ".lock"


def claim_dir(path: str, program: str, clean: bool = False) -> tuple[str, int]:
    """A daemon's own folder ``path`` (``private_dir``), held for this process alone
    while it runs, and emptied first with ``clean`` (--clean; see ``clear_dir``).
    Returns its absolute path and the lock's descriptor (keep it open).  Blocks.

    The hold is an exclusive lock on its LOCK_FILE, which the system releases
    when the process ends, however it ends (no stale lock after a kill -9).  Two
    daemons in one folder would share its result store and computations'
    folders (one closing a computation removed the other's files): the second
    gets a ``DispyError`` naming the process that holds the folder, as does any
    system error on the folder.
    """
    try:
        return _claim_dir(path, program, clean)
    except OSError as exc:
        raise DispyError(f"cannot use --dest_path {path}: {exc}") from None


def _claim_dir(path: str, program: str, clean: bool) -> tuple[str, int]:
    path = private_dir(path)
    lock = os.path.join(path, LOCK_FILE)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise DispyError(
            f"--dest_path {path} is in use by another {program} (pid {holder}): give each "
            f"{program} on this machine a --dest_path of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if clean:
        clear_dir(path)
    return path, fd


def clear_dir(path: str) -> None:
    """--clean: remove what earlier runs left in the daemon's folder ``path``, but
    not its lock (``claim_dir``), which this run holds."""
    import shutil

    for entry in os.listdir(path):
        if entry == LOCK_FILE:
            continue
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except OSError:
                pass


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
