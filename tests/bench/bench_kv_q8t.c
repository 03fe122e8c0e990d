/* bench_kv_q8t.c - the tail sample's items on the CPU (index/kv.c, tail_chunk): the 8-bit table
 * (tail_q8, core/kv_q8t.h) against the float16 table it stands in for (the anchor), one layer's
 * worth: 8 KV heads x 4 chunks of 512 samples (tail_samples 2,048), head dim 128, 4 query heads
 * a KV head, each thread its items i, i + threads, ... as in the decode step. An item: the
 * chunk's scores for the 4 heads, each head's 32 best kept apart (kst_kv_top), the weights, their
 * sum, the best rows' value sum, the other rows' weighted value sum. Prints the mean time a
 * thread spends on its items a step (max over threads beside it) and the ratio float16 / 8-bit.
 * Nothing is asserted.
 *
 *   bench_kv_q8t [SWEEP_MB]     SWEEP_MB per thread read between steps (the searches' traffic);
 *                               KV_Q8T_SIMD=0: the 8-bit table's plain C path (no VNNI)
 *
 * Build (from the repo root, after make):
 *   cc -std=c11 -O2 -fopenmp -D_DEFAULT_SOURCE -I. tests/bench/bench_kv_q8t.c build/libkestrel.a \
 *      $(make -s print-LDLIBS) -o build/bench_kv_q8t */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/half.h"
#include "core/kv_attn.h"
#include "core/kv_q8t.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static float urand(void) { return (float)rand() / (float)RAND_MAX - 0.5f; }

enum { G = 4, N = 512, D = 128, NI = 32, TOP = 32, STEPS = 200 };

int main(int argc, char **argv) {
    size_t sweep = (size_t)(argc > 1 ? atol(argv[1]) : 0) << 20;
    int T = omp_get_max_threads();
    if (getenv("KV_Q8T_SIMD") && atoi(getenv("KV_Q8T_SIMD")) == 0) kst_q8t_set_simd(0);
    int8_t *K8 = malloc((size_t)NI * N * D), *V8 = malloc((size_t)NI * N * D);
    float *ks = malloc(NI * N * sizeof(float)), *vs = malloc(NI * N * sizeof(float));
    int32_t *ksum = malloc(NI * N * sizeof(int32_t));
    uint16_t *Kt = malloc((size_t)NI * N * D * 2), *Vh = malloc((size_t)NI * N * D * 2);
    char *junk = malloc(sweep * (size_t)T + 64);
    double *tq = calloc((size_t)T, sizeof(double)), *tf = calloc((size_t)T, sizeof(double));
    if (!K8 || !V8 || !ks || !vs || !ksum || !Kt || !Vh || !junk || !tq || !tf) {
        fprintf(stderr, "bench_kv_q8t: out of memory\n");
        return 1;
    }
    memset(junk, 1, sweep * (size_t)T + 64);
    for (size_t it = 0; it < NI; it++) /* the same rows in both tables: float16 keys transposed */
        for (size_t j = 0; j < N; j++) {
            uint16_t kr[D], vr[D];
            for (size_t i = 0; i < D; i++) {
                kr[i] = kst_f32_to_f16(urand());
                vr[i] = kst_f32_to_f16(urand());
                Kt[it * N * D + i * N + j] = kr[i];
                Vh[it * N * D + j * D + i] = vr[i];
            }
            kst_q8t_put(K8 + it * N * D, ks + it * N, ksum + it * N, V8 + it * N * D, vs + it * N, j, N, kr, vr, 1, D);
        }
#pragma omp parallel
    {
        int t = omp_get_thread_num();
        float Q[G * D], W[G * N], O[G * D], ot[D], tw[TOP], wsc[G];
        uint8_t qb[G * D], wq[G * N];
        uint32_t tp[TOP];
        volatile long sink = 0;
        for (size_t i = 0; i < G * D; i++) Q[i] = 4 * urand();
        for (int r = 0; r < STEPS; r++)
            for (int q8 = 1; q8 >= 0; q8--) {
                for (size_t i = 0; i < sweep; i += 64) sink += junk[(size_t)t * sweep + i];
#pragma omp barrier
                double a = now_s();
                for (size_t it = (size_t)t; it < NI; it += (size_t)T) {
                    if (q8) kst_q8t_scores(W, Q, G, K8 + it * N * D, ks + it * N, ksum + it * N, N, D, 0.088f, qb);
                    else kst_kv_scores_t(W, Q, G, Kt + it * N * D, 1, N, D, 0.088f);
                    for (size_t g = 0; g < G; g++) {
                        kst_kv_top(W + g * N, N, TOP, tw, tp);
                        kst_kv_exp_shift(W + g * N, N, tw[0]);
                        for (size_t i = 0; i < TOP; i++) {
                            tw[i] = W[g * N + tp[i]];
                            W[g * N + tp[i]] = 0;
                        }
                        sink += (long)kst_kv_sum(W + g * N, N);
                        memset(ot, 0, sizeof ot);
                        for (size_t i = 0; i < TOP; i++) {
                            if (q8) kst_q8t_vaxpy(ot, tw[i] * vs[it * N + tp[i]], V8 + it * N * D, tp[i], N, D);
                            else kst_kv_axpy(ot, tw[i], Vh + it * N * D + (size_t)tp[i] * D, 1, D);
                        }
                    }
                    if (q8) kst_q8t_wsum(O, W, G, V8 + it * N * D, vs + it * N, N, D, wq, wsc);
                    else kst_kv_wsum_multi(O, W, G, Vh + it * N * D, 1, N, D);
                    sink += (long)O[0];
                }
                double b = now_s();
                (q8 ? tq : tf)[t] += b - a;
#pragma omp barrier
            }
    }
    double mq = 0, mf = 0, xq = 0, xf = 0;
    for (int t = 0; t < T; t++) {
        mq += tq[t] / T;
        mf += tf[t] / T;
        xq = tq[t] > xq ? tq[t] : xq;
        xf = tf[t] > xf ? tf[t] : xf;
    }
    double u = 1e6 / STEPS;
    printf("bench_kv_q8t: %d threads, %d items each, %zu MB a thread read between steps: 8-bit table %.1f us a thread"
           " (max %.1f), float16 table (anchor) %.1f (max %.1f): %.2fx\n",
           T, (NI + T - 1) / T, sweep >> 20, mq * u, xq * u, mf * u, xf * u, mf / mq);
    free(K8);
    free(V8);
    free(ks);
    free(vs);
    free(ksum);
    free(Kt);
    free(Vh);
    free(junk);
    free(tq);
    free(tf);
    return 0;
}
