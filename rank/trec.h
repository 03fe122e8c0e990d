/* trec.h - TREC evaluation files: qrels (TREC, BEIR TSV, Cranfield) and runs, read and written.
 *
 * Readers follow trec_eval 9.x (usnistgov/trec_eval get_qrels.c, get_trec_results.c,
 * form_res_rels.c), so a file means here what it means to trec_eval:
 * - qrels `qid iter docid rel`, whitespace separated, exactly 4 fields; iter (0, Q0, ...) ignored.
 * - BEIR qrels: a header line `query-id<TAB>corpus-id<TAB>score`, then `qid<TAB>docid<TAB>rel`.
 * - runs `qid Q0 docid rank score tag`; fields after the tag are ignored, as trec_eval does. The
 *   rank field is ignored too: trec_eval re-ranks each query by score, highest first, and breaks
 *   ties by docid in DEscending strcmp order (comp_sim_docno in form_res_rels.c). Runs are kept in
 *   that order.
 * - Lines starting with '#' and blank lines are skipped; "\r\n" ends are accepted. Files may be
 *   gzip-compressed (zlib reads plain files unchanged).
 * Where trec_eval is silently lenient we stop with an error that names the file, the line and
 * what was expected: a relevance that is not an integer (trec_eval's atol would read "1.5" as 1
 * and "x" as 0), a score that is not a finite number, a duplicate (qid, docid) in qrels or in a
 * run (trec_eval 9 also refuses both, "duplicate docs", but only once it evaluates that query).
 *
 * Relevance values are kept as read: negative values (trec_eval: "in the pool but unjudged") are
 * never relevant and have no gain; see metrics.h.
 */
#ifndef KST_RANK_TREC_H
#define KST_RANK_TREC_H

#include <stddef.h>

#include "core/error.h"

/* ------------------------------------------------------------------------------------------ */
/* Qrels */

typedef enum kst_qrels_format {
    KST_QRELS_AUTO = 0,  /* BEIR when the first line is the BEIR header, TREC otherwise */
    KST_QRELS_TREC,      /* qid iter docid rel */
    KST_QRELS_BEIR,      /* header, then qid<TAB>docid<TAB>rel */
    KST_QRELS_CRANFIELD  /* Cranfield's cranqrel: qid docid code; see kst_qrels_read_cranfield */
} kst_qrels_format;

/* Judgments grouped by query. Queries are sorted by qid and each query's judgments by docid
 * (both strcmp order, as trec_eval keeps them). Judgment j of query q is index
 * off[q] <= j < off[q+1]. All strings belong to the qrels. */
typedef struct kst_qrels {
    size_t nq;       /* queries */
    size_t n;        /* judgments */
    char **qids;     /* (nq) */
    size_t *off;     /* (nq + 1) */
    char **docids;   /* (n) */
    int *rel;        /* (n) relevance as read (Cranfield: the gain 5 - code, see below) */
    void *pool;      /* string storage (private) */
} kst_qrels;

/* Reads qrels from `path` (gzip or plain) in the given format. *out is set only on success; free
 * with kst_qrels_free. Errors: KST_ERR_IO (cannot open/read), KST_ERR_FORMAT (names the file, the
 * line and what was expected), KST_ERR_NOMEM. A file with no judgments is KST_ERR_FORMAT. */
int kst_qrels_read(const char *path, kst_qrels_format format, kst_qrels **out, kst_error *err);

/* Reads Cranfield's `cranqrel` (`qid docid code`, single spaces and a trailing space) into graded
 * qrels: gain = 5 - code for codes 1..4 (1 = complete answer -> 4, ..., 4 = minimum interest -> 1)
 * and 0 for the code -1 (judged, not relevant); any other code is KST_ERR_FORMAT. The qids stay as
 * in cranqrel: 1..225, the POSITION of the query in cran.qry (whose own .I numbers run 1, 2, 4,
 * 8, ... 365 with gaps), so the Cranfield queries reader must number queries by position (as
 * ir_datasets does). Same as kst_qrels_read(path, KST_QRELS_CRANFIELD, ...). */
int kst_qrels_read_cranfield(const char *path, kst_qrels **out, kst_error *err);

/* Writes qrels in TREC form (`qid 0 docid rel`, one line per judgment, qrels order) to `path`
 * atomically (temporary file and rename). With kst_qrels_read_cranfield this is the Cranfield
 * converter (also `kestrel eval --qrels cranqrel --qrels-format cranfield --write-qrels OUT`). */
int kst_qrels_write(const kst_qrels *q, const char *path, kst_error *err);

/* Index of `qid` in q->qids, or -1. */
long kst_qrels_find(const kst_qrels *q, const char *qid);

/* NULL is a no-op. */
void kst_qrels_free(kst_qrels *q);

/* ------------------------------------------------------------------------------------------ */
/* Runs */

/* Retrieved documents grouped by query. Queries are sorted by qid (strcmp); the documents of
 * query q, at off[q] <= i < off[q+1], are in trec_eval's rank order: score descending, ties by
 * docid descending. All strings belong to the run. */
typedef struct kst_run {
    size_t nq;
    size_t n;
    char **qids;     /* (nq) */
    size_t *off;     /* (nq + 1) */
    char **docids;   /* (n) */
    double *scores;  /* (n) */
    char *tag;       /* run tag of the last line, as trec_eval keeps it */
    void *pool;      /* string storage (private) */
} kst_run;

/* Reads a TREC run (gzip or plain). *out is set only on success; free with kst_run_free.
 * Errors: KST_ERR_IO, KST_ERR_FORMAT (file, line, what was expected; e.g. "run.trec line 12:
 * expected 6 fields (qid Q0 docid rank score tag), found 4"), KST_ERR_NOMEM. An empty run is
 * KST_ERR_FORMAT. */
int kst_run_read(const char *path, kst_run **out, kst_error *err);

/* Index of `qid` in r->qids, or -1. */
long kst_run_find(const kst_run *r, const char *qid);

/* NULL is a no-op. */
void kst_run_free(kst_run *r);

/* Writes a run file atomically: lines go to `path`.tmp.PID, renamed over `path` by finish, so a
 * failed or aborted search leaves no partial run. Lines are `qid Q0 docid rank score tag` with the
 * score in the shortest form that reads back as the same double (%.15g, else %.17g). */
typedef struct kst_run_writer {
    char *path, *tmp, *tag;
    void *fp;  /* FILE * */
    size_t lines;
} kst_run_writer;

/* tag: the run tag (non-empty, no whitespace). On failure *w is zeroed and nothing is left. */
int kst_run_writer_open(kst_run_writer *w, const char *path, const char *tag, kst_error *err);
/* Appends one query's ranking: docids[i] at rank i+1 with scores[i]. The caller passes hits in
 * rank order, scores non-increasing (trec_eval would otherwise re-rank them by score:
 * KST_ERR_INVALID); qid and docids must be non-empty without whitespace (KST_ERR_INVALID).
 * Nothing is written for a query that fails. */
int kst_run_writer_add(kst_run_writer *w, const char *qid, const char *const *docids,
                       const double *scores, size_t n, kst_error *err);
/* Flushes, syncs and renames into place; the writer is closed either way. */
int kst_run_writer_finish(kst_run_writer *w, kst_error *err);
/* Removes the temporary file and frees; safe on a zeroed or finished writer. */
void kst_run_writer_abort(kst_run_writer *w);

#endif
