#!/usr/bin/env python
"""kv_peaked.py - how needle-like a dumped layer's attention is (bench README, round 41): of S
prefill queries evenly spaced over the first CTX tokens, the share whose best indexed key holds
half or more of the softmax mass of its top 32 (what kst_kvg_build_attn counts for the cluster
probe's automatic choice, kst_kvg.peaked), as given and moved by RoPE to the decode position
(position CTX, each RoPE pair turned by (CTX - t) x its frequency, pairs half a head apart as
transformers' rotate_half), and the same share of the decode queries after CTX; float64 scores
over the indexed keys (sinks 4, window 1,024), scale 1 / sqrt(head_dim).

    .venv/bin/python tests/bench/kv_peaked.py DIR CTX LAYERS [S]

DIR: a kv_dump_llm.py dump with L<l>_inv_freq.npy (its --freq-only); LAYERS: a comma list. Prints
a line per head; the library's own share comes from the build's queries (every other token's
both forms, bench README round 39), so it differs a little."""
import sys

import numpy as np


def share(Q, K, sc):
    """Per query: the top-1 key's share of the softmax over K, and of the softmax over its top 32."""
    s = (Q @ K.T) * sc
    s1 = s.max(1, keepdims=True)
    full = 1 / np.exp(s - s1).sum(1)
    top = -np.sort(-s, 1)[:, :32]
    return full, 1 / np.exp(top - top[:, :1]).sum(1)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    d_, ctx, layers = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    S = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    heads = [0, 1, 2, 3] if "gemma" in d_ else [0, 1, 2]
    for L in layers:
        f = np.load(f"{d_}/L{L}_inv_freq.npy").astype(np.float64)
        for h in heads:
            K = np.asarray(np.load(f"{d_}/L{L}H{h}_k.npy", mmap_mode="r")[4:ctx - 1024], dtype=np.float64)
            Qa = np.load(f"{d_}/L{L}H{h}_q.npy", mmap_mode="r")
            d = K.shape[1]
            t = np.linspace(0, ctx - 1, S).astype(int)
            Q = np.asarray(Qa[t], dtype=np.float64)
            ang = (ctx - t)[:, None] * f[None, :]
            c, s = np.cos(ang), np.sin(ang)
            nf, hf = len(f), d // 2
            Qm = Q.copy()
            Qm[:, :nf] = Q[:, :nf] * c - Q[:, hf:hf + nf] * s
            Qm[:, hf:hf + nf] = Q[:, hf:hf + nf] * c + Q[:, :nf] * s
            out = []
            for name, QQ in (("given", Q), ("moved", Qm), ("decode", np.asarray(Qa[ctx:], dtype=np.float64))):
                full, top = share(QQ, K, 1 / np.sqrt(d))
                out.append(f"{name}: top-1 >= half of the top 32's mass {np.mean(top >= 0.5):.3f}"
                           f" (of all keys' mass >= 0.2: {np.mean(full >= 0.2):.3f})")
            print(f"L{L}H{h} | " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
