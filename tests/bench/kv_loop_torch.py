#!/usr/bin/env python
"""kv_loop_torch.py - the anchor of bench_kv_loop: the same decoder loop in PyTorch, full
attention (scaled_dot_product_attention) over a GPU-resident cache per layer.

    python3 tests/bench/kv_loop_torch.py N        N cached tokens per layer (e.g. 131072)

Per layer and step, as bench_kv_loop: QKV GEMV 4096 -> 6144 (bfloat16 weights, random), the
new key and value written into the layer's cache (float16, 8 KV heads x N x 128; a fixed slot,
so the step can be captured), SDPA of the 32 query heads over it (enable_gqa), O 4096 -> 4096,
gate and up 4096 -> 14336, down 14336 -> 4096 (GEMVs only: no norms, activations or residuals,
as the C bench). KV_LAYERS (4) layers, KV_LOOP_STEPS (320) steps. Rows (ms per layer):
- graph: the L layers of a step captured as one CUDA graph, replayed `steps` times, CUDA events
  around all of them (the GPU's time per layer; no host overhead);
- graph_wall: the same, host wall time per step with a synchronize (what a decode loop waits for);
- eager: the same loop launched op by op, host wall with a synchronize per step;
- gemv: the graphed loop without the attention (the GEMVs alone; bench_kv_loop's gemv row);
- sdpa: the graphed SDPA alone (with the cache write) per layer.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    L = int(os.environ.get("KV_LAYERS", "4"))
    steps = int(os.environ.get("KV_LOOP_STEPS", "320"))
    hid, nqkv, ff, qh, kvh, d = 4096, 6144, 14336, 32, 8, 128
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bf = torch.bfloat16

    def w(o, i):
        return (torch.rand(o, i, device=dev, dtype=torch.float32) * 2 - 1).div_(64).to(bf)

    W = [dict(qkv=w(nqkv, hid), o=w(hid, hid), g=w(ff, hid), u=w(ff, hid), d=w(hid, ff)) for _ in range(L)]
    K = [torch.randn(1, kvh, n, d, device=dev, dtype=torch.float16) for _ in range(L)]
    V = [torch.randn(1, kvh, n, d, device=dev, dtype=torch.float16) for _ in range(L)]
    x0 = torch.full((1, hid), 0.0115, device=dev, dtype=bf)
    print(f"loop_torch: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; {L} layers, {n} tokens each"
          f" (cache {2 * kvh * n * d * 2 / 2**20:.0f} MB per layer on the GPU), {steps} steps")

    qz = torch.full((1, nqkv), 0.0115, device=dev, dtype=bf)  # the sdpa row's QKV (no GEMV)

    def layer(l, x, attn=True, gemv=True):
        qkv = F.linear(x, W[l]["qkv"]) if gemv else qz
        q = qkv[:, :hid].view(1, qh, 1, d).half()
        if attn:
            K[l][:, :, n - 1:n].copy_(qkv[:, hid:hid + kvh * d].view(1, kvh, 1, d))
            V[l][:, :, n - 1:n].copy_(qkv[:, hid + kvh * d:].view(1, kvh, 1, d))
            a = F.scaled_dot_product_attention(q, K[l], V[l], enable_gqa=True).view(1, hid).to(bf)
        else:
            a = q.view(1, hid).to(bf)
        if not gemv:
            return x
        o = F.linear(a, W[l]["o"])
        g = F.linear(o, W[l]["g"])
        F.linear(o, W[l]["u"])  # (the up projection: its product with the gate is not formed, as in the C bench)
        return F.linear(g, W[l]["d"])

    def step(attn=True, gemv=True):
        x = x0
        for l in range(L):
            x = layer(l, x, attn, gemv)
        return x

    def graphed(attn, gemv):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(attn, gemv)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step(attn, gemv)
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            g.replay()
        b.record()
        b.synchronize()
        gpu = a.elapsed_time(b) / steps / L
        ws = []
        for _ in range(min(steps, 100)):
            w0 = time.perf_counter()
            g.replay()
            torch.cuda.synchronize()
            ws.append((time.perf_counter() - w0) * 1e3 / L)
        ws.sort()
        del g
        return gpu, ws[len(ws) // 2], sum(ws) / len(ws)

    def eager():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        ws = []
        for _ in range(min(steps, 100)):
            w0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            ws.append((time.perf_counter() - w0) * 1e3 / L)
        ws.sort()
        return ws[len(ws) // 2], sum(ws) / len(ws)

    with torch.no_grad():
        g_full = graphed(True, True)
        g_gemv = graphed(False, True)
        g_sdpa = graphed(True, False)
        e_full = eager()
    print(f"{'row':<12} {'ms/layer':>10} {'wall_med':>10} {'wall_mean':>10}")
    print(f"{'graph':<12} {g_full[0]:>10.4f} {g_full[1]:>10.4f} {g_full[2]:>10.4f}")
    print(f"{'eager':<12} {'':>10} {e_full[0]:>10.4f} {e_full[1]:>10.4f}")
    print(f"{'gemv':<12} {g_gemv[0]:>10.4f} {g_gemv[1]:>10.4f} {g_gemv[2]:>10.4f}")
    print(f"{'sdpa':<12} {g_sdpa[0]:>10.4f} {g_sdpa[1]:>10.4f} {g_sdpa[2]:>10.4f}")
    print("(ms/layer: CUDA events over the replays; wall: host wall per step with a synchronize / layers)")


if __name__ == "__main__":
    main()
