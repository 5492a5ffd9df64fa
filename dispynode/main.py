"""``dispynode``: the daemon that runs jobs for dispy clients.

::

    dispynode [-i ADDR]... [--node_port PORT] [-c CPUS] [-s SECRET] [--dest_path DIR]

    main() --> NodeServer (server.py, asyncio) --> per client: Session
                                               --> per computation: Computation
                                                   (executor.py) --> computation
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
import sys

from dispy import config
from dispy._daemon import check_ports, setup_logging
from dispy.errors import DispyError
from dispy.keys import read_secret_file, resolve_secret
from dispy.tls import server_context

from .server import NodeServer, install_signal_handlers

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
#: dispy's options whose behaviour is not built yet: refused, saying so, rather
#: than taken and not honoured (a node serving outside its service hours, say).
_NOT_YET_FROM_DISPY = {
    "--service_start": "service hours; run the node from a timer (systemd, cron) meanwhile",
    "--service_stop": "service hours; run the node from a timer (systemd, cron) meanwhile",
    "--service_end": "service hours; run the node from a timer (systemd, cron) meanwhile",
    "--client_shutdown": "use --serve 1 to exit once its client is gone",
    "--init": "an init/close file run at start and stop",
    "--scheduler_host": "the scheduler is given its nodes (dispyscheduler -n) or finds them",
    "--ipv4_udp_multicast": "discovery is by broadcast and by name",
}


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
    for flag, (takes_value, _why) in _ACCEPTED_FROM_DISPY.items():
        if takes_value:
            p.add_argument(flag, default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(
                flag, action="store_const", const=True, default=None, help=argparse.SUPPRESS
            )
    for flag in _NOT_YET_FROM_DISPY:
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
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
        p.set_defaults(**load_config(p, pre.config))
    args = p.parse_args(argv)
    for flag in _NOT_YET_FROM_DISPY:
        if getattr(args, flag.lstrip("-")) is not None:
            p.error(f"{flag} (dispy's) is not supported yet: {_NOT_YET_FROM_DISPY[flag]}")
    for flag, (_takes_value, why) in _ACCEPTED_FROM_DISPY.items():
        if getattr(args, flag.lstrip("-")) is not None:
            logger.warning("%s (dispy's option) has no effect here: %s", flag, why)
    if pre.ip_addr:  # addresses on the command line replace the file's, not add to them
        args.ip_addr = pre.ip_addr
    args.ip_addr = list(dict.fromkeys(args.ip_addr))
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
    return args


#: Options that never go into a saved configuration file.
_NOT_SAVED = {"config", "save_config", "secret", "make_certs", "quit_on_eof"} | {
    f.lstrip("-") for f in (*_ACCEPTED_FROM_DISPY, *_NOT_YET_FROM_DISPY)
}


def load_config(p: argparse.ArgumentParser, path: str) -> dict:
    """Options from a TOML file, keyed like the command line's long options."""
    import tomllib

    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        p.error(f"cannot read --config {path}: {exc}")
    known = {a.dest: a for a in p._actions}
    for key, value in cfg.items():
        if key not in known or key in _NOT_SAVED:
            p.error(f"--config {path}: unknown option {key!r}")
        if key == "secret":
            p.error(f"--config {path}: put the secret in a --secret_file, not here")
        want = known[key].type
        if want is not None and not isinstance(value, want):
            p.error(f"--config {path}: {key} must be a {want.__name__}")
    return cfg


def save_config(args: argparse.Namespace, path: str) -> None:
    """Write the options as TOML (never the secret)."""
    lines = ["# dispynode options (dispynode --config FILE)"]
    for key, value in sorted(vars(args).items()):
        if key in _NOT_SAVED or value is None or key == "auth":
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, list):
            text = "[" + ", ".join(_toml_str(v) for v in value) + "]"
        else:
            text = _toml_str(str(value))
        lines.append(f"{key} = {text}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _stdin_commands(node: NodeServer, quit_on_eof: bool) -> None:
    """Read ``status`` / ``quit`` from standard input (dispy's interactive node)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        return  # stdin is not a pipe or terminal we can watch
    while True:
        line = await reader.readline()
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
    )
    if args.clean:
        node.clean()
    try:
        await node.start()
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
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_config:
        save_config(args, args.save_config)
        print(f"dispynode: options written to {args.save_config}")
        return 0
    if args.make_certs:
        from dispy.certs import main as certs_main

        return certs_main([args.make_certs])
    setup_logging("dispynode", args.debug)
    try:
        import uvloop  # optional, faster event loop where installed

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run(args))


if __name__ == "__main__":
    sys.exit(main())
