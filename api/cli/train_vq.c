/* train_vq.c - `kestrel train vq`: Distill-VQ, re-learn an index's IVF centroids and PQ codebooks
 * from the dense model's own scores and rewrite its FAISS file as a new generation. */
#define _XOPEN_SOURCE 700
#include <dirent.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/check.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "core/npy.h"
#include "core/progress.h"
#include "index/collection.h"
#include "index/faiss_ext.h"
#include "rank/engine.h"
#include "rank/trec.h"
#include "encoders/checkpoint.h"
#include "train/vq.h"
#include "train/vq_qenc.h"

static const char *HELP =
    "usage: kestrel train vq --index DIR [--queries FILE] [--qrels FILE] [--epochs N]\n"
    "         [--lr-ivf X] [--lr-pq X] [--temperature T] [--candidates K] [--batch-size N]\n"
    "         [--max-queries N] [--tau-scale X] [--val-fraction X] [--anchor X] [--seed N]\n"
    "         [--score-weight X] [--refits N] [--train-query-encoder [--lr-query-encoder X]]\n"
    "         [--device cpu|cuda]\n"
    "\n"
    "Distill-VQ: learns the IVF coarse centroids and PQ codebooks of the index's FAISS IVF-PQ\n"
    "(IVFn,PQm or OPQm,IVFn,PQm; 8-bit codes) so that the compressed index ranks documents as the\n"
    "dense model does, then re-encodes every document and writes the result as the index's next\n"
    "generation. Searching is unchanged FAISS; the old FAISS file stays valid until the new one is\n"
    "complete and committed (a crash leaves the old index in use). The training is recorded in the\n"
    "manifest under \"vq_training\".\n"
    "\n"
    "Teacher: the exact score q.d of the uncompressed document vectors, which the index does not\n"
    "keep: every document is encoded again with the index's model (one `kestrel embed` pass).\n"
    "Per query, candidates are the exact top-K documents plus in-batch documents (the other\n"
    "queries' top-1) plus, with --qrels, its relevant documents. Students: the IVF score\n"
    "q.c(d) and the IVF-PQ score q.(c(d) + PQ(d - c(d))) (hard codes forward, softmax of negative\n"
    "distances to the codewords for gradients). Loss: listwise cross-entropy between\n"
    "softmax(teacher/T) and softmax(student/T), IVF + PQ. With OPQ, learning happens after the\n"
    "(fixed) OPQ rotation.\n"
    "\n"
    "Query-weighted codes (after the epochs; on by default): a document's score error for a query\n"
    "q is q.e, e = (d - c(d)) - PQ code, so its mean square over the queries is e^T S e, S the\n"
    "queries' second moment. FAISS picks the nearest codeword (|e|^2); here every document's codes\n"
    "minimise e^T W e, W = (1 - X) I + X S (scaled to trace d; S from --queries, or from the\n"
    "documents when label-free), and the codebooks are refit under W. The codes are stored in the\n"
    "FAISS IVF-PQ as they are: search is unchanged.\n"
    "\n"
    "  --index DIR        the index (built with a dense model and an IVF-PQ factory)\n"
    "  --queries FILE     training queries (qid<TAB>text or BEIR queries.jsonl). Default: label-free,\n"
    "                     up to --max-queries documents sampled as queries (each never its own\n"
    "                     candidate)\n"
    "  --qrels FILE       judgments (TREC or BEIR) for --queries: relevant documents join the\n"
    "                     candidates of their query\n"
    "  --epochs N         passes over the queries (3)\n"
    "  --lr-ivf X         Adam learning rate of the centroids (1e-3)\n"
    "  --lr-pq X          Adam learning rate of the codebooks (1e-3). The centroids use lazy Adam\n"
    "                     (only lists that hold a batch's candidates move), so no centroid\n"
    "                     coasts on stale momentum at thousands of lists\n"
    "  --temperature T    listwise softmax temperature (0.05; scores are cosines)\n"
    "  --candidates K     exact top-K per query (200; 100-400 is the usual range)\n"
    "  --batch-size N     queries per step (32)\n"
    "  --max-queries N    documents sampled as queries without --queries (2048)\n"
    "  --tau-scale X      soft-assignment temperature, in units of each sub-vector's mean\n"
    "                     quantisation error (1.0)\n"
    "  --val-fraction X   share of the training queries held out for validation (0.1): after\n"
    "                     every epoch their loss is measured and the best epoch's centroids and\n"
    "                     codebooks are kept (the start counts, so training never makes the index\n"
    "                     worse on them), and an epoch that worsens their loss is undone and both\n"
    "                     learning rates are cut tenfold; 0: no validation, keep the last epoch\n"
    "  --anchor X         weight of the reconstruction anchor, |d - (c + PQ code)|^2 over documents\n"
    "                     drawn uniformly each step, relative to its starting value (0: off; 1\n"
    "                     did not help in tests/bench/README.md, \"Distill-VQ\")\n"
    "  --seed N           query sampling and order (0)\n"
    "  --score-weight X   X of the query-weighted codes, in [0, 1] (0.5; 0: FAISS's nearest\n"
    "                     codewords, as before). Chosen on development queries (SciFact train\n"
    "                     queries): tests/bench/README.md, \"Distill-VQ\"\n"
    "  --refits N         codebook refits under W, each after encoding (8; 0: encode only)\n"
    "  --device cpu|cuda  where the training runs (cpu). cuda: a `make CUDA=1` build on an NVIDIA\n"
    "                     GPU (sm_90) runs the epochs, the query-weighted codes, the refits and\n"
    "                     the re-encoding of every document there, with the CPU's semantics\n"
    "                     (float32; results agree within rounding: tests/test_vq_gpu.c); not with\n"
    "                     --train-query-encoder or --anchor. Recorded in the manifest\n"
    "  --doc-vectors V.npy --doc-ids F\n"
    "                     the documents' vectors computed before by the index's model (`kestrel\n"
    "                     embed` over each document's \"title text\"), rows named by the external\n"
    "                     ids of F (one per line), instead of encoding the collection again; every\n"
    "                     indexed document needs a row, and 8 documents are encoded and compared\n"
    "                     (vectors of another model or text are refused)\n"
    "  --train-query-encoder\n"
    "                     also fine-tune the query encoder, jointly: the students score the tuned\n"
    "                     encoder's query vectors against the compressed index, the teacher stays\n"
    "                     the original (frozen) query vectors against the uncompressed documents,\n"
    "                     and the loss's gradient flows through the query vector into the encoder\n"
    "                     (AdamW, no dropout). Needs --queries (the texts to encode; without them\n"
    "                     it is refused: sampled documents have no query text). Documents stay as\n"
    "                     encoded by the index's model. The tuned encoder is saved inside the index\n"
    "                     as the folder query_model.N (a sentence-transformers checkpoint), recorded\n"
    "                     in the manifest (\"query_model\", with its fingerprint) in the same commit\n"
    "                     as the FAISS file, and from then on `kestrel search` and the C API embed\n"
    "                     queries on this index with it. A later run starts from it; a run without\n"
    "                     this flag keeps it and trains the centroids and codebooks for its vectors.\n"
    "                     Each commit keeps the query_model.N the manifest names and the one it\n"
    "                     named before (for readers that opened the index earlier); older ones are\n"
    "                     removed\n"
    "  --lr-query-encoder X  AdamW learning rate of the query encoder (2e-5; weight decay 0.01)\n"
    "\n"
    "Flat and HNSW indexes have nothing to learn. Exit codes as every command (0 ok, 2 I/O, 3 bad\n"
    "input, 6 unsupported index, 64 usage).\n";

#define EMBED_BATCH 256

/* Every vector id of an IVF index (n), from its inverted lists. */
static int ann_ids(kst_ann *ann, int64_t **ids, size_t *n, kst_error *err) {
    FaissIndex *fi = (FaissIndex *)kst_ann_faiss(ann);
    kst_faiss_layout l;
    *ids = NULL, *n = 0;
    if (kst_faiss_layout_get(fi, &l) != 0 || !l.nlist)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "the index's FAISS file is not IVF-PQ");
    size_t *sizes = kst_malloc(l.nlist, sizeof *sizes, "list sizes", err);
    if (!sizes) return KST_ERR_NOMEM;
    int rc = KST_OK;
    if (kst_faiss_ivf_list_sizes(fi, sizes) != 0) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "reading inverted list sizes");
        goto done;
    }
    size_t total = 0;
    for (size_t i = 0; i < l.nlist; i++) total += sizes[i];
    *ids = kst_malloc(total ? total : 1, sizeof **ids, "vector ids", err);
    if (!*ids) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0, at = 0; i < l.nlist; at += sizes[i], i++)
        if (kst_faiss_ivf_list_get(fi, i, *ids + at, NULL) != 0) {
            rc = kst_fail(err, KST_ERR_INTERNAL, "reading inverted list %zu", i);
            goto done;
        }
    *n = total;
done:
    kst_free(sizes);
    if (rc != KST_OK) kst_free(*ids), *ids = NULL;
    return rc;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Encodes the stored text of each id (n) into x (n, dim); ids without a document (left behind by
 * an interrupted write) are dropped: *kept gets the count, ids are compacted in place. */
static int encode_docs(kst_ix *ix, int64_t *ids, size_t n, float *x, size_t *kept,
                       kst_error *err) {
    size_t dim = ix->dense->dim, m = 0;
    char **texts = kst_calloc(EMBED_BATCH, sizeof *texts, "texts", err);
    if (!texts) return KST_ERR_NOMEM;
    int rc = KST_OK;
    kst_progress bar;
    kst_progress_begin(&bar, "encode documents", n);
    size_t nb = 0, first = 0;
    for (size_t i = 0; i <= n && rc == KST_OK; i++) {
        if (i < n) {
            kst_store_doc d = {0};
            kst_error e2;
            int r = kst_store_get(ix->store, ids[i], &d, &e2);
            if (r == KST_ERR_NOTFOUND) continue;
            if (r != KST_OK) {
                *err = e2;
                rc = r;
                break;
            }
            texts[nb] = kst_ix_doc_text(d.title, d.text, err);
            kst_store_doc_free(&d);
            if (!texts[nb]) {
                rc = KST_ERR_NOMEM;
                break;
            }
            if (nb == 0) first = m;
            ids[m++] = ids[i];
            nb++;
        }
        if (nb == EMBED_BATCH || (i == n && nb)) {
            rc = kst_encoder_embed(ix->dense, (const char *const *)texts, NULL, nb, 0, 0, 32,
                                   x + first * dim, err);
            for (size_t j = 0; j < nb; j++) kst_free(texts[j]), texts[j] = NULL;
            kst_progress_add(&bar, nb);
            nb = 0;
        }
    }
    kst_progress_end(&bar);
    for (size_t j = 0; j < nb; j++) kst_free(texts[j]);
    kst_free(texts);
    *kept = m;
    return rc;
}

typedef struct id_row {
    int64_t id;
    size_t row;
} id_row;

static int cmp_id_row(const void *a, const void *b) {
    int64_t x = ((const id_row *)a)->id, y = ((const id_row *)b)->id;
    return x < y ? -1 : x > y;
}

#define VERIFY_DOCS 8

/* --doc-vectors V.npy --doc-ids F: the documents' vectors computed before by the index's model
 * (`kestrel embed` over each document's "title text"), rows named by the external ids of F (one
 * per line), instead of encoding the collection again. Fills x (n, dim) in the order of ids (n).
 * Fails naming the file when the shapes or counts disagree or an indexed vector has no row; then
 * encodes VERIFY_DOCS documents spread over the index and compares: vectors from another model
 * or another text are refused. */
static int load_doc_vectors(kst_ix *ix, const char *vpath, const char *idpath, const int64_t *ids,
                            size_t n, float *x, kst_error *err) {
    size_t dim = ix->dense->dim, nl = 0, cap = 0;
    kst_npy v = {0};
    id_row *map = NULL;
    char *line = NULL, *text = NULL;
    size_t lcap = 0;
    float got[VERIFY_DOCS * 1024];
    FILE *f = NULL;
    int rc = kst_npy_read(vpath, &v, err);
    if (rc != KST_OK) return rc;
    if (v.dtype != KST_NPY_F32 || v.ndim != 2 || v.shape[1] != dim) {
        rc = kst_fail(err, KST_ERR_SHAPE, "%s: expected a float32 (rows, %zu) array of the index "
                      "model's document vectors", vpath, dim);
        goto done;
    }
    f = fopen(idpath, "r");
    if (!f) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot open the document ids", idpath);
        goto done;
    }
    for (ssize_t len; (len = getline(&line, &lcap, f)) >= 0; nl++) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (nl >= v.shape[0]) break;
        int64_t id;
        kst_error e2;
        int r = kst_store_lookup(ix->store, line, &id, &e2);
        if (r == KST_ERR_NOTFOUND) continue; /* not in the index: not needed */
        if (r != KST_OK) {
            *err = e2;
            rc = r;
            goto done;
        }
        KST_TRY(kst_realloc((void **)&map, ++cap, sizeof *map, "document rows", err));
        map[cap - 1] = (id_row){id, nl};
    }
    if (nl != v.shape[0]) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: %zu ids for the %zu rows of %s", idpath, nl,
                      v.shape[0], vpath);
        goto done;
    }
    qsort(map, cap, sizeof *map, cmp_id_row);
    for (size_t i = 0; i < n; i++) {
        id_row key = {ids[i], 0};
        const id_row *h = cap ? bsearch(&key, map, cap, sizeof *map, cmp_id_row) : NULL;
        if (!h) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: no row for indexed document %lld (internal "
                          "id); the ids file must name every document of the index", idpath,
                          (long long)ids[i]);
            goto done;
        }
        memcpy(x + i * dim, (const float *)v.data + h->row * dim, dim * sizeof(float));
    }
    /* The check: a few documents encoded here against their given rows. */
    size_t nv = n < VERIFY_DOCS ? n : VERIFY_DOCS;
    if (dim > 1024) nv = 0;
    for (size_t k = 0; k < nv; k++) {
        size_t i = k * n / nv;
        kst_store_doc d = {0};
        KST_TRY(kst_store_get(ix->store, ids[i], &d, err));
        text = kst_ix_doc_text(d.title, d.text, err);
        kst_store_doc_free(&d);
        if (!text) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(kst_encoder_embed(ix->dense, (const char *const *)&text, NULL, 1, 0, 0, 1, got, err));
        kst_free(text), text = NULL;
        double worst = 0;
        for (size_t j = 0; j < dim; j++) worst = fmax(worst, fabs((double)got[j] - x[i * dim + j]));
        if (!(worst < 2e-3)) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: the row of document %lld differs from the "
                          "index model's vector by %.3g: the vectors must come from the index's "
                          "model over each document's \"title text\" (kestrel embed --model %s)",
                          vpath, (long long)ids[i], worst, ix->dense->dir);
            goto done;
        }
    }
    fprintf(stderr, "kestrel train vq: %zu document vectors from %s (%zu checked against the "
                    "model)\n", n, vpath, nv);
done:
    if (f) fclose(f);
    free(line);
    kst_free(text);
    kst_free(map);
    kst_npy_free(&v);
    return rc;
}

typedef struct qset {
    size_t n, cap;
    char **qid, **text;
} qset;

static void qset_free(qset *q) {
    for (size_t i = 0; i < q->n; i++) kst_free(q->qid[i]), kst_free(q->text[i]);
    kst_free(q->qid);
    kst_free(q->text);
}

static int read_queries(const char *path, qset *qs, kst_error *err) {
    kst_queries *r = NULL;
    int rc = kst_queries_open(path, KST_FORMAT_AUTO, &r, err);
    if (rc != KST_OK) return rc;
    for (;;) {
        kst_query q;
        KST_TRY(kst_queries_next(r, &q, err));
        if (!q.id) break;
        if (qs->n == qs->cap) {
            size_t nc = qs->cap ? qs->cap * 2 : 256;
            KST_TRY(kst_realloc((void **)&qs->qid, nc, sizeof(char *), "queries", err));
            KST_TRY(kst_realloc((void **)&qs->text, nc, sizeof(char *), "queries", err));
            qs->cap = nc;
        }
        qs->qid[qs->n] = kst_strndup(q.id, q.id_len, err);
        qs->text[qs->n] = kst_strndup(q.text, q.text_len, err);
        if (!qs->qid[qs->n] || !qs->text[qs->n]) {
            kst_free(qs->qid[qs->n]);
            kst_free(qs->text[qs->n]);
            rc = KST_ERR_NOMEM;
            goto done;
        }
        qs->n++;
    }
    if (!qs->n) rc = kst_fail(err, KST_ERR_FORMAT, "%s: no queries", path);
done:
    kst_queries_close(r);
    return rc;
}

/* Positives of each query (rows of the sorted ids), from qrels (relevance > 0). */
static int positives(kst_ix *ix, const char *path, const qset *qs, const int64_t *sorted_ids,
                     const size_t *row_of, size_t n, size_t **off, int64_t **pos, size_t *found,
                     kst_error *err) {
    kst_qrels *qr = NULL;
    int rc = kst_qrels_read(path, KST_QRELS_AUTO, &qr, err);
    if (rc != KST_OK) return rc;
    *off = kst_calloc(qs->n + 1, sizeof **off, "positives", err);
    *pos = kst_malloc(qr->n ? qr->n : 1, sizeof **pos, "positives", err);
    *found = 0;
    if (!*off || !*pos) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    size_t at = 0;
    for (size_t i = 0; i < qs->n; i++) {
        (*off)[i] = at;
        long qi = kst_qrels_find(qr, qs->qid[i]);
        for (size_t j = qi < 0 ? 0 : qr->off[qi]; qi >= 0 && j < qr->off[qi + 1]; j++) {
            if (qr->rel[j] <= 0) continue;
            int64_t id;
            kst_error e2;
            if (kst_store_lookup(ix->store, qr->docids[j], &id, &e2) != KST_OK) continue;
            const int64_t *hit = bsearch(&id, sorted_ids, n, sizeof id, cmp_i64);
            if (!hit) continue;
            (*pos)[at++] = (int64_t)row_of[hit - sorted_ids];
            (*found)++;
        }
    }
    (*off)[qs->n] = at;
done:
    kst_qrels_free(qr);
    return rc;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *f) {
    (void)st, (void)flag, (void)f;
    remove(path);
    return 0;
}

/* After a commit: removes the index's query_model.N folders (tuned query encoders of earlier
 * runs) other than `keep` (the one the manifest names now) and `keep_prev` (the one it named
 * before this commit, which a reader that opened the index before it may still load), as the
 * FAISS files of older generations are pruned (rank/engine.c). */
static void prune_query_models(const char *dir, const char *keep, const char *keep_prev) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *nm = de->d_name;
        if (strncmp(nm, "query_model.", 12) != 0 || !nm[12] || strspn(nm + 12, "0123456789") != strlen(nm + 12))
            continue;
        if ((keep && strcmp(nm, keep) == 0) || (keep_prev && strcmp(nm, keep_prev) == 0)) continue;
        char p[4096];
        if (snprintf(p, sizeof p, "%s/%s", dir, nm) < (int)sizeof p)
            nftw(p, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    closedir(d);
}

int cmd_train_vq(int argc, char **argv) {
    const char *dir = NULL, *qpath = NULL, *qrels = NULL, *dvec = NULL, *dids = NULL;
    int train_qenc = 0;
    double lr_qenc = 2e-5;
    kst_vq_opts o = kst_vq_opts_default();
    o.progress = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
        if (strcmp(a, "--train-query-encoder") == 0) {
            train_qenc = 1;
            continue;
        }
        if (!v) return cli_usage_error("train vq", "%s needs a value (or is unknown)", a);
        i++;
        char *end = NULL;
        size_t n;
        if (strcmp(a, "--index") == 0) dir = v;
        else if (strcmp(a, "--device") == 0) {
            if (cli_device_value(v, &o.device) != 0) return KST_EXIT_USAGE;
        }
        else if (strcmp(a, "--queries") == 0) qpath = v;
        else if (strcmp(a, "--qrels") == 0) qrels = v;
        else if (strcmp(a, "--doc-vectors") == 0) dvec = v;
        else if (strcmp(a, "--doc-ids") == 0) dids = v;
        else if (!strcmp(a, "--score-weight")) {
            double x = strtod(v, &end);
            if (!*v || *end || !(x >= 0 && x <= 1))
                return cli_usage_error("train vq", "--score-weight expects a number in [0, 1], got "
                                       "\"%s\"", v);
            o.score_weight = x;
        } else if (!strcmp(a, "--refits")) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            o.refit_rounds = (long)n;
        } else if (!strcmp(a, "--val-fraction") || !strcmp(a, "--anchor")) {
            double x = strtod(v, &end);
            int frac = !strcmp(a, "--val-fraction");
            if (!*v || *end || !(x >= 0) || (frac && !(x < 0.9)))
                return cli_usage_error("train vq", "%s expects a number %s, got \"%s\"", a,
                                       frac ? "in [0, 0.9)" : ">= 0", v);
            if (frac) o.val_fraction = x;
            else o.w_rec = x;
        } else if (!strcmp(a, "--lr-ivf") || !strcmp(a, "--lr-pq") || !strcmp(a, "--temperature") ||
                   !strcmp(a, "--tau-scale") || !strcmp(a, "--lr-query-encoder")) {
            double x = strtod(v, &end);
            if (!*v || *end || !(x > 0))
                return cli_usage_error("train vq", "%s expects a positive number, got \"%s\"", a, v);
            if (!strcmp(a, "--lr-ivf")) o.lr_ivf = x;
            else if (!strcmp(a, "--lr-pq")) o.lr_pq = x;
            else if (!strcmp(a, "--temperature")) o.temperature = x;
            else if (!strcmp(a, "--lr-query-encoder")) lr_qenc = x;
            else o.tau_scale = x;
        } else if (!strcmp(a, "--epochs") || !strcmp(a, "--candidates") || !strcmp(a, "--seed") ||
                   !strcmp(a, "--batch-size") || !strcmp(a, "--max-queries")) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            if (!strcmp(a, "--seed")) o.seed = n;
            else if (!n) return cli_usage_error("train vq", "%s must be at least 1", a);
            else if (!strcmp(a, "--epochs")) o.epochs = (long)n;
            else if (!strcmp(a, "--candidates")) o.candidates = n;
            else if (!strcmp(a, "--batch-size")) o.batch = n;
            else o.max_queries = n;
        } else {
            return cli_usage_error("train vq", "unknown option \"%s\"", a);
        }
    }
    if (!dir) return cli_usage_error("train vq", "--index is required");
    if (qrels && !qpath) return cli_usage_error("train vq", "--qrels needs --queries");
    if (!dvec != !dids)
        return cli_usage_error("train vq", "--doc-vectors and --doc-ids go together");
    if (train_qenc && !qpath)
        return cli_usage_error("train vq", "--train-query-encoder needs --queries FILE: the query "
                                           "texts the encoder is trained on (the label-free "
                                           "default samples document vectors, which have no "
                                           "query text to encode)");

    kst_error err;
    kst_ix *ix = NULL;
    kst_vq_model m = {0};
    kst_vq_result r = {0};
    kst_ann *out = NULL;
    int64_t *ids = NULL, *sorted = NULL, *pos = NULL;
    size_t *row_of = NULL, *pos_off = NULL, n = 0, npos = 0;
    float *x = NULL, *q = NULL, *qstu = NULL;
    qset qs = {0};
    char *json = NULL;
    kst_encoder *qenc_enc = NULL, *saved = NULL;
    kst_vq_qenc qe = {0};
    char qfolder[64] = "", qpath_full[4096] = "", qfp[65] = "", qprev[256] = "";
    int rc = KST_OK;
    if (o.device == KST_DEV_CUDA) {
        /* Before any work: no GPU, or what stays on the CPU, is said at once. */
        if (train_qenc || o.w_rec > 0) {
            rc = kst_fail(&err, KST_ERR_UNSUPPORTED, "--device cuda: %s trains on the CPU only; "
                          "drop --device cuda", train_qenc ? "--train-query-encoder" : "--anchor");
            goto done;
        }
        rc = kst_gpu_check(&err);
        if (rc != KST_OK) {
            if (!strstr(err.msg, "--device cpu")) {
                size_t at = strlen(err.msg);
                snprintf(err.msg + at, sizeof err.msg - at, "; train on the CPU with --device cpu");
            }
            goto done;
        }
    }
    rc = kst_ix_open(dir, NULL, 1, &ix, &err);
    if (rc != KST_OK) goto done;
    if (!ix->dense || !ix->ann) {
        rc = kst_fail(&err, KST_ERR_UNSUPPORTED, "%s: the index has no dense FAISS index to learn",
                      dir);
        goto done;
    }
    if (ix->query) { /* the tuned query encoder in use before this run (kept by the pruning) */
        const char *qd = kst_ix_query_encoder(ix)->dir, *sl = strrchr(qd, '/');
        snprintf(qprev, sizeof qprev, "%s", sl ? sl + 1 : qd);
    }
    KST_TRY(kst_vq_model_from_index(ix->ann, &m, &err));
    KST_TRY(ann_ids(ix->ann, &ids, &n, &err));
    if (n < 2) {
        rc = kst_fail(&err, KST_ERR_INVALID, "%s: %zu indexed vectors; nothing to learn from", dir, n);
        goto done;
    }
    size_t dim = ix->dense->dim, kept = 0;
    x = kst_malloc(n, dim * sizeof(float), "document vectors", &err);
    if (!x) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (dvec) {
        KST_TRY(load_doc_vectors(ix, dvec, dids, ids, n, x, &err));
        kept = n;
    } else {
        KST_TRY(encode_docs(ix, ids, n, x, &kept, &err));
    }
    if (kept < n)
        fprintf(stderr, "kestrel train vq: %zu vectors have no document (an interrupted write); "
                        "they are dropped\n", n - kept);
    n = kept;
    if (qpath) {
        KST_TRY(read_queries(qpath, &qs, &err));
        q = kst_malloc(qs.n, dim * sizeof(float), "query vectors", &err);
        if (!q) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        /* The teacher: the original model's query vectors (frozen). */
        KST_TRY(kst_encoder_embed(ix->dense, (const char *const *)qs.text, NULL, qs.n, 1, 0, 32, q,
                                  &err));
        if (train_qenc) {
            /* The student encoder: a private copy of the index's current query encoder. */
            KST_TRY(kst_encoder_open(kst_ix_query_encoder(ix)->dir, KST_ROLE_DENSE, &qenc_enc, &err));
            KST_TRY(kst_vq_qenc_init(&qe, qenc_enc, (const char *const *)qs.text, qs.n, &err));
            qe.lr = lr_qenc;
            o.qenc = &qe;
        } else if (ix->query) {
            /* The index's tuned query encoder stays in use: the students are its vectors. */
            qstu = kst_malloc(qs.n, dim * sizeof(float), "query vectors", &err);
            if (!qstu) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            KST_TRY(kst_encoder_embed(ix->query, (const char *const *)qs.text, NULL, qs.n, 1, 0, 32,
                                      qstu, &err));
            o.q_student = qstu;
        }
        if (qrels) {
            sorted = kst_malloc(n, sizeof *sorted, "ids", &err);
            row_of = kst_malloc(n, sizeof *row_of, "rows", &err);
            if (!sorted || !row_of) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            /* Rows sorted by id: sort (id, row) pairs through the ids' order. */
            memcpy(sorted, ids, n * sizeof *ids);
            qsort(sorted, n, sizeof *sorted, cmp_i64);
            for (size_t i = 0; i < n; i++) {
                const int64_t *h = bsearch(&ids[i], sorted, n, sizeof *sorted, cmp_i64);
                row_of[h - sorted] = i;
            }
            KST_TRY(positives(ix, qrels, &qs, sorted, row_of, n, &pos_off, &pos, &npos, &err));
            fprintf(stderr, "kestrel train vq: %zu relevant documents from %s join the candidates\n",
                    npos, qrels);
        }
    }
    KST_TRY(kst_vq_train(&m, n, x, qs.n, q, pos_off, pos, &o, &r, &err));
    KST_TRY(kst_vq_write_index(&m, ix->ann, n, x, ids, &out, &err));
    json = kst_malloc(1536, 1, "manifest entry", &err);
    if (!json) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    snprintf(json, 1536,
             "{\"method\":\"distill-vq\",\"documents\":%zu,\"queries\":%zu,\"query_source\":\"%s\","
             "\"qrels_positives\":%zu,\"epochs\":%ld,\"steps\":%ld,\"lr_ivf\":%g,\"lr_pq\":%g,"
             "\"temperature\":%g,\"tau_scale\":%g,\"candidates\":%zu,\"batch\":%zu,\"seed\":%llu,"
             "\"anchor\":%g,\"val_fraction\":%g,\"val_queries\":%zu,\"val_loss\":[%.6f,%.6f],"
             "\"kept_epoch\":%ld,\"mse\":[%.6f,%.6f],"
             "\"opq\":%s,\"loss_ivf\":[%.6f,%.6f],\"loss_pq\":[%.6f,%.6f],\"score_weight\":%g,"
             "\"refits\":%ld,\"weighted_error\":[%.6f,%.6f],\"seconds\":%.1f,\"device\":\"%s\"}",
             n, r.queries, qpath ? "given" : "sampled documents", npos, r.epochs, r.steps, o.lr_ivf,
             o.lr_pq, o.temperature, o.tau_scale, o.candidates, o.batch,
             (unsigned long long)o.seed, o.w_rec, o.val_fraction, r.val_queries, r.val_init,
             r.val_best, r.best_epoch, r.mse_init, r.mse_final, m.rot ? "true" : "false",
             r.loss_init_ivf, r.loss_final_ivf, r.loss_init_pq, r.loss_final_pq, o.score_weight,
             r.refits, r.werr_init, r.werr_final, r.seconds, kst_device_name(o.device));
    if (train_qenc) {
        /* The tuned encoder goes into the index as query_model.<next generation>, written (each
         * file atomically, weights last) before the commit that names it: a crash before the
         * commit leaves the manifest on the old FAISS file and the old query encoder. */
        kst_store_manifest man;
        KST_TRY(kst_store_manifest_read(ix->store, &man, &err));
        snprintf(qfolder, sizeof qfolder, "query_model.%lld", (long long)(man.generation + 1));
        KST_TRY(kst_path_join(qpath_full, sizeof qpath_full, ix->dir, qfolder, &err));
        KST_TRY(kst_checkpoint_save(qenc_enc, qpath_full, &err));
        KST_TRY(kst_encoder_open(qpath_full, KST_ROLE_DENSE, &saved, &err));
        KST_TRY(kst_store_fingerprint_files((const char *const *)saved->weight_files,
                                            saved->n_weight_files, qfp, &err));
        size_t jl = strlen(json);
        snprintf(json + jl - 1, 1536 - (jl - 1),
                 ",\"query_encoder\":{\"folder\":\"%s\",\"lr\":%g}}", qfolder, lr_qenc);
    }
    const char *keys[3] = {"vq_training", "query_model", "query_model_fingerprint"};
    const char *vals[3] = {json, qfolder, qfp};
    rc = kst_ix_replace_ann_meta(ix, out, keys, vals, train_qenc ? 3 : 1, &err);
    out = NULL;
    if (rc == KST_OK)
        fprintf(stderr,
                "kestrel train vq: %zu documents, %zu queries, %ld steps in %.1fs; loss ivf %.4f -> "
                "%.4f, pq %.4f -> %.4f; validation (%zu queries) %.4f -> %.4f, kept epoch %ld of "
                "%ld; wrote %s/%s\n",
                n, r.queries, r.steps, r.seconds, r.loss_init_ivf, r.loss_final_ivf,
                r.loss_init_pq, r.loss_final_pq, r.val_queries, r.val_init, r.val_best,
                r.best_epoch, r.epochs, dir, ix->ann_file);
    if (rc == KST_OK && train_qenc)
        fprintf(stderr, "kestrel train vq: the tuned query encoder is %s (searches of this index "
                        "use it)\n", qpath_full);
    if (rc == KST_OK)
        prune_query_models(dir, train_qenc ? qfolder : qprev, qprev[0] ? qprev : NULL);
done:
    kst_free(json);
    kst_ann_free(out);
    kst_free(r.epoch_loss);
    kst_vq_model_free(&m);
    kst_free(ids);
    kst_free(sorted);
    kst_free(row_of);
    kst_free(pos);
    kst_free(pos_off);
    kst_free(x);
    kst_free(q);
    kst_free(qstu);
    kst_vq_qenc_free(&qe);
    kst_encoder_free(qenc_enc);
    kst_encoder_free(saved);
    qset_free(&qs);
    kst_ix_close(ix);
    if (rc != KST_OK) return cli_report("train vq", rc, &err);
    return 0;
}
