/* kv_scache.h - the clustered tail's sample cache (kst_kvc_set_tail_cache; index/kv.h): the
 * shared sample of a KV head (kv_tclust.h) planned from earlier steps' queries instead of this
 * step's, so that its rows can sit where the step's partial attention runs (the GPU) before the
 * step starts, and a step copies there only the rows a plan adds.
 *
 * State, one per KV head: cluster c keeps its first m_c members (of its uniformly random order)
 * in slots of a table of `cap` rows, in chunks of `ch` rows. The plan (kst_kvsc_plan_make) is made
 * from the last two steps' centroid scores pushed (kst_kvsc_push): each of their 2G query rows'
 * allocations len_c exp(temp cs_gc) normalized, averaged, water-filled (kst_kvtc_fill) into n_c.
 * Held (kst_kvsc_plan_apply), m_c becomes max(m_c, n_c): the rows a plan adds, at most upmax a
 * step once the table holds as many rows as a plan (each short cluster then gets that share of
 * its shortfall). Above cap, clusters holding more than their n_c are cut back towards it, a
 * clock hand going round them. A key that joins a cluster at a place < m_c (kst_kvtc_add's
 * inside-out shuffle) takes the slot of the member it pushes out of the prefix (kst_kvsc_joined).
 * In kst_kvc_attend the plan a step holds afterwards is made while it runs, from the two steps
 * before it (the first plan from the first step's own scores).
 *
 * Estimate, query head q, retrieved ids R: every held row weighted len_c / m_c, those in R left
 * out: sum over S \ R of (len_c / m_c) exp(s) (and times v). The held prefix is a uniformly random
 * subset of its cluster whose size was fixed before this query (by earlier plans and the
 * clusters' sizes), so this is the Horvitz-Thompson estimate of kv_tclust.h, unbiased for the
 * indexed keys outside R; a cluster held whole is exact; a cluster holding no row is left out, as
 * one the per-step plan gives no sample. On SmolLM2's heads at 32K, 4,096 samples (a table of
 * 8,192): 6.7e-3 mean output error against 7.7e-3 for the per-step shared plan with tier 256,
 * about 100 rows a KV head copied a step (bench README, round 20).
 *
 * The table is scored in items, one per (query head, chunk), as the GPU's tail kernel lays them
 * out (kv_cuda.h, KST_KVGPU_TT_TOP): the chunk's best weighted score mx (-inf: no row held), the
 * sum of exp(s + lw - mx) over its rows outside its KST_KVSC_TOP best, their weighted value sum
 * (d), the best rows (int32 bits) and their weights, then their weighted value sum (d), where
 * s = scale <q, k> and lw = log(len_c / m_c). kst_kvsc_item makes them on the CPU,
 * kst_kvsc_finish turns a head's items into its estimate. */
#ifndef KST_INDEX_KV_SCACHE_H
#define KST_INDEX_KV_SCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "index/kv_tclust.h"

#define KST_KVSC_TOP 32           /* best rows an item carries (== KST_KVGPU_TT_TOP) */
#define KST_KVSC_CH 1024          /* rows a chunk holds at most (the GPU scores a chunk in one block) */
#define KST_KVSC_NC 16            /* chunks a table holds at most: KST_KVSC_NC * KST_KVSC_CH slots */
#define KST_KVSC_FREE UINT32_MAX  /* a free slot's node */
#define KST_KVSC_DMAX 512         /* head dim at most, with q8 */
/* An item's floats for head dim d: mx, sum, sums (d), rows, weights, the best rows' sums (d). */
#define KST_KVSC_STRIDE(d) (2 * (d) + 2 + 2 * KST_KVSC_TOP)

typedef struct kst_kvsc {
    size_t C, cap, ch, nc; /* clusters (0: not set up), slots, rows a chunk, chunks */
    size_t used;           /* slots held: sum m_c */
    size_t G;              /* query heads of the KV head */
    uint32_t *m;           /* (C) members held a cluster: its prefix */
    float *lw;             /* (C) log(len_c / m_c), -inf where m_c = 0 */
    float *iw;             /* (C) m_c / len_c (exp(-lw)), 0 where m_c = 0 */
    uint32_t *key;         /* (cap) node in each slot, KST_KVSC_FREE */
    int32_t *cid;          /* (cap) its cluster, -1 for a free slot */
    int32_t *slot;         /* (ncap) slot of each node, -1 */
    size_t ncap;
    uint32_t *fr;          /* (cap) free slots, a stack of nfr */
    size_t nfr;
    uint32_t *dirty;       /* (cap) slots changed since kst_kvsc_take_dirty, nd of them */
    uint8_t *dmark;        /* (cap) */
    size_t nd;
    float *hist;           /* (2 G, C) centroid score rows: the last step's, the one before */
    size_t nh;             /* steps in hist (0..2) */
    float *al;             /* (2, C) each step's rows' normalized allocations summed (plan_make),
                              kept while the clusters' sizes (their nodes, ana) and temp hold */
    size_t ana[2];         /* T->na they were made at (SIZE_MAX: not made) */
    float atemp[2];
    uint32_t *chg;         /* (2 C) kst_kvsc_plan_apply's changes: cluster, its new prefix */
    uint32_t *xs;          /* (2 cap) their nodes, dropped or held */
    size_t hand;           /* the eviction clock */
    size_t na;             /* nodes of the clusters seen (kst_kvsc_joined) */
    size_t added;          /* rows the plans added since set up (uploads) */
    int ready;             /* 1 once a plan is held */
    int made;              /* 1: a plan made (kst_kvsc_plan_make) and not applied yet */
    int q8;                /* set by the owner after kst_kvsc_setup (tail_cache_q8): the table's rows
                              held in 8 bits (kst_kv_q8, as the GPU's table holds them), so
                              kst_kvsc_item and kst_kvsc_finish score and sum each held row in 8
                              bits, quantized as read (the retrieved rows' scores too, not rs;
                              d <= KST_KVSC_DMAX) */
    kst_kvtc_group A;      /* the plan */
    kst_kvtc_group An;     /* the next plan, made while A is held (kst_kvsc_plan_make_next) */
    int made_n;            /* 1: An made and not taken yet */
} kst_kvsc;

/* Sets S up empty for T's clusters (T->C > 0), G query heads and a table of at least cap slots
 * (rounded up to whole chunks of at most KST_KVSC_CH rows, at most KST_KVSC_NC chunks), every node
 * assigned so far seen. */
int kst_kvsc_setup(kst_kvsc *S, const kst_kvtc *T, size_t G, size_t cap, kst_error *err);
void kst_kvsc_free(kst_kvsc *S);
size_t kst_kvsc_bytes(const kst_kvsc *S);

/* After kst_kvtc_add assigned nodes S->na .. T->na - 1: a cluster where one joined inside its
 * prefix has its slots brought in line, and every cluster's weight made anew (its size grew). */
int kst_kvsc_joined(kst_kvsc *S, const kst_kvtc *T, kst_error *err);

/* A step's centroid scores cs (G, C; kst_kvtc_scores) in: they and the step before's are what the
 * next plan is made from. */
void kst_kvsc_push(kst_kvsc *S, const float *cs);
/* The plan of the last two steps' heads pushed (budget samples, at most S->cap; temp as
 * kst_kvtc_group_plan: each row's allocation len_c exp(temp cs_gc) normalized, the rows averaged,
 * water-filled by kst_kvtc_fill) made into S->A, nothing held changed yet (so that it can be made
 * while the step's heads still read the cache). No plan (S->made 0) before a push. */
int kst_kvsc_plan_make(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, kst_error *err);
/* kst_kvsc_plan_make's plan made into S->An instead, so that it can be made (after the step's push)
 * while another thread holds the plan made before (kst_kvsc_plan_apply reads none of what this
 * reads or writes: the scores pushed, the allocations, S->An); kst_kvsc_plan_take_next, once
 * both are done, makes it S's plan (S->made 1). */
int kst_kvsc_plan_make_next(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, kst_error *err);
void kst_kvsc_plan_take_next(kst_kvsc *S);
/* The plan made held, as above, adding at most upmax rows, or as many as the table holds fewer
 * than the plan's samples (where it wants more, each cluster short of its plan gets that share of
 * its shortfall: the estimate stays unbiased, with fewer rows). */
void kst_kvsc_plan_apply(kst_kvsc *S, const kst_kvtc *T, size_t upmax);
/* Push, make and hold, without a bound. */
int kst_kvsc_plan(kst_kvsc *S, const kst_kvtc *T, const float *cs, float temp, size_t budget, kst_error *err);

/* The slots changed since the last call (their node, cluster and rows to copy), into out (at
 * least S->cap entries; NULL: only forgotten); returns their count. */
size_t kst_kvsc_take_dirty(kst_kvsc *S, uint32_t *out);

/* Chunk cc's items (above) for the G queries Q (G, d): head g's at it + g * gst (st >=
 * KST_KVSC_STRIDE(d) floats each; gst = S->nc * st lays them out as the GPU does, head by head).
 * K, V: the KV head's rows, node i at row row0 + i. sc: scratch of G S->ch floats. */
void kst_kvsc_item(const kst_kvsc *S, size_t cc, const float *Q, size_t G, const void *K, const void *V, int f16,
                   size_t d, float scale, size_t row0, float *it, size_t gst, float *sc);

/* Head q's estimate (o, *lse; o = 0, *lse = -inf where nothing is left) from its S->nc items
 * (it + cc * st) once its retrieval attended the m ids rid (distinct; rs: their unscaled scores
 * <q, k>, e.g. the search's exact re-scoring, or NULL: made from the keys): per chunk the items'
 * sums less the terms of the retrieved rows held (a best row is skipped; another's weight made
 * anew from its score, as the items' weights are), plus the best rows not retrieved; where the
 * retrieved outside the best hold all but KST_KVSC_KEEP of the sum (the difference would lose
 * precision: the items' float sums are good to ~1e-6 of the sum), the chunk's rows outside R are
 * scored and summed anew. tau (scaled, as s; INFINITY: none): a best row outside R whose s is
 * above it is a key the retrieval should have found, and is not weighted len_c / m_c (one such row
 * weighted so put single queries' errors at 0.1-0.2 on SmolLM2 at 128K): with cap 0 it is weighted
 * 1 (attended once); with cap 1 (kv.h's capped estimate, the library's default) it weighs exp(s) +
 * lambda (len_c / m_c - 1) exp(tau), itself once and the rest of its ratio at tau's weight, lambda
 * = kst_kv_cap_shrink(na) for the na such rows with len_c > m_c, as the evenly spaced tail's
 * samples above tau do. sl: scratch of 3 m uint32, sc: of S->ch floats. Returns the
 * rows that stood for the rest (held, outside R). */
#define KST_KVSC_KEEP (1.0 / 32)
size_t kst_kvsc_finish(const kst_kvsc *S, const float *it, size_t st, const float *q, const void *K, const void *V,
                       int f16, size_t d, float scale, size_t row0, const uint32_t *rid, const float *rs, size_t m,
                       float tau, int cap, uint32_t *sl, float *sc, float *o, float *lse);

/* The adaptive budget's signal (kv.h, opts.widen): the best rows of a query head's items (it,
 * S->nc of them st floats apart; each chunk's KST_KVSC_TOP) outside the m retrieved ids rid, each
 * as x = its weighted score s + lw (the log of the softmax mass it stands for, in the items'
 * frame) and lk = lw (the log of the keys it stands for, len_c / m_c), into x and lk (at least
 * S->nc * KST_KVSC_TOP each); returns their count. */
size_t kst_kvsc_best(const kst_kvsc *S, const float *it, size_t st, size_t d, const uint32_t *rid, size_t m, float *x,
                     float *lk);

#endif
