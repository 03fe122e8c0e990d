"""report.py RESULTS.jsonl - the GPU benchmark's table: every kestrel figure beside its PyTorch
anchor from the same run, as a ratio (higher is better for kestrel)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
ceil = next((r for r in rows if r["bench"] == "ceilings"), {})
gemm = ceil.get("bf16_gemm_tflops")
bw = ceil.get("copy_gb_s")
print(f"device: {ceil.get('device')}  torch {ceil.get('torch')}  measured bf16 GEMM {gemm} TFLOP/s, "
      f"copy {bw} GB/s (read+write)")
print("\nencoding, batch 256, all tokens valid (docs/s; ratio = kestrel / anchor)")
print(f"{'model':9} {'T':>4} {'kestrel':>9} {'eager':>9} {'compiled':>9} {'x eager':>8} {'x comp':>7} "
      f"{'TFLOP/s':>8} {'of GEMM':>8} {'peak MiB k/e/c':>18} {'parity cos':>10}")
for k in (r for r in rows if r["bench"] == "encode" and r.get("variant", "fused") == "fused"):
    name = k["model"].rstrip("/").split("/")[-1]
    e = next((r for r in rows if r["bench"] == "encode_torch" and r["model"] == name and r["T"] == k["T"] and r["mode"] == "eager"), None)
    c = next((r for r in rows if r["bench"] == "encode_torch" and r["model"] == name and r["T"] == k["T"] and r["mode"] == "compiled"), None)
    ed = e["docs_per_s"] if e else float("nan")
    cd = c["docs_per_s"] if c else float("nan")
    mib = lambda r: f"{r['gpu_peak_bytes'] / 2**20:.0f}" if r else "-"
    print(f"{name:9} {k['T']:>4} {k['docs_per_s']:>9.0f} {ed:>9.0f} {cd:>9.0f} {k['docs_per_s'] / ed:>8.2f} "
          f"{k['docs_per_s'] / cd:>7.2f} {k['tflops']:>8.1f} {k['tflops'] / gemm if gemm else float('nan'):>8.2f} "
          f"{mib(k) + '/' + mib(e) + '/' + mib(c):>18} {k['parity_min_cos']:>10.6f}")
variants = [r for r in rows if r["bench"] == "encode" and r.get("variant", "fused") != "fused"]
if variants:
    print("\nthe same, other paths of bert_gpu.cu (KESTREL_GPU_FUSED=0: cuBLAS + separate bias/GELU kernels and "
          "the previous attention kernel; KESTREL_GPU_EXACT_GELU=1: erf GELU in its own kernel; "
          "KESTREL_GPU_GEMM_TUNE=0: cuBLASLt's first algorithm, untimed; KESTREL_GPU_ATT=2: the mma.sync attention kernel "
          "instead of the wgmma one for 64-dim heads)")
    for k in rows:
        if k["bench"] != "encode":
            continue
        name = k["model"].rstrip("/").split("/")[-1]
        e = next((r for r in rows if r["bench"] == "encode_torch" and r["model"] == name and r["T"] == k["T"] and r["mode"] == "eager"), None)
        c = next((r for r in rows if r["bench"] == "encode_torch" and r["model"] == name and r["T"] == k["T"] and r["mode"] == "compiled"), None)
        ed = e["docs_per_s"] if e else float("nan")
        cd = c["docs_per_s"] if c else float("nan")
        print(f"{k.get('variant', 'fused'):15} {name:9} {k['T']:>4} {k['docs_per_s']:>9.0f} x eager {k['docs_per_s'] / ed:5.2f} "
              f"x comp {k['docs_per_s'] / cd:5.2f}  parity cos {k['parity_min_cos']:.6f} max |d| {k.get('parity_max_abs', float('nan')):.4f}")
profiles = [r for r in rows if r["bench"] == "encode_profile"]
if profiles:
    print("\nper-layer step times, ms (KESTREL_GPU_PROFILE=1: CUDA events between the steps, mean over layers and runs)")
    steps = ("qkv", "attention", "proj", "ln1", "fc1", "fc2", "ln2")
    print(f"{'variant':10} {'model':9} {'T':>4} " + " ".join(f"{s:>9}" for s in steps) + f" {'layer':>8}")
    for r in profiles:
        name = r["model"].rstrip("/").split("/")[-1]
        print(f"{r.get('variant', ''):10} {name:9} {r['T']:>4} " + " ".join(f"{r[s + '_ms']:>9.4f}" for s in steps) + f" {r['layer_ms']:>8.4f}")
for r in (r for r in rows if r["bench"] == "embed_pipeline"):
    print(f"\nkst_model_embed on the GPU, {r['n']} texts ({r['model']}): {r['docs_per_s']:.0f} texts/s with tokenization "
          f"and the heads overlapping the GPU, {r['docs_per_s_serial']:.0f} texts/s one batch at a time "
          f"(ratio {r['docs_per_s'] / r['docs_per_s_serial']:.2f}); tokenization alone {r['tokenize_per_s']:.0f} texts/s")
print("\nexact search, 1M x 384, 10,000 queries, k = 100 (queries/s; ratio = kestrel / torch.mm + torch.topk)")
for k in (r for r in rows if r["bench"] == "search"):
    label = "fp16" if k["fp16"] else "fp32"
    t = next((r for r in rows if r["bench"] == "search_torch" and r["dtype"] == label), None)
    tq = t["qps"] if t else float("nan")
    # bytes a search must move at least: the vectors once per query chunk + the score matrix twice
    print(f"{label}: kestrel {k['qps']:.0f} q/s, torch {tq:.0f} q/s (chunk {t and t['chunk']}), ratio {k['qps'] / tq:.2f}; "
          f"ids shared with torch's top-100 {k['overlap_with_anchor_ids']:.4f}; "
          f"GPU MiB kestrel {k['gpu_bytes'] / 2**20:.0f}, torch peak {t and t['gpu_peak_bytes'] / 2**20:.0f}")
print("\nIVF-PQ, same FAISS index, k = 10 (queries/s; ratio = GPU / CPU FAISS on all cores, at equal nprobe and so equal recall)")
for r in (r for r in rows if r["bench"] == "ivfpq"):
    print(f"{r['factory']} nprobe {r['nprobe']:>4}: GPU {r['gpu_qps']:>9.0f} q/s, CPU FAISS ({r['cpu_threads']} threads) {r['cpu_qps']:>8.0f} q/s, "
          f"ratio {r['gpu_qps'] / r['cpu_qps']:.1f}; recall@10 GPU {r['gpu_recall10']:.2f} CPU {r['cpu_recall10']:.2f}; "
          f"codes scanned {r['gpu_code_gb_s']:.0f} GB/s = {r['of_bw']:.2f} of the copy bandwidth")
print("\nMargin-MSE training step, MiniLM-L6 shape, 64 triples, query 32 / passage Tp tokens, AdamW "
      "(triples/s; ratio = kestrel / PyTorch autocast bf16 with SDPA; attention flash or materialised T x T)")
for k in (r for r in rows if r["bench"] == "train"):
    an = {r["adamw"]: r for r in rows
          if r["bench"] == "train_torch" and r["dropout"] == k["dropout"] and r.get("Tp", 128) == k.get("Tp", 128)}
    fe, fu = an.get("foreach"), an.get("fused")
    rate = lambda r: r["triples_per_s"] if r else float("nan")
    mib = lambda r: f"{r['gpu_peak_bytes'] / 2**20:.0f}" if r else "-"
    print(f"Tp {k.get('Tp', 128)} {k.get('attention', ''):<12} dropout {k['dropout']:<4}: kestrel {k['triples_per_s']:>8.0f} ({k['step_ms']:.2f} ms/step), "
          f"torch AdamW foreach {rate(fe):>7.0f}, fused {rate(fu):>7.0f}; ratio {k['triples_per_s'] / rate(fe):.2f} / "
          f"{k['triples_per_s'] / rate(fu):.2f}; peak MiB kestrel/foreach/fused {mib(k)}/{mib(fe)}/{mib(fu)}")
cb = [r for r in rows if r["bench"] == "train_colbert"]
if cb:
    print("\nColBERT Margin-MSE training step, MiniLM-L6 shape + linear to dim, 64 triples, query 32 / passage Tp tokens, "
          "AdamW (triples/s; ratio = kestrel / PyTorch autocast bf16 with SDPA and colbert-ai's MaxSim, fused AdamW)")
    for k in cb:
        a = next((r for r in rows if r["bench"] == "train_colbert_torch" and r["dropout"] == k["dropout"]
                  and r["Tp"] == k["Tp"] and r["in_batch_weight"] == k["in_batch_weight"]), None)
        rate = a["triples_per_s"] if a else float("nan")
        print(f"Tp {k['Tp']} dim {k['dim']} dropout {k['dropout']:<4} in-batch {k['in_batch_weight']:<4}: kestrel "
              f"{k['triples_per_s']:>8.0f} ({k['step_ms']:.2f} ms/step), torch {rate:>7.0f}; ratio {k['triples_per_s'] / rate:.2f}; "
              f"peak MiB kestrel/torch {k['gpu_peak_bytes'] / 2**20:.0f}/{a['gpu_peak_bytes'] / 2**20 if a else float('nan'):.0f}")
