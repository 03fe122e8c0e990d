"""bench_gpu_train_colbert_torch.py - the PyTorch anchor for kestrel's GPU ColBERT training step
(tests/bench/bench_gpu_train_colbert.c), run by tests/gpu/run_all.sh. Prints one JSON line.

  DIR B TQ TP DIM REPS P [IBW]   the BertModel in DIR (bench_gpu_train_torch.py's MiniLM-L6 shape)
      plus a ColBERT linear (DIM, C) without bias, float32 master weights, autocast bf16, SDPA
      attention, training mode with dropout P; B triples (query, positive, negative) of TQ / TP
      tokens, every token attended and entering MaxSim, random ids copied from the host on every
      step. Each token's vector is linear(h) L2-normalised (F.normalize, float32), the score is
      colbert-ai's colbert_score: (D @ Q^T).max over passage tokens, summed over query tokens
      (the product under autocast, as colbert-ai runs it); Margin-MSE (MSELoss of the margins)
      against random teacher scores, plus IBW times the in-batch cross-entropy (every query
      against every passage of the batch, its positive the label) when IBW > 0; backward, AdamW
      (lr 2e-5, weight decay 0.01 on matrices and embeddings only, fused=True). 3 warm-up steps,
      REPS timed one by one (each ends with loss.item()); median; peak memory.
"""
import json
import statistics
import sys
import time

import torch


def main(d, B, Tq, Tp, dim, reps, p, ibw):
    from transformers import BertModel
    import torch.nn.functional as F
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(42)
    qids = torch.randint(1000, 21000, (B, Tq), generator=g)
    pids = torch.randint(1000, 21000, (2 * B, Tp), generator=g)
    qids[:, 0] = 101
    pids[:, 0] = 101
    teacher = (torch.rand(B, 2, generator=g) * 10).to(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = BertModel.from_pretrained(d, attn_implementation="sdpa", hidden_dropout_prob=p,
                                  attention_probs_dropout_prob=p).to(dev).train()
    torch.manual_seed(7)
    lin = torch.nn.Linear(m.config.hidden_size, dim, bias=False).to(dev)
    named = list(m.named_parameters()) + [("linear.weight", lin.weight)]
    decay = [w for n, w in named if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [w for n, w in named if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=2e-5, fused=True)

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

    first = step()
    for _ in range(2):
        step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        last = step()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    print(json.dumps({"bench": "train_colbert_torch", "triples": B, "Tq": Tq, "Tp": Tp, "dim": dim, "dropout": p,
                      "in_batch_weight": ibw, "step_ms": round(med * 1e3, 3), "triples_per_s": round(B / med, 1),
                      "gpu_peak_bytes": torch.cuda.max_memory_allocated(), "loss_first": first, "loss_last": last,
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), float(a[6]), float(a[7]) if len(a) > 7 else 0.0)
