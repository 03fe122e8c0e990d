"""bench_py.py - the reference encoders Kestrel is compared with, at a fixed thread count.

  synth:     PyTorch (the sentence-transformers model's modules, eval, inference_mode, fp32) and
             ONNX Runtime (CPU provider, intra_op_num_threads = threads) on the same B x T batches
             of texts that all truncate to exactly T tokens. Per engine: forward_s (median over
             batches of transformer + mean pooling + Normalize on pre-tokenized inputs) and e2e
             (tokenization included: SentenceTransformer.encode for PyTorch; tokenizer + session +
             numpy pooling for ONNX Runtime) over all texts after a warm-up.
  cranfield: docs/s of SentenceTransformer.encode(batch_size=32) and of ONNX Runtime (same
             length-sorted batches of 32 as sentence-transformers, padded to the longest, max_len
             from the model) over all texts of the file, after a warm-up on 64 of them.

Prints one JSON object. FLOPs are counted by the caller (report.py), the same way for all.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np


def set_threads(n):
    import torch
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def kernels(engine):
    """Which kernels an engine uses, in a few words (they are their own, not Kestrel's OpenBLAS)."""
    try:
        if engine == "torch":
            import re
            import torch
            cfg = torch.__config__.show()
            libs = []
            if torch.backends.mkl.is_available():
                m = re.search(r"Math Kernel Library Version ([0-9.]+)", cfg)
                libs.append("MKL" + (f" {m.group(1)}" if m else ""))
            if torch.backends.mkldnn.is_available():
                m = re.search(r"MKL-DNN (v\S+)", cfg)
                libs.append("oneDNN" + (f" {m.group(1)}" if m else ""))
            cap = torch.backends.cpu.get_cpu_capability()
            return f"torch {torch.__version__}: " + " + ".join(libs or ["own kernels"]) + f", CPU capability {cap}"
        import onnxruntime as ort
        return f"onnxruntime {ort.__version__}: MLAS (CPUExecutionProvider)"
    except Exception as ex:  # a description only; never fail the benchmark over it
        return f"unknown ({ex})"


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def mean_pool_np(h, mask):
    m = mask[:, :, None].astype(np.float32)
    v = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def ort_run(sess, enc):
    feed = {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "token_type_ids": enc["token_type_ids"].astype(np.int64)}
    h = sess.run(None, feed)[0]
    return mean_pool_np(h, enc["attention_mask"])


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [l.rstrip("\n").rstrip("\r") for l in f]


def synth(a):
    import torch
    from sentence_transformers import SentenceTransformer
    set_threads(a.threads)
    texts = lines(a.texts)
    st = SentenceTransformer(a.model, device="cpu").eval()
    st.max_seq_length = a.T
    tok = st.tokenizer
    batches = [texts[i:i + a.B] for i in range(0, len(texts) - a.B + 1, a.B)]
    enc_np = [tok(b, truncation=True, max_length=a.T, padding=True, return_tensors="np") for b in batches]
    ntok = sorted({int(e["attention_mask"].sum(1).min()) for e in enc_np} |
                  {int(e["attention_mask"].sum(1).max()) for e in enc_np})
    res = {"threads": a.threads, "torch_threads": torch.get_num_threads(), "B": a.B, "T": a.T,
           "batches": len(batches), "warmup": a.warmup, "token_counts_seen": ntok,
           "kernels": {e: kernels(e) for e in a.engines}}
    out = {}
    if "torch" in a.engines:
        feats = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in e.items()} for e in enc_np]
        times = []
        with torch.inference_mode():
            for i in range(a.warmup + len(feats)):
                f = feats[i % len(feats)]
                t0 = time.perf_counter()
                emb = st(dict(f))["sentence_embedding"]
                dt = time.perf_counter() - t0
                if i >= a.warmup:
                    times.append(dt)
                if i == a.warmup:
                    out["torch"] = emb.numpy()
        t0 = time.perf_counter()
        st.encode(texts[:len(batches) * a.B], batch_size=a.B, convert_to_numpy=True)
        e2e = time.perf_counter() - t0
        res["torch"] = {"forward_s": times, "forward_median_s": statistics.median(times),
                        "e2e_s": e2e, "e2e_texts": len(batches) * a.B}
    if "ort" in a.engines:
        sess = ort_session(a.onnx, a.threads)
        times = []
        for i in range(a.warmup + len(enc_np)):
            e = enc_np[i % len(enc_np)]
            t0 = time.perf_counter()
            emb = ort_run(sess, e)
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times.append(dt)
            if i == a.warmup:
                out["ort"] = emb
        t0 = time.perf_counter()
        for b in batches:
            ort_run(sess, tok(b, truncation=True, max_length=a.T, padding=True, return_tensors="np"))
        e2e = time.perf_counter() - t0
        res["ort"] = {"forward_s": times, "forward_median_s": statistics.median(times),
                      "e2e_s": e2e, "e2e_texts": len(batches) * a.B}
    if a.save_first:
        # the first timed batch's embeddings (batch index warmup % batches), for an agreement check
        np.savez(a.save_first, first_batch=a.warmup % len(batches), **out)
    return res


def cranfield(a):
    from sentence_transformers import SentenceTransformer
    set_threads(a.threads)
    docs = lines(a.texts)
    res = {"threads": a.threads, "docs": len(docs)}
    st = SentenceTransformer(a.model, device="cpu").eval()
    max_len = st.max_seq_length
    res["max_seq_length"] = max_len
    tok = st.tokenizer
    lens = np.array([len(x) for x in tok(docs, truncation=True, max_length=max_len)["input_ids"]])
    res["tokens_mean"], res["tokens_max"] = float(lens.mean()), int(lens.max())
    res["tokens"] = [int(x) for x in lens]
    if "torch" in a.engines:
        st.encode(docs[:64], batch_size=32)
        t0 = time.perf_counter()
        st.encode(docs, batch_size=32, convert_to_numpy=True)
        res["torch"] = {"e2e_s": time.perf_counter() - t0}
    if "ort" in a.engines:
        sess = ort_session(a.onnx, a.threads)
        # sentence-transformers' order: longest first (by character length), batches of 32
        order = np.argsort([-len(d) for d in docs], kind="stable")

        def run_all(idx):
            for i in range(0, len(idx), 32):
                b = [docs[j] for j in idx[i:i + 32]]
                ort_run(sess, tok(b, truncation=True, max_length=max_len, padding=True, return_tensors="np"))
        run_all(order[:64])
        t0 = time.perf_counter()
        run_all(order)
        res["ort"] = {"e2e_s": time.perf_counter() - t0}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["synth", "cranfield"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--engines", default="torch,ort")
    ap.add_argument("--save-first", default="")
    a = ap.parse_args()
    a.engines = a.engines.split(",")
    res = synth(a) if a.mode == "synth" else cranfield(a)
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
