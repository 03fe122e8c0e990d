"""bench_cutlass_torch.py B T [reps] - the PyTorch eager anchor for bench_cutlass_gemm: one BERT-base
layer (transformers BertLayer, bf16, eval, SDPA attention, random weights, seed 0) on a (B, T) batch,
and its pieces at the same M = B T tokens: the four Linear products (with bias), LayerNorm, GELU and
the residual add. Times are CUDA-event means over `reps` runs after 3 warm-ups. One JSON line each."""
import json
import sys

import torch
import torch.nn.functional as F

B, T = int(sys.argv[1]), int(sys.argv[2])
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
dev = torch.device("cuda")
torch.manual_seed(0)


def t_ms(fn):
    for _ in range(3):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

cfg = BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072,
                 attn_implementation="sdpa")
layer = BertLayer(cfg).to(dev, torch.bfloat16).eval()
x = torch.randn(B, T, 768, device=dev, dtype=torch.bfloat16)
M = B * T
with torch.inference_mode():
    t_layer = t_ms(lambda: layer(x))
    out = {"bench": "torch_eager", "B": B, "T": T, "M": M, "layer_ms": round(t_layer, 4),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    xm = x.view(M, 768)
    for name, n, k in (("qkv", 2304, 768), ("proj", 768, 768), ("fc1", 3072, 768), ("fc2", 768, 3072)):
        a = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.03
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.05
        out[name + "_linear_ms"] = round(t_ms(lambda: F.linear(a, w, b)), 4)
        out[name + "_tflops"] = round(2 * M * n * k / out[name + "_linear_ms"] / 1e9, 1)
    lnw = torch.ones(768, device=dev, dtype=torch.bfloat16)
    lnb = torch.zeros(768, device=dev, dtype=torch.bfloat16)
    out["layernorm_ms"] = round(t_ms(lambda: F.layer_norm(xm, (768,), lnw, lnb, 1e-12)), 4)
    h = torch.randn(M, 3072, device=dev, dtype=torch.bfloat16)
    out["gelu_ms"] = round(t_ms(lambda: F.gelu(h)), 4)
    out["add_ms"] = round(t_ms(lambda: xm + xm), 4)
print(json.dumps(out), flush=True)
