/* faiss_ext.h - C-linkage extensions to FAISS's C API for what it lacks: IVF coarse centroids,
 * PQ codebooks and the OPQ rotation (read and write), inverted lists (sizes, ids, codes), and a
 * search with per-call nprobe/efSearch that is safe from many threads.
 *
 * They follow the C API's conventions (index/faiss_c.cpp implements both): every function returns
 * 0 or a negative FaissErrorCode, the calling thread's last error is faiss_get_last_error(), no
 * C++ exception leaves them, and sizes are in elements. Each takes the index as the C API hands it
 * out: the structure is found through IndexPreTransform (OPQ), IndexIDMap and IndexIVF layers, so
 * `OPQm,IVFn,PQm` from the factory works as it is.
 *
 * Layout of the vectors an IVF-PQ index stores (what the later issues rely on):
 *   y = A x                        when there is a linear pre-transform (OPQ), else y = x
 *   list = nearest centroid of y   (by the index's metric; centroids are (nlist, ivf_d))
 *   r = y - centroid[list]         when by_residual, else r = y
 *   code = PQ(r): for each sub-quantizer m < pq_M, the index (pq_nbits bits, packed as FAISS's
 *          PQEncoderGeneric does; one byte each when pq_nbits == 8) of the nearest row of
 *          codebook[m] (pq_ksub, pq_dsub) to r[m*pq_dsub : (m+1)*pq_dsub]
 * so the reconstruction is A^T (centroid[list] + decode(code)) (A is orthonormal for OPQ).
 *
 * Writing centroids, codebooks or the rotation is allowed only on an index that holds no vectors
 * (ntotal == 0): stored codes depend on them. Readers of an index may run from many threads at
 * once; writers need exclusive use, as for the rest of FAISS. */
#ifndef KST_INDEX_FAISS_EXT_H
#define KST_INDEX_FAISS_EXT_H

#include <stddef.h>
#include <stdint.h>

#include <faiss/c_api/Index_c.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What an index is made of; fields are 0 for parts it does not have. */
typedef struct kst_faiss_layout {
    int d;               /* input dimension */
    int64_t ntotal;      /* vectors stored */
    int is_trained;
    int metric;          /* FaissMetricType */
    int opq_d_in;        /* linear pre-transform A (opq_d_out, opq_d_in); 0 when none */
    int opq_d_out;
    int ivf_d;           /* dimension the IVF sees (opq_d_out or d); 0 when not IVF */
    size_t nlist;        /* 0 when not IVF */
    size_t code_size;    /* bytes per stored code in the inverted lists (IVF) */
    int by_residual;     /* PQ encodes y - centroid */
    size_t pq_M;         /* sub-quantizers; 0 when there is no PQ */
    size_t pq_nbits;     /* bits per sub-quantizer index */
    size_t pq_ksub;      /* 1 << pq_nbits */
    size_t pq_dsub;      /* ivf_d / pq_M */
    int is_hnsw;         /* an HNSW graph (efSearch applies) */
    int has_id_map;      /* IndexIDMap layer: ids are the caller's */
} kst_faiss_layout;

/* Fills *out. Fails only on a NULL argument. */
int kst_faiss_layout_get(const FaissIndex *index, kst_faiss_layout *out);

/* IVF coarse centroids, (nlist, ivf_d) row-major. _get fails when the index is not IVF or its
 * quantizer does not hold nlist centroids (untrained). _set replaces them (the flat quantizer is
 * reset and refilled) and fails on a non-empty index or a quantizer that is not flat. An IVF
 * without PQ is then trained; one with PQ keeps its trained state, so to build a new IVF-PQ from
 * outside set the centroids first, then the codebook (which marks it trained). */
int kst_faiss_ivf_centroids_get(const FaissIndex *index, float *centroids);
int kst_faiss_ivf_centroids_set(FaissIndex *index, const float *centroids);

/* PQ codebooks (IndexIVFPQ or IndexPQ), (pq_M, pq_ksub, pq_dsub) row-major, FAISS's own order.
 * _set also rebuilds what FAISS derives from them (precomputed tables, transposed copies), marks
 * the index trained when its IVF quantizer holds nlist centroids, and fails on a non-empty index. */
int kst_faiss_pq_codebook_get(const FaissIndex *index, float *codebook);
int kst_faiss_pq_codebook_set(FaissIndex *index, const float *codebook);

/* The linear pre-transform's matrix A (opq_d_out, opq_d_in), y = A x (OPQ's rotation; FAISS's
 * bias b is zero for OPQ and is not touched). Fails when the index has no linear pre-transform.
 * _set marks the transform trained and fails on a non-empty index. */
int kst_faiss_opq_matrix_get(const FaissIndex *index, float *A);
int kst_faiss_opq_matrix_set(FaissIndex *index, const float *A);

/* A deep copy of index (every layer, the OPQ matrix, centroids, codebooks, settings) holding no
 * vectors: *out is the copy, emptied, ready for new centroids/codebooks (Distill-VQ writes its
 * learned ones into it, then adds the documents, which FAISS re-encodes). Fails on an index type
 * FAISS cannot clone (e.g. memory-mapped inverted lists: read the file without mmap). Free *out
 * with faiss_Index_free. */
int kst_faiss_clone_empty(const FaissIndex *index, FaissIndex **out);

/* Inverted lists. sizes: (nlist). For one list: ids (size) and codes (size, code_size); either
 * pointer may be NULL to skip it. Fails on a bad list number or an index that is not IVF. */
int kst_faiss_ivf_list_sizes(const FaissIndex *index, size_t *sizes);
int kst_faiss_ivf_list_get(const FaissIndex *index, size_t list_no, idx_t *ids, uint8_t *codes);

/* Adds n entries already encoded: entry i goes to list list_nos[i] with the IVF's code
 * codes[i * code_size ...] (for IVF-PQ the PQ code of the residual, FAISS's byte layout) under id
 * ids[i]. For codes chosen by other means than FAISS's nearest-codeword encoder (Distill-VQ's
 * query-weighted codes, train/vq_code.h); search is unchanged. Fails on a list out of range, an
 * untrained index, or an index with an id map. */
int kst_faiss_ivf_add_encoded(FaissIndex *index, idx_t n, const idx_t *list_nos,
                              const uint8_t *codes, const idx_t *ids);

/* Searches as faiss_Index_search, with nprobe (IVF; 0 keeps the index's) and ef_search (HNSW; 0
 * keeps the index's) given for this call only, through FAISS's SearchParameters: the index is
 * not modified, so concurrent searches with different settings are safe. distances and labels
 * are (n, k); missing results are label -1. */
int kst_faiss_search(const FaissIndex *index, idx_t n, const float *x, idx_t k, size_t nprobe,
                     int ef_search, float *distances, idx_t *labels);

/* A flat index's stored vectors (ntotal, d) and their ids (ntotal): the caller's ids under an
 * IndexIDMap, positions otherwise. Either pointer may be NULL. Fails on an index that is not
 * flat (IVF, HNSW, PQ, pre-transform). For the GPU copy (index/ann_gpu.c). */
int kst_faiss_flat_get(const FaissIndex *index, float *x, idx_t *ids);

/* Kestrel's training settings, applied by kst_ann to every index it creates: no polysemous
 * training (the factory turns it on for IVFn,PQm: a simulated-annealing reordering of the PQ
 * centroids that only FAISS's polysemous Hamming filter uses, and that took ~4 s per
 * sub-quantizer here, libfaiss.a being built without popcnt), and no "WARNING clustering" lines
 * on stderr (min_points_per_centroid 0 in the IVF and PQ k-means; kst_ann notes instead). Search
 * results of a trained index do not depend on either. Indexes without these parts are left as
 * they are; fails only on a NULL index. */
int kst_faiss_training_defaults(FaissIndex *index);

/* k-means of n vectors x (n, d) into k centroids (k, d) (faiss::Clustering over a flat L2
 * index): niter iterations, at most max_per training vectors per centroid (FAISS samples the
 * rest out, by seed), no warnings on few vectors per centroid. Fails on n < k. For the KV
 * cache's tail clusters (index/kv_tclust.c). */
int kst_faiss_kmeans(size_t d, size_t n, size_t k, const float *x, int niter, int max_per, int seed,
                     float *centroids);

/* KST_OK when the BLAS/LAPACK routines libfaiss.a calls can be reached (OpenBLAS loaded and
 * complete); otherwise err says what is missing (index/faiss_blas.c). */
int kst_faiss_blas_ready(kst_error *err);

#ifdef __cplusplus
}
#endif

#endif
