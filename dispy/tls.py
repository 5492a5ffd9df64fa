"""TLS for every dispy connection, on ``ssl.SSLContext`` (Python 3.11-3.13).

Always mutual: the node requires a client certificate and the client
verifies the node's, both against ``cafile`` (a cluster CA, e.g. from
``dispy-certs``) or, without one, against ``certfile`` itself, so dispy's
documented setup (the same self-signed certificate on client and nodes)
works and is verified.  Host names are not checked: nodes are often
reached by address, and membership of the cluster is what the CA
signature proves.  The shared-secret handshake still runs inside TLS.
"""

from __future__ import annotations

import ssl

from .errors import DispyError


def _check(certfile, keyfile, cafile) -> None:
    if keyfile and not certfile:
        raise DispyError("keyfile given without certfile: TLS needs the certificate too")


def server_context(certfile: str, keyfile: str | None = None, cafile: str | None = None):
    """The node's context: presents ``certfile``, requires a client certificate."""
    _check(certfile, keyfile, cafile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
        ctx.load_verify_locations(cafile or certfile)
    except (OSError, ssl.SSLError) as exc:
        raise DispyError(f"cannot load TLS certificate/key/CA: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None
):
    """The client's context, or None when no TLS option is given."""
    if not (certfile or keyfile or cafile):
        return None
    _check(certfile, keyfile, cafile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile or certfile)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise DispyError(f"cannot load TLS certificate/key/CA: {exc}") from None
    return ctx
