/* teach.h - teacher score files from a cross-encoder: (query, positive, negative) triples scored
 * locally (a Kestrel cross-encoder) or remotely (an HTTP reranking service speaking the
 * text-embeddings-inference /rerank JSON API), written as a Hofstaetter teacher file.
 *
 * Input triples (one per line, streamed; blank lines skipped):
 *   with queries and collection maps  qid<TAB>pos_pid<TAB>neg_pid
 *   without                           query<TAB>positive<TAB>negative (texts)
 * Output (same order as the input):
 *   ids   pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid    (Hofstaetter)
 *   texts pos_score<TAB>neg_score<TAB>query<TAB>positive<TAB>negative (matchmaker text form)
 * Scores are the cross-encoder's raw logits (remote: the service's raw scores, asked for with
 * "raw_scores": true). The output is written to a temporary file beside it and renamed into place
 * at the end, so a failure (bad line, server error) leaves no output file and never a partial one.
 *
 * Remote protocol (text-embeddings-inference, POST <url>, "/rerank" appended unless the URL ends
 * with it): request {"query": q, "texts": [t0, t1, ...], "raw_scores": true, "truncate": true};
 * answer [{"index": i, "score": s}, ...], one entry per text, any order. Triples are grouped by
 * query within each chunk of the input, so one request carries every passage of one query (up to
 * batch_size texts). One libcurl handle is reused, so the connection stays open across requests.
 * Connection errors, time-outs and HTTP 5xx / 429 answers are retried with exponential back-off
 * (retry_wait, doubled each time, at most 30 s) up to `retries` times; any other status, or an
 * answer that is not the format above (not JSON, a missing or repeated index, a score that is not
 * a finite number, the wrong count) fails at once with a message naming the URL and what came. */
#ifndef KST_TRAIN_TEACH_H
#define KST_TRAIN_TEACH_H

#include <stddef.h>

#include "core/error.h"

typedef struct kst_teach_opts {
    const char *model_dir;      /* local cross-encoder folder, or */
    const char *teacher_url;    /* a /rerank service */
    const char *triples_path;   /* any kst_stream input */
    const char *queries_path, *collection_path; /* both or neither */
    const char *out_path;
    size_t batch_size;          /* pairs per forward pass / texts per request (32) */
    size_t chunk;               /* triples read and scored per round (2048) */
    size_t max_len;             /* local: tokens per pair (0: the model's) */
    int num_threads;            /* local: 0 = all cores */
    double timeout_s;           /* remote: whole-request time-out (120) */
    double connect_timeout_s;   /* remote: (10) */
    int retries;                /* remote: retries per request (5) */
    double retry_wait_s;        /* remote: first back-off (0.5) */
    int quiet;                  /* no progress bar */
} kst_teach_opts;

kst_teach_opts kst_teach_opts_default(void);

typedef struct kst_teach_result {
    size_t triples, requests, retries;
    double seconds; /* from the first triple read to the output renamed (model loading excluded) */
} kst_teach_result;

/* Scores every triple and writes opts->out_path atomically (see above). Errors name the file and
 * line of a bad triple, an unknown id, or the URL and what it answered. */
int kst_teach(const kst_teach_opts *opts, kst_teach_result *res, kst_error *err);

/* ------------------------------------------------------------------------------------------ */
/* the /rerank client on its own */

typedef struct kst_rerank_client kst_rerank_client;

/* Prepares a client for url (nothing is sent yet). Free with kst_rerank_client_close. */
int kst_rerank_client_open(const char *url, const kst_teach_opts *opts, kst_rerank_client **out,
                           kst_error *err);
/* Scores query against n texts (lengths in bytes) into out (n), with the retries above. */
int kst_rerank_score(kst_rerank_client *c, const char *query, size_t qlen,
                     const char *const *texts, const size_t *lens, size_t n, float *out,
                     kst_error *err);
/* Requests and retries so far. */
void kst_rerank_client_counts(const kst_rerank_client *c, size_t *requests, size_t *retries);
/* NULL is a no-op. */
void kst_rerank_client_close(kst_rerank_client *c);

#endif
