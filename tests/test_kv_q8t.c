/* test_kv_q8t.c - the tail sample's 8-bit table (core/kv_q8t.h; opts.tail_q8) and the top-k
 * selection (kst_kv_top).
 *
 * References are written here from the documented definitions, in integers and float64: the
 * row quantizer (q = lrintf(x * (127 / max |x|)), scale max |x| / 127), the scores' exact integer
 * dot products, the weights rounded to bytes of the largest, the top-k by (value descending,
 * index ascending). The AVX-512 VNNI path and the plain C path (kst_q8t_set_simd(0)) must each
 * give the reference's bits; the quantized figures must stay within the quantization's own
 * bounds of the float64 ones; the decode step with tail_q8 and every key sampled must be float64
 * full attention within the 8-bit error. */
#include "harness.h"
#include "kv_ref.h"

#include "api/kestrel.h"
#include "core/half.h"
#include "core/kv_attn.h"
#include "core/kv_q8t.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

/* the documented row quantizer */
static float ref_q8(const float *x, size_t d, int8_t *q) {
    float m = 0;
    for (size_t i = 0; i < d; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    if (m == 0) {
        memset(q, 0, d);
        return 0;
    }
    float inv = 127.0f / m;
    for (size_t i = 0; i < d; i++) {
        long r = lrintf(x[i] * inv);
        q[i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    return m / 127.0f;
}

/* n rows of d: float32 X and the bits put in the block (float16 rounded when f16) */
typedef struct blk {
    size_t n, d;
    float *K, *V;   /* (n, d) the rows as the block sees them */
    int8_t *K8, *V8;
    float *ks, *vs;
    int32_t *ksum;
} blk;

static void blk_make(blk *b, size_t n, size_t d, int f16, double vscale) {
    size_t r16 = KST_Q8T_ROWS(n);
    b->n = n;
    b->d = d;
    b->K = malloc(n * d * sizeof(float));
    b->V = malloc(n * d * sizeof(float));
    b->K8 = malloc(r16 * d);
    b->V8 = malloc(r16 * d);
    b->ks = malloc(r16 * sizeof(float));
    b->vs = malloc(r16 * sizeof(float));
    b->ksum = malloc(r16 * sizeof(int32_t));
    uint16_t *kh = malloc(d * 2), *vh = malloc(d * 2);
    for (size_t j = 0; j < n; j++) {
        for (size_t i = 0; i < d; i++) {
            float k = (float)(kv_gauss() * (1 + 0.1 * (double)(i % 7))), v = (float)(vscale * kv_gauss());
            if (f16) {
                kh[i] = kst_f32_to_f16(k);
                vh[i] = kst_f32_to_f16(v);
                k = kst_f16_to_f32(kh[i]);
                v = kst_f16_to_f32(vh[i]);
            }
            b->K[j * d + i] = k;
            b->V[j * d + i] = v;
        }
        if (f16) kst_q8t_put(b->K8, b->ks, b->ksum, b->V8, b->vs, j, n, kh, vh, 1, d);
        else kst_q8t_put(b->K8, b->ks, b->ksum, b->V8, b->vs, j, n, b->K + j * d, b->V + j * d, 0, d);
    }
    kst_q8t_pad(b->K8, b->ks, b->ksum, b->V8, b->vs, n, d);
    free(kh);
    free(vh);
}
static void blk_free(blk *b) {
    free(b->K);
    free(b->V);
    free(b->K8);
    free(b->V8);
    free(b->ks);
    free(b->vs);
    free(b->ksum);
}

/* value row j's 8-bit integers, as vaxpy gives them (out = 0 + 1 * q) */
static void v8_row(const blk *b, size_t j, float *out) {
    memset(out, 0, b->d * sizeof(float));
    kst_q8t_vaxpy(out, 1.0f, b->V8, j, b->n, b->d);
}

/* The block's rows and scales are the documented quantizer's, and scores are the integer dot
 * products' within the quantization's bound of float64 <q, k>. */
static void test_scores(void **state) {
    (void)state;
    const size_t ns[] = {512, 37}, ds[] = {128, 96, 36}, Gs[] = {4, 3, 6};
    size_t checked = 0;
    for (int simd = 1; simd >= 0; simd--) {
        kst_q8t_set_simd(simd);
        for (size_t a = 0; a < 2; a++)
            for (size_t b_ = 0; b_ < 3; b_++)
                for (size_t c = 0; c < 3; c++)
                    for (int f16 = 0; f16 < 2; f16++) {
                        size_t n = ns[a], d = ds[b_], G = Gs[c];
                        float scale = 1.0f / sqrtf((float)d);
                        blk b;
                        blk_make(&b, n, d, f16, 1.0);
                        float *Q = malloc(G * d * sizeof(float)), *S = malloc(G * n * sizeof(float));
                        uint8_t *qb = malloc(G * d);
                        for (size_t i = 0; i < G * d; i++) Q[i] = (float)(2 * kv_gauss());
                        kst_q8t_scores(S, Q, G, b.K8, b.ks, b.ksum, n, d, scale, qb);
                        int8_t qq[512], kq[512], vq[512];
                        float vrow[512];
                        for (size_t j = 0; j < n; j++) {
                            float ks = ref_q8(b.K + j * d, d, kq), vs = ref_q8(b.V + j * d, d, vq);
                            assert_true(ks == b.ks[j] && vs == b.vs[j]);
                            v8_row(&b, j, vrow);
                            for (size_t i = 0; i < d; i++)
                                if (vrow[i] != (float)vq[i]) fail_msg("value row %zu dim %zu: %g, expected %d", j, i, vrow[i], vq[i]);
                        }
                        for (size_t g = 0; g < G; g++) {
                            float qs = ref_q8(Q + g * d, d, qq), qf = scale * qs;
                            for (size_t j = 0; j < n; j++) {
                                float ks = ref_q8(b.K + j * d, d, kq);
                                int64_t acc = 0, ksum = 0;
                                double s64 = 0, bound = 0;
                                for (size_t i = 0; i < d; i++) {
                                    acc += (int64_t)(qq[i] + 128) * kq[i];
                                    ksum += kq[i];
                                    s64 += (double)Q[g * d + i] * b.K[j * d + i];
                                    bound += fabs(b.K[j * d + i]) * qs / 2 + fabs(Q[g * d + i]) * ks / 2 +
                                             (double)qs * ks / 4;
                                }
                                float want = (float)(acc - 128 * ksum) * ks * qf, got = S[g * n + j];
                                if (got != want)
                                    fail_msg("scores n %zu d %zu G %zu f16 %d simd %d: [%zu][%zu] %.9g, expected %.9g",
                                             n, d, G, f16, simd, g, j, got, want);
                                if (!(fabs(got - scale * s64) <= scale * bound * 1.001 + 1e-6))
                                    fail_msg("score [%zu][%zu] %.6g against float64 %.6g: over the 8-bit bound %.3g", g,
                                             j, got, scale * s64, scale * bound);
                                checked++;
                            }
                        }
                        free(Q);
                        free(S);
                        free(qb);
                        blk_free(&b);
                    }
    }
    kst_q8t_set_simd(1);
    print_message("q8t scores: %zu equal to the integer reference\n", checked);
}

/* Weighted value sums: the weights rounded to bytes of the largest as documented, the integer
 * sums exact; within P / 510 a weight of float64 sum W v; weights all 0: 0; a row's scale NaN:
 * NaN. */
static void test_wsum(void **state) {
    (void)state;
    const size_t ns[] = {512, 37, 5}, ds[] = {128, 96, 36}, Gs[] = {4, 3, 6};
    for (int simd = 1; simd >= 0; simd--) {
        kst_q8t_set_simd(simd);
        for (size_t a = 0; a < 3; a++)
            for (size_t b_ = 0; b_ < 3; b_++)
                for (size_t c = 0; c < 3; c++) {
                    size_t n = ns[a], d = ds[b_], G = Gs[c], n16 = KST_Q8T_ROWS(n);
                    blk b;
                    blk_make(&b, n, d, (int)(a + c) % 2, 3.0);
                    float *W = malloc(G * n * sizeof(float)), *O = malloc(G * d * sizeof(float)), wsc[8];
                    uint8_t *wq = malloc(G * n16);
                    for (size_t i = 0; i < G * n; i++) W[i] = i % 7 == 3 ? 0.0f : (float)exp(2 * kv_gauss() - 3);
                    kst_q8t_wsum(O, W, G, b.V8, b.vs, n, d, wq, wsc);
                    float vrow[512];
                    for (size_t g = 0; g < G; g++) {
                        float P = 0;
                        for (size_t j = 0; j < n; j++) P = W[g * n + j] * b.vs[j] > P ? W[g * n + j] * b.vs[j] : P;
                        float r = 255.0f / P;
                        assert_true(wsc[g] == P / 255.0f);
                        int64_t *acc = calloc(d, sizeof(int64_t));
                        double *w64 = calloc(d, sizeof(double)), *bnd = calloc(d, sizeof(double));
                        for (size_t j = 0; j < n; j++) {
                            int u = (int)(W[g * n + j] * b.vs[j] * r + 0.5f);
                            if (wq[g * n16 + j] != u)
                                fail_msg("wsum n %zu d %zu G %zu simd %d: weight [%zu][%zu] byte %d, expected %d", n, d,
                                         G, simd, g, j, wq[g * n16 + j], u);
                            v8_row(&b, j, vrow);
                            for (size_t i = 0; i < d; i++) {
                                acc[i] += (int64_t)u * (int64_t)vrow[i];
                                w64[i] += (double)W[g * n + j] * b.vs[j] * vrow[i];
                                bnd[i] += (double)P / 510 * fabs(vrow[i]);
                            }
                        }
                        for (size_t j = n; j < n16; j++) assert_int_equal(wq[g * n16 + j], 0);
                        for (size_t i = 0; i < d; i++) {
                            float want = (float)acc[i] * (P / 255.0f);
                            if (O[g * d + i] != want)
                                fail_msg("wsum n %zu d %zu G %zu simd %d: [%zu][%zu] %.9g, expected %.9g", n, d, G, simd,
                                         g, i, O[g * d + i], want);
                            if (!(fabs(O[g * d + i] - w64[i]) <= bnd[i] * 1.001 + 1e-30))
                                fail_msg("wsum [%zu][%zu] %.6g against float64 %.6g: over the bound %.3g", g, i,
                                         O[g * d + i], w64[i], bnd[i]);
                        }
                        free(acc);
                        free(w64);
                        free(bnd);
                    }
                    /* no weight: 0; a row's scale NaN: NaN */
                    memset(W, 0, G * n * sizeof(float));
                    kst_q8t_wsum(O, W, G, b.V8, b.vs, n, d, wq, wsc);
                    for (size_t i = 0; i < G * d; i++) assert_true(O[i] == 0);
                    assert_true(wsc[0] == 0);
                    W[n / 2] = 1;
                    b.vs[n / 2] = NAN;
                    kst_q8t_wsum(O, W, G, b.V8, b.vs, n, d, wq, wsc);
                    for (size_t i = 0; i < d; i++) assert_true(isnan(O[i]));
                    free(W);
                    free(O);
                    free(wq);
                    blk_free(&b);
                }
    }
    kst_q8t_set_simd(1);
}

/* kst_kv_top against a sort by (value descending, index ascending) */
typedef struct vi {
    float v;
    uint32_t i;
} vi;
static int cmp_vi(const void *a, const void *b) {
    const vi *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}
static void test_top(void **state) {
    (void)state;
    const size_t ns[] = {512, 520, 100, 16, 2048, 64}, ks[] = {32, 1, 32, 32, 32, 8};
    float *w = malloc(2048 * sizeof(float)), tw[32];
    uint32_t tp[32];
    vi *r = malloc(2048 * sizeof(vi));
    for (size_t a = 0; a < 6; a++)
        for (int kind = 0; kind < 7; kind++) {
            size_t n = ns[a], k = ks[a], nt = n < k ? n : k, nn = 0;
            for (size_t j = 0; j < n; j++) {
                double g = kv_gauss();
                w[j] = kind == 0 ? (float)g : kind == 1 ? (float)j : kind == 2 ? -(float)j
                       : kind == 3 ? (float)(round(g * 4) / 4) /* ties */
                       : kind == 4 ? (j % 9 == 0 ? -INFINITY : (float)g)
                       : kind == 5 ? (j == n - 3 && n > 4 * k ? NAN : (float)g) /* after the list fills */
                                   : 1.0f;
                if (w[j] == w[j]) r[nn++] = (vi){w[j], (uint32_t)j};
            }
            qsort(r, nn, sizeof *r, cmp_vi);
            assert_int_equal(kst_kv_top(w, n, k, tw, tp), nt);
            for (size_t i = 0; i < nt; i++)
                if (tw[i] != r[i].v || tp[i] != r[i].i)
                    fail_msg("top n %zu k %zu kind %d: [%zu] %g at %u, expected %g at %u", n, k, kind, i, tw[i], tp[i],
                             r[i].v, r[i].i);
        }
    free(w);
    free(r);
}

/* kst_kv_sum: the documented lane order's bits, and float64's sum within its rounding */
static void test_sum(void **state) {
    (void)state;
    float w[1031];
    for (size_t i = 0; i < 1031; i++) w[i] = (float)exp(3 * kv_gauss());
    const size_t ns[] = {0, 1, 7, 8, 512, 1031};
    for (size_t a = 0; a < 6; a++) {
        size_t n = ns[a];
        double l[8] = {0}, s64 = 0;
        for (size_t j = 0; j < n; j++) {
            l[j % 8] += w[j];
            s64 += w[j];
        }
        double want = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])), got = kst_kv_sum(w, n);
        if (got != want) fail_msg("kst_kv_sum n %zu: %.17g, expected %.17g", n, got, want);
        assert_true(fabs(got - s64) <= 1e-12 * s64);
    }
}

/* One layer of 2 KV heads x 8 query heads, d 64, 4,096 keys behind a key index. With every
 * indexed key sampled the tail is exact but for its 8 bits: float64 full attention within 2e-3
 * relative error, differing from the float16 table's output (the 8-bit path ran), and the same
 * twice (within 1e-5 where the GPU scores it: its items sum a chunk's warps in any order). With
 * 512 samples its error stays within 10% of the float table's. On the GPU each placement (1 the
 * table read from host memory, 2 held on the GPU, 3 scored on the CPU) passes the same checks, 1
 * and 2 agree within 1e-5, and the GPU holds a cache's bytes with no tail, but for 2's table.
 * head_dim 66 with tail_q8: refused, naming it. */
static kst_kv *q8_cache_l(int q8, size_t layers, size_t n, size_t d, const float *K, const float *V, int gpu,
                          kst_error *err) {
    kst_kv_opts o = kst_kv_opts_default();
    o.layers = layers;
    o.kv_heads = 2;
    o.q_heads = 8;
    o.head_dim = d;
    o.sinks = 4;
    o.window = 32;
    o.degree = 16;
    o.index = KST_KV_INDEX_KEYS;
    o.widen = 0;
    o.tail_q8 = q8;
    o.gpu = gpu;
    kst_kv *kv;
    if (kst_kv_create(&o, &kv, err) != KST_OK) return NULL;
    for (size_t l = 0; l < layers; l++) /* (every layer the same keys and values) */
        if (kst_kv_append(kv, l, K, V, n, err) != KST_OK || kst_kv_build(kv, l, NULL, 0, err) != KST_OK) {
            kst_kv_free(kv);
            return NULL;
        }
    return kv;
}
static kst_kv *q8_cache(int q8, size_t n, size_t d, const float *K, const float *V, int gpu, kst_error *err) {
    return q8_cache_l(q8, 1, n, d, K, V, gpu, err);
}
/* The test's keys (n, 2 KV heads, d), values and queries (nq, 8 query heads, d). */
static void q8_data(size_t n, size_t d, size_t nq, float *K, float *V, float *Q) {
    kv_rng = 0x51ed270b27bd38e5ull;
    for (size_t i = 0; i < n * 2 * d; i++) K[i] = (float)(0.3 * kv_gauss());
    for (size_t i = 0; i < n * 2 * d; i++) V[i] = (float)(1.0 + kv_gauss());
    for (size_t i = 0; i < nq * 8 * d; i++) Q[i] = (float)kv_gauss();
}
static double max_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs((double)a[i] - b[i]) > m ? fabs((double)a[i] - b[i]) : m;
    return m;
}
#ifdef KST_CUDA
/* GPU bytes of one such layer on the GPU with no tail sample, after a step. */
static size_t no_tail_bytes(size_t n, size_t d, const float *K, const float *V, const float *Q) {
    kst_error err;
    float o[8 * 64];
    kst_kv *z = q8_cache(0, n, d, K, V, 1, &err);
    assert_non_null(z);
    assert_ok(kst_kv_set_tail_samples(z, 0, &err), &err);
    assert_ok(kst_kv_attend(z, 0, Q, 16, 64, o, NULL, &err), &err);
    size_t b = kst_kv_gpu_bytes(z);
    kst_kv_free(z);
    return b;
}
#endif
static void q8_decode(int gpu, int where, float *keep) {
    const size_t n = 4096, d = 64, KVH = 2, QH = 8, nq = 6;
    float *K = malloc(n * KVH * d * sizeof(float)), *V = malloc(n * KVH * d * sizeof(float));
    float *Q = malloc(nq * QH * d * sizeof(float)), *Kh = malloc(n * d * sizeof(float)), *Vh = malloc(n * d * sizeof(float));
    q8_data(n, d, nq, K, V, Q);
    kst_error err;
    kst_kv *a = q8_cache(where, n, d, K, V, gpu, &err), *f = q8_cache(0, n, d, K, V, 0, &err);
    assert_non_null(a);
    assert_non_null(f);
    float *oa = malloc(QH * d * sizeof(float)), *of = malloc(QH * d * sizeof(float)), *o2 = malloc(QH * d * sizeof(float));
    double ref[64], e_all = 0, e_q = 0, e_f = 0, dmax = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t m = pass ? 512 : n;
        assert_ok(kst_kv_set_tail_samples(a, m, &err), &err);
        assert_ok(kst_kv_set_tail_samples(f, m, &err), &err);
        for (size_t s = 0; s < nq; s++) {
            const float *q = Q + s * QH * d;
            kst_kv_stats st;
            assert_ok(kst_kv_attend(a, 0, q, 16, 64, oa, &st, &err), &err);
            assert_true(st.sampled > 0);
            assert_ok(kst_kv_attend(a, 0, q, 16, 64, o2, NULL, &err), &err);
            if (gpu && where != KST_KV_TAIL_Q8_CPU) /* (the GPU's items sum a chunk's warps in any order) */
                assert_true(max_diff(oa, o2, QH * d) <= 1e-5);
            else
                assert_memory_equal(oa, o2, QH * d * sizeof(float));
            if (pass && keep) memcpy(keep + s * QH * d, oa, QH * d * sizeof(float));
            assert_ok(kst_kv_attend(f, 0, q, 16, 64, of, NULL, &err), &err);
            for (size_t h = 0; h < QH; h++) {
                size_t kh = h / (QH / KVH);
                for (size_t t = 0; t < n; t++)
                    for (size_t i = 0; i < d; i++) {
                        Kh[t * d + i] = K[(t * KVH + kh) * d + i];
                        Vh[t * d + i] = V[(t * KVH + kh) * d + i];
                    }
                full_attn64(ref, q + h * d, Kh, Vh, n, d, 1.0 / sqrt((double)d));
                double eq = rel_err64(oa + h * d, ref, d), ef = rel_err64(of + h * d, ref, d);
                for (size_t i = 0; i < d; i++)
                    dmax = fabs(oa[h * d + i] - of[h * d + i]) > dmax ? fabs(oa[h * d + i] - of[h * d + i]) : dmax;
                if (!pass) {
                    if (!(eq < 2e-3)) fail_msg("tail_q8, every key sampled: query %zu head %zu error %.3e", s, h, eq);
                    e_all += eq / (nq * QH);
                } else {
                    e_q += eq / (nq * QH);
                    e_f += ef / (nq * QH);
                }
            }
        }
    }
    print_message("tail_q8 %d%s: every key sampled %.3e mean error; 512 samples %.4e (float table %.4e); max |q8 - float| "
                  "%.3g\n", where, gpu ? " (GPU)" : "", e_all, e_q, e_f, dmax);
    assert_true(dmax > 0); /* the 8-bit table was read */
    if (!(fabs(e_q - e_f) <= 0.1 * e_f)) fail_msg("512 samples: tail_q8 error %.4e, float table %.4e", e_q, e_f);
#ifdef KST_CUDA
    if (gpu) { /* the GPU holds only the static tokens: as many bytes as with no tail at all, but
                * for the table where held there (2 KV heads, at least 512 samples, d bytes twice) */
        size_t b_q8 = kst_kv_gpu_bytes(a), b0 = no_tail_bytes(n, d, K, V, Q);
        print_message("GPU bytes: tail_q8 %d %zu, no tail %zu\n", where, b_q8, b0);
        if (where == KST_KV_TAIL_Q8_GPU) assert_true(b_q8 >= b0 + KVH * 512 * 2 * d);
        else assert_int_equal(b_q8, b0);
    }
#endif
    kst_kv_free(a);
    kst_kv_free(f);
    free(K);
    free(V);
    free(Q);
    free(Kh);
    free(Vh);
    free(oa);
    free(of);
    free(o2);
}
static void test_decode(void **state) {
    (void)state;
    q8_decode(0, KST_KV_TAIL_Q8_HOST, NULL);
    kst_kv_opts o = kst_kv_opts_default();
    o.layers = o.kv_heads = o.q_heads = 1;
    o.head_dim = 66;
    o.tail_q8 = 1;
    kst_kv *kv = NULL;
    kst_error err;
    assert_int_equal(kst_kv_create(&o, &kv, &err), KST_ERR_INVALID);
    assert_null(kv);
    assert_msg_has(err.msg, "tail_q8");
    assert_msg_has(err.msg, "head_dim 66");
    o.head_dim = 64; /* a placement past KST_KV_TAIL_Q8_STAGED: refused, naming it */
    o.tail_q8 = 5;
    assert_int_equal(kst_kv_create(&o, &kv, &err), KST_ERR_INVALID);
    assert_null(kv);
    assert_msg_has(err.msg, "tail_q8: 5");
}
#ifdef KST_CUDA
/* tail_q8 KST_KV_TAIL_Q8_STAGED over nl layers holding the same keys (q8_data), 512 samples,
 * attended in a decoder's order for 6 queries: each layer's output within 1e-5 of the table read
 * from host memory (want: q8_decode's outputs with KST_KV_TAIL_Q8_HOST; the same kernel on the
 * same bytes, but for the order of its sums); from the second round on every step finds its
 * table copied ahead during the previous layer's (the slots alternate, so each step's copy was
 * made during the one before); a step out of order (layer 0, then 2) copies it itself, with the
 * same output; with the sample remade (256 samples) after the next layer's table was copied
 * ahead, each layer's output is the host table's again; the GPU holds each layer's static tokens
 * (as a cache with no tail) and the pool's slots: 2, 3 for an odd nl, each one layer's table in 8
 * bits with its scales. */
static void q8_staged(size_t nl, const float *want) {
    const size_t n = 4096, d = 64, QH = 8, nq = 6, ns = 512;
    float *K = malloc(n * 2 * d * sizeof(float)), *V = malloc(n * 2 * d * sizeof(float));
    float *Q = malloc(nq * QH * d * sizeof(float)), *o = malloc(QH * d * sizeof(float));
    q8_data(n, d, nq, K, V, Q);
    kst_error err;
    kst_kv *a = q8_cache_l(KST_KV_TAIL_Q8_STAGED, nl, n, d, K, V, 1, &err);
    assert_non_null(a);
    assert_ok(kst_kv_set_tail_samples(a, ns, &err), &err);
    double dmax = 0;
    size_t staged = 0, steps = 0;
    for (size_t s = 0; s < nq; s++)
        for (size_t l = 0; l < nl; l++) {
            kst_kv_stats st;
            assert_ok(kst_kv_attend(a, l, Q + s * QH * d, 16, 64, o, &st, &err), &err);
            double m = max_diff(o, want + s * QH * d, QH * d);
            dmax = m > dmax ? m : dmax;
            if (s > 0) {
                if (st.staged != 1) fail_msg("%zu layers: query %zu layer %zu: table not staged ahead", nl, s, l);
                staged += st.staged;
                steps++;
            }
        }
    kst_kv_stats st;
    assert_ok(kst_kv_attend(a, 0, Q, 16, 64, o, &st, &err), &err);
    assert_ok(kst_kv_attend(a, 2, Q, 16, 64, o, &st, &err), &err); /* (out of order: layer 1 was staged) */
    assert_int_equal(st.staged, 0);
    double m = max_diff(o, want, QH * d);
    dmax = m > dmax ? m : dmax;
    assert_ok(kst_kv_attend(a, 2, Q, 16, 64, o, &st, &err), &err); /* (again: its table still there) */
    assert_int_equal(st.staged, 1);
    m = max_diff(o, want, QH * d);
    dmax = m > dmax ? m : dmax;
    assert_ok(kst_kv_attend(a, 3 % nl, Q, 16, 64, o, &st, &err), &err); /* (layer 2's step staged 3's) */
    assert_int_equal(st.staged, 1);
    { /* the samples remade while layer 4 % nl's old table sits staged */
        float *w = malloc(QH * d * sizeof(float));
        kst_kv *h = q8_cache(KST_KV_TAIL_Q8_HOST, n, d, K, V, 1, &err);
        assert_non_null(h);
        assert_ok(kst_kv_set_tail_samples(h, 256, &err), &err);
        assert_ok(kst_kv_attend(h, 0, Q, 16, 64, w, NULL, &err), &err);
        assert_ok(kst_kv_set_tail_samples(a, 256, &err), &err);
        for (size_t i = 4; i < 4 + nl; i++) {
            assert_ok(kst_kv_attend(a, i % nl, Q, 16, 64, o, &st, &err), &err);
            m = max_diff(o, w, QH * d);
            if (!(m <= 1e-5)) fail_msg("%zu layers, 256 samples: layer %zu against the host table: max |d| %.3g", nl, i % nl, m);
            dmax = m > dmax ? m : dmax;
        }
        kst_kv_free(h);
        free(w);
    }
    print_message("staged over %zu layers: %zu of %zu steps found their table staged; max |d| against the host table "
                  "%.3g\n", nl, staged, steps, dmax);
    if (!(dmax <= 1e-5)) fail_msg("%zu layers: staged against host table: max |d| %.3g", nl, dmax);
    size_t slot = 2 * ns * 2 * d + ns * 2 * 2 * sizeof(float), nslot = nl % 2 ? 3 : 2, b0 = no_tail_bytes(n, d, K, V, Q);
    print_message("GPU bytes: %zu layers staged %zu, a layer with no tail %zu, slots %zu x %zu\n", nl, kst_kv_gpu_bytes(a),
                  b0, nslot, slot);
    assert_int_equal(kst_kv_gpu_bytes(a), nl * b0 + nslot * slot);
    kst_kv_free(a);
    free(K);
    free(V);
    free(Q);
    free(o);
}
#endif
static void test_decode_gpu(void **state) {
    (void)state;
#ifndef KST_CUDA
    skip_because("built without CUDA");
#else
    if (kst_kv_cuda_devices() == 0) skip_because("no CUDA device visible");
    /* the GPU reading the table from host memory, then holding it: the same kernel on the same
     * bytes, so the same outputs but for the order of its sums; then the table scored on the CPU */
    float *h = malloc(6 * 8 * 64 * sizeof(float)), *g = malloc(6 * 8 * 64 * sizeof(float));
    q8_decode(1, KST_KV_TAIL_Q8_HOST, h);
    q8_decode(1, KST_KV_TAIL_Q8_GPU, g);
    print_message("host against GPU table: max |d| %.3g\n", max_diff(h, g, 6 * 8 * 64));
    assert_true(max_diff(h, g, 6 * 8 * 64) <= 1e-5);
    q8_decode(1, KST_KV_TAIL_Q8_CPU, g);
    /* staged a layer ahead (4 layers: 2 slots; 5: 3), against the host table's outputs */
    q8_staged(4, h);
    q8_staged(5, h);
    free(h);
    free(g);
#endif
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scores), cmocka_unit_test(test_wsum), cmocka_unit_test(test_top), cmocka_unit_test(test_sum),
        cmocka_unit_test(test_decode), cmocka_unit_test(test_decode_gpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
