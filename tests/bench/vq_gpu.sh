#!/usr/bin/env bash
# vq_gpu.sh [BUILD] - Distill-VQ on the GPU against the CPU trainer (tests/bench/bench_vq_gpu.c), on a
# machine with an NVIDIA GPU: SciFact (its 5,183 documents embedded by kestrel with all-MiniLM-L6-v2,
# its 300 test queries) and the synthetic 1M set (vq_data.py's generator, as vq.sh's synth1m). Per
# phase wall time of both trainers, their ratio, recall@10 of both written indexes, peak GPU
# memory; nothing is asserted. See tests/bench/README.md, "Distill-VQ on the GPU".
#
# Environment: KESTREL_BENCH_VQ_OUT (tests/bench/out/vq: the embeddings and sets are shared with
# vq.sh), KESTREL_BENCH_VQ_GPU_SETS ("scifact synth1m"), KESTREL_SHARED, bench_vq_gpu.c's own
# KESTREL_BENCH_VQ_* settings. Builds BUILD (build/cuda) with `make CUDA=1` when it lacks the library.
set -euo pipefail
BUILD=${1:-build/cuda}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT=${KESTREL_BENCH_VQ_OUT:-tests/bench/out/vq}
SHARED=${KESTREL_SHARED:-$ROOT/../shared/data}
SETS=${KESTREL_BENCH_VQ_GPU_SETS:-scifact synth1m}
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
export KESTREL_NO_PROGRESS=1
mkdir -p "$OUT"
[ -f "$BUILD/libkestrel.a" ] || make -j"$(nproc)" CUDA=1 BUILD="$BUILD" all
LDLIBS=$(make -s CUDA=1 print-LDLIBS)
cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. -DKST_CUDA=1 \
  -o "$BUILD/bench_vq_gpu" tests/bench/bench_vq_gpu.c "$BUILD/libkestrel.a" $LDLIBS
for s in $SETS; do
  case $s in
    scifact)
      [ -f "$OUT/scifact_docs.npy" ] || KESTREL_BENCH_VQ_SETS=scifact tests/bench/vq.sh build >/dev/null  # embeds (CPU build)
      "$BUILD/bench_vq_gpu" scifact "$OUT/scifact_docs.npy" "$OUT/scifact_q.npy" ;;
    synth1m)
      [ -f "$OUT/synth1m_docs.npy" ] || "$PY" -c "import sys; sys.path.insert(0, 'tests/bench'); import vq_data; vq_data.synth('$SHARED', '$OUT', 1000000, 500, name='synth1m')"
      KESTREL_BENCH_VQ_DEVICES=${KESTREL_BENCH_VQ_DEVICES:-cuda cpu} "$BUILD/bench_vq_gpu" synth1m "$OUT/synth1m_docs.npy" "$OUT/synth1m_q.npy" ;;
  esac
done 2> >(grep -v '^WARNING clustering' >&2) | tee "$OUT/vq_gpu.txt"
