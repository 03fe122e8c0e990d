/* ann.h - the dense vector index: FAISS through its C API, inner product, caller's int64 ids.
 *
 * A thin layer over <faiss/c_api/...>: create from a factory string (`Flat`, `IVFn,PQm`,
 * `OPQm,IVFn,PQm`, `HNSWn`, anything FAISS's index_factory parses), train on a sample, add with
 * ids, remove ids, search with per-call nprobe/efSearch, write atomically and read back (memory
 * mapping large IVF files). Scores are inner products (cosine for normalised vectors), highest
 * first. Flat and HNSW indexes get an IDMap layer so that they take the caller's ids as IVF does.
 *
 * Threads: searches (kst_ann_search) on one kst_ann may run from many threads at once; train, add,
 * remove and free need exclusive use. Errors carry FAISS's own message after ours. */
#ifndef KST_INDEX_ANN_H
#define KST_INDEX_ANN_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct kst_ann kst_ann;
struct FaissIndex_H;

/* Receives notes about choices made for the caller (a smaller nlist, an under-trained codebook).
 * Called on the calling thread, before the call that made the choice returns. */
typedef void (*kst_ann_note_fn)(void *ctx, const char *note);

/* Per-search settings. 0 keeps the index's own value (FAISS's defaults: nprobe 1, efSearch 16);
 * KST_ANN_SEARCH_OPTS_INIT asks for nprobe 16 and efSearch 64, a sensible recall/speed point. */
typedef struct kst_ann_search_opts {
    int nprobe;    /* IVF lists visited per query (clamped to nlist) */
    int ef_search; /* HNSW candidate list size */
} kst_ann_search_opts;
#define KST_ANN_SEARCH_OPTS_INIT {16, 64}

/* How kst_ann_read maps the file: AUTO maps IVF files of KST_ANN_MMAP_MIN bytes or more. A mapped
 * IVF index is read-only (add and remove fail); FAISS ignores the flag for other index types. */
typedef enum { KST_ANN_MMAP_AUTO = 0, KST_ANN_MMAP_NEVER, KST_ANN_MMAP_ALWAYS } kst_ann_mmap;
#define KST_ANN_MMAP_MIN ((int64_t)256 << 20)

/* FAISS warns below this many training points per k-means centroid. */
#define KST_ANN_POINTS_PER_CENTROID 39

/* Picks a factory string for n vectors of `dim` (always succeeds): Flat below 10,000 vectors,
 * IVF{~4 sqrt n},PQ{dim/8} below 1M, OPQ{m},IVF..,PQ{m} above. Writes the string to factory
 * (cap bytes) and one sentence saying why to why (why_cap bytes; why may be NULL). Returns
 * factory. */
const char *kst_ann_factory_auto(int64_t n, int dim, char *factory, size_t cap, char *why,
                                 size_t why_cap);

/* Creates an empty index. Fails with KST_ERR_INVALID and FAISS's message on a string FAISS cannot
 * parse or that does not fit dim (e.g. PQm with dim % m != 0), KST_ERR_NOTFOUND when OpenBLAS
 * cannot be loaded. *out is NULL on failure; free with kst_ann_free. */
int kst_ann_create(const char *factory, int dim, kst_ann **out, kst_error *err);

/* Reads an index written by kst_ann_write or faiss.write_index (inner-product indexes only).
 * Fails with KST_ERR_IO (missing, unreadable) or KST_ERR_FORMAT (truncated, corrupt, not FAISS),
 * naming the path. *out is NULL on failure. */
int kst_ann_read(const char *path, kst_ann_mmap mmap, kst_ann **out, kst_error *err);

/* Writes the index to path through a temporary file in the same folder, fsync and rename, so
 * readers see the old file or the whole new one. The index is unchanged; a failure leaves no
 * temporary file behind. */
int kst_ann_write(const kst_ann *a, const char *path, kst_error *err);

/* A copy of a's structure (layers, OPQ matrix, centroids, codebooks, factory) with no vectors,
 * for rewriting an index's quantizers (Distill-VQ). Fails with KST_ERR_UNSUPPORTED and FAISS's
 * message where FAISS cannot clone (an index opened memory-mapped). *out is NULL on failure. */
int kst_ann_clone_empty(const kst_ann *a, kst_ann **out, kst_error *err);

/* Frees the index; NULL is a no-op. */
void kst_ann_free(kst_ann *a);

/* Sends notes to fn (NULL: keep them only for kst_ann_note). */
void kst_ann_set_note_fn(kst_ann *a, kst_ann_note_fn fn, void *ctx);
/* The last note, "" when none; valid until the next call on a. */
const char *kst_ann_note(const kst_ann *a);

/* The factory string in use ("" for an index read from a file): training may lower nlist. */
const char *kst_ann_factory(const kst_ann *a);
int kst_ann_dim(const kst_ann *a);
int64_t kst_ann_count(const kst_ann *a);
int kst_ann_is_trained(const kst_ann *a);
/* The FAISS handle, for the faiss_ext.h extensions (centroids, codebooks, lists). Owned by a. */
struct FaissIndex_H *kst_ann_faiss(kst_ann *a);

/* Trains on x (n, dim): a deterministic evenly spaced sample of at most 256 points per centroid
 * (FAISS's own cap) is used. When an IVF index has fewer than 39 * nlist points, it is rebuilt
 * with nlist = n / 39 (at least 1) and a note says so; so is a PQ codebook with fewer than 39 * 256
 * points (noted, not changed). Fails with KST_ERR_SHAPE on a dim mismatch, KST_ERR_MISUSE on an
 * index that already holds vectors, KST_ERR_INVALID with FAISS's message otherwise (e.g. fewer
 * points than PQ centroids). Indexes that need no training (Flat, HNSW) return KST_OK at once. */
int kst_ann_train(kst_ann *a, int64_t n, int dim, const float *x, kst_error *err);

/* Adds x (n, dim) under ids (n). Fails with KST_ERR_SHAPE on a dim mismatch, KST_ERR_MISUSE on an
 * untrained or read-only (memory-mapped) index; the index is unchanged on failure. */
int kst_ann_add(kst_ann *a, int64_t n, int dim, const float *x, const int64_t *ids,
                kst_error *err);

/* Removes every vector whose id is in ids (n); *removed (may be NULL) gets how many were. Ids not
 * present are ignored. Fails with KST_ERR_UNSUPPORTED where FAISS cannot remove (HNSW). */
int kst_ann_remove(kst_ann *a, size_t n, const int64_t *ids, size_t *removed, kst_error *err);

/* Searches q (nq, dim) for the k best by inner product. scores and ids are (nq, k), best first;
 * rows with fewer than k results end with id -1. opts may be NULL (the index's own settings).
 * Fails with KST_ERR_SHAPE on a dim mismatch, KST_ERR_INVALID on k < 1, KST_ERR_MISUSE on an
 * untrained index. */
int kst_ann_search(const kst_ann *a, int64_t nq, int dim, const float *q, int64_t k,
                   const kst_ann_search_opts *opts, float *scores, int64_t *ids, kst_error *err);

/* Searches on the GPU (device 1, KST_DEV_CUDA) or the CPU (0). On the GPU a flat index is kept in
 * GPU memory (float16 when fp16, else float32) and searched exactly there, and an IVF-PQ index
 * (inner product, 8-bit codes, optional OPQ) is searched there over a copy of its lists
 * (index/gpu_search.h), with the same results as on the CPU within the precision kept; the copy
 * is rebuilt at the first search after an add or remove. Other index types stay on the CPU and a
 * note says so.
 * Fails with KST_ERR_UNSUPPORTED when the build has no GPU backend or there is no device. */
int kst_ann_set_device(kst_ann *a, int device, int fp16, kst_error *err);
/* 1 when searches run on the GPU. */
int kst_ann_on_gpu(const kst_ann *a);

#endif
