"""cross_py.py - helpers for tests/bench/cross.sh.

  make OUT MINILM_DIR SCIFACT_DIR N   OUT/cross_minilm/: BertForSequenceClassification (1 logit) with
                                      the real all-MiniLM-L6-v2 weights and a fresh pooler and
                                      classifier (seed 0; no real cross-encoder weights are at
                                      hand); OUT/triples.tsv: N SciFact (query, relevant abstract,
                                      another abstract) text triples, each abstract padded with the
                                      next ones so that every pair truncates to exactly 256 tokens;
                                      OUT/pairs.tsv: the 2N (query, passage) pairs
  torch OUT THREADS                   PyTorch (transformers) scoring of OUT/pairs.tsv, 256 tokens,
                                      batch 32, THREADS threads: prints pairs/s (tokenization
                                      included, as in kestrel), best of 2 runs after a warm-up
"""
import json
import os
import sys
import time

import torch


def make(out, minilm, scifact, n):
    from transformers import AutoTokenizer, BertForSequenceClassification
    d = os.path.join(out, "cross_minilm")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(0)
        m = BertForSequenceClassification.from_pretrained(minilm, num_labels=1)
        m.save_pretrained(d)
        AutoTokenizer.from_pretrained(minilm).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    docs = [json.loads(l) for l in open(os.path.join(scifact, "corpus.jsonl"))]
    text = {x["_id"]: (x["title"] + " " + x["text"]).replace("\t", " ").replace("\n", " ") for x in docs}
    ids = list(text)
    queries = {}
    for l in open(os.path.join(scifact, "queries.jsonl")):
        q = json.loads(l)
        queries[q["_id"]] = q["text"].replace("\t", " ")
    rel = []
    for i, l in enumerate(open(os.path.join(scifact, "qrels", "train.tsv"))):
        if i:
            q, doc, _ = l.split()
            rel.append((q, doc))

    def long(doc):  # the abstract, then the next ones, until well past 256 tokens
        t, k = text[doc], ids.index(doc)
        while len(tok(t)["input_ids"]) < 300:
            k = (k + 1) % len(ids)
            t += " " + text[ids[k]]
        return t

    triples = []
    for j, (q, doc) in enumerate(rel[:n]):
        neg = ids[(ids.index(doc) + 97) % len(ids)]
        triples.append((queries[q], long(doc), long(neg)))
    with open(os.path.join(out, "triples.tsv"), "w") as f:
        f.write("".join(f"{a}\t{b}\t{c}\n" for a, b, c in triples))
    with open(os.path.join(out, "pairs.tsv"), "w") as f:
        f.write("".join(f"{a}\t{b}\n{a}\t{c}\n" for a, b, c in triples))
    lens = [len(tok(a, b, truncation="longest_first", max_length=256)["input_ids"]) for a, b, _ in triples]
    assert min(lens) == 256, min(lens)


def bench_torch(out, threads):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    d = os.path.join(out, "cross_minilm")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    pairs = [l.rstrip("\n").split("\t", 1) for l in open(os.path.join(out, "pairs.tsv"))]

    def run(ps):
        with torch.inference_mode():
            for i in range(0, len(ps), 32):
                b = ps[i:i + 32]
                enc = tok([q for q, _ in b], [p for _, p in b], truncation="longest_first", max_length=256,
                          padding=True, return_tensors="pt")
                model(**{k: v for k, v in enc.items() if k in tok.model_input_names})

    run(pairs[:32])
    best = None
    for _ in range(2):
        t = time.perf_counter()
        run(pairs)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    print("%.3f" % (len(pairs) / best))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        bench_torch(sys.argv[2], int(sys.argv[3]))
