/* kv_q8t.h - a block of key and value rows in 8 bits, laid out for 8-bit dot products (AVX-512
 * VNNI's vpdpbusd), scored and summed for the G query heads of a GQA group at once: the evenly
 * spaced tail sample's table on the CPU with tail_q8 (index/kv.h, kst_kvc_set_tail_q8).
 *
 * Rows are quantized as kst_kv_q8 does (per row: x ~ q * s, s = max |x| / 127, q in -127..127).
 * A block of n rows (n rounded up to 16: KST_Q8T_ROWS(n)) keeps
 *   keys    K8 (KST_Q8T_ROWS(n) * d bytes): rows in fours of bytes, 16 rows at a time: row j's
 *           bytes 4t..4t+3 at ((j / 16) * (d / 4) + t) * 64 + (j % 16) * 4;
 *           ks[j] its scale, ksum[j] = sum_i q[j][i];
 *   values  V8 (the same size): in slabs of 64 dims (the last one d % 64 wide, w_c), each the
 *           rows in fours, interleaved: row j's byte i at 64 c KST_Q8T_ROWS(n) + (j / 4) 4 w_c +
 *           (i % 64) 4 + j % 4, c = i / 64; vs[j] its scale.
 * Padding rows are zeros with scales 0. d must be a multiple of 4, at most 512.
 *
 * Scores. Each query is rounded to 8 bits as a row is (q ~ qq * qs) and offset by 128 to unsigned
 * bytes, so that S[g n + j] = (float)(sum_i (qq_i + 128) q[j][i] - 128 ksum[j]) * ks[j] * (scale *
 * qs): the integer sum is exact, so the AVX-512 VNNI path and the plain C one give the same bits.
 *
 * Weighted value sums. For query g, p_j = W[g n + j] vs[j] is rounded to a byte relative to the
 * largest, u_j = (int)(p_j (255 / P) + 0.5), P = max_j p_j, and O[g d + i] = (float)(sum_j u_j
 * q[j][i]) * (P / 255): the value rows' weighted sum with each weight w_j off by at most P / 510 /
 * vs_j. The u_j (wq, (G, KST_Q8T_ROWS(n)) bytes) and P / 255 (wsc, G) are returned so that one
 * row's term can be taken out again exactly as it went in. P = 0: O = 0; a weight or scale not
 * finite: O is NaN. */
#ifndef KST_CORE_KV_Q8T_H
#define KST_CORE_KV_Q8T_H

#include <stddef.h>
#include <stdint.h>

#define KST_Q8T_ROWS(n) (((n) + 15) / 16 * 16)

/* Row j of a block of n rows from float32 (f16 == 0) or float16 rows of d values. */
void kst_q8t_put(int8_t *K8, float *ks, int32_t *ksum, int8_t *V8, float *vs, size_t j, size_t n,
                 const void *krow, const void *vrow, int f16, size_t d);
/* Rows n .. KST_Q8T_ROWS(n) - 1 made padding. */
void kst_q8t_pad(int8_t *K8, float *ks, int32_t *ksum, int8_t *V8, float *vs, size_t n, size_t d);

/* S (G, n) = scale <Q_g, k_j> as above, for the G queries Q (G, d); qb: scratch of G * d bytes. */
void kst_q8t_scores(float *S, const float *Q, size_t G, const int8_t *K8, const float *ks, const int32_t *ksum,
                    size_t n, size_t d, float scale, uint8_t *qb);
/* O (G, d) = sum_j W[g n + j] v_j as above (W >= 0); wq, wsc out. */
void kst_q8t_wsum(float *O, const float *W, size_t G, const int8_t *V8, const float *vs, size_t n, size_t d,
                  uint8_t *wq, float *wsc);
/* out (d) += w q[j] (value row j of a block of n, unscaled: w carries vs[j] or u_j wsc). */
void kst_q8t_vaxpy(float *out, float w, const int8_t *V8, size_t j, size_t n, size_t d);

/* Tests: 0 makes every call take the plain C path where the CPU has AVX-512 VNNI (the same bits
 * either way), 1 restores it. Not thread-safe against calls running. */
void kst_q8t_set_simd(int on);

#endif
