"""vq_qenc_report.py DOCS.npy DOC_IDS.txt QVEC.npy QIDS.txt RUN - recall@10 and recall@100 of a
TREC run against the exact inner-product top-10 / top-100 of the query vectors QVEC (the original
model's: the teacher) over the uncompressed documents DOCS (rows named by DOC_IDS)."""
import sys

import numpy as np


def main(docs, doc_ids, qvec, qids, run):
    x = np.load(docs)
    ids = open(doc_ids).read().rstrip("\n").split("\n")
    q = np.load(qvec)
    qs = open(qids).read().rstrip("\n").split("\n")
    assert len(ids) == len(x) and len(qs) == len(q)
    got = {}
    for line in open(run):
        qid, _, doc, rank, score, _ = line.split()
        got.setdefault(qid, []).append((float(score), doc))
    s = q @ x.T
    out = []
    for k in (10, 100):
        rec = []
        for i, qid in enumerate(qs):
            top = {ids[j] for j in np.argsort(-s[i], kind="stable")[:k]}
            hits = [d for _, d in sorted(got.get(qid, []), key=lambda t: -t[0])[:k]]
            rec.append(len(top & set(hits)) / k)
        out.append(f"recall@{k} {np.mean(rec):.4f}")
    print("  ".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:6])
