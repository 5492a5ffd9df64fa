"""benchmarks/core.py's network figures with the client and the node on two
hosts of a private network; prints ONE JSON object to stdout.

    python benchmarks/core_netns.py            # jobs, latency, to_node, from_node, local_pool
    python benchmarks/core_netns.py --quick    # a smoke run

Needs root and iproute2.  ``tests/netns.py`` makes the network: two network
namespaces (hosts ``bc``, the client, and ``bn``, the node) with a veth pair
each into a bridge in a third namespace, on private addresses that exist only
there (10.231.x.y).  Nothing is created in this machine's own namespace and
nothing is broadcast (the node runs with ``--no_discovery``; the client names
it).  ``dispynode -c 2`` runs on ``bn``; ``benchmarks/core.py --node`` runs on
``bc``, so every job crosses the veth pairs and the bridge.  The local process
pool's figures come from the same run, on ``bc``.  Every process this starts
is stopped by its PID, and the namespaces are deleted, at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dispy import discovery  # noqa: E402

os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")  # no broadcast here

NODE_PORT = 51348


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="longest the client may take (s)")
    args = p.parse_args(argv)
    from tests.netns import NetnsUnavailable, Network, wait_for_line

    try:
        net = Network()
    except NetnsUnavailable as exc:
        print(json.dumps({"skipped": str(exc)}))
        return 0
    secret = "bench-core-netns-" + os.urandom(8).hex()
    env = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "DISPY_SECRET": secret}
    with net, tempfile.TemporaryDirectory(prefix="dispy-bench-netns-") as tmp:
        client, server = net.add_host("bc", "a"), net.add_host("bn", "a")
        t0 = time.perf_counter()
        node = server.popen(
            [sys.executable, "-m", "dispynode", "-c", "2", "-i", server.ip,
             "--node_port", str(NODE_PORT), "--daemon", "--no_discovery",
             "--dest_path", os.path.join(tmp, "node")],
            env=env, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_line(node, r"^dispynode ready", timeout=60)
        started = time.perf_counter() - t0
        argv = [sys.executable, os.path.join(HERE, "core.py"), "--node",
                f"{server.ip}:{NODE_PORT}", "--secret", secret]  # fmt: skip
        if args.quick:
            argv.append("--quick")
        done = client.run(argv, env=env, timeout=args.timeout)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:] if isinstance(done.stderr, str) else "")
            raise SystemExit(f"core.py on the client host failed (exit {done.returncode})")
        out = json.loads(done.stdout)
    out["network"] = {
        "client": client.ip,
        "node": server.ip,
        "how": "two network namespaces, veth pairs into a bridge (tests/netns.py)",
        "node_started_s": round(started, 3),
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
