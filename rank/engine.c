/* engine.c - an index directory at work: create, open, add, delete, and the reader pool. */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"

#include <dirent.h>
#include <limits.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "core/file.h"
#include "core/mem.h"
#include "core/progress.h"
#include "index/idmap.h"

#define PATH_CAP 4096
#define TOKENS_FILE "tokens.f16"
#define ENCODE_BATCH 256

/* ------------------------------------------------------------------------------------------ */
/* reader pool: read-only store handles, one per concurrent search */

typedef struct reader_pool {
    pthread_mutex_t lock;
    kst_store **free;
    size_t n, cap;
} reader_pool;

int kst_ix_get_reader(kst_ix *ix, kst_store **out, kst_error *err) {
    reader_pool *p = ix->pool;
    *out = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->n) *out = p->free[--p->n];
    pthread_mutex_unlock(&p->lock);
    if (*out) return KST_OK;
    return kst_store_open(ix->dir, KST_STORE_READONLY, out, err);
}

void kst_ix_put_reader(kst_ix *ix, kst_store *s) {
    if (!s) return;
    reader_pool *p = ix->pool;
    pthread_mutex_lock(&p->lock);
    if (p->n == p->cap) {
        size_t nc = p->cap ? p->cap * 2 : 8;
        kst_store **f = realloc(p->free, nc * sizeof *f);
        if (!f) {
            pthread_mutex_unlock(&p->lock);
            kst_store_close(s);
            return;
        }
        p->free = f;
        p->cap = nc;
    }
    p->free[p->n++] = s;
    pthread_mutex_unlock(&p->lock);
}

static void pool_free(reader_pool *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n; i++) kst_store_close(p->free[i]);
    free(p->free);
    pthread_mutex_destroy(&p->lock);
    kst_free(p);
}

/* ------------------------------------------------------------------------------------------ */
/* helpers */

char *kst_ix_doc_text(const char *title, const char *text, kst_error *err) {
    size_t tl = title ? strlen(title) : 0, xl = text ? strlen(text) : 0;
    char *s = kst_malloc(tl + xl + 2, 1, "document text", err);
    if (!s) return NULL;
    size_t at = 0;
    if (tl) {
        memcpy(s, title, tl);
        at = tl;
        if (xl) s[at++] = ' ';
    }
    if (xl) memcpy(s + at, text, xl);
    s[at + xl] = '\0';
    return s;
}

static int fingerprint(const kst_encoder *e, char hex[65], kst_error *err) {
    return kst_store_fingerprint_files((const char *const *)e->weight_files, e->n_weight_files, hex, err);
}

static int meta_get_opt(kst_store *s, const char *key, char **out, kst_error *err) {
    *out = NULL;
    kst_error e2;
    int rc = kst_store_meta_get(s, key, out, &e2);
    if (rc == KST_ERR_NOTFOUND) return KST_OK;
    if (rc != KST_OK && err) *err = e2;
    return rc;
}

/* Opens a model and, when the index recorded a fingerprint under `fp_key`, checks it. */
static int open_model(kst_ix *ix, const char *given, const char *dir_key, const char *fp_key,
                      kst_role role, kst_encoder **out, kst_error *err) {
    char *recorded = NULL, *want_fp = NULL;
    int rc = meta_get_opt(ix->store, dir_key, &recorded, err);
    if (rc == KST_OK) rc = meta_get_opt(ix->store, fp_key, &want_fp, err);
    const char *dir = given && *given ? given : (recorded && *recorded ? recorded : NULL);
    if (rc == KST_OK && dir) {
        rc = kst_encoder_open(dir, role, out, err);
        if (rc != KST_OK) kst_error_prefix(err, "%s: model recorded as %s", ix->dir, dir_key);
    }
    if (rc == KST_OK && *out && want_fp && *want_fp) {
        char fp[65];
        rc = fingerprint(*out, fp, err);
        if (rc == KST_OK && strcmp(fp, want_fp) != 0)
            rc = kst_fail(err, KST_ERR_INVALID,
                          "%s: the index was built with the %s model of fingerprint %s, but %s has "
                          "fingerprint %s; rebuild the index with this model or pass the model it "
                          "was built with",
                          ix->dir, kst_role_name(role), want_fp, dir, fp);
    }
    kst_free(recorded);
    kst_free(want_fp);
    return rc;
}

/* The tuned query encoder (manifest "query_model": a folder name inside the index directory,
 * "query_model_fingerprint": its weights' fingerprint), when the index has one. */
static int open_query_model(kst_ix *ix, kst_error *err) {
    char *name = NULL, *want_fp = NULL, path[PATH_CAP];
    int rc = meta_get_opt(ix->store, "query_model", &name, err);
    if (rc == KST_OK) rc = meta_get_opt(ix->store, "query_model_fingerprint", &want_fp, err);
    if (rc != KST_OK || !name || !*name) goto done;
    if (strchr(name, '/') || strcmp(name, "..") == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: manifest query_model \"%s\" is not a folder name "
                      "inside the index", ix->dir, name);
        goto done;
    }
    KST_TRY(kst_path_join(path, sizeof path, ix->dir, name, err));
    rc = kst_encoder_open(path, KST_ROLE_DENSE, &ix->query, err);
    if (rc != KST_OK) {
        kst_error_prefix(err, "%s: the query encoder recorded as query_model", ix->dir);
        goto done;
    }
    if (want_fp && *want_fp) {
        char fp[65];
        KST_TRY(fingerprint(ix->query, fp, err));
        if (strcmp(fp, want_fp) != 0)
            rc = kst_fail(err, KST_ERR_INVALID, "%s: the query encoder %s has fingerprint %s, the "
                          "manifest records %s (changed on disk?); run `kestrel train vq "
                          "--train-query-encoder` again", ix->dir, path, fp, want_fp);
    }
    if (rc == KST_OK && ix->dense && ix->query->dim != ix->dense->dim)
        rc = kst_fail(err, KST_ERR_SHAPE, "%s: the query encoder gives %zu-d vectors, the index "
                      "%zu-d ones", path, ix->query->dim, ix->dense->dim);
done:
    kst_free(name);
    kst_free(want_fp);
    return rc;
}

/* The id map file (index/idmap.h) beside FAISS file `ann_file` ("dense.N.faiss" -> "dense.N.ids"). */
static void ids_name(const char *ann_file, char *out, size_t cap) {
    size_t l = strlen(ann_file);
    if (l > 6 && strcmp(ann_file + l - 6, ".faiss") == 0)
        snprintf(out, cap, "%.*s.ids", (int)(l - 6), ann_file);
    else
        snprintf(out, cap, "%s.ids", ann_file);
}

/* 1 when `n` is the FAISS or id map file of generation file `keep` ("" or NULL: none). */
static int same_generation(const char *n, const char *keep) {
    if (!keep || !*keep) return 0;
    char ids[80];
    ids_name(keep, ids, sizeof ids);
    return strcmp(n, keep) == 0 || strcmp(n, ids) == 0;
}

/* Removes FAISS and id map files of generations other than `keep` and `keep_prev`. */
static void prune_ann_files(const char *dir, const char *keep, const char *keep_prev) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *n = de->d_name;
        size_t l = strlen(n);
        if (strncmp(n, "dense.", 6) != 0 ||
            !((l >= 12 && strcmp(n + l - 6, ".faiss") == 0) || (l >= 10 && strcmp(n + l - 4, ".ids") == 0)))
            continue;
        if (same_generation(n, keep) || same_generation(n, keep_prev)) continue;
        char p[PATH_CAP];
        if (kst_path_join(p, sizeof p, dir, n, NULL) == KST_OK) unlink(p);
    }
    closedir(d);
}

/* Loads the committed FAISS file named in the manifest (none for an empty or BM25-only index). */
/* Maps the id map of the current FAISS file, when there is one (indexes written before it
 * existed have none: searches then read external ids from SQLite). */
static int load_idmap(kst_ix *ix, kst_error *err) {
    kst_idmap_close(ix->idmap);
    ix->idmap = NULL;
    if (!ix->ann_file[0]) return KST_OK;
    char name[80], path[PATH_CAP];
    ids_name(ix->ann_file, name, sizeof name);
    int rc = kst_path_join(path, sizeof path, ix->dir, name, err);
    if (rc != KST_OK || !kst_path_exists(path)) return rc;
    return kst_idmap_open(path, &ix->idmap, err);
}

static int load_ann(kst_ix *ix, kst_error *err) {
    kst_ann_free(ix->ann);
    ix->ann = NULL;
    kst_idmap_close(ix->idmap);
    ix->idmap = NULL;
    ix->ann_file[0] = '\0';
    char *name = NULL;
    int rc = meta_get_opt(ix->store, "ann_file", &name, err);
    if (rc != KST_OK || !name || !*name) {
        kst_free(name);
        return rc;
    }
    snprintf(ix->ann_file, sizeof ix->ann_file, "%s", name);
    kst_free(name);
    char path[PATH_CAP];
    rc = kst_path_join(path, sizeof path, ix->dir, ix->ann_file, err);
    if (rc == KST_OK) rc = kst_ann_read(path, ix->writable ? KST_ANN_MMAP_NEVER : KST_ANN_MMAP_AUTO, &ix->ann, err);
    if (rc == KST_OK && ix->device) rc = kst_ann_set_device(ix->ann, ix->device, 0, err);
    if (rc == KST_OK) rc = load_idmap(ix, err);
    return rc;
}

static int open_parts(kst_ix *ix, const kst_ix_models *m, kst_error *err) {
    int rc = KST_OK;
    KST_TRY(open_model(ix, m ? m->dense : NULL, "dense_model", "model_fingerprint", KST_ROLE_DENSE, &ix->dense, err));
    KST_TRY(open_model(ix, m ? m->colbert : NULL, "colbert_model", "colbert_fingerprint", KST_ROLE_COLBERT, &ix->colbert, err));
    KST_TRY(open_model(ix, m ? m->cross : NULL, "cross_model", "cross_fingerprint", KST_ROLE_CROSS, &ix->cross, err));
    KST_TRY(open_query_model(ix, err));
    char *fac = NULL;
    KST_TRY(meta_get_opt(ix->store, "requested_factory", &fac, err));
    snprintf(ix->factory, sizeof ix->factory, "%s", fac ? fac : "auto");
    kst_free(fac);
    rc = load_ann(ix, err);
    if (rc != KST_OK && !ix->writable) {
        /* A writer may have switched generations (and pruned our file) between our manifest
         * read and the file open: read the manifest once more. */
        kst_error_clear(err);
        rc = load_ann(ix, err);
    }
    if (rc != KST_OK) goto done;
    if (ix->colbert) {
        char path[PATH_CAP];
        KST_TRY(kst_path_join(path, sizeof path, ix->dir, TOKENS_FILE, err));
        if (ix->writable || kst_path_exists(path))
            KST_TRY(kst_tokens_open(path, ix->colbert->dim, ix->writable, &ix->tokens, err));
    }
done:
    return rc;
}

static kst_ix *ix_new(const char *dir, int writable, kst_error *err) {
    kst_ix *ix = kst_calloc(1, sizeof *ix, "index", err);
    if (!ix) return NULL;
    reader_pool *p = kst_calloc(1, sizeof *p, "reader pool", err);
    ix->dir = kst_strndup(dir, (size_t)-1, err);
    if (!p || !ix->dir) {
        kst_free(p);
        kst_free(ix->dir);
        kst_free(ix);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    ix->pool = p;
    ix->writable = writable;
    return ix;
}

void kst_ix_close(kst_ix *ix) {
    if (!ix) return;
    pool_free(ix->pool);
    kst_store_close(ix->store);
    kst_encoder_free(ix->dense);
    kst_encoder_free(ix->colbert);
    kst_encoder_free(ix->cross);
    kst_encoder_free(ix->query);
    kst_ann_free(ix->ann);
    kst_idmap_close(ix->idmap);
    kst_tokens_close(ix->tokens);
    kst_free(ix->dir);
    kst_free(ix);
}

/* ------------------------------------------------------------------------------------------ */
/* create and open */

static int dir_is_empty_or_absent(const char *dir, kst_error *err) {
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT) return KST_OK;
        return kst_fail(err, KST_ERR_IO, "%s: %s", dir, strerror(errno));
    }
    struct dirent *de;
    int empty = 1;
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) empty = 0;
    closedir(d);
    return empty ? KST_OK
                 : kst_fail(err, KST_ERR_INVALID,
                            "%s: the folder is not empty; an index is built into a new folder (use "
                            "`kestrel index add` to add to an existing index)", dir);
}

int kst_ix_create(const char *dir, const kst_ix_models *models, const char *factory, kst_ix **out,
                  kst_error *err) {
    *out = NULL;
    int rc = dir_is_empty_or_absent(dir, err);
    if (rc != KST_OK) return rc;
    kst_ix *ix = ix_new(dir, 1, err);
    if (!ix) return KST_ERR_NOMEM;
    int began = 0;
    KST_TRY(kst_store_open(dir, KST_STORE_CREATE, &ix->store, err));
    const char *fac = factory && *factory ? factory : "auto";
    snprintf(ix->factory, sizeof ix->factory, "%s", fac);
    if (models && models->dense) {
        KST_TRY(kst_encoder_open(models->dense, KST_ROLE_DENSE, &ix->dense, err));
        if (strcmp(fac, "auto") != 0) {
            /* Check the factory string now rather than after encoding the whole collection. */
            kst_ann *probe = NULL;
            rc = kst_ann_create(fac, (int)ix->dense->dim, &probe, err);
            kst_ann_free(probe);
            if (rc != KST_OK) goto done;
        }
    }
    if (models && models->colbert) KST_TRY(kst_encoder_open(models->colbert, KST_ROLE_COLBERT, &ix->colbert, err));
    if (models && models->cross) KST_TRY(kst_encoder_open(models->cross, KST_ROLE_CROSS, &ix->cross, err));
    KST_TRY(kst_store_begin(ix->store, err));
    began = 1;
    char fp[65];
    struct { kst_encoder *e; const char *dir_key, *fp_key, *path; } m[3] = {
        {ix->dense, "dense_model", "model_fingerprint", models ? models->dense : NULL},
        {ix->colbert, "colbert_model", "colbert_fingerprint", models ? models->colbert : NULL},
        {ix->cross, "cross_model", "cross_fingerprint", models ? models->cross : NULL}};
    for (int i = 0; i < 3; i++) {
        if (!m[i].e) continue;
        char abs[PATH_MAX];
        const char *p = realpath(m[i].path, abs) ? abs : m[i].path;
        KST_TRY(fingerprint(m[i].e, fp, err));
        KST_TRY(kst_store_meta_set(ix->store, m[i].dir_key, p, err));
        if (i == 0) KST_TRY(kst_store_set_model(ix->store, fp, (long)ix->dense->dim, "", err));
        else KST_TRY(kst_store_meta_set(ix->store, m[i].fp_key, fp, err));
    }
    KST_TRY(kst_store_meta_set(ix->store, "requested_factory", fac, err));
    KST_TRY(kst_store_commit(ix->store, err));
    began = 0;
    if (ix->colbert) {
        char path[PATH_CAP];
        KST_TRY(kst_path_join(path, sizeof path, dir, TOKENS_FILE, err));
        KST_TRY(kst_tokens_open(path, ix->colbert->dim, 1, &ix->tokens, err));
    }
done:
    if (rc != KST_OK) {
        if (began) kst_store_rollback(ix->store, NULL);
        kst_ix_close(ix);
        return rc;
    }
    *out = ix;
    return KST_OK;
}

int kst_ix_open(const char *dir, const kst_ix_models *models, int writable, kst_ix **out,
                kst_error *err) {
    *out = NULL;
    kst_ix *ix = ix_new(dir, writable, err);
    if (!ix) return KST_ERR_NOMEM;
    int rc = KST_OK;
    KST_TRY(kst_store_open(dir, writable ? 0 : KST_STORE_READONLY, &ix->store, err));
    rc = open_parts(ix, models, err);
done:
    if (rc != KST_OK) {
        kst_ix_close(ix);
        return rc;
    }
    *out = ix;
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* writes */

typedef struct pending {
    float *vecs;     /* (n, dim) dense vectors kept until the ANN is trained */
    int64_t *ids;    /* (n) their internal ids */
    size_t n, cap;
    int64_t *gone;   /* internal ids replaced or deleted: to remove from FAISS */
    size_t ngone, capgone;
} pending;

static int push_gone(pending *p, int64_t id, kst_error *err) {
    if (p->ngone == p->capgone) {
        size_t nc = p->capgone ? p->capgone * 2 : 256;
        int rc = kst_realloc((void **)&p->gone, nc, sizeof *p->gone, "replaced ids", err);
        if (rc != KST_OK) return rc;
        p->capgone = nc;
    }
    p->gone[p->ngone++] = id;
    return KST_OK;
}

static int keep_vectors(pending *p, const float *v, const int64_t *ids, size_t n, size_t dim,
                        kst_error *err) {
    if (p->n + n > p->cap) {
        size_t nc = (p->n + n) * 2;
        int rc = kst_realloc((void **)&p->vecs, nc, dim * sizeof(float), "dense vectors", err);
        if (rc == KST_OK) rc = kst_realloc((void **)&p->ids, nc, sizeof(int64_t), "vector ids", err);
        if (rc != KST_OK) return rc;
        p->cap = nc;
    }
    memcpy(p->vecs + p->n * dim, v, n * dim * sizeof(float));
    memcpy(p->ids + p->n, ids, n * sizeof(int64_t));
    p->n += n;
    return KST_OK;
}

static void pending_free(pending *p) {
    kst_free(p->vecs);
    kst_free(p->ids);
    kst_free(p->gone);
}

/* One batch of documents: texts to encode and their internal ids. */
typedef struct batch {
    char **texts;
    int64_t *ids;
    size_t n;
} batch;

static void batch_clear(batch *b) {
    for (size_t i = 0; i < b->n; i++) kst_free(b->texts[i]);
    b->n = 0;
}

static int encode_batch(kst_ix *ix, batch *b, pending *p, kst_ix_stats *st, kst_error *err) {
    int rc = KST_OK;
    if (!b->n) return KST_OK;
    double t0 = kst_now();
    float *v = NULL;
    if (ix->dense) {
        size_t dim = ix->dense->dim;
        v = kst_malloc(b->n, dim * sizeof(float), "dense vectors", err);
        if (!v) return KST_ERR_NOMEM;
        KST_TRY(kst_encoder_embed(ix->dense, (const char *const *)b->texts, NULL, b->n, 0, 0, 32, v, err));
        st->encode_s += kst_now() - t0;
        t0 = kst_now();
        if (ix->ann && kst_ann_is_trained(ix->ann)) {
            KST_TRY(kst_ann_add(ix->ann, (int64_t)b->n, (int)dim, v, b->ids, err));
            st->add_s += kst_now() - t0;
        } else {
            KST_TRY(keep_vectors(p, v, b->ids, b->n, dim, err));
        }
    }
    if (ix->colbert) {
        t0 = kst_now();
        float *tv = NULL;
        size_t total = 0;
        int64_t *off = kst_malloc(b->n + 1, sizeof *off, "token offsets", err);
        if (!off) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        rc = kst_encoder_embed_tokens(ix->colbert, (const char *const *)b->texts, NULL, b->n, 0, 0, 32, &tv, &total, off, err);
        st->encode_s += kst_now() - t0;
        uint64_t first = 0;
        if (rc == KST_OK) rc = kst_tokens_append(ix->tokens, tv, total, &first, err);
        for (size_t i = 0; rc == KST_OK && i < b->n; i++)
            rc = kst_store_set_tokens(ix->store, b->ids[i], first + (uint64_t)off[i],
                                      (uint64_t)(off[i + 1] - off[i]), err);
        st->tokens += total;
        kst_free(tv);
        kst_free(off);
    }
done:
    kst_free(v);
    return rc;
}

/* Writes the id map of generation file `ann_file` from the store's rows as the open
 * transaction sees them: the same rows the FAISS file of that generation holds. */
static int write_idmap(kst_ix *ix, const char *ann_file, kst_error *err) {
    char name[80], path[PATH_CAP];
    ids_name(ann_file, name, sizeof name);
    int rc = kst_path_join(path, sizeof path, ix->dir, name, err);
    return rc == KST_OK ? kst_idmap_write(ix->store, path, err) : rc;
}

/* Trains (when needed) and fills the ANN with the kept vectors, removes replaced ids, writes the
 * next generation's file and points the manifest at it (inside the open transaction). */
static int finish_ann(kst_ix *ix, pending *p, kst_ix_stats *st, char *new_file, size_t cap,
                      kst_error *err) {
    int rc = KST_OK;
    new_file[0] = '\0';
    if (!ix->dense) return KST_OK;
    int dim = (int)ix->dense->dim;
    double t0 = kst_now();
    if (!ix->ann) {
        if (p->n == 0 && p->ngone == 0) return KST_OK; /* nothing to index yet */
        char fac[KST_STORE_FACTORY_MAX], why[256];
        if (strcmp(ix->factory, "auto") == 0)
            kst_ann_factory_auto((int64_t)p->n, dim, fac, sizeof fac, why, sizeof why);
        else
            snprintf(fac, sizeof fac, "%s", ix->factory);
        KST_TRY(kst_ann_create(fac, dim, &ix->ann, err));
        if (ix->device) KST_TRY(kst_ann_set_device(ix->ann, ix->device, 0, err));
    }
    if (!kst_ann_is_trained(ix->ann)) {
        KST_TRY(kst_ann_train(ix->ann, (int64_t)p->n, dim, p->vecs, err));
        snprintf(st->note, sizeof st->note, "%s", kst_ann_note(ix->ann));
    }
    st->train_s += kst_now() - t0;
    t0 = kst_now();
    if (p->n) KST_TRY(kst_ann_add(ix->ann, (int64_t)p->n, dim, p->vecs, p->ids, err));
    if (p->ngone) KST_TRY(kst_ann_remove(ix->ann, p->ngone, p->gone, NULL, err));
    st->add_s += kst_now() - t0;
    t0 = kst_now();
    kst_store_manifest man;
    KST_TRY(kst_store_manifest_read(ix->store, &man, err));
    snprintf(new_file, cap, "dense.%lld.faiss", (long long)(man.generation + 1));
    char path[PATH_CAP];
    KST_TRY(kst_path_join(path, sizeof path, ix->dir, new_file, err));
    KST_TRY(kst_ann_write(ix->ann, path, err));
    KST_TRY(write_idmap(ix, new_file, err));
    KST_TRY(kst_store_meta_set(ix->store, "ann_file", new_file, err));
    const char *fac = kst_ann_factory(ix->ann);
    if (fac && *fac) KST_TRY(kst_store_meta_set(ix->store, "faiss_factory", fac, err));
    st->write_s += kst_now() - t0;
done:
    return rc;
}

/* Commits, or rolls everything back (the in-memory FAISS index is reloaded from the committed
 * file, and the new file removed). */
/* Crash-test hook (as SQLite's test hooks): KESTREL_TEST_KILL=before_commit|after_commit makes
 * the process kill itself at that point of a write, so tests can check both sides. */
static void test_kill_point(const char *where) {
    const char *k = getenv("KESTREL_TEST_KILL");
    if (k && strcmp(k, where) == 0) raise(SIGKILL);
}

static int end_write(kst_ix *ix, int rc, const char *new_file, kst_error *err) {
    char path[PATH_CAP];
    char old[64];
    snprintf(old, sizeof old, "%s", ix->ann_file);
    if (rc == KST_OK && ix->tokens) rc = kst_tokens_sync(ix->tokens, err);
    if (rc == KST_OK) test_kill_point("before_commit");
    if (rc == KST_OK) rc = kst_store_commit(ix->store, err);
    if (rc == KST_OK) test_kill_point("after_commit");
    if (rc == KST_OK) {
        if (new_file[0]) {
            snprintf(ix->ann_file, sizeof ix->ann_file, "%s", new_file);
            prune_ann_files(ix->dir, ix->ann_file, old);
            /* The commit is done; a map that cannot be read back only costs speed (searches
             * then read external ids from SQLite). */
            kst_error e2;
            if (load_idmap(ix, &e2) != KST_OK) ix->idmap = NULL;
        }
        return KST_OK;
    }
    kst_store_rollback(ix->store, NULL);
    if (new_file[0] && kst_path_join(path, sizeof path, ix->dir, new_file, NULL) == KST_OK) unlink(path);
    if (new_file[0]) {
        char ids[80];
        ids_name(new_file, ids, sizeof ids);
        if (kst_path_join(path, sizeof path, ix->dir, ids, NULL) == KST_OK) unlink(path);
    }
    kst_error e2;
    load_ann(ix, &e2); /* back to the committed state; the first error is the one to report */
    return rc;
}

int kst_ix_add(kst_ix *ix, kst_docs *docs, kst_ix_progress_fn progress, void *ctx,
               kst_ix_stats *stats, kst_error *err) {
    kst_ix_stats local;
    kst_ix_stats *st = stats ? stats : &local;
    memset(st, 0, sizeof *st);
    if (!ix->writable) return kst_fail(err, KST_ERR_MISUSE, "%s: opened read-only", ix->dir);
    pending p = {0};
    batch b = {0};
    char new_file[64] = "";
    int rc = kst_store_begin(ix->store, err);
    if (rc != KST_OK) return rc;
    b.texts = kst_calloc(ENCODE_BATCH, sizeof *b.texts, "batch", err);
    b.ids = kst_calloc(ENCODE_BATCH, sizeof *b.ids, "batch", err);
    if (!b.texts || !b.ids) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    kst_stream *s = kst_docs_stream(docs);
    for (;;) {
        kst_doc d;
        double t0 = kst_now();
        KST_TRY(kst_docs_next(docs, &d, err));
        st->read_s += kst_now() - t0;
        if (!d.id) break;
        t0 = kst_now();
        int64_t id, replaced;
        rc = kst_store_add(ix->store, d.id, d.title_len ? d.title : NULL, d.text, d.meta_json, &id, &replaced, err);
        if (rc != KST_OK) {
            kst_error_prefix(err, "%s line %zu", kst_stream_name(s), d.line);
            goto done;
        }
        st->store_s += kst_now() - t0;
        if (replaced >= 0) {
            st->replaced++;
            KST_TRY(push_gone(&p, replaced, err));
        }
        if (ix->dense || ix->colbert) {
            b.texts[b.n] = kst_ix_doc_text(d.title, d.text, err);
            if (!b.texts[b.n]) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            b.ids[b.n++] = id;
            if (b.n == ENCODE_BATCH) {
                KST_TRY(encode_batch(ix, &b, &p, st, err));
                batch_clear(&b);
            }
        }
        st->docs++;
        if (progress && st->docs % 64 == 0)
            progress(ctx, st->docs, kst_stream_bytes_read(s), kst_stream_bytes_total(s));
    }
    KST_TRY(encode_batch(ix, &b, &p, st, err));
    batch_clear(&b);
    if (progress) progress(ctx, st->docs, kst_stream_bytes_read(s), kst_stream_bytes_total(s));
    KST_TRY(finish_ann(ix, &p, st, new_file, sizeof new_file, err));
done:
    rc = end_write(ix, rc, new_file, err);
    if (b.texts) batch_clear(&b);
    kst_free(b.texts);
    kst_free(b.ids);
    pending_free(&p);
    return rc;
}

int kst_ix_delete(kst_ix *ix, const char *const *ids, size_t n, size_t *removed, kst_error *err) {
    if (!ix->writable) return kst_fail(err, KST_ERR_MISUSE, "%s: opened read-only", ix->dir);
    pending p = {0};
    char new_file[64] = "";
    kst_ix_stats st;
    memset(&st, 0, sizeof st);
    int64_t *gone = kst_malloc(n ? n : 1, sizeof *gone, "deleted ids", err);
    if (!gone) return KST_ERR_NOMEM;
    size_t nrem = 0;
    int rc = kst_store_begin(ix->store, err);
    if (rc != KST_OK) {
        kst_free(gone);
        return rc;
    }
    KST_TRY(kst_store_delete(ix->store, ids, n, gone, &nrem, err));
    for (size_t i = 0; i < n; i++)
        if (gone[i] >= 0) KST_TRY(push_gone(&p, gone[i], err));
    if (ix->ann && p.ngone) KST_TRY(finish_ann(ix, &p, &st, new_file, sizeof new_file, err));
done:
    rc = end_write(ix, rc, new_file, err);
    if (rc == KST_OK && removed) *removed = nrem;
    kst_free(gone);
    pending_free(&p);
    return rc;
}

int kst_ix_replace_ann(kst_ix *ix, kst_ann *ann, const char *meta_key, const char *meta_value,
                       kst_error *err) {
    return kst_ix_replace_ann_meta(ix, ann, &meta_key, &meta_value, meta_key ? 1 : 0, err);
}

int kst_ix_replace_ann_meta(kst_ix *ix, kst_ann *ann, const char *const *keys,
                            const char *const *values, size_t nkeys, kst_error *err) {
    if (!ix->writable) {
        kst_ann_free(ann);
        return kst_fail(err, KST_ERR_MISUSE, "%s: opened read-only", ix->dir);
    }
    char new_file[64] = "", path[PATH_CAP];
    int rc = kst_store_begin(ix->store, err);
    if (rc != KST_OK) {
        kst_ann_free(ann);
        return rc;
    }
    kst_store_manifest man;
    KST_TRY(kst_store_manifest_read(ix->store, &man, err));
    snprintf(new_file, sizeof new_file, "dense.%lld.faiss", (long long)(man.generation + 1));
    KST_TRY(kst_path_join(path, sizeof path, ix->dir, new_file, err));
    KST_TRY(kst_ann_write(ann, path, err));
    KST_TRY(write_idmap(ix, new_file, err));
    KST_TRY(kst_store_meta_set(ix->store, "ann_file", new_file, err));
    for (size_t i = 0; i < nkeys; i++)
        KST_TRY(kst_store_meta_set(ix->store, keys[i], values && values[i] ? values[i] : "", err));
    if (ix->device) KST_TRY(kst_ann_set_device(ann, ix->device, 0, err));
    kst_ann_free(ix->ann);
    ix->ann = ann; /* end_write reloads the committed file if the commit fails */
    ann = NULL;
done:
    rc = end_write(ix, rc, new_file, err);
    kst_ann_free(ann);
    return rc;
}
