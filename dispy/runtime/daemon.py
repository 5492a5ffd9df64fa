"""What the daemons' command lines share (dispynode, dispynetrelay, dispyscheduler):
port checks, dispy's options taken with a warning, TOML configuration files,
logging, and running until SIGINT/SIGTERM or ``quit`` on stdin."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys


def check_ports(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``parser.error`` for any of ``args.<name>`` that is not a port number."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 65535:
            parser.error(f"--{name} {value} is not a port number (0-65535)")


def add_dispy_options(p: argparse.ArgumentParser, table: dict) -> None:
    """dispy 4.15's options with no counterpart here (``table``: flag -> (takes a
    value, why)): taken, hidden from --help, so dispy's scripts still start."""
    for flag, (takes_value, _why) in table.items():
        if takes_value:
            p.add_argument(flag, default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(
                flag, action="store_const", const=True, default=None, help=argparse.SUPPRESS
            )


def warn_dispy_options(args: argparse.Namespace, table: dict, logger) -> None:
    """A warning for each of ``table``'s options given, naming it and why."""
    for flag, (_takes_value, why) in table.items():
        if getattr(args, flag.lstrip("-")) is not None:
            logger.warning("%s (dispy's option) has no effect here: %s", flag, why)


def load_config(p: argparse.ArgumentParser, path: str, not_saved: set) -> dict:
    """Options from a TOML file, keyed like the command line's long options."""
    import tomllib

    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        p.error(f"cannot read --config {path}: {exc}")
    except RecursionError:  # (found by fuzzing: brackets nested a thousand deep)
        p.error(f"cannot read --config {path}: nested too deeply")
    known = {a.dest: a for a in p._actions}
    for key, value in cfg.items():
        if key not in known or key in not_saved:
            p.error(f"--config {path}: unknown option {key!r}")
        if "secret" in key and not key.endswith("_file"):
            p.error(f"--config {path}: put the secret in a --secret_file, not here")
        cfg[key] = _config_value(p, path, key, value, known[key])
    return cfg


def _config_value(p: argparse.ArgumentParser, path: str, key: str, value, action):
    """A config file's value for ``action``, checked as its command-line form is."""
    want = action.type
    many = isinstance(action, argparse._AppendAction)  # repeatable: a list in the file
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if type(value) is not bool:
            p.error(f"--config {path}: {key} must be true or false")
        return value
    values = value if many else [value]
    if many and not isinstance(value, list):
        p.error(f'--config {path}: {key} must be a list, e.g. {key} = ["..."]')
    out = []
    for v in values:
        if want is float and type(v) is int:
            v = float(v)  # 5 for 5.0
        if type(v) is bool and want is not bool:
            p.error(f"--config {path}: {key} must be a {(want or str).__name__}, not true/false")
        if not isinstance(v, want or str):
            p.error(f"--config {path}: {key} must be a {(want or str).__name__}")
        out.append(v)
    return out if many else out[0]


def save_config(args: argparse.Namespace, path: str, prog: str, not_saved: set) -> None:
    """Write the options as TOML (never a secret)."""
    lines = [f"# {prog} options ({prog} --config FILE)"]
    for key, value in sorted(vars(args).items()):
        if key in not_saved or value is None or "auth" in key:
            continue
        if "secret" in key and not key.endswith("_file"):
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


def setup_logging(prog: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=f"%(asctime)s {prog} %(levelname)s %(message)s",
    )


async def _stdin_quit(stopped: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() in ("quit", "exit"):
            stopped.set()
            return


async def run_until_stopped(stopped: asyncio.Event, *, daemon: bool) -> None:
    """Wait until ``stopped`` is set: by SIGINT or SIGTERM, or (unless ``daemon``) by
    ``quit``/``exit`` or the end of standard input."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    task = None if daemon else loop.create_task(_stdin_quit(stopped))
    try:
        await stopped.wait()
    finally:
        if task is not None:
            task.cancel()
