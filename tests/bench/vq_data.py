"""vq_data.py OUT_DIR SHARED - inputs of the Distill-VQ benchmark (tests/bench/vq.sh).

Writes into OUT_DIR:
  m778_docs.npy / m778_q.npy   the 778 real all-MiniLM-L6-v2 embeddings (../shared/data), split
                               by a seeded permutation: 678 indexed, 100 held out as queries
  scifact_docs.txt / _doc_ids.txt   SciFact corpus, "title text" per line (what the index encodes,
                               rank/engine.c's kst_ix_doc_text), newlines flattened
  scifact_q.txt / _qids.txt    the 300 test queries (qrels/test.trec); scifact.qrels (TREC)
  cran_docs.txt / _doc_ids.txt Cranfield ".T .W" per document; cran_q.txt / _qids.txt the 225
                               queries numbered by position (as cranqrel does); cran.qrels (TREC,
                               gain 5 - code, -1 -> 0)
  synth_docs.npy / synth_q.npy the scale set (see synth() below); synth1m_* the same at 1M
  Development queries, never evaluation queries (settings are chosen on these, the figures are
  reported on the test queries): scifact_dev.txt (SciFact's TRAIN queries, qrels/train.tsv) and
  synth_dev.npy (500 more queries drawn like synth_q with another seed)
"""
import json
import os
import sys

import numpy as np


def flat(s):
    return " ".join(s.split())


def scifact(shared, out):
    d = os.path.join(shared, "beir-scifact")
    ids, texts = [], []
    with open(os.path.join(d, "corpus.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            ids.append(r["_id"])
            texts.append(flat((r.get("title") or "") + " " + (r.get("text") or "")))
    qrels = [l.split() for l in open(os.path.join(d, "qrels/test.trec")) if l.strip()]
    want = sorted({q for q, _, _, _ in qrels}, key=int)
    qtext = {}
    with open(os.path.join(d, "queries.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            qtext[r["_id"]] = flat(r["text"])
    write(out, "scifact", ids, texts, want, [qtext[q] for q in want])
    train = sorted({l.split()[0] for l in open(os.path.join(d, "qrels/train.tsv")).readlines()[1:]
                    if l.strip()}, key=int)
    assert not set(train) & set(want), "SciFact train and test queries overlap"
    with open(os.path.join(out, "scifact_dev.txt"), "w") as f:
        f.write("\n".join(qtext[q] for q in train) + "\n")
    with open(os.path.join(out, "scifact.qrels"), "w") as f:
        for q, it, doc, rel in qrels:
            f.write(f"{q} 0 {doc} {rel}\n")


def cranfield(shared, out):
    d = os.path.join(shared, "cranfield")
    ids, texts, cur, field = [], [], None, None
    for line in open(os.path.join(d, "cran.all.1400")):
        line = line.rstrip("\n")
        if line.startswith(".I "):
            ids.append(line[3:].strip())
            texts.append({"T": "", "W": ""})
            field = None
        elif line in (".T", ".A", ".B", ".W"):
            field = line[1]
        elif field in ("T", "W"):
            texts[-1][field] += " " + line
    docs = [flat(t["T"] + " " + t["W"]) or "empty" for t in texts]
    qs, cur = [], None
    for line in open(os.path.join(d, "cran.qry"), newline=""):
        line = line.rstrip("\r\n")
        if line.startswith(".I "):
            qs.append("")
        elif line != ".W":
            qs[-1] += " " + line
    qids = [str(i + 1) for i in range(len(qs))]
    write(out, "cran", ids, docs, qids, [flat(q) for q in qs])
    with open(os.path.join(out, "cran.qrels"), "w") as f:
        for line in open(os.path.join(d, "cranqrel")):
            p = line.split()
            if len(p) < 3:
                continue
            code = int(p[2])
            f.write(f"{p[0]} 0 {p[1]} {5 - code if 1 <= code <= 4 else 0}\n")


def write(out, name, ids, docs, qids, queries):
    for suffix, rows in (("_doc_ids.txt", ids), ("_docs.txt", docs), ("_qids.txt", qids),
                         ("_q.txt", queries)):
        with open(os.path.join(out, name + suffix), "w") as f:
            f.write("\n".join(rows) + "\n")


def m778(shared, out):
    x = np.fromfile(os.path.join(shared, "minilm-reference-embeddings/embeddings.bin"),
                    dtype="<f4").reshape(778, 384)
    p = np.random.default_rng(0).permutation(778)
    np.save(os.path.join(out, "m778_docs.npy"), x[p[100:]])
    np.save(os.path.join(out, "m778_q.npy"), x[p[:100]])


def synth(shared, out, n, nq, dev_only=False, name="synth"):
    """Scale set with the structure of real sentence embeddings: the 778 real MiniLM vectors are
    the topic centres; each vector is a centre plus anisotropic noise drawn in the real data's own
    principal axes (the eigen-spectrum of the 778 vectors' covariance, so directions that vary in
    real embeddings vary here), normalised. Queries are drawn the same way (never indexed)."""
    x = np.fromfile(os.path.join(shared, "minilm-reference-embeddings/embeddings.bin"),
                    dtype="<f4").reshape(778, 384).astype(np.float64)
    mu = x.mean(0)
    u, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    scale = s / np.sqrt(len(x))           # per-axis std of the real data
    g = np.random.default_rng(1)

    def draw(m):
        c = x[g.integers(0, 778, m)]
        z = g.standard_normal((m, len(scale))) * scale * 0.7
        v = c + z @ vt
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    if not dev_only:
        np.save(os.path.join(out, name + "_docs.npy"),
                np.concatenate([draw(10000) for _ in range(n // 10000)]))
        np.save(os.path.join(out, name + "_q.npy"), draw(nq))
    g = np.random.default_rng(2)  # development queries: another seed, same distribution
    np.save(os.path.join(out, name + "_dev.npy"), draw(nq))


if __name__ == "__main__":
    out, shared = sys.argv[1], sys.argv[2]
    n = int(os.environ.get("KESTREL_BENCH_VQ_SYNTH_N", "200000"))
    os.makedirs(out, exist_ok=True)
    m778(shared, out)
    scifact(shared, out)
    cranfield(shared, out)
    if not os.path.exists(os.path.join(out, f"synth_docs.npy")) or \
            np.load(os.path.join(out, "synth_docs.npy"), mmap_mode="r").shape[0] != n:
        synth(shared, out, n, 500)
    elif not os.path.exists(os.path.join(out, "synth_dev.npy")):
        synth(shared, out, n, 500, dev_only=True)
    # The 1M scale set (vq.sh makes it when KESTREL_BENCH_VQ_SETS names synth1m): the same
    # generator and seeds at 1,000,000 vectors, so its first 200,000 are the synth set.
    if "synth1m" in os.environ.get("KESTREL_BENCH_VQ_SETS", "") and \
            not os.path.exists(os.path.join(out, "synth1m_docs.npy")):
        synth(shared, out, 1000000, 500, name="synth1m")
