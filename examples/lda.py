# Distributed LDA (online variational Bayes), as gensim's distributed LdaModel
# computes it, with the E-steps done by dispy jobs:
#
#   python examples/lda.py --corpus FILE.mm --topics K --passes P [--heldout FILE2.mm] \
#       [--local N | --nodes ...] --json OUT.json [--save-topics T.npy]
#
# FILE.mm (and FILE2.mm) are Matrix Market files with a row per document
# (gensim's MmCorpus layout), or with --terms-by-docs a row per term.  The
# computation is in dispy.workloads.lda (installed with dispy, so the nodes
# import it): the corpus is placed once on each node (cluster.put), the topics
# once per update, and each job runs the E-step on its chunk of documents and
# returns its sufficient statistics; this program does the M-step.
# Without --local or --nodes, the nodes are those of $DISPY_NODES.
#
# OUT.json: seconds, log_perplexity (gensim's per-word bound, on the held-out
# documents if given, else on the training documents), documents, and the
# run's parameters and per-pass figures; documents_bound_per_word is the same
# bound without the topics' term (gensim includes it; it grows with K x terms).  T.npy: the topic-term matrix
# (K x terms, rows summing to 1).

import argparse
import json
import logging
import sys
import time

import numpy as np

from dispy.workloads import corpus, lda, local_cluster


def main():
    parser = argparse.ArgumentParser(description='Distributed LDA with dispy')
    parser.add_argument('--corpus', required=True, help='Matrix Market corpus file')
    parser.add_argument('--topics', type=int, required=True, help='K: number of topics')
    parser.add_argument('--passes', type=int, required=True, help='passes over the corpus')
    parser.add_argument('--heldout', help='Matrix Market file of held-out documents')
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--local', type=int, metavar='N', help='start a local node with N CPUs')
    where.add_argument('--nodes', nargs='+', help='node names or addresses (host or host:port)')
    parser.add_argument('--secret', help="the nodes' secret (default: $DISPY_SECRET / key file)")
    parser.add_argument('--json', required=True, help='write the results here')
    parser.add_argument('--save-topics', help='write the topics (K x terms, rows sum to 1) here (.npy)')
    parser.add_argument('--terms-by-docs', action='store_true',
                        help='the files have a row per term (default: a row per document)')
    parser.add_argument('--chunksize', type=int,
                        help='documents per chunk (default 2000); each M-step\'s chunks are '
                             'cut into a job per CPU')
    parser.add_argument('--update-every', type=int, default=1,
                        help='chunks per M-step (default 1, as gensim); 0: batch, one per pass')
    parser.add_argument('--alpha', type=float, help='symmetric document-topic prior (default 1/K)')
    parser.add_argument('--eta', type=float, help='symmetric topic-term prior (default 1/K)')
    parser.add_argument('--decay', type=float, default=0.5, help='kappa of the learning rate rho = (offset + pass + chunks merged)^-kappa')
    parser.add_argument('--offset', type=float, default=1.0, help='tau0 of the learning rate (see --decay)')
    parser.add_argument('--iterations', type=int, default=50, help='most E-step iterations per document')
    parser.add_argument('--gamma-threshold', type=float, default=1e-3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-put', action='store_true',
                        help='send the data with each job instead of placing it on the nodes')
    parser.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args()
    if args.topics < 1 or args.passes < 1:
        parser.error('--topics and --passes must be at least 1')
    if args.local is not None and args.local < 1:
        parser.error('--local needs a positive number of CPUs')
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(name)s %(message)s', stream=sys.stderr)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else None

    orientation = corpus.TERMS_DOCS if args.terms_by_docs else corpus.DOCS_TERMS
    t0 = time.perf_counter()
    try:
        matrix = corpus.read_mm(args.corpus, orientation)
        heldout = corpus.read_mm(args.heldout, orientation) if args.heldout else None
    except (OSError, ValueError) as exc:
        parser.error(f'cannot read a corpus: {exc}')
    read_s = time.perf_counter() - t0
    if heldout is not None and heldout.shape[1] != matrix.shape[1]:
        if heldout.shape[1] > matrix.shape[1]:
            parser.error(f'{args.heldout} has {heldout.shape[1]} terms, '
                         f'{args.corpus} only {matrix.shape[1]}')
        heldout.resize((heldout.shape[0], matrix.shape[1]))  # fewer terms in use: same ids
    nodes = [n for spec in args.nodes for n in spec.split(',') if n] if args.nodes else None
    with local_cluster(local_cpus=args.local, nodes=nodes, secret=args.secret,
                       use_put=False if args.no_put else None) as runner:
        model = lda.lda(matrix, args.topics, runner, passes=args.passes,
                        chunksize=args.chunksize, update_every=args.update_every,
                        alpha=args.alpha, eta=args.eta, decay=args.decay, offset=args.offset,
                        iterations=args.iterations, gamma_threshold=args.gamma_threshold,
                        seed=args.seed, log=log)
        t1 = time.perf_counter()
        sent = runner.bytes_sent()
        doc_bound, words = lda.heldout_bound(model, heldout, runner, chunksize=args.chunksize,
                                             iterations=args.iterations,
                                             gamma_threshold=args.gamma_threshold,
                                             seed=args.seed)
        perplexity = (doc_bound + model.topic_bound()) / max(words, 1.0)
        eval_s = time.perf_counter() - t1
        eval_bytes = runner.bytes_sent() - sent
        cpus, placement = runner.cpus, runner.placement
    out = {
        'seconds': model.seconds + eval_s,
        'train_seconds': model.seconds,
        'eval_seconds': eval_s,
        'log_perplexity': perplexity,
        'perplexity_on': 'heldout' if heldout is not None else 'training',
        'documents_bound_per_word': doc_bound / max(words, 1.0),
        'documents': int(matrix.shape[0]),
        'heldout_documents': int(heldout.shape[0]) if heldout is not None else 0,
        'terms': int(matrix.shape[1]),
        'nonzeros': int(matrix.nnz),
        'topics': args.topics,
        'passes': model.passes,
        'updates': model.updates,
        'chunks': model.chunks,
        'bytes_sent': int(model.bytes_sent + eval_bytes),
        'pass_bytes_sent': [int(b) for b in model.pass_bytes],
        'pass_seconds': model.pass_seconds,
        'train_bound_per_pass': model.train_bound,
        'documents_per_second': matrix.shape[0] * model.passes / model.seconds if model.seconds else None,
        'alpha': float(model.alpha[0]),
        'eta': model.eta,
        'decay': args.decay,
        'offset': args.offset,
        'read_seconds': read_s,
        'cpus': cpus,
        'placement': placement,
        'orientation': orientation,
    }
    with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
    if args.save_topics:
        np.save(args.save_topics, model.topics)
    print(f'LDA: {args.topics} topics of {matrix.shape[0]} documents, {model.passes} passes '
          f'in {out["seconds"]:.2f} s on {cpus} CPUs; log perplexity ({out["perplexity_on"]}): '
          f'{perplexity:.4f}')


if __name__ == '__main__':
    main()
