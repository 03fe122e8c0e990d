/* kv_tclust.h - the clustered tail estimate of the KV cache (kst_kv_opts.tail_clusters; index/kv.h,
 * kst_kvc_attend): the attention over the indexed keys that retrieval left out, estimated from a
 * sample drawn each step where that query's attention mass is.
 *
 * One per KV head: its indexed keys partitioned by k-means (FAISS) into C clusters at build time,
 * keys indexed later assigned to the nearest centroid. Each cluster keeps its members in a
 * uniformly random order (an inside-out shuffle as they join), so its first members form a
 * uniform sample of it.
 *
 * A decode step's query q, after retrieval attended the keys R exactly:
 * - plan: cluster c holds r_c keys outside R and gets n_c = r_c w_c / sum w samples of the budget
 *   B (water-filled: a cluster whose share reaches r_c is taken whole, the rest shared again;
 *   rounded by cumulative sums, so sum n_c = min(B, sum r_c) and |n_c - share| < 1), with
 *   w_c = r_c exp(temp * scale * <q, centroid_c>). temp 0 is proportional allocation; 1 would
 *   sample a cluster as if its keys all scored its centroid's score; 0.7 (the default; 0.5-0.8
 *   within 7% of each other on SmolLM2's heads) hedges the centroid's error (bench README,
 *   round 18);
 * - estimate: in each cluster its first n_c members outside R, each weighted r_c / n_c: an
 *   unbiased estimate of the cluster's sum of exp(s) v and exp(s), stratified by cluster, merged
 *   as one partial (o, lse) whose softmax weights are exp(s + log(r_c / n_c)).
 * A cluster taken whole is exact, so with B >= the keys outside R the estimate is exact. */
#ifndef KST_INDEX_KV_TCLUST_H
#define KST_INDEX_KV_TCLUST_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct kst_kvtc {
    size_t C, d;      /* clusters (0: not built), head dim */
    size_t na;        /* nodes assigned: 0 .. na - 1 */
    float *cent;      /* (C, d) centroids (of float16 keys: float16 values) */
    float *cent_t;    /* (d, C) the same, transposed (a query's scores in one pass) */
    float *hn2;       /* (C) |centroid|^2 / 2 (nearest centroid by <k, c> - |c|^2 / 2) */
    uint32_t *of;     /* (ncap) cluster of each assigned node */
    uint32_t *pos;    /* (ncap) its place in its cluster's order (mem[of[x]][pos[x]] == x) */
    size_t ncap;
    uint32_t **mem;   /* (C) members, in a uniformly random order */
    uint32_t *len, *mcap;
    uint64_t rng;     /* the shuffles' state */
} kst_kvtc;

/* Clusters the n keys (rows of K, float16 bits or float32, d wide; node i = row i) into C
 * clusters (fewer where n < 16 C: n / 16, at least 1), k-means (FAISS, 8 iterations over up to
 * 64 keys a cluster, evenly spaced), and assigns every key. Replaces T's clusters. */
int kst_kvtc_build(kst_kvtc *T, const void *K, int f16, size_t n, size_t d, size_t C, uint64_t seed,
                   kst_error *err);
/* Assigns nodes T->na .. n - 1 (rows of K) to their nearest centroids (a no-op when T is not
 * built). The scoring runs on the calling thread's OpenMP team. */
int kst_kvtc_add(kst_kvtc *T, const void *K, int f16, size_t n, kst_error *err);
void kst_kvtc_free(kst_kvtc *T);
/* Heap bytes T holds. */
size_t kst_kvtc_bytes(const kst_kvtc *T);

/* The centroids' scaled scores S (G, C) = scale * <Q_g, centroid_c> of G queries Q (G, d) (the
 * query heads of a KV head: the centroids read once for all of them). */
void kst_kvtc_scores(const kst_kvtc *T, const float *Q, size_t G, float scale, float *S);
/* The plan (above) for a query whose centroid scores are cs (C, kst_kvtc_scores), with the m
 * attended nodes rid (distinct, any order; nodes >= T->na ignored): ns (C) the samples per
 * cluster, rc (C) the keys outside R per cluster; returns the samples in all. sc: scratch of 2 C
 * floats. */
size_t kst_kvtc_plan(const kst_kvtc *T, const float *cs, float temp, const uint32_t *rid, size_t m, size_t budget,
                     uint32_t *ns, uint32_t *rc, float *sc);
/* The water-filling and rounding of the plans above from weights w (C; cluster c's, its keys
 * included; destroyed): budget shared in proportion to w, a cluster whose share reaches cap[c]
 * taken whole and the rest shared again; rounded by cumulative sums (sum ns = min(budget, keys of
 * weighted clusters), |ns_c - share_c| < 1). sh: scratch of C floats. Returns the samples. */
size_t kst_kvtc_fill(size_t C, const uint32_t *cap, float *w, float *sh, size_t budget, uint32_t *ns);
/* The estimate (above) from a plan: (o, *lse) the partial over the sampled keys with their
 * weights (o = 0, *lse = -inf when none); K, V the head's rows, node i at row row0 + i; mark
 * (>= T->na bytes): nonzero for the attended nodes (the plan's rid). tau (scaled, INFINITY: none):
 * a sample scoring above it (a key the retrieval should have found) is not weighted rc / ns: with
 * cap 0 it is weighted 1; with cap 1 (kv.h's capped estimate, the library's default) it weighs
 * exp(s) + lambda (rc / ns - 1) exp(tau), itself once and the rest of its ratio at tau's weight,
 * lambda = kst_kv_cap_shrink(na) for the na such samples with rc > ns.
 * rows, s, sc: scratch of the plan's total (int64, float, float). Returns the keys sampled. */
size_t kst_kvtc_partial(const kst_kvtc *T, const float *q, const void *K, const void *V, int f16, size_t d,
                        float scale, size_t row0, const uint8_t *mark, const uint32_t *ns,
                        const uint32_t *rc, float tau, int cap, int64_t *rows, float *s, float *sc, float *o,
                        float *lse);


/* One sample a KV head, shared by its G query heads (kst_kvc_set_tail_share): read once, scored
 * for each head, so that a step reads 1/G of the rows the per-head samples read.
 * - plan (before retrieval): cluster c gets n_c of the budget (water-filled and rounded as
 *   above; at most its keys) in proportion to len_c times the mixture over the heads of
 *   exp(temp * cs_gc) normalized per head: the heads' own allocations averaged, so that every
 *   head gets at least 1/G of the samples it would have drawn alone where its attention is.
 * - gather (before retrieval too, in pieces): the sample is each planned cluster's first n_c
 *   members, each weighted len_c / n_c (its cluster's keys over its samples); per piece and head
 *   the weighted sums of exp(s) and exp(s) V over its clusters' samples, in doubles.
 * - finish, for head g once its retrieval attended the ids R: the pieces merged, less the terms
 *   of the sampled members of R. A member of a uniformly random order lies in its cluster's
 *   first n_c places with probability n_c / len_c whatever R is, so the sum over the sampled
 *   keys outside R, each weighted len_c / n_c, is an unbiased (Horvitz-Thompson) estimate of the
 *   sum over the indexed keys outside R; a cluster taken whole is exact. Where the subtraction
 *   would leave under 1e-3 of the sums (the float rounding of a subtracted term, ~2e-7 |its log
 *   weight| of it, would then matter), the head's estimate
 *   is summed anew from its samples outside R. */
#define KST_KVTC_PIECES 16
typedef struct kst_kvtc_group {
    size_t G, d, C;   /* query heads, head dim, clusters (the arrays' sizes) */
    size_t ni, tot;   /* clusters sampled (items), samples in all */
    size_t nmax;      /* the most samples a cluster gets */
    size_t pmax;      /* the most samples a piece holds (the scratch sizes below) */
    uint32_t *ns;     /* (C) the plan */
    uint32_t *item;   /* (ni) cluster of each item, ascending */
    size_t pb[KST_KVTC_PIECES + 1]; /* piece p: items pb[p] .. pb[p + 1] - 1 (about tot / PIECES
                                       samples each: a cluster is not split) */
    double *pt;       /* (KST_KVTC_PIECES, G, d + 2): each piece's sums per head: max score mx,
                         sum of w = (len_c / n_c) exp(s - mx), sum of w V */
    float *x;         /* (C) scratch of the plan */
    size_t gcap, dcap;
} kst_kvtc_group;

/* Plans the KV head's shared sample from its G heads' centroid scores cs (G, C; kst_kvtc_scores)
 * into A (grown as needed); returns KST_OK or KST_ERR_NOMEM. A->tot: the samples in all. */
int kst_kvtc_group_plan(const kst_kvtc *T, kst_kvtc_group *A, const float *cs, size_t G, float temp,
                        size_t budget, kst_error *err);
/* Gathers piece p (< KST_KVTC_PIECES: items A->pb[p] .. A->pb[p + 1] - 1) of A's plan
 * for the queries Q (G, d): K, V the head's rows, node i at row row0 + i. The pieces of one plan
 * may be gathered by several threads at once. sc: scratch of KST_KVTC_GATHER_SC(A) floats. */
#define KST_KVTC_GATHER_SC(A) (3 * (A)->pmax + ((A)->G < 64 ? (A)->G : 64) * (16 + (A)->d))
void kst_kvtc_group_gather(const kst_kvtc *T, kst_kvtc_group *A, size_t p, const float *Q, const void *K,
                           const void *V, int f16, float scale, size_t row0, float *sc);
/* Head g's estimate (above) once every piece is gathered: (o, *lse) (o = 0, *lse = -inf where
 * nothing is left; o untouched where T has no clusters); rid: the m ids it attended (distinct;
 * ids >= T->na ignored); mark (>= T->na bytes): nonzero for them (read only where the estimate
 * is summed anew); sc: scratch of KST_KVTC_FINISH_SC(A) floats. Returns the samples that stood
 * for the rest (those outside R). */
#define KST_KVTC_FINISH_SC(A) (3 * (A)->tot + 16 + (A)->d)
size_t kst_kvtc_group_finish(const kst_kvtc *T, const kst_kvtc_group *A, size_t g, const float *q,
                             const void *K, const void *V, int f16, float scale, size_t row0,
                             const uint32_t *rid, size_t m, const uint8_t *mark, float *sc, float *o,
                             float *lse);
void kst_kvtc_group_free(kst_kvtc_group *A);

#endif
