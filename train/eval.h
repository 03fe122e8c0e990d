/* eval.h - retrieval quality of a student while it trains: exhaustive search of a small held-out
 * corpus with the encoder's current weights, scored by trec_eval's nDCG@10 and MRR@10.
 *
 * The corpus, queries and qrels are read once (kst_train_eval_open) and kept in memory; each
 * kst_train_eval_run encodes every document and query with the encoder as it is then (inference
 * mode: no dropout) and ranks all documents for every query: dense students by the dot product
 * of their output vectors (cosine for normalising models, as the index's inner-product search),
 * ColBERT students by MaxSim over the document's kept tokens. Rankings follow trec_eval: score
 * descending, ties by docid descending; metrics are rank/metrics.h's ndcg_cut.10 and
 * recip_rank cut at 10, averaged over the queries that have judgments and text. Meant for
 * corpora of up to some ten thousand documents (every document is encoded at every run). */
#ifndef KST_TRAIN_EVAL_H
#define KST_TRAIN_EVAL_H

#include <stddef.h>

#include "core/error.h"
#include "encoders/encoder.h"

typedef struct kst_train_eval kst_train_eval;

typedef struct kst_train_eval_result {
    double ndcg10, mrr10;
    size_t queries, docs;
} kst_train_eval_result;

/* Reads the queries (qid<TAB>text or BEIR queries.jsonl), the qrels (TREC or BEIR TSV, see
 * rank/trec.h) and the corpus (TSV, BEIR or Pyserini; a title is joined to the text with one
 * space, as the index does). Only queries with a judgment are kept. Errors name the file and
 * line (KST_ERR_FORMAT), or say that no query of the queries file is judged in the qrels
 * (KST_ERR_INVALID), or that the corpus is empty. *out is freed with kst_train_eval_free. */
int kst_train_eval_open(const char *queries, const char *qrels, const char *corpus,
                        kst_train_eval **out, kst_error *err);

/* Encodes and ranks with e's current weights (query_max_len / doc_max_len: 0 for the model's)
 * and fills *res. Fails only for memory or an encoder error. */
int kst_train_eval_run(kst_train_eval *ev, kst_encoder *e, size_t query_max_len,
                       size_t doc_max_len, kst_train_eval_result *res, kst_error *err);

/* NULL is a no-op. */
void kst_train_eval_free(kst_train_eval *ev);

#endif
