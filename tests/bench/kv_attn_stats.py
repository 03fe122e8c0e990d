#!/usr/bin/env python3
"""kv_attn_stats.py DIR CTX [--window 1024] [--sinks 4] - how concentrated a dump's attention is
(kv_dump_llm.py's heads, the decode queries bench_kv_heads takes its errors over: the first 100
of 200 evenly spaced after CTX):
per layer, the softmax mass (float64) on the sinks, on the window, on the exact top-100 indexed
keys and on the rest of the indexed keys, and the effective number of keys attended (exp of the
entropy), and the share of queries whose rest holds more than 2% of the mass (those the
adaptive budget, opts.widen 0.02, would consider widening); with --oracle, the output error of exact top-k attention (no index, no tail).
Mean over the query heads and queries of each layer. Says whether heads at 32K are as
focused as at 8K, and so what the tail estimate has to cover."""
import argparse
import glob
import os
import re

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("ctx", type=int)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--nq", type=int, default=100)
    ap.add_argument("--oracle", default="", help="top-k list: also the output error of exact top-k attention "
                    "(static tokens + the k best indexed keys, no tail), mean per layer, e.g. 100,1000,4000")
    a = ap.parse_args()
    ks = [int(x) for x in a.oracle.split(",") if x]
    pairs = sorted({(int(m.group(1)), int(m.group(2))) for m in
                    (re.search(r"L(\d+)H(\d+)_q\.npy$", p) for p in glob.glob(os.path.join(a.dir, "L*H*_q.npy"))) if m})
    n, s, w = a.ctx, a.sinks, a.window
    print(f"{a.dir}: {n} cached keys, sinks {s}, window {w}, {a.nq} decode queries per head")
    print(f"{'layer':>5} {'heads':>5} {'sinks':>7} {'window':>7} {'top-100':>7} {'rest':>7} {'eff. keys':>9} {'rest>2%':>7}"
          + "".join(f" {'err@' + str(k):>9}" for k in ks))
    layers = sorted({l for l, _ in pairs})
    tot = np.zeros(6 + len(ks))
    for l in layers:
        acc = np.zeros(6 + len(ks))
        hs = [h for ll, h in pairs if ll == l]
        for h in hs:
            q = np.load(os.path.join(a.dir, f"L{l}H{h}_q.npy")).astype(np.float64)
            K = np.load(os.path.join(a.dir, f"L{l}H{h}_k.npy"))[:n].astype(np.float64)
            rows = q.shape[0]
            idx = [n + i * (rows - n) // (2 * a.nq) for i in range(a.nq)]  # bench_kv_heads' error queries
            sc = q[idx] @ K.T / np.sqrt(q.shape[1])
            sc -= sc.max(axis=1, keepdims=True)
            p = np.exp(sc)
            p /= p.sum(axis=1, keepdims=True)
            mid = p[:, s:n - w]
            top = np.sort(mid, axis=1)[:, -100:].sum(axis=1)
            ent = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
            errs = []
            if ks:
                V = np.load(os.path.join(a.dir, f"L{l}H{h}_v.npy"))[:n].astype(np.float64)
                ref = p @ V
                order = np.argsort(-mid, axis=1)
                for k in ks:
                    keep = np.zeros_like(p, dtype=bool)
                    keep[:, :s] = keep[:, n - w:] = True
                    np.put_along_axis(keep[:, s:n - w], order[:, :k], True, axis=1)
                    pk = np.where(keep, p, 0)
                    o = (pk @ V) / pk.sum(1, keepdims=True)
                    errs.append((np.linalg.norm(o - ref, axis=1) / np.linalg.norm(ref, axis=1)).mean())
            acc += np.array([p[:, :s].sum(1).mean(), p[:, n - w:].sum(1).mean(), top.mean(),
                             (mid.sum(1) - top).mean(), np.exp(ent).mean(),
                             ((mid.sum(1) - top) > 0.02).mean()] + errs) / len(hs)
        tot += acc / len(layers)
        print(f"{l:5d} {len(hs):5d} {acc[0]:7.3f} {acc[1]:7.3f} {acc[2]:7.3f} {acc[3]:7.3f} {acc[4]:9.0f} {acc[5]:7.3f}"
              + "".join(f" {x:9.2e}" for x in acc[6:]))
    print(f"{'all':>5} {len(pairs):5d} {tot[0]:7.3f} {tot[1]:7.3f} {tot[2]:7.3f} {tot[3]:7.3f} {tot[4]:9.0f} {tot[5]:7.3f}"
          + "".join(f" {x:9.2e}" for x in tot[6:]))


if __name__ == "__main__":
    main()
