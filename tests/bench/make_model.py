"""make_model.py - builds the benchmark inputs (idempotent; skips what already exists).

  OUT/minilm_rand/        a MiniLM-L6-shaped BERT (6 layers, hidden 384, 12 heads, FFN 1536), real
                          bert-base-uncased vocab, random weights (seed 0), saved as a
                          sentence-transformers folder: Transformer (max_seq_length 128) + mean
                          Pooling + Normalize
  OUT/minilm_rand.onnx    its transformer exported to ONNX (dynamic batch and sequence axes)
  OUT/minilm_real.onnx    the same export of the real all-MiniLM-L6-v2 (when --real is given)
  OUT/texts_128.txt       N lines of random whole words, each well over 128 tokens, so that
                          --max-len 128 truncates every one to exactly 128
  OUT/cranfield.txt       the 1,400 Cranfield .W abstracts, one per line (lines joined by spaces)

usage: make_model.py --out DIR --vocab VOCAB.txt --cran CRAN.ALL.1400 [--real MODEL_DIR] [--lines N]
"""
import argparse
import os
import random
import sys

import torch


def export_onnx(st_dir, path):
    """Exports the Transformer module of a sentence-transformers folder; inputs input_ids,
    attention_mask, token_type_ids (batch, seq); output last_hidden_state (batch, seq, C)."""
    if os.path.exists(path):
        return
    from transformers import AutoModel
    sub = st_dir if os.path.exists(os.path.join(st_dir, "config.json")) else os.path.join(st_dir, "0_Transformer")
    model = AutoModel.from_pretrained(sub).eval()

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, 16, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(Wrap(model), (ids, ids, torch.zeros_like(ids)), tmp,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    os.replace(tmp, path)
    print(f"make_model: wrote {path}", file=sys.stderr)


def make_random_model(out_dir, vocab):
    """Writes the folder in the classic sentence-transformers layout (the one all-MiniLM-L6-v2
    ships): config.json + model.safetensors + vocab.txt at the top, modules.json,
    sentence_bert_config.json, 1_Pooling/config.json, 2_Normalize/."""
    if os.path.exists(os.path.join(out_dir, "modules.json")):
        return
    import json
    import shutil
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=sum(1 for _ in open(vocab, encoding="utf-8")), hidden_size=384,
                     num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     max_position_embeddings=512, hidden_act="gelu", type_vocab_size=2)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(cfg).eval().save_pretrained(tmp)
    shutil.copyfile(vocab, os.path.join(tmp, "vocab.txt"))

    def dump(rel, obj):
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        with open(os.path.join(tmp, rel), "w") as f:
            json.dump(obj, f, indent=2)

    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": "[MASK]"}
    dump("special_tokens_map.json", special)
    dump("tokenizer_config.json", dict(special, do_lower_case=True, tokenize_chinese_chars=True,
                                       strip_accents=None, model_max_length=512,
                                       tokenizer_class="BertTokenizer"))
    dump("sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    dump("modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    dump("1_Pooling/config.json", {"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
                                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                   "pooling_mode_mean_sqrt_len_tokens": False})
    os.makedirs(os.path.join(tmp, "2_Normalize"), exist_ok=True)
    os.replace(tmp, out_dir)
    print(f"make_model: wrote {out_dir}", file=sys.stderr)


def make_texts(path, vocab, lines):
    if os.path.exists(path) and sum(1 for _ in open(path)) == lines:
        return
    words = [w.strip() for w in open(vocab, encoding="utf-8")]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) >= 3]
    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choice(words) for _ in range(200)) + "\n")


def make_cranfield(path, cran):
    if os.path.exists(path):
        return
    docs, cur, field = [], None, None
    for line in open(cran, encoding="ascii"):
        line = line.rstrip("\n")
        if line.startswith(".I "):
            if cur is not None:
                docs.append(" ".join(cur))
            cur, field = [], None
        elif line in (".T", ".A", ".B", ".W"):
            field = line
        elif field == ".W":
            s = line.strip()
            if s:
                cur.append(s)
    if cur is not None:
        docs.append(" ".join(cur))
    with open(path, "w") as f:
        for d in docs:
            f.write(d + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--cran", required=True)
    ap.add_argument("--real", default="")
    ap.add_argument("--lines", type=int, default=352)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rand_dir = os.path.join(a.out, "minilm_rand")
    make_random_model(rand_dir, a.vocab)
    export_onnx(rand_dir, os.path.join(a.out, "minilm_rand.onnx"))
    if a.real:
        export_onnx(a.real, os.path.join(a.out, "minilm_real.onnx"))
    make_texts(os.path.join(a.out, "texts_128.txt"), a.vocab, a.lines)
    make_cranfield(os.path.join(a.out, "cranfield.txt"), a.cran)


if __name__ == "__main__":
    main()
