"""bench_gpu_train_torch.py - the PyTorch anchor for kestrel's GPU Margin-MSE training step
(tests/bench/bench_gpu_train.c), run by tests/gpu/run_all.sh. Prints one JSON object per line.

  model DIR VOCAB              a random-weight BertModel of MiniLM-L6 shape (384/6/12/1536, seed 0,
                               as bench_gpu_torch.py's "minilm") saved by transformers in DIR
  train DIR B TQ TP REPS P     the same step as kestrel's: float32 master weights, autocast bf16,
                               SDPA attention, training mode with dropout P, B triples (query,
                               positive, negative) of TQ / TP tokens, every token valid, random ids
                               copied from the host on every step; mean pooling + F.normalize, dot
                               scores, Margin-MSE (MSELoss of the margins) against random teacher
                               scores, backward, AdamW (lr 2e-5, weight decay 0.01 on matrices and
                               embeddings only; torch's default foreach implementation, and fused=True).
                               3 warm-up steps, REPS timed one by one (each ends with loss.item(),
                               as kestrel's ends with the loss on the host); median; peak memory
                               (torch.cuda.max_memory_allocated).
  colbert DIR B TQ TP REPS P DIM [IBW]
                               the ColBERT step (bench_gpu_train.c with DIM): the same model plus a
                               linear (DIM, C) without bias (seed 7); each token's vector is
                               linear(h) L2-normalised (F.normalize, float32), every token attended
                               and entering MaxSim; the score is colbert-ai's colbert_score, (D @
                               Q^T).max over passage tokens summed over query tokens (the product
                               under autocast, as colbert-ai runs it); Margin-MSE plus IBW times the
                               in-batch cross-entropy (every query against every passage, its
                               positive the label) when IBW > 0; AdamW fused=True. Same timing.
"""
import json
import os
import shutil
import statistics
import sys
import time

import torch

dev = torch.device("cuda")


def model(d, vocab):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    m.save_pretrained(d, safe_serialization=True)
    shutil.copy(vocab, os.path.join(d, "vocab.txt"))
    print(json.dumps({"bench": "model", "name": "minilm", "dir": d}), flush=True)


def inputs(B, Tq, Tp):
    """Random ids ([CLS] first) and teacher scores, as bench_gpu_train.c draws them (not the same draws)."""
    g = torch.Generator().manual_seed(42)
    qids = torch.randint(1000, 21000, (B, Tq), generator=g)
    pids = torch.randint(1000, 21000, (2 * B, Tp), generator=g)
    qids[:, 0] = 101
    pids[:, 0] = 101
    return qids, pids, (torch.rand(B, 2, generator=g) * 10).to(dev)


def timed(step, reps):
    """3 warm-up steps, then reps timed one by one; (first loss, last loss, median seconds)."""
    first = step()
    for _ in range(2):
        step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        last = step()
        ts.append(time.perf_counter() - t0)
    return first, last, statistics.median(ts)


def adamw(named, **kw):
    """AdamW with weight decay 0.01 on matrices and embeddings only, lr 2e-5."""
    decay = [w for n, w in named if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [w for n, w in named if n.endswith("bias") or "LayerNorm" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=2e-5, **kw)


def train(d, B, Tq, Tp, reps, p):
    from transformers import BertModel
    import torch.nn.functional as F
    qids, pids, teacher = inputs(B, Tq, Tp)
    for impl in ("foreach", "fused"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        m = BertModel.from_pretrained(d, attn_implementation="sdpa", hidden_dropout_prob=p,
                                      attention_probs_dropout_prob=p).to(dev).train()
        opt = adamw(list(m.named_parameters()), **({"fused": True} if impl == "fused" else {}))

        def encode(ids):
            mask = torch.ones_like(ids)
            h = m(input_ids=ids, attention_mask=mask).last_hidden_state
            v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return F.normalize(v.float(), dim=-1)

        def step():
            qi, pi = qids.to(dev), pids.to(dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                vq = encode(qi)
                vp = encode(pi).view(B, 2, -1)
            s = (vq[:, None, :] * vp).sum(-1)
            loss = F.mse_loss(s[:, 0] - s[:, 1], teacher[:, 0] - teacher[:, 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        first, last, med = timed(step, reps)
        print(json.dumps({"bench": "train_torch", "adamw": impl, "triples": B, "Tq": Tq, "Tp": Tp, "dropout": p,
                          "step_ms": round(med * 1e3, 3), "triples_per_s": round(B / med, 1),
                          "gpu_peak_bytes": torch.cuda.max_memory_allocated(), "loss_first": first,
                          "loss_last": last, "torch": torch.__version__}), flush=True)
        del m, opt


def colbert(d, B, Tq, Tp, reps, p, dim, ibw):
    from transformers import BertModel
    import torch.nn.functional as F
    qids, pids, teacher = inputs(B, Tq, Tp)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = BertModel.from_pretrained(d, attn_implementation="sdpa", hidden_dropout_prob=p,
                                  attention_probs_dropout_prob=p).to(dev).train()
    torch.manual_seed(7)
    lin = torch.nn.Linear(m.config.hidden_size, dim, bias=False).to(dev)
    opt = adamw(list(m.named_parameters()) + [("linear.weight", lin.weight)], fused=True)

    def vecs(ids):
        h = m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return F.normalize(lin(h).float(), p=2, dim=2)

    def step():
        qi, pi = qids.to(dev), pids.to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            Q = vecs(qi)                      # (B, Tq, dim)
            D = vecs(pi)                      # (2B, Tp, dim)
            if ibw > 0:                       # every query against every passage
                S = torch.einsum("qid,ptd->qpit", Q, D).max(-1).values.sum(-1).float()  # (B, 2B)
                s = torch.stack([S[torch.arange(B), 2 * torch.arange(B)], S[torch.arange(B), 2 * torch.arange(B) + 1]], 1)
            else:                             # colbert_score on the own passages
                Qr = Q.repeat_interleave(2, dim=0)
                s = (D @ Qr.permute(0, 2, 1)).max(1).values.sum(-1).float().view(B, 2)
        loss = F.mse_loss(s[:, 0] - s[:, 1], teacher[:, 0] - teacher[:, 1])
        if ibw > 0:
            loss = loss + ibw * F.cross_entropy(S, 2 * torch.arange(B, device=dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    first, last, med = timed(step, reps)
    print(json.dumps({"bench": "train_colbert_torch", "triples": B, "Tq": Tq, "Tp": Tp, "dim": dim, "dropout": p,
                      "in_batch_weight": ibw, "step_ms": round(med * 1e3, 3), "triples_per_s": round(B / med, 1),
                      "gpu_peak_bytes": torch.cuda.max_memory_allocated(), "loss_first": first, "loss_last": last,
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "model":
        model(sys.argv[2], sys.argv[3])
    elif what == "train":
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
    elif what == "colbert":
        a = sys.argv[2:]
        colbert(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), float(a[5]), int(a[6]), float(a[7]) if len(a) > 7 else 0.0)
    else:
        sys.exit(f"unknown command {what}")
