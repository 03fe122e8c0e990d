#!/usr/bin/env python
"""kv_sdpa.py - the anchor of the GPU decode-step bench (tests/bench/kv_gpu.sh): PyTorch's
scaled_dot_product_attention of one decode query over the whole cache, resident on the GPU, for
the shape bench_kv_gpu uses (4 query heads over one KV head, head dim 128, float16).

    python3 tests/bench/kv_sdpa.py 32768,131072,1048576

Per size: median of 200 single calls, each timed with CUDA events after 20 warm-ups (the cache
is rotated among 4 copies when it fits, so repeated calls do not only read L2), and the GPU
memory the cache holds.
"""
import sys

import torch
import torch.nn.functional as F


def main():
    sizes = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,131072,1048576").split(",")]
    dev = torch.device("cuda")
    print(f"sdpa: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'tokens':>8} {'sdpa_ms':>10} {'cache_MB':>10}")
    for n in sizes:
        copies = 4 if n <= 262144 else 1
        q = torch.randn(1, 4, 1, 128, device=dev, dtype=torch.float16)
        ks = [torch.randn(1, 1, n, 128, device=dev, dtype=torch.float16) for _ in range(copies)]
        vs = [torch.randn(1, 1, n, 128, device=dev, dtype=torch.float16) for _ in range(copies)]
        for i in range(20):
            F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
        torch.cuda.synchronize()
        ts = []
        for i in range(200):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        ts.sort()
        print(f"{n:>8} {ts[len(ts) // 2]:>10.4f} {2 * n * 128 * 2 / 2**20:>10.1f}")
        del ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
