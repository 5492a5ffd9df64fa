"""Exceptions that dispy raises for known failures.

Every error says what went wrong and what the user can do about it; none of
them is a bare ``Exception``.
"""

from __future__ import annotations


class DispyError(Exception):
    """Base class of every error dispy raises on purpose."""


class ProtocolError(DispyError):
    """A peer sent bytes that do not follow the dispy wire protocol.

    The connection that carried them is closed; other connections go on.
    """


class FrameTooLarge(ProtocolError):
    """A frame announced a size above the configured limit."""


class AuthenticationFailed(DispyError):
    """The peer could not prove it holds the same secret (or certificate)."""


class IncompatibleVersion(ProtocolError):
    """The peer speaks no protocol version that this side speaks."""


class ConnectionClosed(DispyError):
    """The connection ended (by the peer, the network, or ``close()``)."""


class NodeLost(DispyError):
    """A node stopped answering or its connection broke."""


class SubmitError(DispyError):
    """A job could not be submitted (bad arguments, closed cluster...)."""


class ComputationError(DispyError):
    """The computation, its setup, or its dependencies could not be sent or set up."""


class JobFailed(DispyError):
    """Raised by ``job.future.result()`` / ``await job`` for a job that did not finish:
    it ended Terminated, Cancelled or Abandoned.  ``job`` is the DispyJob."""

    def __init__(self, job, message: str) -> None:
        super().__init__(message)
        self.job = job
