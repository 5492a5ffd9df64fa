"""Paths a peer names: checked to stay inside the folder they are for (node and scheduler)."""

from __future__ import annotations

import os


def safe_relpath(path: str) -> str:
    """A client-given file path, checked to stay inside the computation's folder."""
    norm = os.path.normpath(path)
    if not path or os.path.isabs(path) or norm.startswith("..") or "\0" in path:
        raise ValueError(f"file path {path!r} must be relative and stay inside the computation")
    return norm
