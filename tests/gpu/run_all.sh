#!/usr/bin/env bash
# tests/gpu/run_all.sh [OUT] - everything the GPU backend has to show, in one go, on a machine
# with an NVIDIA GPU (sm_90 by default: NVCC_ARCH=sm_80 ... for others):
#   build    make CUDA=1 (leave it out of KST_GPU_STAGES to use the build folder as it is)
#   test     tests/test_gpu.c (GPU search against CPU FAISS, GPU encoders against the
#            transformers fixtures and the CPU forward), tests/test_gpu_train.c (GPU training
#            gradients and a training run against the CPU trainer)
#   bench    PyTorch anchors (tests/bench/bench_gpu_torch.py) and kestrel (bench_gpu) in the same
#            run (encoding, exact search, IVF-PQ against CPU FAISS, the Margin-MSE training step
#            against PyTorch autocast bf16: bench_gpu_train / bench_gpu_train_torch.py), then the
#            table of ratios
#            (tests/gpu/report.py)
#   memcheck the GPU tests again under compute-sanitizer --tool memcheck
# Results land in OUT (default tests/gpu/out): *.log, results.jsonl, report.txt.
# Environment: KST_GPU_STAGES (default build,test,bench,memcheck; kst instead of bench: kestrel's
# figures alone, without the PyTorch anchors), KST_BUILD (default build/cuda, apart from
# the CPU build's objects),
# KST_GPU_ENCODE_ONLY=1 (the encoding benchmarks alone, without exact search, IVF-PQ and training),
# KST_GPU_WORK (scratch for models and vectors, default /tmp/kst_gpu), KST_PY (python with torch
# and transformers, default python3), KST_LIBPATH (extra LD_LIBRARY_PATH for kestrel's binaries).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-tests/gpu/out}}
mkdir -p "$OUT"
STAGES=${KST_GPU_STAGES:-build,test,bench,memcheck}
BUILD=${KST_BUILD:-build/cuda}
WORK=${KST_GPU_WORK:-/tmp/kst_gpu}
PY=${KST_PY:-python3}
RES=$OUT/results.jsonl
mkdir -p "$WORK"
has() { case ",$STAGES," in *",$1,"*) return 0 ;; esac; return 1; }
say() { echo "run_all: $*" >&2; }
kst() { LD_LIBRARY_PATH="${KST_LIBPATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@"; }
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

if has build; then
  say "building with CUDA=1"
  make -j"$(nproc)" CUDA=1 BUILD="$BUILD" all "$BUILD/tests/test_gpu" "$BUILD/tests/test_gpu_train" >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  LDLIBS=$(make -s CUDA=1 print-LDLIBS)
  cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. -DKST_CUDA=1 \
    -o "$BUILD/bench_gpu" tests/bench/bench_gpu.c "$BUILD/libkestrel.a" $LDLIBS >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. -DKST_CUDA=1 \
    -o "$BUILD/bench_gpu_train" tests/bench/bench_gpu_train.c "$BUILD/libkestrel.a" $LDLIBS >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi

if has test; then
  say "GPU tests"
  kst "$BUILD/tests/test_gpu" >"$OUT/test_gpu.log" 2>&1 || status=1
  grep -E "^\[|GPU|cosine|identical|recall" "$OUT/test_gpu.log" | grep -v "RUN\|^\[       OK" | tail -40
  say "GPU training tests"
  kst "$BUILD/tests/test_gpu_train" >"$OUT/test_gpu_train.log" 2>&1 || status=1
  grep -E "^\[|rel err|ratio|mean of" "$OUT/test_gpu_train.log" | grep -v "RUN\|^\[       OK" | tail -40
fi

if has bench || has kst; then
  : >"$RES"
  say "anchors: ceilings; models"
  has bench && { $PY tests/bench/bench_gpu_torch.py ceilings >>"$RES" || status=1; }
  [ -f "$WORK/bertbase/parity_hidden.npy" ] || $PY tests/bench/bench_gpu_torch.py models "$WORK" tests/fixtures/models/st_bert_mean/vocab.txt >>"$RES" || status=1
  # the default path, then the unfused path (KESTREL_GPU_FUSED=0), erf GELU (KESTREL_GPU_EXACT_GELU=1),
  # cuBLASLt's first choice of algorithm without timing its candidates (KESTREL_GPU_GEMM_TUNE=0),
  # and the residual added in the LayerNorm (KESTREL_GPU_RES_IN_LN=1), bf16 epilogue biases
  # (KESTREL_GPU_BIAS16=1), the mma.sync attention kernel instead of the wgmma one for 64-dim heads
  # (KESTREL_GPU_ATT=2), the wgmma kernel with key tiles of 128 (KESTREL_GPU_ATT=5), the wgmma kernel
  # with key tiles of 64 that the warp-specialized default replaced (KESTREL_GPU_ATT=1), FC1's bias in
  # its GELU epilogue rather than as an input column (KESTREL_GPU_FC1_KCOL=0), then the per-step
  # profile of each layer (KESTREL_GPU_PROFILE=1)
  for v in "" KESTREL_GPU_FUSED=0 KESTREL_GPU_EXACT_GELU=1 KESTREL_GPU_GEMM_TUNE=0 KESTREL_GPU_RES_IN_LN=1 \
           KESTREL_GPU_BIAS16=1 KESTREL_GPU_ATT=2 KESTREL_GPU_ATT=5 KESTREL_GPU_ATT=1 KESTREL_GPU_FC1_KCOL=0 \
           "KESTREL_GPU_PROFILE=1 KST_BENCH_VARIANT=profile"; do
    for m in minilm bertbase; do
      for T in 128 256; do
        kst env $v "$BUILD/bench_gpu" encode "$WORK/$m" 256 "$T" 20 "$WORK/$m/parity_ids.npy" "$WORK/$m/parity_valid.npy" \
          "$WORK/$m/parity_hidden.npy" >>"$RES" || status=1
      done
    done
  done
  say "kst_model_embed end to end (tokenization and heads overlapping the GPU, and one batch at a time)"
  for m in minilm bertbase; do
    kst "$BUILD/bench_gpu" embed "$WORK/$m" 8192 120 256 >>"$RES" || status=1
  done
  if has bench; then
    say "anchors: encoding (eager, torch.compile)"
    $PY tests/bench/bench_gpu_torch.py encode "$WORK" 256 128,256 20 >>"$RES" || status=1
  fi
  if [ "${KST_GPU_ENCODE_ONLY:-0}" = 1 ]; then
    cp "$RES" "$OUT/results_$(date +%H%M%S).jsonl"
    $PY tests/gpu/report.py "$RES" | tee "$OUT/report.txt"
  else
  say "exact search: anchors, then kestrel"
  if has bench || ! [ -f "$WORK/db.npy" ]; then $PY tests/bench/bench_gpu_torch.py search "$WORK" >>"$RES" || status=1; fi
  kst "$BUILD/bench_gpu" search "$WORK/db.npy" "$WORK/q.npy" 100 5 0 "$WORK/anchor_ids.npy" >>"$RES" || status=1
  kst "$BUILD/bench_gpu" search "$WORK/db.npy" "$WORK/q.npy" 100 5 1 "$WORK/anchor_ids.npy" >>"$RES" || status=1
  BW=$(python3 -c "import json,sys; print(next((json.loads(l)['copy_gb_s'] for l in open('$RES') if 'copy_gb_s' in l), 3000))")
  say "IVF-PQ: CPU FAISS ($(nproc) cores) against the GPU, same index"
  kst "$BUILD/bench_gpu" ivfpq "$WORK/db.npy" "$WORK/q.npy" "${KST_IVF_FACTORY:-IVF1024,PQ48}" 8,32,128 "$BW" >>"$RES" || status=1
  say "Margin-MSE training step (MiniLM-L6 shape, 64 triples, query 32 / passage 128 and 512 tokens)"
  [ -f "$WORK/minilm_train/config.json" ] || $PY tests/bench/bench_gpu_train_torch.py model "$WORK/minilm_train" tests/fixtures/models/st_bert_mean/vocab.txt >>"$RES" || status=1
  # passages of 128 and 512 tokens; the flash attention (default) and the materialised T x T one
  for TP in 128 512; do
  for P in 0.1 0; do
    kst "$BUILD/bench_gpu_train" "$WORK/minilm_train" 64 32 "$TP" 20 "$P" >>"$RES" || status=1
    kst env KESTREL_GPU_TRAIN_FLASH=0 "$BUILD/bench_gpu_train" "$WORK/minilm_train" 64 32 "$TP" 20 "$P" >>"$RES" || status=1
    has bench && { $PY tests/bench/bench_gpu_train_torch.py train "$WORK/minilm_train" 64 32 "$TP" 20 "$P" >>"$RES" || status=1; }
  done
  done
  say "ColBERT Margin-MSE training step (the same model + a linear to 128, 64 triples, 32 / 128 tokens; dropout 0.1, 0; in-batch 0.5)"
  for args in "0.1 128 0" "0 128 0" "0.1 128 0.5"; do
    kst "$BUILD/bench_gpu_train" "$WORK/minilm_train" 64 32 128 20 $args >>"$RES" || status=1
    has bench && { $PY tests/bench/bench_gpu_train_torch.py colbert "$WORK/minilm_train" 64 32 128 20 $args >>"$RES" || status=1; }
  done
  cp "$RES" "$OUT/results_$(date +%H%M%S).jsonl"
  $PY tests/gpu/report.py "$RES" | tee "$OUT/report.txt"
  fi
fi
if has memcheck; then
  say "GPU tests under compute-sanitizer memcheck"
  kst compute-sanitizer --tool memcheck --error-exitcode 99 "$BUILD/tests/test_gpu" >"$OUT/memcheck.log" 2>&1
  rc=$?
  tail -4 "$OUT/memcheck.log"
  [ $rc = 0 ] || { say "memcheck exit $rc"; status=1; }
  kst compute-sanitizer --tool memcheck --error-exitcode 99 "$BUILD/tests/test_gpu_train" >"$OUT/memcheck_train.log" 2>&1
  rc=$?
  tail -4 "$OUT/memcheck_train.log"
  [ $rc = 0 ] || { say "memcheck (training) exit $rc"; status=1; }
fi

exit $status
