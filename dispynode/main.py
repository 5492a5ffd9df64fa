"""``dispynode``: the daemon that runs jobs for dispy clients.

::

    dispynode [-i ADDR]... [--node_port PORT] [-c CPUS] [-s SECRET] [--dest_path DIR]

    main() --> NodeServer (server.py, asyncio) --> per client: Session
                                               --> per computation: Computation
                                                   (handles.py) --> computation
                                                   process --> job processes

Prints one line ``dispynode ready: ...`` on stdout once it listens (tools and
tests wait for it), then serves until SIGINT/SIGTERM, ``quit`` on standard
input (unless --daemon), or --serve clients have come and gone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
import sys

from dispy import config, discovery
from dispy.errors import DispyError
from dispy.keys import read_secret_file, resolve_secret
from dispy.runtime.daemon import (
    add_dispy_options,
    check_ports,
    load_config,
    save_config,
    setup_logging,
    warn_dispy_options,
)
from dispy.tls import server_context

from .server import NodeServer, install_signal_handlers
from .service import ServiceHours

logger = logging.getLogger("dispynode")


#: dispy's options taken with a warning: (takes a value, why it changes nothing here).
_ACCEPTED_FROM_DISPY = {
    "--msg_timeout": (True, "a peer has --handshake_timeout to authenticate, and a silent "
                      "one is declared gone after 5 pulses"),
    "--ping_interval": (True, "the node announces itself when it starts and when its "
                        "clients have left; clients ask again with their own ping_interval"),
    "--force_cleanup": (False, "a computation's files are always removed when it closes"),
    "--unsafe_setup": (False, "setup always runs in the computation's own process"),
    "--admin_secret": (True, "there is no admin connection; stop the node with a signal "
                       "or 'quit'"),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dispynode",
        description="Run jobs for dispy clients (JobCluster) on this machine.",
    )
    p.add_argument(
        "-i",
        "--ip_addr",
        "--host",
        dest="ip_addr",
        action="append",
        default=[],
        help="address to listen on (repeatable; default: all addresses)",
    )
    p.add_argument(
        "--ext_ip_addr",
        "--ext_host",
        dest="ext_ip_addr",
        help="address clients should use (behind NAT)",
    )
    p.add_argument(
        "-c",
        "--cpus",
        type=int,
        default=0,
        help="CPUs to use for jobs (default all; negative: all but that many)",
    )
    p.add_argument(
        "--node_port", type=int, default=config.NODE_PORT, help="TCP port (default %(default)s)"
    )
    p.add_argument(
        "--client_port",
        type=int,
        default=config.CLIENT_PORT,
        help="UDP port clients hear announcements on (default %(default)s)",
    )
    p.add_argument(
        "--no_discovery",
        action="store_true",
        help="do not answer or send discovery datagrams (clients must name this node)",
    )
    p.add_argument(
        "-s",
        "--secret",
        default=None,
        help="shared secret (visible in ps; prefer --secret_file or $DISPY_SECRET)",
    )
    p.add_argument(
        "--secret_file",
        "--secret-file",
        dest="secret_file",
        help="read the shared secret from this file",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no authentication: anyone who reaches the node runs code on it; "
        "binds to 127.0.0.1 unless -i names addresses",
    )
    p.add_argument(
        "--zombie_interval",
        type=float,
        default=60.0,
        help="minutes a silent client keeps its computations here (default %(default)s)",
    )
    p.add_argument("--certfile", help="TLS certificate (PEM; may hold the key too)")
    p.add_argument("--keyfile", help="TLS private key, if not in --certfile")
    p.add_argument(
        "--cafile", help="CA that client certificates must be signed by (default: --certfile)"
    )
    p.add_argument(
        "--make_certs",
        metavar="DIR",
        help="write a cluster CA and node/client certificates into DIR, then exit",
    )
    p.add_argument(
        "--handshake_timeout",
        type=float,
        default=config.HANDSHAKE_TIMEOUT,
        help="seconds a peer has to authenticate (default %(default)s)",
    )
    p.add_argument(
        "--max_unauth",
        type=int,
        default=config.MAX_UNAUTHENTICATED,
        help="most connections still authenticating at once (default %(default)s)",
    )
    p.add_argument("--name", help="node name reported to clients (default: host name)")
    p.add_argument(
        "--dest_path",
        "--dest_path_prefix",
        dest="dest_path",
        default=config.DEFAULT_DEST_PATH,
        help="where computations' files go",
    )
    # dispy 4.15's options that have no counterpart here: taken, with a warning
    # saying why, so that dispy's service units and scripts still start a node
    add_dispy_options(p, _ACCEPTED_FROM_DISPY)
    p.add_argument(
        "--service_start",
        metavar="HH:MM",
        help="serve only from this time of day (with --service_stop and/or --service_end)",
    )
    p.add_argument(
        "--service_stop",
        metavar="HH:MM",
        help="from this time of day take no new jobs (running ones go on); "
        "jobs not started go back to their clients",
    )
    p.add_argument(
        "--service_end",
        metavar="HH:MM",
        help="at this time of day also stop the running jobs; they go back to their "
        "clients, to run elsewhere or when the node serves again",
    )
    p.add_argument(
        "--client_shutdown",
        action="store_true",
        help="exit once the first client has closed its computation (as --serve 1)",
    )
    p.add_argument(
        "--init",
        metavar="FILE",
        help="Python file whose init() runs before the node serves and close() when it stops",
    )
    p.add_argument(
        "--scheduler_host",
        metavar="HOST",
        help="also announce this node to the dispyscheduler (or client) on HOST, "
        "for one in another network",
    )
    p.add_argument(
        "--ipv4_udp_multicast",
        action="store_true",
        help=f"discovery by IPv4 multicast (group {discovery.MULTICAST_GROUP}) instead of "
        "broadcast",
    )
    p.add_argument(
        "--max_file_size",
        type=int,
        default=0,
        help="largest file a client may send (bytes; 0: no limit)",
    )
    p.add_argument(
        "--clean", action="store_true", help="remove files left under dest_path by earlier runs"
    )
    p.add_argument("--serve", type=int, default=-1, help="exit after serving this many clients")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging")
    p.add_argument("--daemon", action="store_true", help="do not read commands from standard input")
    p.add_argument("--quit_on_eof", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help="read options from this TOML file (command line wins)")
    p.add_argument(
        "--save_config",
        metavar="FILE",
        help="write the options given (file and command line) to FILE as TOML, then exit",
    )
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**load_config(p, pre.config, _NOT_SAVED))
    args = p.parse_args(argv)
    warn_dispy_options(args, _ACCEPTED_FROM_DISPY, logger)
    if pre.ip_addr:  # addresses on the command line replace the file's, not add to them
        args.ip_addr = pre.ip_addr
    args.ip_addr = list(dict.fromkeys(args.ip_addr))
    try:
        args.service = ServiceHours.from_options(
            args.service_start, args.service_stop, args.service_end
        )
    except ValueError as exc:
        p.error(str(exc))
    if args.client_shutdown and args.serve < 0:
        args.serve = 1
    if args.init and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file")
    if args.save_config:
        return args
    if args.make_certs:
        return args
    if (args.keyfile or args.cafile) and not args.certfile:
        p.error("--keyfile/--cafile need --certfile")
    ncpu = os.cpu_count() or 1
    if args.cpus <= 0:
        args.cpus = max(1, ncpu + args.cpus)
    elif args.cpus > ncpu:
        logger.warning("--cpus %d is more than this machine's %d CPUs", args.cpus, ncpu)
    check_ports(p, args, "node_port")
    if args.secret and args.secret_file:
        p.error("give --secret or --secret_file, not both")
    if args.insecure and (args.secret or args.secret_file):
        p.error("--insecure means no secret: drop --secret/--secret_file")
    if args.secret:
        logger.warning(
            "--secret on the command line can be seen by other users (ps); "
            "prefer --secret_file or $DISPY_SECRET"
        )
    try:
        if args.secret_file:
            args.secret, args.auth = (
                read_secret_file(args.secret_file),
                f"secret file {args.secret_file}",
            )
        else:
            args.secret, args.auth = resolve_secret(args.secret, args.insecure)
    except DispyError as exc:
        p.error(str(exc))
    if args.insecure and not args.ip_addr:
        args.ip_addr = ["127.0.0.1"]  # no authentication: never reachable from elsewhere by default
    for addr in args.ip_addr if args.insecure else ():
        if not (addr.startswith("127.") or addr in ("::1", "localhost")):
            p.error(
                f"--insecure with -i {addr}: whoever reaches that address could run any code "
                "here as this user; --insecure serves on loopback (127.x) only: to serve other "
                "machines, give the cluster a secret (--secret_file, $DISPY_SECRET)"
            )
    return args


#: Options that never go into a saved configuration file.
_NOT_SAVED = {"config", "save_config", "secret", "make_certs", "quit_on_eof", "service"} | {
    f.lstrip("-") for f in _ACCEPTED_FROM_DISPY
}


def _watchable(stream) -> bool:
    """Whether the event loop can wait for ``stream``'s input: a terminal, a pipe or
    a socket.  Not a file, nor ``/dev/null`` (what a program started in the background
    or by a service manager gets), whose reads never wait anyway."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, ValueError, OSError):
        return False
    return os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _stdin_commands(node: NodeServer, quit_on_eof: bool) -> None:
    """Read ``status`` / ``quit`` from standard input (dispy's interactive node)."""
    if sys.stdin is None:
        return
    if _watchable(sys.stdin):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (ValueError, OSError):
            return
        readline = reader.readline
    else:  # a file, or /dev/null: read at once, in a thread (no such read waits long)
        stdin = sys.stdin.buffer

        async def readline() -> bytes:
            try:
                return await asyncio.to_thread(stdin.readline)
            except (OSError, ValueError):
                return b""

    while True:
        line = await readline()
        if not line:
            if quit_on_eof:
                node.stopped.set()
            return
        cmd = line.decode(errors="replace").strip().lower()
        if cmd in ("quit", "exit"):
            node.stopped.set()
            return
        if cmd == "status":
            print(
                f"{node.name}: {node.cpus} CPUs, {node.running} running, {len(node.queue)} queued, "
                f"{node.jobs_done} done, {len(node.sessions)} clients",
                flush=True,
            )


async def run(args: argparse.Namespace) -> int:
    ssl_ctx = None
    if args.certfile:
        try:
            ssl_ctx = server_context(args.certfile, args.keyfile, args.cafile)
        except DispyError as exc:
            print(f"dispynode: {exc}", file=sys.stderr)
            return 2
    node = NodeServer(
        ssl=ssl_ctx,
        zombie_interval=args.zombie_interval * 60.0,
        ip_addrs=args.ip_addr,
        port=args.node_port,
        secret=args.secret,
        cpus=args.cpus,
        dest_path=args.dest_path,
        name=args.name,
        ext_ip_addr=args.ext_ip_addr,
        max_file_size=args.max_file_size,
        serve=args.serve,
        handshake_timeout=args.handshake_timeout,
        max_unauth=args.max_unauth,
        client_port=args.client_port,
        discover=not args.no_discovery,
        multicast=args.ipv4_udp_multicast,
        scheduler_host=args.scheduler_host,
        service=args.service,
    )
    hooks = {}
    if args.init:
        try:
            hooks = _run_init(args.init)
        except Exception as exc:  # the administrator's code: any error stops the start
            print(f"dispynode: --init {args.init} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        await node.start(clean=args.clean)
    except DispyError as exc:
        print(f"dispynode: {exc}", file=sys.stderr)
        await node.shutdown()
        return 2
    except OSError as exc:
        print(
            f"dispynode: cannot listen on {args.ip_addr or 'all addresses'} port {args.node_port}: "
            f"{exc.strerror or exc} (is another dispynode using it? try --node_port)",
            file=sys.stderr,
        )
        return 2
    install_signal_handlers(node)
    addrs = " ".join(f"{h}:{p}" for h, p in node.bound)
    print(f"dispynode ready: name={node.name} cpus={node.cpus} addr={addrs}", flush=True)
    logger.info("serving on %s with %d CPUs, files under %s", addrs, node.cpus, node.dest_path)
    if args.insecure:
        logger.warning("INSECURE mode: clients are not authenticated (--insecure)")
    else:
        logger.info("clients must authenticate; secret from %s", args.auth)
    if ssl_ctx is not None:
        logger.info(
            "TLS on: clients must present a certificate signed by %s", args.cafile or args.certfile
        )
    stdin_task = None
    if not args.daemon or args.quit_on_eof:
        stdin_task = asyncio.get_running_loop().create_task(_stdin_commands(node, args.quit_on_eof))
    await node.stopped.wait()
    if stdin_task is not None:
        stdin_task.cancel()
    await node.shutdown()
    if callable(hooks.get("close")):
        try:
            hooks["close"]()
        except Exception as exc:  # logged: the node stops anyway
            logger.error("--init %s: close() failed: %s: %s", args.init, type(exc).__name__, exc)
    return 0


def _run_init(path: str) -> dict:
    """--init FILE (dispy's): run the file, then its ``init()``; its namespace (for
    ``close()`` at stop)."""
    import runpy

    ns = runpy.run_path(path, run_name="dispynode_init")
    if callable(ns.get("init")):
        ns["init"]()
    logger.info("--init %s: ran%s", path, " init()" if callable(ns.get("init")) else "")
    return ns


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_config:
        save_config(args, args.save_config, "dispynode", _NOT_SAVED)
        print(f"dispynode: options written to {args.save_config}")
        return 0
    if args.make_certs:
        from dispy.certs import main as certs_main

        return certs_main([args.make_certs])
    setup_logging("dispynode", args.debug)
    # asyncio's own loop, whatever else is installed: uvloop (tried, 73bf15f) did 12%
    # more tiny jobs a second but took 2.3 MiB more of the node's 40 MiB
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
