"""report.py - gathers run.sh's measurements into the printed table and out/encode_cpu.json.

FLOPs are counted the same way for every engine (embeddings, pooling and padding ignored):
    per sequence of T tokens: L * (2*T*(3*C^2 + C^2 + 2*C*FF) + 4*T^2*C)
i.e. the four weight GEMMs (QKV, attention output, FFN in, FFN out) and the two attention
products (Q K^T and P V). For Cranfield each document counts its own (truncated) length.
"""
import argparse
import json
import os
import platform

import numpy as np

L, C, FF = 6, 384, 1536  # MiniLM-L6 (both the random model and all-MiniLM-L6-v2)


def flop_seq(T):
    return L * (2.0 * T * (3 * C * C + C * C + 2 * C * FF) + 4.0 * T * T * C)


def load(path):
    with open(path) as f:
        return json.load(f)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fnum(x):
    return float(x) if x not in (None, "") else None


def main():
    ap = argparse.ArgumentParser()
    for k in ["out", "threads", "nproc", "cli-load", "cli-e2e", "cli-lines", "real", "real-note", "cran-load", "cran-e2e", "load-start", "load-end", "cpu-start", "cpu-end", "clk-tck", "own-cpu", "wall"]:
        ap.add_argument("--" + k, default="")
    a = ap.parse_args()
    out = a.out
    threads = int(a.threads)
    F = load(os.path.join(out, "forward_rand.json"))
    P = load(os.path.join(out, "py_synth.json"))
    B, T = F["B"], F["T"]
    fs = flop_seq(T)
    core, src = F["blas_core"], F["blas_core_source"]
    how = {"user": f"OPENBLAS_CORETYPE={F['openblas_coretype']} set by the user",
           "kestrel": "chosen by kestrel from CPU features",
           "openblas": "chosen by OpenBLAS itself (kestrel set no OPENBLAS_CORETYPE)"}[src]
    if core == "portable":
        how = "OpenBLAS could not be loaded: kestrel's slow portable loop"
    res = {"threads": threads, "cores": int(a.nproc), "cpu": cpu_name(),
           "blas_core": core, "blas_core_source": src, "openblas_coretype": F["openblas_coretype"],
           "loadavg_before": a.load_start, "loadavg_after": a.load_end,
           "flop_formula": "per sequence: L*(2*T*(3*C^2 + C^2 + 2*C*FF) + 4*T^2*C); embeddings, pooling, padding ignored",
           "flop_per_seq_T128": fs}
    lines = []
    p = lines.append
    p(f"Kestrel CPU encoding benchmark - {threads} threads on {a.nproc} cores ({res['cpu']})")
    p(f"OpenBLAS kernels: {core} ({how}); the sgemm anchor calls kst_sgemm, the library's own instance")
    for eng, label in (("torch", "PyTorch"), ("ort", "ONNX Runtime")):
        if eng in P.get("kernels", {}):
            p(f"{label} kernels: {P['kernels'][eng]}")
    res["kernels"] = P.get("kernels", {})
    p(f"FLOPs/sequence = L*(2T(3C^2+C^2+2C*FF) + 4T^2*C) = {fs / 1e9:.3f} GFLOP at T={T} (L=6, C=384, FF=1536)")
    busy = a.load_start and float(a.load_start.split()[0]) > 0.5
    if busy:
        p(f"WARNING: load average {a.load_start} before the run: other processes were using the CPU; figures may be low")

    # ---- 1. random MiniLM-L6 shape, 32 x 128 ----
    p("")
    p(f"1. MiniLM-L6 shape (random weights), batch {B} x {T} tokens, {threads} threads")
    anchor = F["sgemm_anchor_gflops"]
    fwd_sps = F["forward_sent_per_s"]
    fwd_gf = F["forward_gflops"]
    p(f"  {'kestrel forward':24s} {fwd_sps:7.1f} sent/s {fwd_gf:7.1f} GFLOP/s | sgemm anchor {anchor:6.1f} GFLOP/s"
      f" | ratio {fwd_gf / anchor:.2f} (target 0.60)   [median of {F['reps']} batches,"
      f" min {F['forward_min_s']:.3f} s max {F['forward_max_s']:.3f} s]")
    n_cli = int(a.cli_lines)
    cli_e2e, cli_load = float(a.cli_e2e), float(a.cli_load)
    cli_sps = n_cli / cli_e2e
    cli_gf = n_cli * fs / cli_e2e / 1e9
    p(f"  {'kestrel embed (CLI)':24s} {cli_sps:7.1f} sent/s {cli_gf:7.1f} GFLOP/s | sgemm anchor {anchor:6.1f} GFLOP/s"
      f" | ratio {cli_gf / anchor:.2f}   [{n_cli} texts, {cli_e2e:.2f} s wall incl. load and tokenization]")
    p(f"  {'kestrel model load':24s} {cli_load:7.3f} s (wall of a 1-line embed, median of 3)")
    res["synthetic"] = {
        "B": B, "T": T, "reps": F["reps"],
        "kestrel_forward": {"sent_per_s": fwd_sps, "gflops": fwd_gf, "median_s": F["forward_median_s"],
                            "min_s": F["forward_min_s"], "max_s": F["forward_max_s"]},
        "sgemm_anchor": {"gflops": anchor, "shapes": F["sgemm_shapes"]},
        "ratio_forward_to_sgemm": fwd_gf / anchor, "ratio_target": 0.60,
        "kestrel_cli": {"texts": n_cli, "wall_s": cli_e2e, "sent_per_s": cli_sps, "gflops": cli_gf,
                        "ratio_to_sgemm": cli_gf / anchor, "load_s": cli_load},
        "breakdown": F["breakdown"], "breakdown_total_s": F["breakdown_total_s"],
        "token_counts_seen": P["token_counts_seen"],
    }
    names = {"torch": "PyTorch", "ort": "ONNX Runtime"}
    for eng in ("torch", "ort"):
        if eng not in P:
            continue
        e = P[eng]
        sps = B / e["forward_median_s"]
        gf = sps * fs / 1e9
        e2e_sps = e["e2e_texts"] / e["e2e_s"]
        p(f"  {names[eng] + ' forward':24s} {sps:7.1f} sent/s {gf:7.1f} GFLOP/s | kestrel forward / {names[eng]}"
          f" = {fwd_sps / sps:.2f} (target > 1.0)")
        p(f"  {names[eng] + ' end to end':24s} {e2e_sps:7.1f} sent/s {e2e_sps * fs / 1e9:7.1f} GFLOP/s |"
          f" kestrel embed (CLI) / {names[eng]} = {cli_sps / e2e_sps:.2f} (target > 1.0)")
        res["synthetic"][eng] = {"forward_sent_per_s": sps, "forward_gflops": gf,
                                 "forward_median_s": e["forward_median_s"], "forward_s": e["forward_s"],
                                 "e2e_sent_per_s": e2e_sps, "e2e_s": e["e2e_s"],
                                 "ratio_kestrel_forward": fwd_sps / sps,
                                 "ratio_kestrel_cli_e2e": cli_sps / e2e_sps}
    bd = F["breakdown"]
    top = sorted(bd.items(), key=lambda kv: -kv[1]["s"])
    p("  forward breakdown: " + ", ".join(f"{k} {v['share'] * 100:.0f}%" for k, v in top if v["share"] >= 0.005))
    # agreement of the CLI's vectors with PyTorch's on the first timed batch (a sanity check)
    try:
        z = np.load(os.path.join(out, "py_first_batch.npz"))
        k = np.load(os.path.join(out, "rand_cli.npy"))
        i = int(z["first_batch"]) * B
        diff = float(np.abs(k[i:i + B] - z["torch"]).max())
        p(f"  check: max |kestrel - PyTorch| over one batch's vectors = {diff:.2e}")
        res["synthetic"]["max_abs_diff_vs_torch"] = diff
    except (OSError, KeyError) as ex:
        p(f"  check: skipped ({ex})")

    # ---- 2. all-MiniLM-L6-v2 on Cranfield ----
    p("")
    if not a.real:
        p(f"2. all-MiniLM-L6-v2 on Cranfield: {a.real_note}")
        res["cranfield"] = {"skipped": a.real_note}
    else:
        R = load(os.path.join(out, "py_cran.json"))
        n = R["docs"]
        tot = sum(flop_seq(t) for t in R["tokens"])
        e2e, ld = float(a.cran_e2e), float(a.cran_load)
        k_dps = n / e2e
        p(f"2. all-MiniLM-L6-v2 on Cranfield: {n} docs (.W), natural lengths (mean {R['tokens_mean']:.0f},"
          f" max {R['tokens_max']} tokens; max_seq_length {R['max_seq_length']}), {threads} threads;"
          f" {tot / 1e12:.2f} TFLOP in all")
        p(f"  {'kestrel embed (CLI)':24s} {k_dps:7.1f} docs/s {tot / e2e / 1e9:7.1f} GFLOP/s"
          f"   [{e2e:.2f} s wall incl. load {ld:.2f} s and tokenization]")
        res["cranfield"] = {"model": a.real, "docs": n, "tokens_mean": R["tokens_mean"],
                            "tokens_max": R["tokens_max"], "max_seq_length": R["max_seq_length"],
                            "total_flop": tot,
                            "kestrel_cli": {"wall_s": e2e, "docs_per_s": k_dps, "gflops": tot / e2e / 1e9,
                                            "load_s": ld}}
        for eng, label in (("torch", "sentence-transformers"), ("ort", "ONNX Runtime")):
            if eng not in R:
                continue
            s = R[eng]["e2e_s"]
            dps = n / s
            p(f"  {label:24s} {dps:7.1f} docs/s {tot / s / 1e9:7.1f} GFLOP/s | kestrel / {label} = {k_dps / dps:.2f} (target > 1.0)")
            res["cranfield"][eng] = {"wall_s": s, "docs_per_s": dps, "gflops": tot / s / 1e9,
                                     "ratio_kestrel": k_dps / dps}
        try:
            k = np.load(os.path.join(out, "cran_cli.npy"))
            res["cranfield"]["kestrel_vectors"] = list(k.shape)
        except OSError:
            pass
    p("")
    if a.cpu_start and a.cpu_end and a.own_cpu and a.wall:
        (b0, s0), (b1, s1) = (map(int, x.split()) for x in (a.cpu_start, a.cpu_end))
        hz, wall, own = int(a.clk_tck or 100), float(a.wall), float(a.own_cpu)
        other = max((b1 - b0) / hz - own, 0.0)
        cap = wall * int(a.nproc)
        res["quiet"] = {"wall_s": wall, "machine_busy_cpu_s": (b1 - b0) / hz, "benchmark_cpu_s": own,
                        "other_cpu_s": other, "steal_s": (s1 - s0) / hz, "capacity_cpu_s": cap}
        p(f"(CPU used by other processes during the run: {other:.1f} s of {cap:.0f} s"
          f" ({100 * other / cap:.1f}%), steal {(s1 - s0) / hz:.1f} s; the benchmark itself used {own:.0f} s)")
    p(f"(load average before {a.load_start}, after {a.load_end} (the benchmark's own threads count in 'after');"
      f" JSON: {os.path.join(out, 'encode_cpu.json')})")
    print("\n".join(lines))
    res["printed"] = lines
    with open(os.path.join(out, "encode_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
