/* bench_forward.c - the encoder's forward pass alone, beside its anchor: OpenBLAS sgemm at the
 * encoder's own GEMM shapes, measured in the same process. Prints one JSON object on stdout.
 *
 * The anchor goes through kst_sgemm (core/blas.h), i.e. the very OpenBLAS instance and kernel
 * set the library loaded (dlopen, OPENBLAS_CORETYPE chosen from the CPU's features unless the
 * user set it). This program must not link -lopenblas: an OpenBLAS linked in would be
 * initialised (and pick its kernels) before kestrel could choose them.
 *
 * usage: bench_forward MODEL_DIR B T REPS THREADS [BREAKDOWN_REPS (default 3)]
 *
 * forward:  kst_bert_forward on a fixed (B, T) batch of ids ([CLS] w... [SEP], all T valid),
 *           2 warm-up calls, then REPS timed calls; median and min seconds.
 * anchor:   kst_sgemm(NoTrans, Trans) (row-major) with M = B*T rows at [N, K] = [3C, C], [C, C],
 *           [FF, C], [C, FF] (kst_matmul_forward's call, beta 0), median of REPS each, run
 *           interleaved with the forward calls; the anchor GFLOP/s is FLOP-weighted: sum of
 *           their FLOPs / sum of their median times (one layer's GEMMs, each shape once).
 * breakdown: one replica of kst_bert_forward's layer loop through the core/ops.h calls, timed per
 *           op (median over BREAKDOWN_REPS of each op's per-forward total) - shows where the time goes.
 * FLOPs per sequence: L * (2*T*(3C^2 + C^2 + 2*C*FF) + 4*T^2*C); embeddings and pooling ignored.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/blas.h"
#include "core/ops.h"
#include "encoders/encoder.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static float *rand_buf(size_t n, uint32_t seed) {
    float *p = malloc(n * sizeof *p);
    if (!p) {
        fprintf(stderr, "bench_forward: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        p[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    return p;
}

/* Breakdown ops, in the order they run. */
enum { OP_EMB, OP_QKV, OP_ATT, OP_ATTPROJ, OP_RES, OP_LN, OP_FC, OP_ACT, OP_FCPROJ, NOPS };
static const char *OP_NAME[NOPS] = {"embeddings+ln", "gemm_qkv",  "attention", "gemm_attproj",
                                    "residual",      "layernorm", "gemm_fc",   "gelu",
                                    "gemm_fcproj"};

/* One forward pass in kst_bert_forward's order, adding each op's seconds to t[op]. */
static void forward_timed(const kst_bert *m, kst_bert_acts *a, float *out, const int32_t *ids,
                          const int *valid, size_t B, size_t T, double *t) {
    const kst_bert_config *c = &m->cfg;
    const kst_bert_params *p = &m->params;
    size_t C = c->C, FF = c->FF, BT = B * T;
    double t0 = now(), t1;
#define LAP(op) (t1 = now(), t[op] += t1 - t0, t0 = t1)
#pragma omp parallel for
    for (size_t i = 0; i < BT; i++) {
        float *x = out + i * C;
        const float *we = p->wte + (size_t)ids[i] * C, *pe = p->wpe + (i % T) * C, *te = p->wtt;
        for (size_t k = 0; k < C; k++) x[k] = we[k] + te[k] + pe[k];
    }
    kst_layernorm_forward(out, NULL, NULL, out, p->emblnw, p->emblnb, BT, C, c->eps);
    LAP(OP_EMB);
    for (size_t l = 0; l < c->L; l++) {
        kst_matmul_forward(a->qkv, out, p->qkvw + l * 3 * C * C, p->qkvb + l * 3 * C, BT, C, 3 * C);
        LAP(OP_QKV);
        kst_attention_forward(a->atty, NULL, a->scratch, a->qkv, valid, B, T, C, c->NH);
        LAP(OP_ATT);
        kst_matmul_forward(a->tmp, a->atty, p->attprojw + l * C * C, p->attprojb + l * C, BT, C, C);
        LAP(OP_ATTPROJ);
        kst_residual_forward(a->tmp, a->tmp, out, BT * C);
        LAP(OP_RES);
        kst_layernorm_forward(out, NULL, NULL, a->tmp, p->ln1w + l * C, p->ln1b + l * C, BT, C, c->eps);
        LAP(OP_LN);
        kst_matmul_forward(a->ff, out, p->fcw + l * FF * C, p->fcb + l * FF, BT, C, FF);
        LAP(OP_FC);
        kst_act_forward(a->ff, a->ff, BT * FF, c->act);
        LAP(OP_ACT);
        kst_matmul_forward(a->tmp, a->ff, p->fcprojw + l * C * FF, p->fcprojb + l * C, BT, FF, C);
        LAP(OP_FCPROJ);
        kst_residual_forward(a->tmp, a->tmp, out, BT * C);
        LAP(OP_RES);
        kst_layernorm_forward(out, NULL, NULL, a->tmp, p->ln2w + l * C, p->ln2b + l * C, BT, C, c->eps);
        LAP(OP_LN);
    }
#undef LAP
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: bench_forward MODEL_DIR B T REPS THREADS [BREAKDOWN_REPS]\n");
        return 2;
    }
    const char *dir = argv[1];
    size_t B = (size_t)atol(argv[2]), T = (size_t)atol(argv[3]);
    int reps = atoi(argv[4]), threads = atoi(argv[5]), breps = argc == 7 ? atoi(argv[6]) : 3;
    if (B == 0 || T < 2 || reps < 1 || threads < 1 || breps < 1) {
        fprintf(stderr, "bench_forward: B, REPS, THREADS must be >= 1 and T >= 2\n");
        return 2;
    }
    /* Whether the user chose the kernels: read before the library's first call, which sets the
     * variable itself when it is unset. */
    const char *env_core = getenv("OPENBLAS_CORETYPE");
    char user_core[64] = "";
    if (env_core) snprintf(user_core, sizeof user_core, "%s", env_core);
    kst_error err;
    if (kst_blas_init(&err) != KST_OK) fprintf(stderr, "bench_forward: %s (portable sgemm)\n", err.msg);
    const char *set_core = getenv("OPENBLAS_CORETYPE");
    kst_set_num_threads(threads);
    kst_encoder *e = NULL;
    double tl = now();
    if (kst_encoder_open(dir, KST_ROLE_AUTO, &e, &err) != KST_OK) {
        fprintf(stderr, "bench_forward: %s\n", err.msg);
        return 1;
    }
    double load_s = now() - tl;
    const kst_bert *m = &e->bert;
    const kst_bert_config *c = &m->cfg;
    size_t C = c->C, FF = c->FF, L = c->L, BT = B * T;
    if (c->TT == 0) {
        fprintf(stderr, "bench_forward: the breakdown replica needs a BERT (token type) model\n");
        return 1;
    }

    /* Fixed ids: [CLS] then pseudo-random word pieces from the body of the vocabulary, [SEP]. */
    int32_t *ids = malloc(BT * sizeof *ids);
    int *valid = malloc(B * sizeof *valid);
    float *out = malloc(BT * C * sizeof *out);
    if (!ids || !valid || !out) return 1;
    uint32_t s = 12345;
    for (size_t b = 0; b < B; b++) {
        valid[b] = (int)T;
        for (size_t t = 0; t < T; t++) {
            s = s * 1664525u + 1013904223u;
            int32_t id = (int32_t)(2000 + (s >> 8) % (uint32_t)(c->V - 2000));
            ids[b * T + t] = t == 0 ? 101 : t == T - 1 ? 102 : id;
        }
    }
    double flop_seq = (double)L * (2.0 * (double)T * (3.0 * C * C + C * C + 2.0 * C * FF) +
                                   4.0 * (double)T * T * C);
    double flop_batch = flop_seq * (double)B;

    /* Forward and anchor are interleaved (each rep: one forward, then one sgemm per shape) so
     * that a slow drift of the machine (other load, clock changes) hits both alike. */
    kst_bert_acts acts = {0};
    size_t shapes[4][2] = {{3 * C, C}, {C, C}, {FF, C}, {C, FF}};
    size_t maxk = FF > C ? FF : C, maxn = 3 * C > FF ? 3 * C : FF;
    float *A = rand_buf(BT * maxk, 1), *W = rand_buf(maxn * maxk, 2), *Y = rand_buf(BT * maxn, 3);
    double *tv = malloc((size_t)reps * 5 * sizeof *tv);
    if (!tv) return 1;
    for (int i = 0; i < reps + 2; i++) {
        double t0 = now();
        if (kst_bert_forward(m, &acts, out, ids, NULL, valid, B, T, &err) != KST_OK) {
            fprintf(stderr, "bench_forward: %s\n", err.msg);
            return 1;
        }
        if (i >= 2) tv[i - 2] = now() - t0;
        for (int k = 0; k < 4; k++) {
            int N = (int)shapes[k][0], K = (int)shapes[k][1], M = (int)BT;
            t0 = now();
            kst_sgemm(0, 1, M, N, K, 1.0f, A, K, W, K, 0.0f, Y, N);
            if (i >= 2) tv[(k + 1) * reps + i - 2] = now() - t0;
        }
    }
    double fwd_min = tv[0], fwd_max = tv[0];
    for (int i = 1; i < reps; i++) {
        fwd_min = tv[i] < fwd_min ? tv[i] : fwd_min;
        fwd_max = tv[i] > fwd_max ? tv[i] : fwd_max;
    }
    double fwd_med = median(tv, reps);
    double gemm_s[4], gemm_flop[4], sum_s = 0, sum_flop = 0;
    for (int k = 0; k < 4; k++) {
        gemm_s[k] = median(tv + (k + 1) * reps, reps);
        gemm_flop[k] = 2.0 * (double)BT * (double)shapes[k][0] * (double)shapes[k][1];
        sum_s += gemm_s[k];
        sum_flop += gemm_flop[k];
    }
    double checksum = 0;
    for (size_t i = 0; i < BT * C; i++) checksum += out[i];

    /* Breakdown: per-op totals of each forward, then the median per op. */
    double *opt = calloc((size_t)breps * NOPS, sizeof *opt);
    if (!opt) return 1;
    for (int i = 0; i < breps; i++) {
        double t[NOPS] = {0};
        forward_timed(m, &acts, out, ids, valid, B, T, t);
        for (int o = 0; o < NOPS; o++) opt[o * breps + i] = t[o];
    }
    double op_med[NOPS], op_sum = 0;
    for (int o = 0; o < NOPS; o++) {
        op_med[o] = median(opt + o * breps, breps);
        op_sum += op_med[o];
    }

    double anchor_gflops = sum_flop / sum_s * 1e-9;
    double fwd_gflops = flop_batch / fwd_med * 1e-9;

    printf("{\"model\": \"%s\", \"B\": %zu, \"T\": %zu, \"reps\": %d, \"threads\": %d,\n", dir, B, T,
           reps, threads);
    printf(" \"omp_max_threads\": %d, \"blas_core\": \"%s\", \"blas_core_source\": \"%s\",\n",
           omp_get_max_threads(), kst_blas_core(),
           user_core[0] ? "user" : set_core ? "kestrel" : "openblas");
    printf(" \"openblas_coretype\": \"%s\",\n", user_core[0] ? user_core : set_core ? set_core : "");
    printf(" \"L\": %zu, \"C\": %zu, \"NH\": %zu, \"FF\": %zu, \"flop_per_seq\": %.6g,\n", L, C, c->NH, FF,
           flop_seq);
    printf(" \"load_s\": %.6f, \"forward_median_s\": %.6f, \"forward_min_s\": %.6f, \"forward_max_s\": %.6f,\n",
           load_s, fwd_med, fwd_min, fwd_max);
    printf(" \"forward_sent_per_s\": %.3f, \"forward_gflops\": %.3f, \"checksum\": %.6g,\n",
           (double)B / fwd_med, fwd_gflops, checksum);
    printf(" \"sgemm_anchor_gflops\": %.3f, \"ratio_forward_to_sgemm\": %.4f,\n", anchor_gflops,
           fwd_gflops / anchor_gflops);
    printf(" \"sgemm_shapes\": [");
    for (int k = 0; k < 4; k++)
        printf("%s{\"M\": %zu, \"N\": %zu, \"K\": %zu, \"median_s\": %.6f, \"gflops\": %.3f}", k ? ", " : "",
               BT, shapes[k][0], shapes[k][1], gemm_s[k], gemm_flop[k] / gemm_s[k] * 1e-9);
    printf("],\n \"breakdown_total_s\": %.6f, \"breakdown\": {", op_sum);
    for (int o = 0; o < NOPS; o++)
        printf("%s\"%s\": {\"s\": %.6f, \"share\": %.4f}", o ? ", " : "", OP_NAME[o], op_med[o],
               op_med[o] / op_sum);
    printf("}}\n");

    free(A);
    free(W);
    free(Y);
    free(opt);
    free(tv);
    free(ids);
    free(valid);
    free(out);
    kst_bert_acts_free(&acts);
    kst_encoder_free(e);
    return 0;
}
