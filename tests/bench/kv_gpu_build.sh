#!/usr/bin/env bash
# kv_gpu_build.sh OUT - builds tests/bench/bench_kv_gpu standalone (the kv sources only, and FAISS's
# k-means for the tail clusters: libfaiss.a, whose BLAS core/blas.c loads at run time; libgomp
# static; cudart static, cublas shared) so that it runs on a CUDA machine without Kestrel's other
# dependencies (OpenBLAS found at run time). Needs nvcc (works without a GPU). BENCH=bench_kv_loop
# builds that bench instead; KV_CFLAGS: more C flags (e.g. -DKST_KVG_RERANK_PF=16, experiments).
set -euo pipefail
bench=${BENCH:-bench_kv_gpu}
out=${1:-build/$bench}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
NVCC=${NVCC:-nvcc}
CF="-std=c11 -O2 -Wall -Wextra -Werror -Wno-unused-parameter -fopenmp -D_DEFAULT_SOURCE -DKST_CUDA=1 -I. ${KV_CFLAGS:-}"
for f in core/kv_attn.c core/kv_q8t.c core/half.c core/mem.c core/error.c core/blas.c core/npy.c core/file.c index/kv.c index/kv_graph.c \
         index/kv_tclust.c index/kv_scache.c index/faiss_blas.c tests/bench/$bench.c; do
  cc $CF -c "$f" -o "$tmp/$(basename "$f" .c).o"
done
c++ -std=c++17 -O2 -fopenmp -I. -c index/faiss_c.cpp -o "$tmp/faiss_c.o"
$NVCC -O2 -std=c++17 ${NVCCFLAGS:-} -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80 -I. -c index/kv_cuda.cu -o "$tmp/kv_cuda.o"
$NVCC -o "$out" "$tmp"/*.o -Xcompiler -static-libgcc -lfaiss -Xlinker -Bstatic -lgomp -lstdc++ -Xlinker -Bdynamic -lcublas -ldl -lpthread -lm
echo "built $out"
