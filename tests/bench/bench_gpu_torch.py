"""bench_gpu_torch.py - the PyTorch anchors for the GPU benchmark (tests/gpu/run_all.sh), and the
inputs both sides share. Prints one JSON object per line.

  ceilings            bf16 GEMM rate (8192^3, random data) and device copy bandwidth (read+write)
  models DIR          random-weight BertModel checkpoints (seed 0) of MiniLM-L6 and BERT-base
                      shape in DIR/<name>, with the bert-base-uncased vocab, plus a padded parity
                      batch (ids, valid, float32 last hidden states from transformers)
  encode DIR B T...   transformers BertModel in bf16, eval, SDPA attention: eager and
                      torch.compile, docs/s on a (B, T) batch (ids copied from the host each call,
                      as kestrel's), peak GPU memory (KST_TORCH_MODES=eager: eager alone)
  kernels DIR NAME B T  torch.profiler's CUDA kernels of one eager forward (KST_TORCH_MODELS limits encode)
  search DIR          1M x 384 unit vectors and 10,000 queries (written to DIR as .npy); torch.mm +
                      torch.topk (k=100) in float32 and float16, best of two query chunk sizes
"""
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

dev = torch.device("cuda")


def bench(fn, reps, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ceilings():
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: a @ b, 10)
    gemm = 2 * 8192**3 / t / 1e12
    x = torch.randn(1 << 28, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), 10)
    bw = 2 * x.numel() * 4 / t / 1e9
    print(json.dumps({"bench": "ceilings", "device": torch.cuda.get_device_name(),
                      "bf16_gemm_tflops": round(gemm, 1), "copy_gb_s": round(bw, 1),
                      "torch": torch.__version__}), flush=True)


SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "bertbase": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}


def models(root, vocab):
    from transformers import BertConfig, BertModel
    for name, shp in SHAPES.items():
        d = os.path.join(root, name)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **shp)
        m = BertModel(cfg, add_pooling_layer=False).eval()
        m.save_pretrained(d, safe_serialization=True)
        shutil.copy(vocab, os.path.join(d, "vocab.txt"))
        g = torch.Generator().manual_seed(1)
        b, t = 8, 128
        valid = torch.randint(16, t + 1, (b,), generator=g)
        valid[0] = t
        ids = torch.randint(1000, 21000, (b, t), generator=g)
        mask = (torch.arange(t)[None, :] < valid[:, None]).long()
        ids[:, 0] = 101
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        with torch.no_grad():
            h = m.to(dev)(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.float().cpu()
        np.save(os.path.join(d, "parity_ids.npy"), ids.numpy().astype(np.int64))
        np.save(os.path.join(d, "parity_valid.npy"), valid.numpy().astype(np.int64))
        np.save(os.path.join(d, "parity_hidden.npy"), h.numpy().astype(np.float32))
        print(json.dumps({"bench": "model", "name": name, "dir": d}), flush=True)


def encode(root, B, Ts, reps):
    from transformers import BertModel
    names = os.environ.get("KST_TORCH_MODELS", ",".join(SHAPES)).split(",")
    for name in (n for n in SHAPES if n in names):
        d = os.path.join(root, name)
        m = BertModel.from_pretrained(d, attn_implementation="sdpa", dtype=torch.bfloat16).to(dev).eval()
        cm = torch.compile(m)
        for T in Ts:
            g = torch.Generator().manual_seed(2)
            ids = torch.randint(1000, 21000, (B, T), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102
            mask = torch.ones(B, T, dtype=torch.long)
            modes = os.environ.get("KST_TORCH_MODES", "eager,compiled").split(",")
            for label, mod in (("eager", m), ("compiled", cm)):
                if label not in modes:
                    continue
                def step():
                    with torch.inference_mode():
                        return mod(input_ids=ids.to(dev, non_blocking=False),
                                   attention_mask=mask.to(dev)).last_hidden_state
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t = bench(step, reps)
                cfg = m.config
                C, FF, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
                flop = L * (2 * T * (4 * C * C + 2 * C * FF) + 4 * T * T * C) * B
                print(json.dumps({"bench": "encode_torch", "model": name, "mode": label, "B": B, "T": T,
                                  "seconds": t, "docs_per_s": B / t, "tflops": flop / t / 1e12,
                                  "first_call_s": round(first, 1),
                                  "gpu_peak_bytes": torch.cuda.max_memory_allocated()}), flush=True)
        del m, cm
        torch.cuda.empty_cache()


def kernels(root, name, B, T):
    """torch.profiler's CUDA kernels of one eager forward: name, calls, total ms (a layer's share
    is total / the model's layers)"""
    from torch.profiler import ProfilerActivity, profile
    from transformers import BertModel
    m = BertModel.from_pretrained(os.path.join(root, name), attn_implementation="sdpa",
                                  dtype=torch.bfloat16).to(dev).eval()
    ids = torch.randint(1000, 21000, (B, T)).to(dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    with torch.inference_mode():
        for _ in range(3):
            m(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if e.device_time_total > 0:
            print(json.dumps({"bench": "torch_kernel", "model": name, "T": T, "kernel": e.key[:120],
                              "calls": e.count, "total_ms": round(e.device_time_total / 1e3, 4)}), flush=True)


def search(root, n=1_000_000, d=384, nq=10_000, k=100):
    g = torch.Generator(device=dev).manual_seed(3)
    db = torch.randn(n, d, device=dev, generator=g)
    db = db / db.norm(dim=1, keepdim=True)
    # queries near some documents, as real ones are
    q = db[torch.randint(0, n, (nq,), device=dev, generator=g)] + 0.5 * torch.randn(nq, d, device=dev, generator=g) / d**0.5
    q = q / q.norm(dim=1, keepdim=True)
    np.save(os.path.join(root, "db.npy"), db.cpu().numpy())
    qh = q.cpu().numpy()
    np.save(os.path.join(root, "q.npy"), qh)
    qcpu = torch.from_numpy(qh)
    for dt, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        dbt = db.to(dt)
        best, best_chunk, ids0 = None, 0, None
        for chunk in (1000, 5000):
            def run():
                out_s, out_i = [], []
                for s in range(0, nq, chunk):
                    qq = qcpu[s:s + chunk].to(dev).to(dt)
                    v, i = torch.topk(qq @ dbt.T, k, dim=1)
                    out_s.append(v.float().cpu())
                    out_i.append(i.cpu())
                return torch.cat(out_s), torch.cat(out_i)
            torch.cuda.reset_peak_memory_stats()
            t = bench(run, 3, warm=1)
            peak = torch.cuda.max_memory_allocated()
            if best is None or t < best:
                best, best_chunk, best_peak = t, chunk, peak
        if label == "fp32":
            _, ids0 = run()
            np.save(os.path.join(root, "anchor_ids.npy"), ids0[:200].numpy().astype(np.int64))
        print(json.dumps({"bench": "search_torch", "dtype": label, "n": n, "d": d, "nq": nq, "k": k,
                          "seconds": best, "qps": nq / best, "chunk": best_chunk,
                          "gpu_peak_bytes": best_peak}), flush=True)
        del dbt
    del db
    torch.cuda.empty_cache()


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "ceilings":
        ceilings()
    elif what == "models":
        models(sys.argv[2], sys.argv[3])
    elif what == "encode":
        encode(sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")], int(sys.argv[5]))
    elif what == "kernels":
        kernels(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif what == "search":
        search(sys.argv[2])
