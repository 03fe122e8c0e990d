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
    for k in ["out", "threads", "nproc", "cli-load", "cli-e2e", "cli-lines", "whatif", "whatif-core",
              "real", "real-note", "cran-load", "cran-e2e", "load-start", "load-end"]:
        ap.add_argument("--" + k, default="")
    a = ap.parse_args()
    out = a.out
    threads = int(a.threads)
    F = load(os.path.join(out, "forward_rand.json"))
    P = load(os.path.join(out, "py_synth.json"))
    B, T = F["B"], F["T"]
    fs = flop_seq(T)
    core = F["openblas_config"].split()[-2]
    res = {"threads": threads, "cores": int(a.nproc), "cpu": cpu_name(),
           "openblas": F["openblas_config"], "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE", ""),
           "loadavg_before": a.load_start, "loadavg_after": a.load_end,
           "flop_formula": "per sequence: L*(2*T*(3*C^2 + C^2 + 2*C*FF) + 4*T^2*C); embeddings, pooling, padding ignored",
           "flop_per_seq_T128": fs}
    lines = []
    p = lines.append
    p(f"Kestrel CPU encoding benchmark - {threads} threads on {a.nproc} cores ({res['cpu']})")
    p(f"OpenBLAS: {F['openblas_config']}" + (f"  [OPENBLAS_CORETYPE={res['openblas_coretype_env']}]"
                                              if res["openblas_coretype_env"] else ""))
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
    if a.whatif:
        W = load(a.whatif)
        wsps, wgf, wa = W["forward_sent_per_s"], W["forward_gflops"], W["sgemm_anchor_gflops"]
        p(f"  what if OPENBLAS_CORETYPE={a.whatif_core} (default core here: {core}):")
        rat = " | ".join(f"/ {names[e]} forward {wsps / (B / P[e]['forward_median_s']):.2f}" for e in ("torch", "ort") if e in P)
        p(f"  {'kestrel forward':24s} {wsps:7.1f} sent/s {wgf:7.1f} GFLOP/s | sgemm anchor {wa:6.1f} GFLOP/s"
          f" | ratio {wgf / wa:.2f} | {rat}")
        wtop = sorted(W["breakdown"].items(), key=lambda kv: -kv[1]["s"])
        p("  forward breakdown: " + ", ".join(f"{k} {v['share'] * 100:.0f}%" for k, v in wtop if v["share"] >= 0.005))
        res["whatif_coretype"] = {"OPENBLAS_CORETYPE": a.whatif_core, "default_core": core,
                                  "kestrel_forward": {"sent_per_s": wsps, "gflops": wgf,
                                                      "median_s": W["forward_median_s"]},
                                  "sgemm_anchor_gflops": wa, "ratio_forward_to_sgemm": wgf / wa,
                                  "breakdown": W["breakdown"]}

    try:
        S = load(os.path.join(out, "ops_simd.json"))
        p(f"  proposal (tests/bench/proposals/ops_simd.c), same inputs as the library's ops, default core:")
        p(f"    GELU (4096 x 1536)       current {S['gelu_current_s'] * 1e3:6.1f} ms  proposed {S['gelu_proposed_s'] * 1e3:6.1f} ms"
          f"  x{S['gelu_speedup']:.1f}  (max abs diff {S['gelu_max_abs_diff']:.1e})")
        p(f"    attention (32x12 heads)  current {S['attention_current_s'] * 1e3:6.1f} ms  proposed {S['attention_proposed_s'] * 1e3:6.1f} ms"
          f"  x{S['attention_speedup']:.1f}  (max abs diff {S['attention_max_abs_diff']:.1e})")
        res["proposals_ops_simd"] = S
    except OSError:
        pass

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
    p(f"(load average before {a.load_start}, after {a.load_end}; JSON: {os.path.join(out, 'encode_cpu.json')})")
    print("\n".join(lines))
    res["printed"] = lines
    with open(os.path.join(out, "encode_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
