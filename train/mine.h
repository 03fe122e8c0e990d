/* mine.h - hard negatives for training triples: each judged query is searched in an index's
 * first stage (BM25 or dense, or both fused) and its best-ranked documents that the qrels do not
 * mark relevant become negatives for each of its positives.
 *
 * Output, one triple per line (tab-separated, no header), the input of `kestrel teach`, which
 * scores it into a Hofstaetter teacher file, and of any tool that reads MS MARCO's id triples:
 *   qid<TAB>pos_pid<TAB>neg_pid
 * ids as in the queries file, the qrels and the index. For each query, lines come positive by
 * positive (qrels order), and for each positive the negatives in rank order (best first). */
#ifndef KST_TRAIN_MINE_H
#define KST_TRAIN_MINE_H

#include <stddef.h>

#include "core/error.h"

typedef struct kst_mine_opts {
    unsigned stages;     /* KST_STAGE_BM25 and/or KST_STAGE_DENSE (rank/search.h); 0: the
                            index's default first stage (dense when it has a model, else BM25) */
    size_t negatives;    /* negatives per (query, positive); default 8 */
    size_t skip_top;     /* hits ranked 1..skip_top are never negatives (likely unjudged
                            positives; "skip the top K" as in dense retrieval training); 0 */
    int relevance_level; /* qrels judgments >= this are positives, never negatives; 1 */
    int quiet;           /* no progress bar */
} kst_mine_opts;

kst_mine_opts kst_mine_opts_default(void);

typedef struct kst_mine_stats {
    size_t queries;        /* judged queries with text, searched */
    size_t triples;        /* lines written */
    size_t no_positive;    /* judged queries without a judgment >= relevance_level (skipped) */
    size_t no_text;        /* qrels queries missing from the queries file (skipped) */
    size_t short_lists;    /* (query, positive) pairs that got fewer than `negatives` negatives */
} kst_mine_stats;

/* Mines `out_path` from the index at index_dir, the queries file (qid<TAB>text or BEIR JSONL)
 * and the qrels (TREC or BEIR TSV). Each query is searched for skip_top + negatives + (its
 * judged positives) hits. The output is written to a temporary file and renamed into place, so
 * a failure leaves no partial file. Errors: the index's (KST_ERR_INVALID when the dense stage is
 * asked of an index without a dense model), the qrels' and queries' (file and line), KST_ERR_IO
 * for the output, KST_ERR_NOTFOUND when no query of the qrels has text. stats may be NULL. */
int kst_mine(const char *index_dir, const char *queries_path, const char *qrels_path,
             const char *out_path, const kst_mine_opts *opts, kst_mine_stats *stats,
             kst_error *err);

#endif
