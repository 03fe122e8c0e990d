/* kv_attn.h - attention of one query over a subset of cached keys, as a partial result that
 * merges exactly with others by log-sum-exp rescaling (the decode step of RetrievalAttention:
 * static tokens and retrieved tokens are attended to separately, then merged).
 *
 * A partial over key set S is (o, lse) with
 *   lse = log sum_{j in S} exp(s_j),  s_j = scale * <q, k_j>
 *   o   = sum_{j in S} exp(s_j - lse) v_j
 * and for disjoint S1, S2 the attention over S1 u S2 is
 *   lse = logaddexp(lse1, lse2),  o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2,
 * exactly (FlashAttention's online softmax). An empty set has lse = -inf and o = 0, the merge's
 * identity. Rows of K and V are float32 or IEEE float16 (uint16_t bits). */
#ifndef KST_CORE_KV_ATTN_H
#define KST_CORE_KV_ATTN_H

#include "core/half.h"
#include <stddef.h>
#include <stdint.h>


/* <q, row> for a row of d float32 (f16 == 0) or float16 (f16 != 0) values. */
float kst_kv_dot(const float *q, const void *row, int f16, size_t d);
/* Copies n rows of d values (float32 or float16) starting at row `first` of src into out (n, d)
 * float32. */
void kst_kv_rows_f32(float *out, const void *src, int f16, size_t first, size_t n, size_t d);

/* A row of d float32 or float16 values in 8 bits (the sample cache's table, tail_cache_q8):
 * q[i] = round(x[i] * (127 / max |x|)) (float32, to nearest even), returns the scale
 * max |x| / 127, so that x[i] ~ q[i] * scale (0 for a row of zeros, or one so small that 127 /
 * max |x| overflows; a NaN or an infinity gives the scale NaN; q 0 in each of these). The GPU's
 * 8-bit table (index/kv_cuda.cu, sc_scatter_q8_kernel) quantizes the same way. */
float kst_kv_q8(const void *row, int f16, size_t d, int8_t *q);
/* <qv, q8> (unscaled: times the row's scale for <qv, x>) and out += w * q8. */
float kst_kv_dot_q8(const float *qv, const int8_t *q8, size_t d);
void kst_kv_axpy_q8(float *out, float w, const int8_t *q8, size_t d);

/* out (d) += w * row (d) for a row of d float32 or float16 values. */
void kst_kv_axpy(float *out, float w, const void *row, int f16, size_t d);

/* Scores of G queries Q (G, d) float32 against n contiguous rows K (n, d):
 * S[g * n + j] = scale * <Q_g, K_j> (each row read once for all G queries). */
void kst_kv_scores_multi(float *S, const float *Q, size_t G, const void *K, int f16, size_t n,
                         size_t d, float scale);

/* The same from K stored transposed, Kt (d, n): S[g * n + j] = scale * sum_i Q_g[i] Kt[i][j]. */
void kst_kv_scores_t(float *S, const float *Q, size_t G, const void *Kt, int f16, size_t n,
                     size_t d, float scale);

/* w[j] = exp(w[j] - mx) for j < n (float32; a vectorized exp where the CPU has AVX2, within
 * 2 ulp of expf; 0 below exp's float range). */
void kst_kv_exp_shift(float *w, size_t n, float mx);
/* One row of the sample cache's plan (index/kv_scache.c): a[j] += p[j] for j < n, where
 * p[j] = lf[j] exp(temp (cs[j] - max cs)) / Z and Z = sum_j lf[j] exp(temp (cs[j] - max cs))
 * (a NaN score's term 0); e: scratch of n floats (left holding the unnormalized terms). Returns
 * 0, a untouched, where no score is above -inf or every term is 0. */
int kst_kv_alloc_add(float *a, const float *cs, const float *lf, size_t n, float temp, float *e);
/* One round of water-filling over n clusters (kst_kvtc_fill): cluster c with w[c] > 0 and
 * lw * w[c] >= rc[c] (rc[c] < 2^31) is taken whole: ns[c] = rc[c], w[c] = 0. Returns 1 if any
 * was; *wopen: the weights left open summed (in double), *took: the keys of those taken. */
int kst_kv_fill_round(size_t n, const uint32_t *rc, float *w, uint32_t *ns, float lw, double *wopen, uint64_t *took);

/* y (d) += sum_j x[j] M[j] over the n float32 rows of M (n, d): M^T x. */
void kst_kv_gemv_t(float *y, const float *M, const float *x, size_t n, size_t d);

/* Weighted sums of n contiguous rows V (n, d) for G weight vectors W (G, n):
 * O[g * d + i] = sum_j W[g * n + j] V[j][i] (each row read once for all G). */
void kst_kv_wsum_multi(float *O, const float *W, size_t G, const void *V, int f16, size_t n,
                       size_t d);

/* Partial attention of q (d) over n rows of K and V (each (*, d), float32 or float16): rows
 * ids[0..n) when ids is not NULL, else rows first..first+n-1. Writes out (d) and *lse; scratch
 * holds n floats. n == 0 gives out = 0, *lse = -INFINITY. Cannot fail. */
void kst_attn_partial(float *out, float *lse, float *scratch, const float *q, const void *K,
                      const void *V, int f16, const int64_t *ids, size_t first, size_t n,
                      size_t d, float scale);

/* kst_attn_partial over rows ids[0..n) of V whose scores are known: s[j] = <q, k_ids[j]> unscaled
 * (as kst_kv_dot gives them, e.g. a search's exact re-scoring); scratch gets scale * s[j], the
 * values kst_attn_partial would have computed from the keys, so the result is the same without
 * reading the keys again. */
void kst_attn_partial_scored(float *out, float *lse, float *scratch, const float *s, const void *V, int f16,
                             const int64_t *ids, size_t n, size_t d, float scale);

/* Merges the partial (o2, lse2) into (o, *lse) in place (d values). Either may be empty
 * (lse = -INFINITY). Cannot fail. */
void kst_attn_merge(float *o, float *lse, const float *o2, float lse2, size_t d);
/* sum of w[0..n) in double: eight running sums (element j in sum j % 8) added pairwise at the
 * end, the same bits with and without AVX2 */
double kst_kv_sum(const float *w, size_t n);
/* The k best of w[0..n): tw[0..r) their values, best first, tp their indices, r = min(k, n)
 * returned (ties: the first seen first), the list that inserting them one at a time into a
 * sorted list gives. Where the CPU has AVX2 and n >= 4 k (no NaN in w), only the values above a
 * threshold are tried, the threshold found by bisection with counts of 8 values at a time, so
 * that a scan whose values rise (each one a new best) costs no more than a random one. */
size_t kst_kv_top(const float *w, size_t n, size_t k, float *tw, uint32_t *tp);

/* Merges unnormalized sums into (o, *lse): v (d) = sum of w_j v_j and s = sum of w_j > 0, the
 * weights w_j = exp(s_j - mx) in the frame mx (v is scaled by 1 / s in place). s <= 0: no-op. */
void kst_attn_merge_sum(float *o, float *lse, float *v, double s, float mx, size_t d);

/* The tail estimate's control variate (index/kv.h, kst_kvc_set_tail_cv): the estimate (o, *lse)
 * over the nt keys left out of retrieval, corrected by the parts da (d) and dz of the scores'
 * linear term (the exact sum over those keys less the sample's estimate of it) at slope b = the
 * estimate's weight / nt: in the estimate's frame o = (o + da / nt) / z, *lse += log z, z = 1 +
 * dz / nt; left as it is where z falls outside [1/4, 4] (the linear term then too far from the
 * weights to help). */
void kst_kv_cv_apply(float *o, float *lse, const float *da, double dz, double nt, size_t d);

/* The capped tail estimate (index/kv.h, kst_kvc_attend): each sampled key above tau, the least
 * retrieved score (a key the search missed), also stands for the rest of its ratio rho at tau's
 * weight. kst_kv_cap sums those parts in tau's frame: o = sum (rho - 1) v, s = sum (rho - 1), n
 * the samples given one. A query head's n such samples stand for about n (rho - 1) unsampled
 * keys, a count whose relative noise is 1 / sqrt(n), so the sum is taken down by
 * kst_kv_cap_shrink(n) = n / (n + KST_KV_CAP_K0) when merged. */
#define KST_KV_CAP_K0 4
static inline float kst_kv_cap_shrink(size_t n) { return (float)n / (float)(n + KST_KV_CAP_K0); }
typedef struct {
    float o[512]; /* (head_dim <= 512) */
    double s;
    size_t n;
} kst_kv_cap;
void kst_kv_cap_init(kst_kv_cap *p, size_t d);
/* Counts a sample of weight r1 = rho - 1 and returns 1 where r1 > 0: the caller then adds r1 v
 * to p->o (its rows may be in 8 bits). */
static inline int kst_kv_cap_take(kst_kv_cap *p, float r1) {
    if (!(r1 > 0)) return 0;
    p->s += r1;
    p->n++;
    return 1;
}
/* Merges the parts into (o, *lse), taken down by kst_kv_cap_shrink(p->n); tau: the frame. */
void kst_kv_cap_merge(kst_kv_cap *p, float *o, float *lse, float tau, size_t d);

/* Rotary position embedding (RoPE) moved along: x (d), a query or key already rotated for
 * position t, becomes the same vector rotated for position t + delta. Pair i (i < nf) of x turns
 * by the angle delta * inv_freq[i]:
 *   half (interleaved == 0, transformers' rotate_half: Llama, Gemma, Qwen, Mistral): dimensions
 *     i and i + nf (the first 2 nf dimensions rotate; nf = d / 2 for full rotary);
 *   interleaved (GPT-J, Meta's original Llama code): dimensions 2 i and 2 i + 1.
 * inv_freq is what the model multiplies positions by, its RoPE scaling (linear, YaRN, NTK,
 * Llama 3) included; the dimensions past 2 nf are left as they are. The angles are taken in
 * double, so a shift of a million positions keeps float32's precision. */
void kst_rope_shift(float *x, size_t d, const float *inv_freq, size_t nf, int interleaved, double delta);
/* The same in two parts, for many vectors moved by one delta: cs (2 nf) = cos and sin of
 * delta * inv_freq[i] (interleaved), then the rotation of x by them. */
void kst_rope_angles(double *cs, const float *inv_freq, size_t nf, double delta);
void kst_rope_rotate(float *x, size_t d, const double *cs, size_t nf, int interleaved);

#endif
