# Write a synthetic corpus drawn by LDA's generative process (seeded) as a
# Matrix Market file, for examples/lsi.py and examples/lda.py:
#
#   python examples/make_corpus.py corpus.mm --docs 10000 --terms 5000 --topics 20 \
#       [--heldout heldout.mm --heldout-docs 1000] [--save-topics planted.npy]
#
# The file holds a row per document (gensim's MmCorpus layout); with
# --terms-by-docs a row per term.

import argparse
import json

import numpy as np

from dispy.workloads import corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('out', help='Matrix Market file to write (.mm)')
    parser.add_argument('--docs', type=int, default=10000)
    parser.add_argument('--terms', type=int, default=5000)
    parser.add_argument('--topics', type=int, default=20, help='planted topics')
    parser.add_argument('--doc-length', type=float, default=100.0, help='mean words per document')
    parser.add_argument('--alpha', type=float, default=0.1, help='document-topic Dirichlet prior')
    parser.add_argument('--eta', type=float, default=0.01, help='topic-term Dirichlet prior')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--heldout', help='also write this many more documents (--heldout-docs) here')
    parser.add_argument('--heldout-docs', type=int, default=0)
    parser.add_argument('--save-topics', help='write the planted topics (topics x terms) to this .npy')
    parser.add_argument('--terms-by-docs', action='store_true',
                        help='write a row per term (a term-document matrix) instead of per document')
    args = parser.parse_args()
    held = args.heldout_docs if args.heldout else 0
    if args.heldout and held < 1:
        parser.error('--heldout needs --heldout-docs N (N > 0)')
    drawn = corpus.synthetic_corpus(args.docs + held, args.terms, args.topics,
                                    doc_length=args.doc_length, alpha=args.alpha,
                                    eta=args.eta, seed=args.seed)
    orientation = corpus.TERMS_DOCS if args.terms_by_docs else corpus.DOCS_TERMS
    corpus.write_mm(args.out, drawn.matrix[:args.docs], orientation)
    if held:
        corpus.write_mm(args.heldout, drawn.matrix[args.docs:], orientation)
    if args.save_topics:
        np.save(args.save_topics, drawn.topics)
    print(json.dumps({'corpus': args.out, 'documents': args.docs, 'terms': args.terms,
                      'nonzeros': int(drawn.matrix[:args.docs].nnz), 'heldout': args.heldout,
                      'heldout_documents': held, 'orientation': orientation}))


if __name__ == '__main__':
    main()
