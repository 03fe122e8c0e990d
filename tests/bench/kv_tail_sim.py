#!/usr/bin/env python
"""kv_tail_sim.py - numpy studies of where the clustered tail estimate's samples could live
(bench README, round 19), on kv_dump_llm.py's dumps (float64; exact retrieval: the top 356 =
top_k 100 + tier 256 indexed keys by score; sinks 4, window 1,024; 2,048 k-means clusters of the
indexed keys, FAISS, each cluster's members in a random order; relative L2 of the attention
output against full attention, mean over decode queries).

    .venv/bin/python tests/bench/kv_tail_sim.py reservoir DIR CTX LAYER HEAD [nq]
        per-query plan (kv_tclust.h, CPU reads) against a fixed reservoir (each cluster's first R
        members, Horvitz-Thompson weights: what a GPU could hold) and the reservoir topped up on
        the CPU where the plan wants more than R
    .venv/bin/python tests/bench/kv_tail_sim.py locality DIR CTX LAYER HEAD
        how much of a step's plan (3,072 samples) the samples of the last W steps' plans cover
        (a cache of recent samples)
    .venv/bin/python tests/bench/kv_tail_sim.py gqa DIR CTX LAYER KVHEAD [nq]
        one plan per query head against one shared plan per KV head (kst_kvc_set_tail_share)
        at the rows read (needs the dump's three query heads of the KV head)
    .venv/bin/python tests/bench/kv_tail_sim.py lag DIR CTX LAYER KVHEAD [nq]
        the shared plan made from the last W steps' queries instead of this step's (a plan known
        before the step, whose rows a GPU cache can hold), with a share of the budget spread by
        cluster size; error, and the rows a step must upload to a cache of the prefixes planned
    .venv/bin/python tests/bench/kv_tail_sim.py mirror DIR CTX LAYER HEAD NS K [nq]
        the evenly spaced tail estimate (kv.h) as bench_kv_heads measures it (the first CTX
        tokens cached, nq decode queries evenly spaced after them), with the exact top K
        indexed keys attended and NS samples: what the library's estimate gives with perfect
        retrieval (bench README, round 37: the capped estimate's anchor)
    .venv/bin/python tests/bench/kv_tail_sim.py cv DIR CTX LAYER HEAD NS K [nq]
        the same with the tail's control variate (kv.h, opts.tail_cv): the scores' linear term
        summed exactly over the keys left out, the sample's estimate of it taken out, at the
        slope the library uses (Stein's: the estimate's mean weight) and at the sample's
        least-squares slope (which the GPU's items could not give); bench README, round 38
"""
import sys

import numpy as np

SINKS, WIN, RET = 4, 1024, 356


def load(d, l, h, what):
    return np.load(f"{d}/L{l}H{h}_{what}.npy").astype(np.float64)


def clusters(Ki, seed=1):
    import faiss  # (faiss-cpu: only the clustered studies need it)

    n, d = Ki.shape
    C = min(2048, n // 16)
    tr = Ki[np.linspace(0, n - 1, min(n, C * 64)).astype(int)].astype(np.float32)
    km = faiss.Kmeans(d, C, niter=8, seed=seed, max_points_per_centroid=64)
    km.train(tr)
    ix = faiss.IndexFlatL2(d)
    ix.add(km.centroids)
    a = ix.search(Ki.astype(np.float32), 1)[1][:, 0]
    rng = np.random.default_rng(seed)
    mem = [rng.permutation(np.where(a == c)[0]) for c in range(C)]
    return C, a, mem, np.array([len(m) for m in mem]), km.centroids.astype(np.float64)


def plan(w, r, B):
    """kst_kvtc_plan: water-filled shares of B over weights w, capped at r; cumulative rounding"""
    cap = r.astype(float)
    ns = np.zeros(len(w))
    op = (w > 0) & (cap > 0)
    left = B
    while True:
        W = w[op].sum()
        if W <= 0 or left <= 0:
            break
        sh = left * w / W
        cl = op & (sh >= cap)
        if not cl.any():
            ns[op] = sh[op]
            break
        ns[cl] = cap[cl]
        op &= ~cl
        left = B - ns[~op].sum()
    F = np.floor(np.cumsum(ns) + 0.5)
    return np.minimum(np.diff(np.concatenate([[0], F])).astype(int), r)


class Query:
    """one decode query: exact parts, retrieved set, per-cluster rest counts and weights"""

    def __init__(self, q, K, V, ctx, a, ln, cent, C):
        lo, hi = SINKS, ctx - WIN
        s = K[:ctx] @ q
        w = np.exp(s - s.max())
        self.o_true = (w[:, None] * V[:ctx]).sum(0) / w.sum()
        R = np.argsort(-s[lo:hi])[:RET]
        self.isR = np.zeros(hi - lo, bool)
        self.isR[R] = True
        ex_w = np.concatenate([w[:lo], w[hi:ctx], w[lo:hi][self.isR]])
        ex_v = np.concatenate([V[:lo], V[hi:ctx], V[lo:hi][self.isR]])
        self.exs, self.exo = ex_w.sum(), (ex_w[:, None] * ex_v).sum(0)
        self.wi, self.Vi = w[lo:hi], V[lo:hi]
        self.rc = ln - np.bincount(a[R], minlength=C)
        cs = cent @ q
        self.wc = self.rc * np.exp(0.7 * (cs - cs[self.rc > 0].max()))

    def err(self, ts, to):
        o = (self.exo + to) / (self.exs + ts)
        return np.linalg.norm(o - self.o_true) / np.linalg.norm(self.o_true)

    def ratio(self, mem, c, k):
        """cluster c's first k members outside R, weighted r_c / k (kst_kvtc_partial)"""
        mm = mem[c][~self.isR[mem[c]]][:k]
        f = self.rc[c] / len(mm)
        return f * self.wi[mm].sum(), f * (self.wi[mm, None] * self.Vi[mm]).sum(0), len(mm)

    def ht(self, mem, ln, ns):
        """each cluster's first ns[c] members, R's dropped, weighted len_c / ns[c]"""
        ts, to = 0.0, 0.0
        for c in np.nonzero(ns)[0]:
            mm = mem[c][: ns[c]]
            mm = mm[~self.isR[mm]]
            f = ln[c] / ns[c]
            ts += f * self.wi[mm].sum()
            to = to + f * (self.wi[mm, None] * self.Vi[mm]).sum(0)
        return ts, to


def reservoir(D, ctx, l, h, nq=24):
    Q, K, V = load(D, l, h, "q"), load(D, l, h, "k"), load(D, l, h, "v")
    scale = 1 / np.sqrt(K.shape[1])
    n = ctx - WIN - SINKS
    C, a, mem, ln, cent = clusters(K[SINKS:ctx - WIN])
    pos = np.empty(n, int)
    for c in range(C):
        pos[mem[c]] = np.arange(len(mem[c]))
    res = {}
    for t in range(ctx, ctx + nq * (256 // nq), 256 // nq):
        x = Query(Q[t] * scale, K, V, ctx, a, ln, cent, C)
        for B in (3072, 6144):
            ns = plan(x.wc, x.rc, B)
            ts = to = 0.0
            rd = 0
            for c in np.nonzero(ns)[0]:
                a1, a2, k = x.ratio(mem, c, ns[c])
                ts, to, rd = ts + a1, to + a2, rd + k
            res.setdefault(f"plan {B}", []).append((x.err(ts, to), rd, 0))
        for R in (2, 4, 8, 16):
            Rc = np.minimum(R, ln)
            g = pos < Rc[a]
            ts, to = x.ht(mem, ln, Rc)
            res.setdefault(f"reservoir R={R}", []).append((x.err(ts, to), 0, g.sum() / n))
            for B in (1024, 3072):
                ns = plan(x.wc, x.rc, B)
                hot = ns > Rc
                ts2, to2, rd = ts, to, 0
                for c in np.nonzero(hot)[0]:  # the CPU's estimate of the hot clusters replaces the reservoir's
                    mm = mem[c][: Rc[c]]
                    mm = mm[~x.isR[mm]]
                    f = ln[c] / Rc[c]
                    ts2 -= f * x.wi[mm].sum()
                    to2 = to2 - f * (x.wi[mm, None] * x.Vi[mm]).sum(0)
                    a1, a2, k = x.ratio(mem, c, ns[c])
                    ts2, to2, rd = ts2 + a1, to2 + a2, rd + k
                res.setdefault(f"reservoir R={R} + CPU plan {B}", []).append((x.err(ts2, to2), rd, g.sum() / n))
    print(f"L{l} H{h}, {ctx} tokens ({n} indexed, {C} clusters), {nq} queries")
    for k, v in res.items():
        v = np.array(v)
        print(f"  {k:32s} err {v[:, 0].mean():.3e}  CPU rows {v[:, 1].mean():7.0f}  GPU rows {100 * v[:, 2].mean():5.1f}% of the keys")


def locality(D, ctx, l, h):
    Q, K = load(D, l, h, "q"), load(D, l, h, "k")
    scale = 1 / np.sqrt(K.shape[1])
    n = ctx - WIN - SINKS
    C, a, mem, ln, cent = clusters(K[SINKS:ctx - WIN])
    P = []
    for t in range(ctx, ctx + 128):
        cs = cent @ (Q[t] * scale)
        P.append(plan(ln * np.exp(0.7 * (cs - cs.max())), ln, 3072))
    P = np.array(P)
    for W in (1, 4, 16, 64):
        hit, rows = [], []
        for t in range(64, 128):
            c = P[t - W:t].max(0)
            hit.append(np.minimum(P[t], c).sum() / P[t].sum())
            rows.append(c.sum())
        print(f"L{l} H{h}: the last {W:2d} steps' samples cover {np.mean(hit):.3f} of a step's, "
              f"{np.mean(rows):6.0f} rows ({100 * np.mean(rows) / n:.1f}% of the keys)")


def gqa(D, ctx, l, kh, nq=16):
    hs = [3 * kh, 3 * kh + 1, 3 * kh + 2]
    Qs = [load(D, l, h, "q") for h in hs]
    K, V = load(D, l, hs[0], "k"), load(D, l, hs[0], "v")
    scale = 1 / np.sqrt(K.shape[1])
    C, a, mem, ln, cent = clusters(K[SINKS:ctx - WIN])
    res = {}
    for t in range(ctx, ctx + nq * (256 // nq), 256 // nq):
        xs = [Query(Qg[t] * scale, K, V, ctx, a, ln, cent, C) for Qg in Qs]
        for B in (1024, 2048, 3072):
            e = []
            for x in xs:
                ns = plan(x.wc, x.rc, B)
                ts = to = 0.0
                for c in np.nonzero(ns)[0]:
                    a1, a2, _ = x.ratio(mem, c, ns[c])
                    ts, to = ts + a1, to + a2
                e.append(x.err(ts, to))
            res.setdefault(f"one a head, {B} (rows {3 * B})", []).append(np.mean(e))
        for B in (3072, 4096, 6144):
            ns = plan(sum(x.wc / x.wc.sum() for x in xs) / 3, ln, B)
            res.setdefault(f"shared, {B} (rows {B})", []).append(np.mean([x.err(*x.ht(mem, ln, ns)) for x in xs]))
    print(f"L{l} KV head {kh} (query heads {hs}), {ctx} tokens, {nq} queries")
    for k, v in res.items():
        print(f"  {k:28s} err {np.mean(v):.3e}")


def lag(D, ctx, l, kh, nq=32):
    hs = [3 * kh, 3 * kh + 1, 3 * kh + 2]
    Qs = [load(D, l, h, "q") for h in hs]
    K, V = load(D, l, hs[0], "k"), load(D, l, hs[0], "v")
    scale = 1 / np.sqrt(K.shape[1])
    C, a, mem, ln, cent = clusters(K[SINKS:ctx - WIN])

    def alloc(t):  # the heads' normalized allocations averaged, before any retrieval
        m = 0
        for Qg in Qs:
            cs = cent @ (Qg[t] * scale)
            w = ln * np.exp(0.7 * (cs - cs.max()))
            m = m + w / w.sum()
        return m / len(Qs)

    A = {t: alloc(t) for t in range(ctx, ctx + nq + 16)}
    res, up = {}, {}
    for B in (4096, 6144):
        for W, u, cap in ((0, 0.0, 0), (1, 0.0, 0), (2, 0.0, 0), (2, 0.1, 0), (4, 0.1, 0), (2, 0.0, 1.5), (2, 0.0, 2), (2, 0.0, 4)):
            held, last = np.zeros(C, int), np.zeros(C)
            for t in range(ctx + 8, ctx + 8 + nq):
                m = A[t] if W == 0 else sum(A[t - j] for j in range(1, W + 1)) / W
                ns = plan((1 - u) * m + u * ln / ln.sum(), ln, B)
                new = np.maximum(held, ns)
                if cap and new.sum() > cap * B:  # clusters holding more than planned cut back, oldest first
                    over, c = new.sum() - cap * B, 0
                    for c in np.argsort(last):
                        if over <= 0:
                            break
                        cut = min(new[c] - ns[c], over)
                        new[c] -= cut
                        over -= cut
                last[ns >= np.maximum(held, 1)] = t
                if t >= ctx + 12:
                    xs = [Query(Qg[t] * scale, K, V, ctx, a, ln, cent, C) for Qg in Qs]
                    k = f"B {B}, plan from " + ("this step" if W == 0 else f"the last {W} steps") + f", {u:.0%} by size"
                    if cap:
                        k += f", all held (cap {cap} B)"
                    res.setdefault(k, []).append(np.mean([x.err(*x.ht(mem, ln, new if cap else ns)) for x in xs]))
                    up.setdefault(k, []).append([np.maximum(new - held, 0).sum(), new.sum()])
                held = new
    print(f"L{l} KV head {kh} (query heads {hs}), {ctx} tokens, {nq - 4} consecutive steps")
    for k, v in res.items():
        u = np.array(up[k])
        print(f"  {k:62s} err {np.mean(v):.3e}  uploads a step {u[:, 0].mean():6.0f}  rows held {u[:, 1].mean():6.0f}")


def mirror_steps(D, ctx, l, h, ns, k, nq):
    """mirror's decode queries: per query the scores s, weights w (its max 1), full attention,
    the attended ids (sinks, window, exact top k), the kept samples S and the keys left out T"""
    K, V, Q = load(D, l, h, "k")[:ctx], load(D, l, h, "v")[:ctx], load(D, l, h, "q")
    scale = 1 / np.sqrt(K.shape[1])
    lo, hi = SINKS, ctx - WIN
    idx = np.arange(lo, hi)
    samp = idx[(2 * np.arange(ns) + 1) * len(idx) // (2 * ns)]  # floor((2j + 1) n / (2 ns))
    for i in range(nq):
        s = K @ (Q[ctx + i * (len(Q) - ctx) // nq] * scale)
        w = np.exp(s - s.max())
        top = idx[np.argsort(-s[idx])[:k]]
        att = np.r_[np.arange(lo), np.arange(hi, ctx), top]
        keep = np.ones(ctx, bool)
        keep[att] = False
        # the sample less the retrieved (none above tau with exact retrieval)
        yield V, s, w, w @ V / w.sum(), att, samp[keep[samp]], idx[keep[idx]]


def mirror(D, ctx, l, h, ns, k, nq=100):
    err = []
    for V, s, w, full, att, S, T in mirror_steps(D, ctx, l, h, ns, k, nq):
        rho = len(T) / len(S)
        o = (w[att] @ V[att] + rho * (w[S] @ V[S])) / (w[att].sum() + rho * w[S].sum())
        err.append(np.linalg.norm(o - full) / np.linalg.norm(full))
    print(f"L{l} H{h}, {ctx} cached, exact top {k} + {ns} evenly spaced samples: rel. L2 mean {np.mean(err):.3e}, "
          f"max {np.max(err):.3e} ({nq} decode queries)")


def cv(D, ctx, l, h, ns, k, nq=100):
    err = {"plain": [], "Stein slope (the library's)": [], "least-squares slope": []}
    for V, s, w, full, att, S, T in mirror_steps(D, ctx, l, h, ns, k, nq):
        rho = len(T) / len(S)
        A0, Z0 = w[att] @ V[att], w[att].sum()
        At, Zt = rho * (w[S] @ V[S]), rho * w[S].sum()
        u = 1 + s - s[T].mean()  # the control: a key's weight's linear term in its score
        dA, dZ = u[T] @ V[T] - rho * (u[S] @ V[S]), u[T].sum() - rho * u[S].sum()
        x, y = s[S], w[S]
        for name, b in (("plain", 0.0), ("Stein slope (the library's)", Zt / len(T)),
                        ("least-squares slope", ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())):
            o = (A0 + At + b * dA) / (Z0 + Zt + b * dZ)
            err[name].append(np.linalg.norm(o - full) / np.linalg.norm(full))
    print(f"L{l} H{h}, {ctx} cached, exact top {k} + {ns} evenly spaced samples ({nq} decode queries): " +
          ", ".join(f"{n} {np.mean(e):.3e}" for n, e in err.items()))


if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[1] not in ("reservoir", "locality", "gqa", "lag", "mirror", "cv"):
        sys.exit(__doc__)
    f = {"reservoir": reservoir, "locality": locality, "gqa": gqa, "lag": lag, "mirror": mirror, "cv": cv}[sys.argv[1]]
    f(sys.argv[2], *map(int, sys.argv[3:]))
