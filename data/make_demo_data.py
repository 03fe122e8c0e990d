"""Builds data/ for `make demo` from committed material (run once; its output is committed).

- data/sample/queries.txt, docs.tsv: three Cranfield queries (../shared/data/cranfield; queries
  numbered by position, as cranqrel does) and eighteen abstracts: each query's most relevant
  documents (codes 1-2) and distractors, as `docid<TAB>title. abstract` (cut at 400 characters).
- data/models/{dense,colbert,cross}: the small random-weight fixture checkpoints of
  tests/fixtures/models (st_bert_mean, colbert, cross_bert) with weights stored as float16 and
  only vocab.txt for the tokenizer, to keep the bundle small. They show the pipeline, not quality.

Needs numpy and safetensors (the project's .venv has both).
"""
import json
import os
import random
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data", "cranfield")


def cran_docs():
    docs, cur, field = {}, None, None
    with open(os.path.join(SHARED, "cran.all.1400"), encoding="ascii") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith(".I "):
                cur = line[3:].strip()
                docs[cur] = {"T": [], "W": []}
                field = None
            elif line in (".T", ".A", ".B", ".W"):
                field = line[1]
            elif field in ("T", "W"):
                docs[cur][field].append(line.strip())
    return {k: (" ".join(v["T"]), " ".join(v["W"])) for k, v in docs.items()}


def cran_queries():
    qs, cur = [], None
    with open(os.path.join(SHARED, "cran.qry"), encoding="ascii", newline="") as f:
        for line in f.read().replace("\r\n", "\n").split("\n"):
            if line.startswith(".I "):
                qs.append([])
            elif line == ".W":
                continue
            elif qs:
                qs[-1].append(line.strip())
    return [" ".join(q).strip() for q in qs]


def main():
    docs, queries = cran_docs(), cran_queries()
    qrels = {}
    with open(os.path.join(SHARED, "cranqrel")) as f:
        for line in f:
            q, d, c = line.split()
            qrels.setdefault(int(q), []).append((int(c), d))
    rng = random.Random(7)
    chosen_q = [1, 2, 8]
    picked = []
    for q in chosen_q:
        rel = sorted(x for x in qrels[q] if x[0] in (1, 2))[:3]
        picked += [d for _, d in rel if d not in picked]
    while len(picked) < 18:
        d = str(rng.randint(1, 1400))
        if d not in picked and docs[d][1]:
            picked.append(d)
    out = os.path.join(HERE, "sample")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "queries.txt"), "w") as f:
        for q in chosen_q:
            f.write(queries[q - 1] + "\n")
    with open(os.path.join(out, "docs.tsv"), "w") as f:
        for d in picked:
            t, w = docs[d]
            text = (t.rstrip(" .") + ". " + w)[:400].rsplit(" ", 1)[0]
            f.write(f"{d}\t{text}\n")
    with open(os.path.join(out, "qrels.txt"), "w") as f:
        for i, q in enumerate(chosen_q):
            for c, d in sorted(qrels[q]):
                if d in picked and c in (1, 2, 3, 4):
                    f.write(f"{i + 1} 0 {d} {5 - c}\n")

    fx = os.path.join(ROOT, "tests", "fixtures", "models")
    for name, src in (("dense", "st_bert_mean"), ("colbert", "colbert"), ("cross", "cross_bert")):
        dst = os.path.join(HERE, "models", name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(fx, src), dst,
                        ignore=shutil.ignore_patterns("kestrel_ref", "tokenizer.json", "README.md"))
        for root, _, files in os.walk(dst):
            for fn in files:
                if fn == "model.safetensors":
                    p = os.path.join(root, fn)
                    t = load_file(p)
                    save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in t.items()}, p)
    print("wrote", out, "and", os.path.join(HERE, "models"))


if __name__ == "__main__":
    sys.exit(main())
