"""A job's options as the node gets them, from the keywords dispy reads out of
``submit()``'s: ``dispy_job_depends`` (files read now, sent with the job) and
``dispy_job_timeout``."""

from __future__ import annotations

import os

from .errors import SubmitError


def job_options(kwargs: dict, default_timeout, more_opts=None) -> tuple[dict | None, list]:
    """Take dispy's keywords out of ``kwargs``; (the job's options or None, the
    segments of its files, which go before its arguments)."""
    job_files = kwargs.pop("dispy_job_depends", None) or ()
    timeout = kwargs.pop("dispy_job_timeout", None) or default_timeout
    opts: dict = {}
    file_segs: list = []
    if timeout:
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise SubmitError(f"dispy_job_timeout must be a positive number, not {timeout!r}")
        opts["t"] = float(timeout)
    if job_files:
        opts["f"], file_segs = read_job_files(job_files)
    if more_opts:
        opts.update(more_opts)
    return opts or None, file_segs


def read_job_files(paths) -> tuple[list, list]:
    """dispy_job_depends: read the files now; ([[name, mode], ...], [contents, ...])."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    specs, datas = [], []
    for p in paths:
        if not isinstance(p, str | os.PathLike):
            raise SubmitError(f"dispy_job_depends takes file paths, not {type(p).__name__}")
        path = os.fspath(p)
        try:
            with open(path, "rb") as f:
                datas.append(f.read())
            mode = os.stat(path).st_mode & 0o777
        except OSError as exc:
            raise SubmitError(
                f"dispy_job_depends file {path!r} cannot be read: {exc.strerror}; fix the path"
            ) from None
        specs.append([os.path.basename(path), mode])
    return specs, datas
