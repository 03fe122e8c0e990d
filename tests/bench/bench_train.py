"""bench_train.py - the PyTorch side of the training benchmark (tests/bench/train.sh).

  data OUT --vocab V --n N         N synthetic Margin-MSE triples in the matchmaker form
                                   (pos_score<TAB>neg_score<TAB>query<TAB>pos<TAB>neg) of random
                                   whole words: queries of 48 words and passages of 220, so that
                                   truncation to 32 / 128 tokens is exact for every one.
  torch --model M --triples F ...  the same Margin-MSE training step as `kestrel train
                                   margin-mse` in PyTorch (sentence-transformers modules, train
                                   mode: dropout as configured; AdamW with no decay on biases and
                                   LayerNorm, linear schedule; tokenization inside the step), file
                                   order; prints JSON {triples_per_s, step_s, peak_rss_mb, loss}.
  teacher ...                      the SciFact teacher and triples for part 2 (see its help).
  ndcg ...                         nDCG@10 of a ranking by vectors or fused scores (pytrec_eval).
"""
import argparse
import json
import os
import random
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def cmd_data(a):
    words = [w.strip() for w in open(a.vocab, encoding="utf-8")]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) >= 3]
    rng = random.Random(3)
    with open(a.out, "w") as f:
        for _ in range(a.n):
            q = " ".join(rng.choice(words) for _ in range(48))
            p = " ".join(rng.choice(words) for _ in range(220))
            n = " ".join(rng.choice(words) for _ in range(220))
            f.write(f"{rng.gauss(0.6, 0.1):.4f}\t{rng.gauss(0.3, 0.1):.4f}\t{q}\t{p}\t{n}\n")


def cmd_torch(a):
    import torch
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    from sentence_transformers import SentenceTransformer
    from transformers import get_linear_schedule_with_warmup
    model = SentenceTransformer(a.model, device="cpu")
    model.train()
    tok = model.tokenizer
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, foreach=False)
    sched = get_linear_schedule_with_warmup(opt, 0, a.steps)
    rows = [line.rstrip("\n").split("\t") for line in open(a.triples)]
    B, times, losses = a.batch, [], []
    mse = torch.nn.MSELoss()

    def embed(texts, max_len):
        f = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return model(dict(f))["sentence_embedding"]

    for step in range(a.steps):
        batch = [rows[(step * B + i) % len(rows)] for i in range(B)]
        t0 = time.perf_counter()
        tp = torch.tensor([float(r[0]) for r in batch])
        tn = torch.tensor([float(r[1]) for r in batch])
        q = embed([r[2] for r in batch], a.qlen)
        d = embed([x for r in batch for x in (r[3], r[4])], a.dlen)  # pos, neg interleaved as kestrel
        d = d.view(B, 2, -1)
        sp = (q * d[:, 0]).sum(-1)
        sn = (q * d[:, 1]).sum(-1)
        loss = mse(sp - sn, tp - tn)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    meas = times[a.warmup:]
    print(json.dumps({"triples_per_s": B * len(meas) / sum(meas), "step_s": times, "loss": losses,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


# ------------------------------------------------------------------------------------------------
# part 2: SciFact


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def read_qrels(path):
    q = {}
    for i, line in enumerate(open(path)):
        f = line.split()
        if path.endswith(".tsv"):
            if i == 0:
                continue
            qid, did, r = f
        else:
            qid, _, did, r = f
        q.setdefault(qid, {})[did] = int(r)
    return q


def read_run(path):
    run = {}
    for line in open(path):
        q, _, d, _, s, _ = line.split()
        run.setdefault(q, {})[d] = float(s)
    return run


def ndcg10(qrels, scores, qids, dids):
    """nDCG@10 over qids of the full ranking by scores (nq, nd), trec_eval's order."""
    import pytrec_eval
    run = {}
    for i, q in enumerate(qids):
        top = np.argsort(-scores[i], kind="stable")[:50]
        run[q] = {dids[j]: float(scores[i, j]) for j in top}
    ev = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in qids}, {"ndcg_cut.10"})
    res = ev.evaluate(run)
    return float(np.mean([res[q]["ndcg_cut_10"] for q in qids]))


def fused(cos, bm25, w):
    """Teacher score: MiniLM cosine + w * BM25 normalised by the query's best BM25 score
    (documents outside the BM25 top 1000 get 0)."""
    mx = bm25.max(axis=1, keepdims=True)
    mx[mx <= 0] = 1
    return cos + w * bm25 / mx


def bm25_matrix(run, qids, index):
    m = np.zeros((len(qids), len(index)), dtype=np.float64)
    for i, q in enumerate(qids):
        for d, s in run.get(q, {}).items():
            m[i, index[d]] = s
    return m


def cmd_teacher(a):
    """Builds the fused teacher on SciFact and the training triples it scores.

    Inputs: the corpus ids in embedding order (--doc-ids), kestrel embed outputs of the corpus
    and of the train and test queries (all-MiniLM-L6-v2), BM25 runs (kestrel search --stages bm25
    -k 1000) of the train and test queries. The BM25 weight w is chosen on the TRAIN qrels only
    (nDCG@10 over w in 0.05..1.0); the test qrels are used only to report. Triples: for each train
    query and relevant document, --negatives hard negatives drawn (seed 0) from the top 30 of the
    teacher's own ranking that are not relevant; teacher scores = fused scores x s, matchmaker form.
    s (--teacher-scale, default auto) keeps the ranking and brings the teacher's margins into the
    student's range: auto = std of MiniLM's own cosine margins / std of the fused margins over the
    training triples (the fused score adds up to w to a cosine, so its margins are larger than
    any cosine student can follow; Margin-MSE would pull it apart harder than its geometry allows).
    Prints JSON with the nDCG@10 figures."""
    S = a.scifact
    docs = {d["_id"]: ((d["title"] + " " + d["text"]).strip()) for d in read_jsonl(f"{S}/corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(f"{S}/queries.jsonl")}
    dids = [line.rstrip("\n") for line in open(a.doc_ids)]
    index = {d: i for i, d in enumerate(dids)}
    dv = np.load(a.doc_vecs).astype(np.float64)
    out = {}
    for split in ("train", "test"):
        qrels = read_qrels(f"{S}/qrels/{'train.tsv' if split == 'train' else 'test.trec'}")
        qids = [line.split("\t")[0] for line in open(getattr(a, f"{split}_queries"))]
        qv = np.load(getattr(a, f"{split}_vecs")).astype(np.float64)
        cos = qv @ dv.T
        bm = bm25_matrix(read_run(getattr(a, f"{split}_bm25")), qids, index)
        out[split] = (qrels, qids, cos, bm)
    qrels, qids, cos, bm = out["train"]
    best_w, best = 0.0, -1
    for w in [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]:
        v = ndcg10(qrels, fused(cos, bm, w), qids, dids)
        if v > best:
            best_w, best = w, v
    tq, tqids, tcos, tbm = out["test"]
    res = {"w": best_w, "train_teacher_ndcg10": best,
           "train_minilm_ndcg10": ndcg10(qrels, cos, qids, dids),
           "test_minilm_ndcg10": ndcg10(tq, tcos, tqids, dids),
           "test_bm25_ndcg10": ndcg10(tq, tbm, tqids, dids),
           "test_teacher_ndcg10": ndcg10(tq, fused(tcos, tbm, best_w), tqids, dids)}
    T = fused(cos, bm, best_w)
    rng = random.Random(0)
    trip = []
    for i, q in enumerate(qids):
        rel = qrels[q]
        top = [dids[j] for j in np.argsort(-T[i], kind="stable")[:30] if dids[j] not in rel]
        for p, r in rel.items():
            if r <= 0 or p not in index:
                continue
            for neg in rng.sample(top, min(a.negatives, len(top))):
                trip.append((i, q, index[p], index[neg]))
    tm = np.array([T[i, p] - T[i, n] for i, _, p, n in trip])
    cm = np.array([cos[i, p] - cos[i, n] for i, _, p, n in trip])
    scale = float(cm.std() / tm.std()) if a.teacher_scale == "auto" else float(a.teacher_scale)
    res.update({"teacher_scale": scale, "teacher_margin_mean": float(tm.mean() * scale),
                "teacher_margin_std": float(tm.std() * scale), "minilm_margin_mean": float(cm.mean()),
                "minilm_margin_std": float(cm.std())})
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")
    with open(a.out, "w") as f:
        for i, q, p, n in trip:
            f.write(f"{scale * T[i, p]:.6f}\t{scale * T[i, n]:.6f}\t{clean(queries[q])}\t"
                    f"{clean(docs[dids[p]])}\t{clean(docs[dids[n]])}\n")
    res["triples"] = len(trip)
    print(json.dumps(res))


def cmd_ndcg(a):
    S = a.scifact
    dids = [line.rstrip("\n") for line in open(a.doc_ids)]
    qids = [line.split("\t")[0] for line in open(a.queries)]
    qrels = read_qrels(f"{S}/qrels/test.trec")
    scores = np.load(a.query_vecs).astype(np.float64) @ np.load(a.doc_vecs).astype(np.float64).T
    print(json.dumps({"ndcg10": ndcg10(qrels, scores, qids, dids)}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--vocab", required=True)
    d.add_argument("--n", type=int, default=640)
    t = sub.add_parser("torch")
    t.add_argument("--model", required=True)
    t.add_argument("--triples", required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--qlen", type=int, default=32)
    t.add_argument("--dlen", type=int, default=128)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--lr", type=float, default=2e-5)
    te = sub.add_parser("teacher")
    te.add_argument("--scifact", required=True)
    te.add_argument("--doc-ids", required=True)
    te.add_argument("--doc-vecs", required=True)
    for s in ("train", "test"):
        te.add_argument(f"--{s}-queries", required=True)
        te.add_argument(f"--{s}-vecs", required=True)
        te.add_argument(f"--{s}-bm25", required=True)
    te.add_argument("--negatives", type=int, default=4)
    te.add_argument("--teacher-scale", default="auto")
    te.add_argument("--out", required=True)
    n = sub.add_parser("ndcg")
    n.add_argument("--scifact", required=True)
    n.add_argument("--doc-ids", required=True)
    n.add_argument("--doc-vecs", required=True)
    n.add_argument("--queries", required=True)
    n.add_argument("--query-vecs", required=True)
    a = ap.parse_args()
    {"data": cmd_data, "torch": cmd_torch, "teacher": cmd_teacher, "ndcg": cmd_ndcg}[a.cmd](a)


if __name__ == "__main__":
    main()
