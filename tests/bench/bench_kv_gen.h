/* bench_kv_gen.h - the synthetic Llama-3-8B-shaped layer of the KV benches (bench_kv_gpu layer,
 * bench_kv_loop): head 0's keys and values and the queries of all 32 query heads, each KV head
 * reading head 0's keys under its own signed permutation of the dimensions. Include after
 * bench_kv_util.h (urand, nrand, rng); needs -fopenmp. */
#ifndef KST_BENCH_KV_GEN_H
#define KST_BENCH_KV_GEN_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "core/check.h"
#include "index/kv.h"

enum { KVB_D = 128, KVB_KVH = 8, KVB_QH = 32, KVB_G = 4, KVB_SINKS = 4, KVB_NT = 50, KVB_NPRE = 8192 };

/* Counter-based normal draws (splitmix64 + Box-Muller), so big arrays fill in parallel. */
static inline uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static inline float gauss_at(uint64_t seed, uint64_t i) {
    uint64_t a = mix64(seed * 0x632be59bd9b4e019ull + 2 * i), b = mix64(seed * 0x632be59bd9b4e019ull + 2 * i + 1);
    double u = ((a >> 11) + 0.5) * (1.0 / 9007199254740992.0), v = (b >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2 * log(u)) * cos(2 * M_PI * v));
}

/* Token t of head 0's synthetic keys and values as a KV head's (its signed permutation perm,
 * sgn of the dimensions) into k and v (D each). */
static inline void head_row(uint16_t *k, uint16_t *v, const uint16_t *K0, const uint16_t *V0, size_t t,
                            const int *perm, const float *sgn, size_t D) {
    for (size_t i = 0; i < D; i++) {
        uint16_t a = K0[t * D + perm[i]], b = V0[t * D + perm[i]];
        if (sgn[i] < 0) { a ^= 0x8000; b ^= 0x8000; }
        k[i] = a;
        v[i] = b;
    }
}

/* Appends tokens 0 .. N-1 of the synthetic layer (every KV head's rows by head_row) to layer
 * `layer` of c, 65,536 tokens at a time; 0 or the failed append's status. */
static inline int kvb_append(kst_kvc *c, size_t layer, size_t N, const uint16_t *K0, const uint16_t *V0,
                             int perm[KVB_KVH][KVB_D], float sgn[KVB_KVH][KVB_D], kst_error *e) {
    const size_t CH = 65536, KVH = KVB_KVH, D = KVB_D;
    uint16_t *kc = malloc(CH * KVH * D * 2), *vc = malloc(CH * KVH * D * 2);
    int rc = kc && vc ? 0 : kst_fail(e, KST_ERR_NOMEM, "kvb_append: out of memory");
    for (size_t t0c = 0; !rc && t0c < N; t0c += CH) {
        size_t m = N - t0c < CH ? N - t0c : CH;
#pragma omp parallel for schedule(static)
        for (size_t t = 0; t < m; t++)
            for (size_t h = 0; h < KVH; h++)
                head_row(kc + (t * KVH + h) * D, vc + (t * KVH + h) * D, K0, V0, t0c + t, perm[h], sgn[h], D);
        rc = kst_kvc_append(c, layer, kc, vc, m, e);
    }
    free(kc);
    free(vc);
    return rc;
}

/* Each KV head's signed permutation (head 0: the identity), drawn from rng. */
static inline void kvb_perms(int perm[KVB_KVH][KVB_D], float sgn[KVB_KVH][KVB_D]) {
    for (size_t h = 0; h < KVB_KVH; h++) {
        for (size_t i = 0; i < KVB_D; i++) { perm[h][i] = (int)i; sgn[h][i] = 1; }
        for (size_t i = KVB_D - 1; h && i > 0; i--) { /* Fisher-Yates */
            size_t j = (size_t)(urand() * (i + 1)) % (i + 1);
            int x = perm[h][i]; perm[h][i] = perm[h][j]; perm[h][j] = x;
        }
        for (size_t i = 0; h && i < KVB_D; i++) sgn[h][i] = urand() < 0.5 ? -1.0f : 1.0f;
    }
}

typedef struct kvb_data {
    size_t C;                /* clusters */
    uint16_t *K0, *V0;       /* head 0's keys and values, (N, D) float16 */
    float *Qpre, *Qd0, *Qd;  /* prefill (NPRE, QH, D; only group 0's heads set), decode (NT, QH, D)
                              * in head 0's frame, and each in its KV head's frame */
} kvb_data;

/* The layer of N tokens (rng reset from N, so the same draws whatever came before): head 0 =
 * common offset + one of C centres + noise, values noise. diffuse (the generator of rounds 1-10):
 * C = 1024 whatever N. Otherwise ("real"): C = N / kpc, and the sinks and the most recent 1,024
 * tokens get a logit bonus (bsink, bwin) along a direction u that the other keys and the queries'
 * noise lack (projected out; every query has sqrt(D) along u). corr: with that probability a
 * query head takes its group's shared centre and noise mixed sqrt(corr) shared + sqrt(1 - corr)
 * own. qtime r (0: each decode query drawn anew, as before; the same draws then): a decode query
 * after the first keeps the step before's centres (its group's shared one, its own, whether it
 * shares) with probability r (one draw a group), and its noise is r x the step before's + sqrt(1 -
 * r^2) x new, so that the varying part of a head's query correlates about r with the step
 * before's (kvb_qlag1 measures it; a real decoder's heads: SmolLM2's, 0.46-0.51 on the mean,
 * tests/bench/README.md). */
static inline void kvb_gen(size_t N, float corr, float qtime, int diffuse, size_t kpc, float bsink, float bwin,
                           int perm[KVB_KVH][KVB_D], float sgn[KVB_KVH][KVB_D], kvb_data *g) {
    const size_t D = KVB_D, QH = KVB_QH, G = KVB_G, NT = KVB_NT, NPRE = KVB_NPRE, GWIN = 1024;
    rng = 88172645463325252ull ^ (N * 0x9e3779b97f4a7c15ull);
    size_t C = diffuse ? 1024 : (N / (kpc ? kpc : 1) > 0 ? N / (kpc ? kpc : 1) : 1);
    float *cen = malloc(C * D * 4), mk[KVB_D], mq[KVB_D], u[KVB_D];
    for (size_t i = 0; i < C * D; i++) cen[i] = nrand();
    for (size_t i = 0; i < D; i++) { mk[i] = 1.5f * nrand(); mq[i] = 0.5f * nrand(); }
    double un2 = 0;
    for (size_t i = 0; i < D; i++) { u[i] = diffuse ? 0 : nrand(); un2 += (double)u[i] * u[i]; }
    for (size_t i = 0; i < D; i++) u[i] = un2 > 0 ? (float)(u[i] / sqrt(un2)) : 0;
    uint16_t *K0 = malloc(N * D * 2), *V0 = malloc(N * D * 2);
    uint64_t seed = N;
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < N; t++) {
        size_t c = mix64(seed ^ (t * 0x9e3779b97f4a7c15ull)) % C;
        float kr[KVB_D];
        double ku = 0;
        for (size_t i = 0; i < D; i++) {
            kr[i] = mk[i] + cen[c * D + i] + 0.7f * gauss_at(seed, t * 2 * D + i);
            ku += (double)kr[i] * u[i];
            V0[t * D + i] = kst_f32_to_f16(gauss_at(seed, t * 2 * D + D + i));
        }
        float b = t < KVB_SINKS ? bsink : t + GWIN >= N ? bwin : 0;
        for (size_t i = 0; i < D; i++) K0[t * D + i] = kst_f32_to_f16(kr[i] - (float)ku * u[i] + b * u[i]);
    }
    float *Qpre = calloc(NPRE * QH * D, 4), *Qd0 = malloc(NT * QH * D * 4), *Qd = malloc(NT * QH * D * 4);
    /* (qtime: the step before's draws, a group's and a head's) */
    size_t pcs[KVB_QH / KVB_G], pc[KVB_QH];
    int psh[KVB_QH];
    float pzs[KVB_QH / KVB_G][KVB_D], pe[KVB_QH][KVB_D], rn = sqrtf(1 - qtime * qtime);
    for (size_t t = 0; t < NPRE + NT; t++)
        for (size_t g0 = 0; g0 < QH; g0 += G) {
            int ar = qtime > 0 && t > NPRE, keep = ar && urand() < qtime;
            size_t cs = (size_t)(urand() * C) % C;
            if (keep) cs = pcs[g0 / G];
            float zs[KVB_D];
            for (size_t i = 0; i < D; i++) zs[i] = ar ? qtime * pzs[g0 / G][i] + rn * nrand() : nrand();
            if (t >= NPRE) {
                pcs[g0 / G] = cs;
                memcpy(pzs[g0 / G], zs, sizeof zs);
            }
            for (size_t h = g0; h < g0 + G; h++) {
                if (t < NPRE && h >= G) continue;
                float *q = t < NPRE ? Qpre + (t * QH + h) * D : Qd0 + ((t - NPRE) * QH + h) * D;
                size_t c = (size_t)(urand() * C) % C;
                int shared = urand() < corr;
                if (keep) c = pc[h], shared = psh[h];
                if (t >= NPRE) pc[h] = c, psh[h] = shared;
                if (shared) c = cs;
                float a = shared ? sqrtf(corr) : 0, b = sqrtf(1 - a * a);
                double qu = 0;
                for (size_t i = 0; i < D; i++) {
                    float en = ar ? qtime * pe[h][i] + rn * nrand() : nrand();
                    if (t >= NPRE) pe[h][i] = en;
                    q[i] = mq[i] + 1.5f * cen[c * D + i] + 0.7f * (a * zs[i] + b * en);
                    qu += (double)q[i] * u[i];
                }
                if (!diffuse) /* u: projected out, then sqrt(D) along it (the bonuses in logits) */
                    for (size_t i = 0; i < D; i++) q[i] += ((float)sqrt((double)D) - (float)qu) * u[i];
            }
        }
    for (size_t t = 0; t < NT; t++)
        for (size_t h = 0; h < QH; h++)
            for (size_t i = 0; i < D; i++)
                Qd[(t * QH + h) * D + i] = sgn[h / G][i] * Qd0[(t * QH + h) * D + perm[h / G][i]];
    free(cen);
    g->C = C;
    g->K0 = K0;
    g->V0 = V0;
    g->Qpre = Qpre;
    g->Qd0 = Qd0;
    g->Qd = Qd;
}

/* The decode queries' (Qd0: NT, QH, D) varying part's correlation with the step before's: per
 * head, each query less the head's mean query, the cosine of consecutive ones averaged, then the
 * mean over heads (the statistic of tests/bench/README.md's real decoder heads). */
static inline double kvb_qlag1(const float *Qd0) {
    const size_t D = KVB_D, QH = KVB_QH, NT = KVB_NT;
    double tot = 0;
    for (size_t h = 0; h < QH; h++) {
        double mean[KVB_D] = {0}, acc = 0;
        for (size_t t = 0; t < NT; t++)
            for (size_t i = 0; i < D; i++) mean[i] += Qd0[(t * QH + h) * D + i] / (double)NT;
        for (size_t t = 1; t < NT; t++) {
            double ab = 0, aa = 0, bb = 0;
            for (size_t i = 0; i < D; i++) {
                double x = Qd0[(t * QH + h) * D + i] - mean[i], y = Qd0[((t - 1) * QH + h) * D + i] - mean[i];
                ab += x * y, aa += x * x, bb += y * y;
            }
            acc += ab / sqrt(aa * bb);
        }
        tot += acc / (double)(NT - 1);
    }
    return tot / (double)QH;
}

/* FNV-1a of the generated arrays (the bench prints it: the same data, the same sum) */
static inline uint64_t kvb_sum(const kvb_data *g, size_t N) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char *p[5] = {(const void *)g->K0, (const void *)g->V0, (const void *)g->Qpre,
                                 (const void *)g->Qd0, (const void *)g->Qd};
    size_t n[5] = {N * KVB_D * 2, N * KVB_D * 2, (size_t)KVB_NPRE * KVB_QH * KVB_D * 4,
                   (size_t)KVB_NT * KVB_QH * KVB_D * 4, (size_t)KVB_NT * KVB_QH * KVB_D * 4};
    for (int a = 0; a < 5; a++)
        for (size_t i = 0; i < n[a]; i++) h = (h ^ p[a][i]) * 1099511628211ull;
    return h;
}

#endif
