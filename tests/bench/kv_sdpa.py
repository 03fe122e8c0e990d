#!/usr/bin/env python
"""kv_sdpa.py - the anchors of the GPU decode-step bench (tests/bench/kv.sh): PyTorch's
scaled_dot_product_attention of one decode step over the whole cache.

    python3 tests/bench/kv_sdpa.py 32768,131072,1048576            one KV head of 4 query heads
    python3 tests/bench/kv_sdpa.py --layer 32768,131072,1048576    one layer: 8 KV x 32 query heads

Shape: head dim 128, float16, GQA (enable_gqa). Per size, the median of 200 single calls:
- resident: the cache on the GPU, each call timed with CUDA events after 20 warm-ups (the cache
  rotates among copies, so repeated calls do not only read L2), and as host wall time per call
  with a synchronize (what a decode loop waits for);
- with --offload (layer only): the same full attention for a GPU that holds only the static
  tokens: (a) the cache in pinned CPU memory, copied to the GPU and attended each step (median
  of 10); (b) PyTorch's CPU SDPA over the cache in CPU memory, float32 (median of 10);
- with --table=MiB[,MiB...] (layer only): what reading the clustered tail's sample table from CPU
  memory would cost a step instead of holding it on the GPU: a copy of that many MiB from pinned
  CPU memory to the GPU (the copy engine; CUDA events, median of 50 after 5), beside the step's
  SDPA. The table of `tail_cache_q8` with tail 4,096 at 8 KV heads of d 128: 8,192 rows a KV head
  of 256 bytes (key and value) and two float scales, 16.5 MiB a layer; the 4,096 rows one plan
  samples, 8.25 MiB.
"""
import sys
import time

import torch
import torch.nn.functional as F


def med(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    layer = "--layer" in sys.argv
    offload = "--offload" in sys.argv
    tables = [float(x) for a in sys.argv[1:] if a.startswith("--table=") for x in a[8:].split(",")]
    sizes = [int(x) for x in (args[0] if args else "32768,131072,1048576").split(",")]
    qh, kvh, d = (32, 8, 128) if layer else (4, 1, 128)
    dev = torch.device("cuda")
    print(f"sdpa: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {qh} query heads over {kvh} KV heads, d {d}, float16"
          f"; {torch.get_num_threads()} CPU threads")
    cols = f"{'tokens':>8} {'sdpa_ms':>10} {'wall_ms':>10} {'cache_MB':>10}"
    if offload:
        cols += f" {'h2d+sdpa_ms':>12} {'cpu_sdpa_ms':>12}"
    for t in tables:
        cols += f" {'h2d_' + format(t, 'g') + 'MiB_ms':>16} {'x_sdpa':>7}"
    print(cols)
    for n in sizes:
        mb = 2 * kvh * n * d * 2 / 2**20
        copies = 4 if mb <= 1024 else 2
        q = torch.randn(1, qh, 1, d, device=dev, dtype=torch.float16)
        ks = [torch.randn(1, kvh, n, d, device=dev, dtype=torch.float16) for _ in range(copies)]
        vs = [torch.randn(1, kvh, n, d, device=dev, dtype=torch.float16) for _ in range(copies)]
        for i in range(20):
            F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
        torch.cuda.synchronize()
        ts, ws = [], []
        for i in range(200):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            w0 = time.perf_counter()
            a.record()
            F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
            b.record()
            b.synchronize()
            ws.append((time.perf_counter() - w0) * 1e3)
            ts.append(a.elapsed_time(b))
        line = f"{n:>8} {med(ts):>10.4f} {med(ws):>10.4f} {mb:>10.1f}"
        del ks, vs
        torch.cuda.empty_cache()
        if offload:
            kh = torch.randn(1, kvh, n, d, dtype=torch.float16).pin_memory()
            vh = torch.randn(1, kvh, n, d, dtype=torch.float16).pin_memory()
            hs = []
            for i in range(12):
                w0 = time.perf_counter()
                kd, vd = kh.to(dev, non_blocking=True), vh.to(dev, non_blocking=True)
                F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
                torch.cuda.synchronize()
                if i >= 2:
                    hs.append((time.perf_counter() - w0) * 1e3)
                del kd, vd
            kc, vc, qc = kh.float(), vh.float(), q.float().cpu()
            cs = []
            for i in range(12):
                w0 = time.perf_counter()
                F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True)
                if i >= 2:
                    cs.append((time.perf_counter() - w0) * 1e3)
            line += f" {med(hs):>12.2f} {med(cs):>12.2f}"
            del kh, vh, kc, vc
        for t in tables:
            src = torch.empty(int(t * 2**20), dtype=torch.uint8).pin_memory()
            dst = torch.empty_like(src, device=dev)
            cp = []
            for i in range(55):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src, non_blocking=True)
                b.record()
                b.synchronize()
                if i >= 5:
                    cp.append(a.elapsed_time(b))
            line += f" {med(cp):>16.4f} {med(cp) / med(ts):>7.2f}"
            del src, dst
        print(line, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
