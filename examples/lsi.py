# Distributed LSI (truncated SVD) of a sparse term-document corpus, as gensim's
# distributed LsiModel computes it, with the work done by dispy jobs:
#
#   python examples/lsi.py --corpus FILE.mm --topics K [--local N | --nodes ...] \
#       [--secret S] --json OUT.json [--save-u U.npy]
#
# FILE.mm is a Matrix Market file with a row per document (gensim's MmCorpus
# layout), or with --terms-by-docs a row per term.  The computation is in
# dispy.workloads.lsi (installed with dispy, so the nodes import it): the
# corpus is placed once on each node (cluster.put), each pass's small matrix
# once per pass, and each job multiplies its chunk of documents.
# Without --local or --nodes, the nodes are those of $DISPY_NODES.
#
# OUT.json: singular_values (descending), seconds, documents, terms,
# bytes_sent, and the run's parameters and per-pass figures.  U.npy: the
# left singular vectors (terms x K), the topics.

import argparse
import json
import logging
import sys
import time

import numpy as np

from dispy.workloads import corpus, local_cluster, lsi


def main():
    parser = argparse.ArgumentParser(description='Distributed LSI with dispy')
    parser.add_argument('--corpus', required=True, help='Matrix Market corpus file')
    parser.add_argument('--topics', type=int, required=True, help='K: singular values/vectors')
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--local', type=int, metavar='N', help='start a local node with N CPUs')
    where.add_argument('--nodes', nargs='+', help='node names or addresses (host or host:port)')
    parser.add_argument('--secret', help="the nodes' secret (default: $DISPY_SECRET / key file)")
    parser.add_argument('--json', required=True, help='write the results here')
    parser.add_argument('--save-u', help='write the left singular vectors (terms x K) here (.npy)')
    parser.add_argument('--terms-by-docs', action='store_true',
                        help='the file has a row per term (default: a row per document)')
    parser.add_argument('--oversample', type=int, default=100, help='extra columns (default 100)')
    parser.add_argument('--power-iters', type=int, default=2, help='power iterations (default 2)')
    parser.add_argument('--chunksize', type=int, help='documents per job (default: 2 chunks per CPU)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-put', action='store_true',
                        help='send the data with each job instead of placing it on the nodes')
    parser.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args()
    if args.topics < 1:
        parser.error('--topics must be at least 1')
    if args.local is not None and args.local < 1:
        parser.error('--local needs a positive number of CPUs')
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(name)s %(message)s', stream=sys.stderr)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None

    orientation = corpus.TERMS_DOCS if args.terms_by_docs else corpus.DOCS_TERMS
    t0 = time.perf_counter()
    try:
        matrix = corpus.read_mm(args.corpus, orientation)
    except (OSError, ValueError) as exc:
        parser.error(f'cannot read {args.corpus}: {exc}')
    read_s = time.perf_counter() - t0
    nodes = [n for spec in args.nodes for n in spec.split(',') if n] if args.nodes else None
    if args.topics > min(matrix.shape):
        parser.error(f'--topics {args.topics} exceeds min(documents, terms) = {min(matrix.shape)}')
    with local_cluster(local_cpus=args.local, nodes=nodes, secret=args.secret,
                       use_put=False if args.no_put else None) as runner:
        res = lsi.lsi(matrix, args.topics, runner, oversample=args.oversample,
                      power_iters=args.power_iters, chunksize=args.chunksize, seed=args.seed,
                      log=log)
        cpus, placement = runner.cpus, runner.placement
    out = {
        'singular_values': [float(x) for x in res.s],
        'seconds': res.seconds,
        'documents': int(matrix.shape[0]),
        'terms': int(matrix.shape[1]),
        'nonzeros': int(matrix.nnz),
        'bytes_sent': int(res.bytes_sent),
        'topics': args.topics,
        'oversample': args.oversample,
        'power_iters': args.power_iters,
        'chunks': res.chunks,
        'passes': res.passes,
        'pass_bytes_sent': [int(b) for b in res.pass_bytes],
        'pass_seconds': res.pass_seconds,
        'documents_per_second': matrix.shape[0] * res.passes / res.seconds if res.seconds else None,
        'read_seconds': read_s,
        'cpus': cpus,
        'placement': placement,
        'orientation': orientation,
    }
    with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
    if args.save_u:
        np.save(args.save_u, res.u)
    print(f'LSI: {args.topics} topics of {matrix.shape[0]} documents x {matrix.shape[1]} terms '
          f'in {res.seconds:.2f} s on {cpus} CPUs; top singular values: '
          + ' '.join(f'{x:.4g}' for x in res.s[:5]))


if __name__ == '__main__':
    main()
