"""Where a cluster's shared secret comes from, so authentication is on by default.

In order: an explicit secret (``secret=`` / ``-s``), ``$DISPY_SECRET``, the
file named by ``$DISPY_SECRET_FILE``, else the per-user key file
(``$DISPY_KEY_FILE``, default ``~/.config/dispy/cluster.key``), created
with mode 0600 and a random key on first use.  A client and a node run by
the same user on one machine therefore agree with no configuration; for
other machines, copy the key file (or pass the same secret).

No authentication at all needs an explicit choice (``insecure``).  The
secret itself is never logged: only where it came from.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable

from .errors import DispyError
from .protocol import derive_key

logger = logging.getLogger("dispy")

KEY_FILE_ENV = "DISPY_KEY_FILE"


def key_file_path() -> str:
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        return os.path.abspath(os.path.expanduser(path))
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "dispy", "cluster.key")


def read_secret_file(path: str) -> str:
    """The secret in ``path`` (surrounding whitespace removed); DispyError if unusable."""
    try:
        with open(path) as f:
            secret = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DispyError(f"cannot read secret file {path!r}: {exc.strerror}") from None
    if not secret:
        raise DispyError(f"secret file {path!r} is empty: put the cluster's secret in it")
    if mode & stat.S_IRWXO:  # anyone on the machine could run code on the cluster
        raise DispyError(
            f"secret file {path!r} can be read by every user of this machine: "
            f"chmod 600 {path} (and give the cluster a new secret if others had it)"
        )
    if mode & stat.S_IRWXG:
        logger.warning("secret file %s can be read by its group: chmod 600 %s", path, path)
    check_strength(secret, f"secret file {path}")
    return secret


def load_or_create_key(path: str | None = None) -> str:
    """The per-user cluster key, created (mode 0600) if it does not exist yet."""
    path = path or key_file_path()
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.stat(folder)
    if st.st_uid == os.geteuid() and st.st_mode & 0o022:  # others could swap the key file
        os.chmod(folder, stat.S_IMODE(st.st_mode) & ~0o022)
    if not os.path.exists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return read_secret_file(path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        logger.info("created cluster key file %s (copy it to the nodes' users)", path)
    return read_secret_file(path)


#: Shorter secrets get a warning: a recorded handshake lets words be tried offline.
SHORT_SECRET = 16


def check_strength(secret: str, source: str) -> None:
    if len(secret) < SHORT_SECRET:
        logger.warning(
            "the cluster secret (%s) is short, %d characters: whoever records one "
            "connection can try words offline; use %d or more random characters "
            "(the per-user key file has 64)",
            source,
            len(secret),
            SHORT_SECRET + 4,
        )


def resolve_secret(secret: str | None = None, insecure: bool = False) -> tuple[str, str]:
    """(secret, where it came from): see the module's docstring for the order."""
    if insecure:
        return "", "none (insecure: no authentication)"
    if secret:
        check_strength(secret, "secret given")
        return secret, "secret given"
    if os.environ.get("DISPY_SECRET"):
        check_strength(os.environ["DISPY_SECRET"], "$DISPY_SECRET")
        return os.environ["DISPY_SECRET"], "$DISPY_SECRET"
    if os.environ.get("DISPY_SECRET_FILE"):
        path = os.environ["DISPY_SECRET_FILE"]
        return read_secret_file(path), f"secret file {path}"
    path = key_file_path()
    return load_or_create_key(path), f"key file {path}"


def derive_key_soon(secret: str | None) -> Callable[[], bytes]:
    """Start ``derive_key(secret)`` (scrypt: ~20 ms, with the GIL released) in a
    thread; returns a function that waits for the key."""
    out: list = []
    thread = threading.Thread(
        target=lambda: out.append(derive_key(secret)), name="dispy-key", daemon=True
    )
    thread.start()

    def key() -> bytes:
        thread.join()
        return out[0] if out else derive_key(secret)  # (its error, raised here)

    return key
