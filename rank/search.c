/* search.c - the staged query pipeline over an index directory. */
#include "search.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/ops_backward.h"
#include "core/mem.h"
#include "index/idmap.h"

kst_search_cfg kst_search_cfg_default(void) {
    kst_search_cfg c = {0, 10, 100, 100, 100, 20, 16, 64, 60.0, 0};
    return c;
}

unsigned kst_search_stages(const kst_ix *ix, const kst_search_cfg *cfg) {
    if (cfg && cfg->stages) return cfg->stages;
    unsigned s = ix->dense ? KST_STAGE_DENSE : KST_STAGE_BM25;
    if (ix->colbert) s |= KST_STAGE_MAXSIM;
    if (ix->cross) s |= KST_STAGE_CROSS;
    return s;
}

int kst_search_stages_parse(const char *s, unsigned *out, kst_error *err) {
    *out = 0;
    const char *p = s;
    while (*p) {
        size_t n = strcspn(p, ",+ ");
        if (n == 5 && strncmp(p, "dense", 5) == 0) *out |= KST_STAGE_DENSE;
        else if (n == 4 && strncmp(p, "bm25", 4) == 0) *out |= KST_STAGE_BM25;
        else if (n == 6 && strncmp(p, "maxsim", 6) == 0) *out |= KST_STAGE_MAXSIM;
        else if (n == 5 && strncmp(p, "cross", 5) == 0) *out |= KST_STAGE_CROSS;
        else if (n > 0)
            return kst_fail(err, KST_ERR_INVALID, "unknown stage \"%.*s\" (expected dense, bm25, maxsim or cross)",
                            (int)n, p);
        p += n;
        while (*p == ',' || *p == '+' || *p == ' ') p++;
    }
    if (!(*out & (KST_STAGE_DENSE | KST_STAGE_BM25)))
        return kst_fail(err, KST_ERR_INVALID, "stages \"%s\" lack a first stage (dense and/or bm25)", s);
    return KST_OK;
}

typedef struct cand {
    int64_t id;
    double score;
    unsigned stage;
} cand;

static int by_score(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

void kst_rank_hits_free(kst_rank_hits *h) {
    if (!h) return;
    for (size_t i = 0; i < h->n; i++) {
        kst_free(h->hit[i].ext_id);
        kst_free(h->hit[i].title);
        kst_free(h->hit[i].text);
    }
    kst_free(h->hit);
    kst_free(h);
}

/* Reciprocal rank fusion of two ranked lists (Cormack et al. 2009): sum of 1 / (k + rank). */
static size_t fuse(const cand *a, size_t na, const cand *b, size_t nb, double k, cand *out) {
    size_t n = 0;
    for (size_t i = 0; i < na; i++) out[n++] = (cand){a[i].id, 1.0 / (k + (double)(i + 1)), KST_STAGE_DENSE};
    for (size_t j = 0; j < nb; j++) {
        double s = 1.0 / (k + (double)(j + 1));
        size_t i;
        for (i = 0; i < n; i++)
            if (out[i].id == b[j].id) break;
        if (i < n) {
            out[i].score += s;
            out[i].stage |= KST_STAGE_BM25;
        } else {
            out[n++] = (cand){b[j].id, s, KST_STAGE_BM25};
        }
    }
    qsort(out, n, sizeof *out, by_score);
    return n;
}

static int stage_maxsim(kst_ix *ix, kst_store *rd, const char *query, size_t qlen, cand *c,
                        size_t n, kst_error *err) {
    int rc = KST_OK;
    float *qv = NULL, *dv = NULL;
    size_t qn = 0, dcap = 0, D = ix->colbert->dim;
    int64_t off[2];
    KST_TRY(kst_encoder_embed_tokens(ix->colbert, &query, &qlen, 1, 1, 0, 1, &qv, &qn, off, err));
    for (size_t i = 0; i < n; i++) {
        uint64_t first, count;
        KST_TRY(kst_store_get_tokens(rd, c[i].id, &first, &count, err));
        if (count > dcap) {
            KST_TRY(kst_realloc((void **)&dv, count, D * sizeof(float), "document token vectors", err));
            dcap = count;
        }
        KST_TRY(kst_tokens_read(ix->tokens, first, count, dv, err));
        c[i].score = kst_maxsim_forward(NULL, qv, dv, NULL, qn, count, D);
        c[i].stage = KST_STAGE_MAXSIM;
    }
    qsort(c, n, sizeof *c, by_score);
done:
    kst_free(qv);
    kst_free(dv);
    return rc;
}

static int stage_cross(kst_ix *ix, kst_store *rd, const char *query, size_t qlen, cand *c, size_t n,
                       kst_error *err) {
    int rc = KST_OK;
    size_t nl = kst_encoder_num_scores(ix->cross);
    char **texts = kst_calloc(n ? n : 1, sizeof *texts, "passages", err);
    const char **qs = kst_malloc(n ? n : 1, sizeof *qs, "queries", err);
    size_t *ql = kst_malloc(n ? n : 1, sizeof *ql, "query lengths", err);
    float *logits = kst_malloc(n ? n * nl : 1, sizeof *logits, "logits", err);
    if (!texts || !qs || !ql || !logits) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        kst_store_doc d = {0};
        KST_TRY(kst_store_get(rd, c[i].id, &d, err));
        texts[i] = kst_ix_doc_text(d.title, d.text, err);
        kst_store_doc_free(&d);
        if (!texts[i]) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        qs[i] = query;
        ql[i] = qlen;
    }
    KST_TRY(kst_encoder_score(ix->cross, qs, ql, (const char *const *)texts, NULL, n, 0, 32, logits, err));
    /* With several labels the last one is taken as "relevant" (label 1 of a binary classifier). */
    for (size_t i = 0; i < n; i++) {
        c[i].score = logits[i * nl + nl - 1];
        c[i].stage = KST_STAGE_CROSS;
    }
    qsort(c, n, sizeof *c, by_score);
done:
    if (texts)
        for (size_t i = 0; i < n; i++) kst_free(texts[i]);
    kst_free(texts);
    kst_free(qs);
    kst_free(ql);
    kst_free(logits);
    return rc;
}

/* The hits' external ids alone. Candidates that all come from the FAISS file (no BM25 stage) take
 * them from its id map (index/idmap.h), written from the same rows: no store read. Otherwise,
 * or for an index without a map, one indexed lookup per hit. */
static int fill_ids(kst_ix *ix, kst_store *rd, unsigned stages, const cand *all, size_t n,
                    kst_rank_hits *h, kst_error *err) {
    const kst_idmap *map = (stages & KST_STAGE_BM25) ? NULL : ix->idmap;
    int rc = KST_OK;
    for (size_t i = 0; i < n && rc == KST_OK; i++) {
        kst_rank_hit *x = &h->hit[h->n++];
        x->id = all[i].id;
        x->score = all[i].score;
        x->stage = all[i].stage;
        size_t len = 0;
        const char *e = map ? kst_idmap_get(map, x->id, &len) : NULL;
        if (len == SIZE_MAX)
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: corrupt entry for internal id %lld (offsets out "
                          "of range); delete the file and kestrel reads external ids from SQLite",
                          kst_idmap_path(map), (long long)x->id);
        else if (e)
            rc = (x->ext_id = kst_strndup(e, len, err)) ? KST_OK : KST_ERR_NOMEM;
        else
            rc = kst_store_ext_id_dup(rd, x->id, &x->ext_id, err);
    }
    return rc;
}

int kst_rank_search(kst_ix *ix, const char *query, size_t qlen, const kst_search_cfg *cfg_in,
                    kst_rank_hits **out, kst_error *err) {
    *out = NULL;
    kst_search_cfg cfg = cfg_in ? *cfg_in : kst_search_cfg_default();
    unsigned stages = kst_search_stages(ix, &cfg);
    if ((stages & KST_STAGE_DENSE) && !ix->dense)
        return kst_fail(err, KST_ERR_INVALID, "%s: the dense stage needs a dense model; this index has none", ix->dir);
    if ((stages & KST_STAGE_MAXSIM) && (!ix->colbert || !ix->tokens))
        return kst_fail(err, KST_ERR_INVALID, "%s: MaxSim re-ranking needs the index built with a ColBERT model (--colbert)", ix->dir);
    if ((stages & KST_STAGE_CROSS) && !ix->cross)
        return kst_fail(err, KST_ERR_INVALID, "%s: cross-encoder re-ranking needs a cross-encoder (--cross)", ix->dir);
    if (cfg.k == 0) cfg.k = 10;
    int rc = KST_OK;
    kst_store *rd = NULL;
    cand *dense = NULL, *bm = NULL, *all = NULL;
    size_t nd = 0, nb = 0, n = 0;
    float *qv = NULL, *sc = NULL;
    int64_t *ids = NULL, *hid = NULL;
    kst_store_doc *docs = NULL;
    kst_store_hits *bh = NULL;
    char *qz = kst_strndup(query, qlen, err); /* the store takes NUL-terminated text */
    if (!qz) return KST_ERR_NOMEM;
    KST_TRY(kst_ix_get_reader(ix, &rd, err));
    /* Several statements read the store (BM25, token offsets, texts for the cross-encoder, then the
     * hits' rows): one snapshot keeps them consistent. Dense alone reads it once, in one statement. */
    if (stages & (KST_STAGE_BM25 | KST_STAGE_MAXSIM | KST_STAGE_CROSS))
        KST_TRY(kst_store_read_begin(rd, err));
    if ((stages & KST_STAGE_DENSE) && ix->ann && kst_ann_count(ix->ann) > 0) {
        size_t dim = ix->dense->dim, kn = cfg.dense_n ? cfg.dense_n : 100;
        qv = kst_malloc(dim, sizeof *qv, "query vector", err);
        sc = kst_malloc(kn, sizeof *sc, "ANN scores", err);
        ids = kst_malloc(kn, sizeof *ids, "ANN ids", err);
        dense = kst_malloc(kn, sizeof *dense, "candidates", err);
        if (!qv || !sc || !ids || !dense) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(kst_encoder_embed(kst_ix_query_encoder(ix), (const char *const *)&qz, &qlen, 1, 1, 0, 1, qv, err));
        kst_ann_search_opts so = {cfg.nprobe, cfg.ef_search};
        KST_TRY(kst_ann_search(ix->ann, 1, (int)dim, qv, (int64_t)kn, &so, sc, ids, err));
        for (size_t i = 0; i < kn && ids[i] >= 0; i++) dense[nd++] = (cand){ids[i], sc[i], KST_STAGE_DENSE};
    }
    if (stages & KST_STAGE_BM25) {
        KST_TRY(kst_store_bm25(rd, qz, cfg.bm25_n ? cfg.bm25_n : 100, &bh, err));
        bm = kst_malloc(bh->n ? bh->n : 1, sizeof *bm, "candidates", err);
        if (!bm) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        for (size_t i = 0; i < bh->n; i++) bm[nb++] = (cand){bh->hit[i].id, bh->hit[i].score, KST_STAGE_BM25};
    }
    all = kst_malloc(nd + nb + 1, sizeof *all, "candidates", err);
    if (!all) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (nd && nb) n = fuse(dense, nd, bm, nb, cfg.rrf_k > 0 ? cfg.rrf_k : 60.0, all);
    else if (nd) memcpy(all, dense, (n = nd) * sizeof *all);
    else if (nb) memcpy(all, bm, (n = nb) * sizeof *all);
    if ((stages & KST_STAGE_MAXSIM) && n) {
        size_t m = cfg.maxsim_m && cfg.maxsim_m < n ? cfg.maxsim_m : n;
        KST_TRY(stage_maxsim(ix, rd, qz, qlen, all, m, err));
        n = m;
    }
    if ((stages & KST_STAGE_CROSS) && n) {
        size_t m = cfg.cross_k && cfg.cross_k < n ? cfg.cross_k : n;
        KST_TRY(stage_cross(ix, rd, qz, qlen, all, m, err));
        n = m;
    }
    if (n > cfg.k) n = cfg.k;
    kst_rank_hits *h = kst_calloc(1, sizeof *h, "hits", err);
    if (!h) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    h->hit = kst_calloc(n ? n : 1, sizeof *h->hit, "hits", err);
    if (!h->hit) {
        kst_free(h);
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (cfg.ids_only) {
        rc = fill_ids(ix, rd, stages, all, n, h, err);
        if (rc != KST_OK) {
            kst_rank_hits_free(h);
            goto done;
        }
        *out = h;
        goto done;
    }
    docs = kst_malloc(n ? n : 1, sizeof *docs, "hit rows", err);
    hid = kst_malloc(n ? n : 1, sizeof *hid, "hit ids", err);
    if (!docs || !hid) {
        kst_rank_hits_free(h);
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) hid[i] = all[i].id;
    rc = kst_store_get_many(rd, hid, n, docs, err);
    if (rc != KST_OK) {
        kst_rank_hits_free(h);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        kst_rank_hit *x = &h->hit[h->n++];
        x->id = all[i].id;
        x->score = all[i].score;
        x->stage = all[i].stage;
        x->ext_id = docs[i].ext_id;
        x->title = docs[i].title;
        x->text = docs[i].text;
        kst_free(docs[i].meta);
    }
    *out = h;
done:
    if (rd) {
        kst_store_read_end(rd);
        kst_ix_put_reader(ix, rd);
    }
    kst_store_hits_free(bh);
    kst_free(qz);
    kst_free(qv);
    kst_free(sc);
    kst_free(ids);
    kst_free(docs);
    kst_free(hid);
    kst_free(dense);
    kst_free(bm);
    kst_free(all);
    return rc;
}
