/* bench_kv_ins.c - the index quality gate for the insertion of appended keys (rounds 8, 9 and 11 of
 * the bench README's "KV-cache retrieval"): the layer bench's synthetic clustered keys (d 128,
 * float16, 1,024 centres), one KV head of 4 query heads, window 1,024, codes; the index built on
 * the first N/2 tokens from 8,192 prefill queries, the other N/2 appended one at a time (linked
 * in batches of KV_BATCH, default 64), then flushed. 200 decode queries x 4 heads search it
 * (ef 128, 1,015 spaced entries, best 8, two expansions at a time) against the exact top-100 of
 * the indexed keys (float32 brute force): recall@100, the same over the appended keys, scanned,
 * and the CPU time of the appends (one thread: OMP_NUM_THREADS=1 for a per-token cost).
 *
 *   bench_kv_ins [N]      N tokens (default 40,000)
 * KESTREL_KV_INS_* (kv_graph.h) change the insertion beam. Build (from the repo root):
 *   make && cc -std=c11 -O2 -fopenmp -D_DEFAULT_SOURCE -I. tests/bench/bench_kv_ins.c build/libkestrel.a \
 *      $(make -s print-LDLIBS) -o build/bench_kv_ins */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/half.h"
#include "core/kv_attn.h"
#include "index/kv.h"
#include "index/kv_graph.h"
#define KVB_PROG "bench_kv_ins"
#include "tests/bench/bench_kv_util.h"

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const size_t N = argc > 1 ? (size_t)atol(argv[1]) : 40000, D = 128, G = 4, C = 1024, SINKS = 4, WINDOW = 1024;
    const size_t NPRE = 8192, NQ = 200, TOPK = 100, EF = 128;
    if (N < 4 * (SINKS + WINDOW)) {
        fprintf(stderr, "bench_kv_ins: N = %zu is too small (at least %zu)\n", N, 4 * (SINKS + WINDOW));
        return 2;
    }
    kst_error e;
    float *cen = malloc(C * D * 4), mk[128], mq[128];
    for (size_t i = 0; i < C * D; i++) cen[i] = nrand();
    for (size_t i = 0; i < D; i++) { mk[i] = 1.5f * nrand(); mq[i] = 0.5f * nrand(); }
    uint16_t *K = malloc(N * D * 2), *V = malloc(N * D * 2);
    for (size_t t = 0; t < N; t++) {
        size_t c = (size_t)(urand() * C) % C;
        for (size_t i = 0; i < D; i++) {
            K[t * D + i] = kst_f32_to_f16(mk[i] + cen[c * D + i] + 0.7f * nrand());
            V[t * D + i] = kst_f32_to_f16(nrand());
        }
    }
    float *Qp = malloc(NPRE * G * D * 4), *Qd = malloc(NQ * G * D * 4);
    for (size_t t = 0; t < NPRE + NQ; t++)
        for (size_t h = 0; h < G; h++) {
            float *q = t < NPRE ? Qp + (t * G + h) * D : Qd + ((t - NPRE) * G + h) * D;
            size_t c = (size_t)(urand() * C) % C;
            for (size_t i = 0; i < D; i++) q[i] = mq[i] + 1.5f * cen[c * D + i] + 0.7f * nrand();
        }
    kst_kvc_opts o = {1, 1, G, D, 1, 0, SINKS, WINDOW, TOPK, EF, 32, 32, 0, 32, 64, KST_KVC_INDEX_ATTN, 0, 0, 0, 1, 0, 0, 0};
    o.append_batch = getenv("KV_BATCH") ? (size_t)atol(getenv("KV_BATCH")) : 64;
    kst_kvc *c;
    if (kst_kvc_create(&o, &c, &e)) die("create", &e);
    size_t half = N / 2;
    if (kst_kvc_append(c, 0, K, V, half, &e)) die("append", &e);
    double t0 = now_s();
    if (kst_kvc_build(c, 0, Qp, NPRE, &e)) die("build", &e);
    double tb = now_s() - t0;
    if (kst_kvc_reserve(c, 0, N, &e)) die("reserve", &e);
    kst_kvc_set_spread(c, 1015, 8);
    size_t idx0 = kst_kvc_indexed(c, 0);
    t0 = now_s();
    double c0 = (double)clock();
    for (size_t t = half; t < N; t++)
        if (kst_kvc_append(c, 0, K + t * D, V + t * D, 1, &e)) die("append", &e);
    if (kst_kvc_flush(c, 0, &e)) die("flush", &e);
    double ta = now_s() - t0, ca = ((double)clock() - c0) / CLOCKS_PER_SEC;
    size_t nidx = kst_kvc_indexed(c, 0), added = nidx - idx0;
    /* exact top-100 of the indexed keys (rows sinks .. sinks + nidx) */
    float *kx = malloc(nidx * D * 4);
    kst_kv_rows_f32(kx, K, 1, SINKS, nidx, D);
    uint32_t *want = malloc(NQ * G * TOPK * 4);
    if (kst_kvg_exact_topk(kx, 0, nidx, D, Qd, NQ * G, TOPK, want, NULL, &e)) die("exact", &e);
    free(kx);
    kst_kvc_set_search(c, 0, 1);
    kst_kvc_set_expand(c, 2);
    int64_t pos[4 * 100];
    size_t found[4], hit = 0, hitn = 0, nnew = 0, scanned = 0;
    for (size_t i = 0; i < NQ; i++) {
        size_t sc;
        if (kst_kvc_search_group(c, 0, 0, Qd + i * G * D, TOPK, EF, pos, found, &sc, &e)) die("search", &e);
        scanned += sc;
        for (size_t h = 0; h < G; h++)
            for (size_t x = 0; x < TOPK; x++) {
                uint32_t w = want[(i * G + h) * TOPK + x];
                int isnew = w >= idx0, got = 0;
                for (size_t b = 0; b < found[h] && !got; b++) got = (uint64_t)pos[h * TOPK + b] == w + SINKS;
                hit += got;
                nnew += isnew;
                hitn += got && isnew;
            }
    }
    printf("bench_kv_ins: %zu tokens, %zu indexed (%zu built in %.1f s, %zu appended, batch %zu, %d threads):"
           " appends %.1f us/token wall, %.1f us CPU; recall@100 %.4f, on appended keys %.4f (%zu of the top-100s);"
           " scanned %.2f%%\n",
           N, nidx, idx0, tb, added, o.append_batch, omp_get_max_threads(), 1e6 * ta / (double)added,
           1e6 * ca / (double)added, (double)hit / (double)(NQ * G * TOPK), nnew ? (double)hitn / (double)nnew : 0.0, nnew,
           100.0 * (double)scanned / (double)(NQ * G) / (double)nidx);
    kst_kvc_free(c);
    free(cen); free(K); free(V); free(Qp); free(Qd); free(want);
    return 0;
}
