/* engine.h - an index directory at work: the SQLite store (documents, FTS5, manifest), the FAISS dense
 * index, the ColBERT token store, and the models they were built with.
 *
 * Directory layout:
 *   docs.sqlite (+ -wal, -shm)  documents, BM25, manifest (index/store.h)
 *   dense.<gen>.faiss           the FAISS index of committed generation <gen> (manifest "ann_file")
 *   tokens.f16                  ColBERT token vectors, rows referenced from docs.sqlite
 *
 * Crash safety: a write builds everything new first (token rows appended and synced, the next
 * FAISS file written under a new name and synced), then commits one SQLite transaction that
 * switches the manifest to them. A crash before the commit leaves the old generation intact (its
 * FAISS file is kept until the one after next); after it, the new one. Writers are serialised by
 * SQLite's write lock; readers keep the generation they opened.
 *
 * It lives in rank/ because it joins the encoders with the index/ parts (which know no models). */
#ifndef KST_RANK_ENGINE_H
#define KST_RANK_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/encoder.h"
#include "index/ann.h"
#include "index/collection.h"
#include "index/store.h"
#include "index/tokens.h"

/* Model folders. At creation: dense (NULL: BM25 only), colbert and cross optional. At open: NULL
 * fields use the folders recorded at creation; a given dense or ColBERT model must have the
 * fingerprint the index was built with. */
typedef struct kst_ix_models {
    const char *dense, *colbert, *cross;
} kst_ix_models;

typedef struct kst_ix {
    char *dir;
    int writable;
    kst_store *store;       /* the writer's handle, or the first reader's */
    kst_encoder *dense, *colbert, *cross;
    kst_encoder *query;     /* the query encoder trained with the index (`kestrel train vq
                               --train-query-encoder`, manifest "query_model": a folder inside the
                               index), or NULL: queries use `dense`. Documents always use `dense` */
    kst_ann *ann;           /* NULL for a BM25-only or still empty index */
    struct kst_idmap *idmap; /* ann's internal -> external ids (index/idmap.h); NULL when the
                                index predates it or a write is open */
    kst_tokens *tokens;     /* NULL without a ColBERT model */
    char ann_file[64];      /* committed FAISS file name ("" when none) */
    char factory[KST_STORE_FACTORY_MAX]; /* requested factory ("auto" or a FAISS string) */
    void *pool;             /* read-only store handles for concurrent searches (index.c) */
    int device;             /* KST_DEV_CPU or KST_DEV_CUDA (kst_ix_set_device) */
} kst_ix;

/* Timings of one add, split by stage (seconds), and counts. */
typedef struct kst_ix_stats {
    size_t docs, replaced, tokens;
    double read_s, store_s, encode_s, train_s, add_s, write_s;
    char note[256]; /* a choice made for the caller (e.g. a smaller nlist), "" when none */
} kst_ix_stats;

/* Called after each batch: documents done so far and the input's bytes read / total (0 when
 * unknown). */
typedef void (*kst_ix_progress_fn)(void *ctx, size_t docs, uint64_t bytes, uint64_t total);

/* Creates a new index in `dir` (which must not exist or be empty). factory: "auto" (chosen from
 * the collection size at the first add), or a FAISS factory string (inner product). */
int kst_ix_create(const char *dir, const kst_ix_models *models, const char *factory, kst_ix **out,
                  kst_error *err);
/* Opens an index; writable takes no lock until a write begins. */
int kst_ix_open(const char *dir, const kst_ix_models *models, int writable, kst_ix **out,
                kst_error *err);
void kst_ix_close(kst_ix *ix);
/* Runs the encoders and the dense search on the GPU (KST_DEV_CUDA) or the CPU; the FAISS index
 * loaded or created later follows (rank/engine_gpu.c). */
int kst_ix_set_device(kst_ix *ix, int device, kst_error *err);

/* Adds every document of `docs` in one commit (a re-added external id replaces the document).
 * On failure nothing of it is kept. stats and progress may be NULL. */
int kst_ix_add(kst_ix *ix, kst_docs *docs, kst_ix_progress_fn progress, void *ctx,
               kst_ix_stats *stats, kst_error *err);
/* Deletes documents by external id (absent ids are ignored) from SQLite, FTS5, FAISS and the
 * token store, in one commit. *removed (may be NULL) receives how many were deleted. */
int kst_ix_delete(kst_ix *ix, const char *const *ids, size_t n, size_t *removed, kst_error *err);

/* Replaces the committed FAISS index with `ann` (the same documents re-encoded, e.g. with
 * quantizers learned by Distill-VQ): writes it as the next generation's file, sets meta_key to
 * meta_value in the manifest (meta_key may be NULL) and commits, with kst_ix_add's crash safety
 * (the old file stays valid and named by the manifest until the commit; KESTREL_TEST_KILL applies).
 * Takes ownership of ann: on success ix->ann is ann; on failure ann is freed and ix keeps the
 * committed index. */
int kst_ix_replace_ann(kst_ix *ix, kst_ann *ann, const char *meta_key, const char *meta_value,
                       kst_error *err);
/* kst_ix_replace_ann setting n manifest keys (values NULL: ""), in the same commit. */
int kst_ix_replace_ann_meta(kst_ix *ix, kst_ann *ann, const char *const *keys,
                            const char *const *values, size_t n, kst_error *err);

/* The encoder that embeds queries for the dense search: ix->query when the index has one, else
 * ix->dense. */
static inline kst_encoder *kst_ix_query_encoder(const kst_ix *ix) {
    return ix->query ? ix->query : ix->dense;
}

/* A read-only store handle for one search (thread-safe pool); give it back with kst_ix_put_reader. */
int kst_ix_get_reader(kst_ix *ix, kst_store **out, kst_error *err);
void kst_ix_put_reader(kst_ix *ix, kst_store *s);

/* The text a document is encoded from: "title text" (as BEIR's dense models do), or the text. */
char *kst_ix_doc_text(const char *title, const char *text, kst_error *err);

#endif
