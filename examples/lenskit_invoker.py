"""Batch scoring the way LensKit does it, over a dispy cluster.

A recommender's item factors (the "model") are placed once on each node; each
task scores every item for one user and keeps the top N.  The same code runs
in this process (n_jobs=1), on a node started here (n_jobs=2), or on your
nodes (--nodes host1 host2, with the cluster's secret in $DISPY_SECRET or the
key file)::

    python examples/lenskit_invoker.py                     # a node started here, 2 processes
    python examples/lenskit_invoker.py --nodes n1 n2       # your dispynode hosts
"""

import argparse

import numpy as np

import dispy


def recommend(model, user, n):
    """The top ``n`` items for ``user`` (an index into the user factors)."""
    scores = model["items"] @ model["users"][user]
    top = np.argpartition(-scores, n)[:n]
    return user, top[np.argsort(-scores[top])].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", nargs="*", help="dispynode hosts (default: a node started here)")
    p.add_argument("--jobs", type=int, default=2, help="processes of the local node")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(42)
    model = {
        "items": rng.standard_normal((args.items, 32)),
        "users": rng.standard_normal((args.users, 32)),
    }
    with dispy.invoker(model, recommend, args.jobs, nodes=args.nodes) as inv:
        for user, top in inv.map(range(args.users), [10] * args.users):
            if user < 3:
                print(f"user {user}: items {top}")
    print(f"scored {args.items} items for {args.users} users")


if __name__ == "__main__":
    main()
