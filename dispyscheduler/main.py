"""``dispyscheduler``: share nodes between client programs (``SharedJobCluster``).

::

    dispyscheduler [-n NODE]... [-i ADDR]... [-p PORT] [--node_secret S]
                   [--cluster_secret S] [--fair_cluster_scheduler |
                   --early_cluster_scheduler] [--daemon] [-d] ...

Finds nodes like a client does (``-n`` names, addresses or wildcards; by
default ``'*'``: broadcast), and serves clients on the scheduler port (51349).
Prints one line ``dispyscheduler ready: ...`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from dispy import config, discovery
from dispy.engine import parse_nodes
from dispy.errors import DispyError
from dispy.keys import read_secret_file, resolve_secret
from dispy.protocol import derive_key
from dispy.runtime.daemon import (
    add_dispy_options,
    check_ports,
    load_config,
    run_until_stopped,
    save_config,
    setup_logging,
    warn_dispy_options,
)
from dispy.tls import client_context, server_context

from .server import SchedulerServer

logger = logging.getLogger("dispyscheduler")


#: dispy's options taken with a warning: (takes a value, why it changes nothing here).
_ACCEPTED_FROM_DISPY = {
    "--cleanup_nodes": (False, "a computation's files are always removed from its nodes "
                        "when it closes"),
    "--msg_timeout": (True, "a peer has a fixed time to authenticate, and a silent one is "
                      "declared gone after 5 pulses"),
}  # fmt: skip
#: Options that never go into a saved configuration file.
_NOT_SAVED = {"config", "save_config", "policy"} | {f.lstrip("-") for f in _ACCEPTED_FROM_DISPY}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dispyscheduler",
        description="Share dispynode nodes between client programs (SharedJobCluster).",
    )
    p.add_argument(
        "-n",
        "--node",
        dest="nodes",
        action="append",
        default=[],
        help="node name, address or wildcard (repeatable; default '*': broadcast)",
    )
    p.add_argument(
        "-i",
        "--ip_addr",
        "--host",
        dest="ip_addr",
        action="append",
        default=[],
        help="address to serve clients on (repeatable; default all)",
    )
    p.add_argument(
        "--ext_ip_addr",
        "--ext_host",
        dest="ext_ip_addr",
        help="address clients should use (behind NAT)",
    )
    p.add_argument(
        "--ipv4_udp_multicast",
        action="store_true",
        help=f"find nodes by IPv4 multicast (group {discovery.MULTICAST_GROUP}) instead of broadcast",
    )
    p.add_argument(
        "-p",
        "--port",
        type=int,
        default=config.SCHEDULER_PORT,
        help="port clients connect to (default %(default)s)",
    )
    p.add_argument(
        "--node_port", type=int, default=config.NODE_PORT, help="nodes' port (default %(default)s)"
    )
    p.add_argument(
        "--node_secret",
        default=None,
        help="the nodes' secret (default: $DISPY_SECRET or the key file)",
    )
    p.add_argument(
        "--cluster_secret",
        default=None,
        help="secret clients must prove (default: the node secret)",
    )
    p.add_argument(
        "--node_secret_file",
        help="read the nodes' secret from this file (not visible in ps, unlike --node_secret)",
    )
    p.add_argument(
        "--cluster_secret_file",
        help="read the clients' secret from this file (not visible in ps)",
    )
    p.add_argument("--node_certfile", help="TLS certificate to present to nodes")
    p.add_argument("--node_keyfile", help="its key, if not in --node_certfile")
    p.add_argument("--cluster_certfile", help="TLS certificate for clients")
    p.add_argument("--cluster_keyfile", help="its key, if not in --cluster_certfile")
    p.add_argument(
        "--node_cafile",
        help="CA the nodes' certificates must be signed by (dispy-certs' ca.pem; "
        "default: --node_certfile itself)",
    )
    p.add_argument(
        "--cluster_cafile",
        help="CA the clients' certificates must be signed by (default: --cluster_certfile)",
    )
    p.add_argument(
        "--pulse_interval",
        type=float,
        default=2.0,
        help="seconds between pulses with nodes and clients (default %(default)s)",
    )
    p.add_argument(
        "--ping_interval",
        type=float,
        default=None,
        help="seconds between discovery requests (default: at start only)",
    )
    p.add_argument(
        "--zombie_interval",
        type=float,
        default=60.0,
        help="minutes a silent client keeps its computations (default %(default)s)",
    )
    p.add_argument(
        "--dest_path_prefix",
        "--dest_path",
        dest="dest_path",
        default=config.SCHEDULER_DEST_PATH,
        help="where clients' files are kept (default %(default)s)",
    )
    p.add_argument(
        "--max_file_size",
        type=int,
        default=0,
        help="largest file a client may send (bytes; 0: no limit)",
    )
    p.add_argument("--clean", action="store_true", help="remove what earlier runs left")
    p.add_argument(
        "--httpd",
        action="store_true",
        help="serve the web monitor (its URL, with the access token, is logged at start)",
    )
    p.add_argument(
        "--httpd_host",
        default="127.0.0.1",
        help="address the web monitor listens on (default %(default)s)",
    )
    p.add_argument(
        "--httpd_port",
        type=int,
        default=8181,
        help="the web monitor's port (default %(default)s; 0: a free one)",
    )
    policy = p.add_mutually_exclusive_group()
    policy.add_argument(
        "--fair_cluster_scheduler", action="store_true", help="clusters take turns, one job each"
    )
    policy.add_argument(
        "--early_cluster_scheduler",
        action="store_true",
        help="the cluster created first goes first",
    )
    p.add_argument(
        "--cooperative",
        action="store_true",
        help="accepted for dispy compatibility (clients may always set node CPUs)",
    )
    p.add_argument("--daemon", action="store_true", help="do not read commands from standard input")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    p.add_argument("--config", help="read options from this TOML file (command line wins)")
    p.add_argument(
        "--save_config",
        metavar="FILE",
        help="write the options given (file and command line) to FILE as TOML, then exit",
    )
    add_dispy_options(p, _ACCEPTED_FROM_DISPY)
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**load_config(p, pre.config, _NOT_SAVED))
    args = p.parse_args(argv)
    warn_dispy_options(args, _ACCEPTED_FROM_DISPY, logger)
    for name in ("nodes", "ip_addr"):  # the command line's replace the file's
        if getattr(pre, name):
            setattr(args, name, getattr(pre, name))
    check_ports(p, args, "port", "node_port", "httpd_port")
    try:
        parse_nodes(args.nodes or ["*"], args.node_port)
    except ValueError as exc:
        p.error(f"-n: {exc}")
    for name in ("node_secret", "cluster_secret"):
        if getattr(args, name) and getattr(args, name + "_file"):
            p.error(f"give --{name} or --{name}_file, not both")
        if getattr(args, name):
            logger.warning(
                "--%s on the command line can be seen by other users (ps); prefer --%s_file",
                name,
                name,
            )
    try:
        if args.node_secret_file:
            args.node_secret = read_secret_file(args.node_secret_file)
            args.node_auth = f"secret file {args.node_secret_file}"
        else:
            args.node_secret, args.node_auth = resolve_secret(args.node_secret)
        if args.cluster_secret_file:
            args.cluster_secret = read_secret_file(args.cluster_secret_file)
    except DispyError as exc:
        p.error(str(exc))
    if args.cluster_secret is None:
        args.cluster_secret = args.node_secret
    if args.save_config:
        return args
    args.policy = (
        "fair"
        if args.fair_cluster_scheduler
        else "early"
        if args.early_cluster_scheduler
        else "first"
    )
    return args


async def run(args: argparse.Namespace) -> int:
    try:
        client_ssl = (
            server_context(args.cluster_certfile, args.cluster_keyfile, args.cluster_cafile)
            if args.cluster_certfile else None
        )  # fmt: skip
        node_ssl = (
            client_context(args.node_certfile, args.node_keyfile, args.node_cafile)
            if args.node_certfile or args.node_cafile else None
        )  # fmt: skip
    except DispyError as exc:
        print(f"dispyscheduler: {exc}", file=sys.stderr)
        return 2
    server = SchedulerServer(
        cluster_key=derive_key(args.cluster_secret),
        node_key=derive_key(args.node_secret),
        ip_addrs=args.ip_addr,
        port=args.port,
        node_port=args.node_port,
        nodes=args.nodes,
        policy=args.policy,
        dest_path=args.dest_path,
        pulse_interval=args.pulse_interval,
        ping_interval=args.ping_interval,
        zombie_interval=args.zombie_interval * 60.0,
        max_file_size=args.max_file_size,
        client_ssl=client_ssl,
        node_ssl=node_ssl,
        ext_ip_addr=args.ext_ip_addr,
        multicast=args.ipv4_udp_multicast,
    )
    try:
        await server.start(clean=args.clean)
    except DispyError as exc:
        print(f"dispyscheduler: {exc}", file=sys.stderr)
        await server.shutdown()
        return 2
    except OSError as exc:
        print(
            f"dispyscheduler: cannot listen on port {args.port}: {exc.strerror or exc} "
            "(is another dispyscheduler using it? try --port)",
            file=sys.stderr,
        )
        await server.shutdown()
        return 2
    monitor = None
    if args.httpd:
        from .monitor import SchedulerMonitor

        try:
            monitor = SchedulerMonitor(server, host=args.httpd_host, port=args.httpd_port)
        except OSError as exc:
            print(
                f"dispyscheduler: cannot serve the monitor on {args.httpd_host}:"
                f"{args.httpd_port}: {exc.strerror or exc} (try --httpd_port)",
                file=sys.stderr,
            )
            await server.shutdown()
            return 2
    addrs = " ".join(f"{h}:{p}" for h, p in server.bound)
    print(f"dispyscheduler ready: addr={addrs} policy={args.policy}", flush=True)
    logger.info("nodes: %s; secret for nodes from %s", " ".join(server.node_specs), args.node_auth)
    await run_until_stopped(server.stopped, daemon=args.daemon)
    if monitor is not None:  # from a thread: its requests may be waiting for this loop
        await asyncio.to_thread(monitor.shutdown)
    await server.shutdown()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_config:
        save_config(args, args.save_config, "dispyscheduler", _NOT_SAVED)
        print(f"dispyscheduler: options written to {args.save_config}")
        return 0
    setup_logging("dispyscheduler", args.debug)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
