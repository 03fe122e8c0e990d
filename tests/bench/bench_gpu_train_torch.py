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


def train(d, B, Tq, Tp, reps, p):
    from transformers import BertModel
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(42)
    qids = torch.randint(1000, 21000, (B, Tq), generator=g)
    pids = torch.randint(1000, 21000, (2 * B, Tp), generator=g)
    qids[:, 0] = 101
    pids[:, 0] = 101
    teacher = (torch.rand(B, 2, generator=g) * 10).to(dev)
    for impl in ("foreach", "fused"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        m = BertModel.from_pretrained(d, attn_implementation="sdpa", hidden_dropout_prob=p,
                                      attention_probs_dropout_prob=p).to(dev).train()
        decay = [w for n, w in m.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
        rest = [w for n, w in m.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                lr=2e-5, **({"fused": True} if impl == "fused" else {}))

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

        first = step()
        for _ in range(2):
            step()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            last = step()
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        print(json.dumps({"bench": "train_torch", "adamw": impl, "triples": B, "Tq": Tq, "Tp": Tp, "dropout": p,
                          "step_ms": round(med * 1e3, 3), "triples_per_s": round(B / med, 1),
                          "gpu_peak_bytes": torch.cuda.max_memory_allocated(), "loss_first": first,
                          "loss_last": last, "torch": torch.__version__}), flush=True)
        del m, opt


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "model":
        model(sys.argv[2], sys.argv[3])
    elif what == "train":
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
    else:
        sys.exit(f"unknown command {what}")
