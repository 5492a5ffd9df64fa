"""``dispy-certs DIR``: make a cluster CA and certificates for nodes and clients.

For users without a PKI.  Writes into DIR::

    ca.pem      the cluster CA's certificate (give it to every node and client)
    private/ca.key  its private key, in a folder of its own (mode 0700): never
                copy it to a node; needed only to make more certificates
    node.pem    node.key     for dispynode --certfile node.pem --keyfile node.key --cafile ca.pem
    node-NAME.pem/.key       with --node NAME (repeatable): a key of its own for each node,
                             NAME in its certificate
    client.pem  client.key   for JobCluster(..., certfile=, keyfile=, cafile=)

Keys are ECDSA P-256, written with mode 0600 (also over older files).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dispy cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write(path: str, data: bytes, private: bool) -> None:
    """Write ``path`` anew with its mode (0600 for keys) whatever was there before;
    a symlink in its place is replaced, not followed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_bytes(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(directory: str, hosts=(), days: int = 3650, nodes=()) -> dict[str, str]:
    """Create the CA, node and client certificates in ``directory`` (and one per
    name in ``nodes``); return their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(directory, "private"), mode=0o700, exist_ok=True)
    os.chmod(os.path.join(directory, "private"), 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("dispy cluster CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    names += [_san(h) for h in hosts]
    paths = {
        "ca": os.path.join(directory, "ca.pem"),
        "ca_key": os.path.join(directory, "private", "ca.key"),
    }
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), False)
    _write(paths["ca_key"], _key_bytes(ca_key), True)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    # the node's certificate may also serve as a client's (dispy's one-certificate setup)
    roles = [("node", both, names, "dispy node")]
    roles += [(f"node-{n}", both, [*names, _san(n)], f"dispy node {n}") for n in nodes]
    roles.append(("client", [ExtendedKeyUsageOID.CLIENT_AUTH], names, "dispy client"))
    for role, usage, sans, cn in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[role] = os.path.join(directory, f"{role}.pem")
        paths[f"{role}_key"] = os.path.join(directory, f"{role}.key")
        _write(paths[role], cert.public_bytes(serialization.Encoding.PEM), False)
        _write(paths[f"{role}_key"], _key_bytes(key), True)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="dispy-certs", description="Make a cluster CA and node/client TLS certificates."
    )
    p.add_argument("directory", help="where to write ca.pem, node.pem/.key, client.pem/.key")
    p.add_argument("--hosts", default="", help="extra node names/addresses, comma separated")
    p.add_argument("--days", type=int, default=3650, help="validity (default %(default)s days)")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME",
        help="also a certificate and key of its own for node NAME (repeatable): "
        "node-NAME.pem, node-NAME.key",
    )
    args = p.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    for n in args.node:
        if not n or "/" in n or n.startswith("."):
            p.error(f"--node {n!r}: give a host name or address")
    paths = make_certs(args.directory, hosts, args.days, args.node)
    print(
        f"wrote {', '.join(sorted(os.path.basename(v) for v in paths.values()))} "
        f"in {args.directory}"
    )
    print(
        f"node:   dispynode --certfile {paths['node']} --keyfile {paths['node_key']} "
        f"--cafile {paths['ca']}"
    )
    print(f"keep {paths['ca_key']} off the nodes: it signs certificates for the cluster")
    print(
        f"client: JobCluster(..., certfile={paths['client']!r}, keyfile={paths['client_key']!r}, "
        f"cafile={paths['ca']!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
