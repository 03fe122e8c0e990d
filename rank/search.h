/* search.h - the staged query pipeline: first stage (dense ANN, BM25, or both fused by
 * reciprocal rank fusion), ColBERT MaxSim re-ranking, cross-encoder re-ranking. */
#ifndef KST_RANK_SEARCH_H
#define KST_RANK_SEARCH_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "rank/engine.h"

enum { KST_STAGE_DENSE = 1, KST_STAGE_BM25 = 2, KST_STAGE_MAXSIM = 4, KST_STAGE_CROSS = 8 };

typedef struct kst_search_cfg {
    unsigned stages;   /* KST_STAGE_* bits; 0: every stage the index has models for, BM25 fused
                          in only for a BM25-only index */
    size_t k;          /* hits returned (10) */
    size_t dense_n;    /* ANN candidates (100) */
    size_t bm25_n;     /* BM25 candidates (100) */
    size_t maxsim_m;   /* candidates re-ranked by MaxSim (100) */
    size_t cross_k;    /* candidates re-ranked by the cross-encoder (20) */
    int nprobe;        /* IVF lists probed (16) */
    int ef_search;     /* HNSW candidate list (64) */
    double rrf_k;      /* reciprocal rank fusion constant (60) */
    int ids_only;      /* 1: hits carry ids and scores, no title or text (0) */
} kst_search_cfg;

kst_search_cfg kst_search_cfg_default(void);

typedef struct kst_rank_hit {
    int64_t id;        /* internal id */
    char *ext_id, *title, *text; /* title NULL when the document has none */
    double score;      /* the score of the last stage that ranked it */
    unsigned stage;    /* that stage (KST_STAGE_*; dense|bm25 for a fused first stage) */
} kst_rank_hit;

typedef struct kst_rank_hits {
    size_t n;
    kst_rank_hit *hit; /* (n) best first */
} kst_rank_hits;

/* Runs the pipeline for one query. Thread-safe: any number of threads may search one kst_ix
 * (opened read-only or not, while no write runs through that same handle). *out is set on
 * success (possibly with 0 hits); free with kst_rank_hits_free. Asking for a stage the index
 * has no model for is KST_ERR_INVALID naming the missing model. */
int kst_rank_search(kst_ix *ix, const char *query, size_t qlen, const kst_search_cfg *cfg,
                    kst_rank_hits **out, kst_error *err);
void kst_rank_hits_free(kst_rank_hits *h);

/* The stages kst_rank_search runs for cfg on this index. */
unsigned kst_search_stages(const kst_ix *ix, const kst_search_cfg *cfg);
/* Parses "dense,bm25,maxsim,cross" (any subset, also "+" separated) into KST_STAGE_* bits. */
int kst_search_stages_parse(const char *s, unsigned *out, kst_error *err);

#endif
