/* mine.c - hard-negative mining from an index's first stage (mine.h). */
#define _POSIX_C_SOURCE 200809L
#include "mine.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "core/mem.h"
#include "core/progress.h"
#include "index/collection.h"
#include "rank/engine.h"
#include "rank/search.h"
#include "rank/trec.h"

kst_mine_opts kst_mine_opts_default(void) {
    kst_mine_opts o;
    memset(&o, 0, sizeof o);
    o.negatives = 8;
    o.relevance_level = 1;
    return o;
}

/* The judgment of doc for qrels query q, or -1 when unjudged (judgments are sorted by docid). */
static int judged(const kst_qrels *qr, long q, const char *doc) {
    size_t lo = qr->off[q], hi = qr->off[q + 1];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(qr->docids[mid], doc);
        if (c == 0) return qr->rel[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

int kst_mine(const char *index_dir, const char *queries_path, const char *qrels_path,
             const char *out_path, const kst_mine_opts *opts, kst_mine_stats *stats,
             kst_error *err) {
    int rc = KST_OK;
    kst_mine_opts o = opts ? *opts : kst_mine_opts_default();
    kst_mine_stats st;
    memset(&st, 0, sizeof st);
    kst_qrels *qr = NULL;
    kst_queries *qs = NULL;
    kst_ix *ix = NULL;
    kst_rank_hits *hits = NULL;
    FILE *f = NULL;
    unsigned char *seen = NULL;
    const char **negs = NULL;
    char tmp[4096];
    tmp[0] = '\0';
    if (o.negatives == 0) return kst_fail(err, KST_ERR_INVALID, "negatives per positive must be at least 1");
    if (o.stages & ~(unsigned)(KST_STAGE_BM25 | KST_STAGE_DENSE))
        return kst_fail(err, KST_ERR_INVALID, "mining uses the first stage only (bm25 and/or dense)");
    KST_TRY(kst_qrels_read(qrels_path, KST_QRELS_AUTO, &qr, err));
    KST_TRY(kst_ix_open(index_dir, NULL, 0, &ix, err));
    kst_search_cfg cfg = kst_search_cfg_default();
    cfg.stages = o.stages ? o.stages : (ix->dense ? KST_STAGE_DENSE : KST_STAGE_BM25);
    if ((cfg.stages & KST_STAGE_DENSE) && !ix->dense) {
        rc = kst_fail(err, KST_ERR_INVALID, "%s: --first-stage dense needs an index built with a dense model (--model); this one is BM25 only",
                      index_dir);
        goto done;
    }
    if (!(seen = kst_calloc(qr->nq ? qr->nq : 1, 1, "qrels queries", err)) ||
        !(negs = kst_malloc(o.negatives, sizeof *negs, "negatives", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", out_path, (long)getpid()) >= sizeof tmp) {
        tmp[0] = '\0';
        rc = kst_fail(err, KST_ERR_INVALID, "%s: path too long", out_path);
        goto done;
    }
    if (!(f = fopen(tmp, "w"))) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create", tmp);
        tmp[0] = '\0';
        goto done;
    }
    KST_TRY(kst_queries_open(queries_path, KST_FORMAT_AUTO, &qs, err));
    kst_progress bar;
    kst_progress_begin(&bar, "mine", qr->nq);
    if (o.quiet) bar.enabled = 0;
    for (;;) {
        kst_query q;
        KST_TRY(kst_queries_next(qs, &q, err));
        if (!q.id) break;
        long qi = kst_qrels_find(qr, q.id);
        if (qi < 0 || seen[qi]) continue;
        seen[qi] = 1;
        size_t npos = 0;
        for (size_t j = qr->off[qi]; j < qr->off[qi + 1]; j++) npos += qr->rel[j] >= o.relevance_level;
        if (npos == 0) {
            st.no_positive++;
            kst_progress_add(&bar, 1);
            continue;
        }
        cfg.k = o.skip_top + o.negatives + npos;
        cfg.bm25_n = cfg.dense_n = cfg.k;
        KST_TRY(kst_rank_search(ix, q.text, q.text_len, &cfg, &hits, err));
        size_t nn = 0;
        for (size_t h = o.skip_top; h < hits->n && nn < o.negatives; h++)
            if (judged(qr, qi, hits->hit[h].ext_id) < o.relevance_level) negs[nn++] = hits->hit[h].ext_id;
        for (size_t j = qr->off[qi]; j < qr->off[qi + 1]; j++) {
            if (qr->rel[j] < o.relevance_level) continue;
            if (nn < o.negatives) st.short_lists++;
            for (size_t k = 0; k < nn; k++) {
                if (fprintf(f, "%s\t%s\t%s\n", q.id, qr->docids[j], negs[k]) < 0) {
                    rc = kst_fail(err, KST_ERR_IO, "%s: write failed", tmp);
                    goto done;
                }
                st.triples++;
            }
        }
        kst_rank_hits_free(hits);
        hits = NULL;
        st.queries++;
        kst_progress_add(&bar, 1);
    }
    kst_progress_end(&bar);
    for (size_t i = 0; i < qr->nq; i++) st.no_text += !seen[i];
    if (st.queries == 0 && st.no_positive == 0) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: none of the qrels' %zu queries is in %s (do the qids match?)", qrels_path,
                      qr->nq, queries_path);
        goto done;
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) {
        f = NULL;
        rc = kst_fail(err, KST_ERR_IO, "%s: write failed", tmp);
        goto done;
    }
    f = NULL;
    if (rename(tmp, out_path) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot replace", out_path);
        goto done;
    }
    tmp[0] = '\0';
done:
    if (f) fclose(f);
    if (tmp[0]) unlink(tmp);
    kst_rank_hits_free(hits);
    kst_queries_close(qs);
    kst_ix_close(ix);
    kst_qrels_free(qr);
    kst_free(seen);
    kst_free(negs);
    if (stats) *stats = st;
    return rc;
}
