"""What the daemons' command lines share (dispynode, dispynetrelay, dispyscheduler):
port checks, logging, and running until SIGINT/SIGTERM or ``quit`` on stdin."""

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
