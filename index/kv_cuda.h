/* kv_cuda.h - the GPU side of the retrieval-attention KV cache (index/kv_cuda.cu, compiled only
 * with `make CUDA=1`): the static tokens' keys and values held on the GPU with a partial-
 * attention kernel over them (its (o, lse) merge with the CPU's retrieved-token partial), the
 * tail estimate's sample table scored in the same launch (kst_kvgpu_tail_reserve), and
 * the exact top-k by inner product that the attention-aware index is built from (cuBLAS scores,
 * a block-per-query selection).
 *
 * Every function returns a kst_status and fills err with the CUDA call and its message on
 * failure; none aborts. Handles are not thread-safe. */
#ifndef KST_INDEX_KV_CUDA_H
#define KST_INDEX_KV_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices (0 without a GPU or driver; never fails). */
int kst_kv_cuda_devices(void);

typedef struct kst_kvgpu kst_kvgpu;

/* Device buffers for the static tokens: `sinks` slots, then a ring of `ring` slots (the window
 * and the tokens that left it but are not indexed yet), each slot a token's keys and values
 * (kv_heads, d) in float16 (f16) or float32; plus the query and result buffers of q_heads. */
int kst_kvgpu_create(size_t q_heads, size_t kv_heads, size_t d, size_t sinks, size_t ring, int f16,
                      float scale, kst_kvgpu **out, kst_error *err);
void kst_kvgpu_free(kst_kvgpu *g);
/* Device memory held, in bytes. */
size_t kst_kvgpu_bytes(const kst_kvgpu *g);

/* Writes n consecutive slots from `slot` on (slot < sinks: sinks; sinks + i: ring slot i): keys
 * and values (n, kv_heads, d) host rows. Asynchronous: the rows are staged in pinned memory and
 * one copy is queued on the step's stream (so the next step's kernel sees them); it waits for the
 * stream only when the staging would overwrite rows whose copy may still be queued (a ring of
 * slots written since the last step's partials came in). */
int kst_kvgpu_put(kst_kvgpu *g, size_t slot, const void *K, const void *V, size_t n,
                   kst_error *err);

/* Starts the partial attention of q (q_heads, d) float32 over sink slots [0, nsink) and cnt ring
 * tokens from ring offset rlo on (ring slots rlo, rlo + 1, ... mod ring) (returns at once);
 * kst_kvgpu_partial_wait then writes o (q_heads, d) and lse (q_heads). */
/* The step's parameters, uploaded after the query (ints): sink slots, ring offset, ring tokens,
 * skip (1: the step kernel does nothing; a released armed chain), then the slots staged by
 * kst_kvgpu_put while armed: their count and up to KST_KVGPU_DMAX slots. */
#define KST_KVGPU_DMAX 32
#define KST_KVGPU_PRM (6 + KST_KVGPU_DMAX) /* (the last: the step's number, kst_kvgpu_items_ready) */
int kst_kvgpu_partial_start(kst_kvgpu *g, const float *q, size_t nsink, size_t rlo, size_t cnt,
                            kst_error *err);
/* Launch without host cost (round 17): queues the next step's work (the query upload, the
 * kernels, the downloads, the event) on the handle's stream now, behind a wait
 * (cuStreamWaitValue32) on a flag word in pinned host memory; the next kst_kvgpu_partial_start
 * then only writes the query and its parameters into pinned memory and the flag (no CUDA call,
 * ~1-2 us instead of 12-22), and kst_kvgpu_put meanwhile stages rows in pinned memory that the
 * step's first kernel copies in (zero-copy; more than KST_KVGPU_DMAX slots, or any other call
 * that needs the stream, releases the chain first: its kernel skipped, the stream synchronized).
 * Call it once the last step's partials are in (no-op otherwise, or if already armed, or where
 * the device takes no stream waits on host memory, or without the step's CUDA graph: after the
 * first graphed partial_start; the first call only has the next step's graph captured anew with
 * the staged slots' kernel, which a handle never armed does not run). While armed the stream is
 * blocked on the flag: a
 * cudaDeviceSynchronize by the caller would not return; kst_kvgpu_disarm (or any of this
 * handle's other calls) releases it. *armed: 1 if a chain is queued now. */
int kst_kvgpu_arm(kst_kvgpu *g, int *armed, kst_error *err);
/* Releases g's chain if armed; as any release, it releases every armed handle of the process
 * (all flags written first, then the streams synchronized: a queued wait can hold up other
 * streams sharing its hardware queue, so releasing one by one could wait forever).
 * kst_kvgpu_release_all: the same whether g is armed or not. kst_kvgpu_create, _free, the tail
 * table's reallocation and kst_kv_cuda_topk (whose allocations and frees may wait for the whole
 * device) call it first. */
int kst_kvgpu_disarm(kst_kvgpu *g, kst_error *err);
int kst_kvgpu_release_all(kst_error *err);
/* 1 where kst_kvgpu_arm can queue a chain (the device takes stream waits on host memory). */
int kst_kvgpu_can_arm(const kst_kvgpu *g);
/* Steps launched through an armed chain since creation. */
size_t kst_kvgpu_armed_steps(const kst_kvgpu *g);
int kst_kvgpu_partial_wait(kst_kvgpu *g, float *o, float *lse, kst_error *err);
/* As kst_kvgpu_partial_wait, without the copies: *o (q_heads, d) and *lse (q_heads) point at the
 * partials in pinned host memory, valid until the next kst_kvgpu_partial_start. Safe to call
 * from any thread (one call at a time). */
int kst_kvgpu_partial_ready(kst_kvgpu *g, const float **o, const float **lse, kst_error *err);
/* Without waiting: *done 1 (and *o, *lse as kst_kvgpu_partial_ready sets them) when the
 * partials are in, else 0. */
int kst_kvgpu_partial_poll(kst_kvgpu *g, const float **o, const float **lse, int *done, kst_error *err);

/* The tail estimate's sample table on the GPU (kv.h, kst_kvc_attend): per KV head ns sampled
 * rows of keys and values in nc chunks of ch rows (ch <= 1024; the last chunk may be shorter),
 * keys transposed within each chunk as the CPU's table keeps them ((d, rows) per chunk), values
 * (ns, d). Once reserved (ns > 0), every kst_kvgpu_partial_start also scores the table for the
 * query heads, and kst_kvgpu_tail_out then holds, per query head h and chunk c (item h * nc + c,
 * kst_kvgpu_tail_stride floats each): the chunk's best score mx, the sum of w = exp(s - mx) over
 * its rows outside its KST_KVGPU_TT_TOP best, their sum of w V (d), the best rows (int32 row
 * within the chunk, as float bits) and their weights, then (kst_kvgpu_tail_topsum on, the
 * default) the best rows' sum of w V (d). ns 0: no tail. */
#define KST_KVGPU_TT_TOP 32
int kst_kvgpu_tail_reserve(kst_kvgpu *g, size_t ns, size_t ch, size_t nc, kst_error *err);
/* 1 (the default): the items end with their best rows' sum of w V; 0: without it. Takes effect
 * at the next kst_kvgpu_tail_reserve (a change makes it lay the items out anew; the tables
 * must then be put again). */
void kst_kvgpu_tail_topsum(kst_kvgpu *g, int on);
/* The evenly spaced tail's table in 8 bits (each row quantized by kst_kv_q8: a scale a row; the
 * keys grouped as the sample cache's, one block a KV head's chunk scoring it for its G query
 * heads): where 1 on the GPU (half the float16 table's bytes), 2 in pinned host memory, mapped,
 * which the step's kernel reads over PCIe in place (the GPU holding none of it: kst_kvgpu_bytes
 * leaves it out), 0 (the default) in the cache's type on the GPU. Returns 0 (and leaves it as it
 * was) where the grouped layout does not fit chunks of ch rows: G <= 8, head dim <= 128 and a
 * multiple of 16, ch <= 1,024, G times ch rounded up to a power of two <= 4,096,
 * KESTREL_KV_GPU_TGRP not 0.
 * Takes effect at the next kst_kvgpu_tail_reserve (the tables must then be put again);
 * kst_kvgpu_tail_put quantizes the rows on the host. The items are as above. */
int kst_kvgpu_tail_q8(kst_kvgpu *g, int where, size_t ch);
/* where 3 (with a pool bound by kst_kvgpu_tail_stage; else kst_kvgpu_tail_q8 returns 0): the
 * table in pinned host memory as with 2 (one block: keys, values, scales), and copied whole into
 * the handle's slot of a pool of GPU buffers shared by a model's layers, which its kernel reads.
 * kst_kvgpu_prefetch, called for the next layer's handle once this layer's step is launched,
 * queues that copy on the next handle's stream, so it runs during this step (after the slot's
 * last copy and last reader, where those may still run); a step whose table is in its slot so
 * (kst_kvgpu_stage_hit) copies nothing, one whose is not (no prefetch, another layer's copy
 * since, or its table put since) copies it first. Each layer's memory then holds only the static
 * tokens (kst_kvgpu_bytes leaves the table out) and the pool one table a slot
 * (kst_kvgpu_pool_bytes). Adjacent layers need different slots: two for an even number of
 * layers, three for an odd one. Such a handle is never armed (kst_kvgpu_arm: a queued step would
 * hold its slot for a layer's cycle, while the layers between use it). */
#define KST_KVGPU_POOL_MAX 4
typedef struct kst_kvgpu_pool kst_kvgpu_pool;
int kst_kvgpu_pool_create(size_t slots, kst_kvgpu_pool **out, kst_error *err);
/* Frees the pool once its copies are done; free or unbind (kst_kvgpu_tail_stage(g, NULL, 0)) its
 * handles first. */
void kst_kvgpu_pool_free(kst_kvgpu_pool *p);
/* Binds g to slot `slot` of p (NULL: none; where 3 then falls back to 2 at the next reserve). */
void kst_kvgpu_tail_stage(kst_kvgpu *g, kst_kvgpu_pool *p, size_t slot);
int kst_kvgpu_prefetch(kst_kvgpu *g, kst_error *err);
int kst_kvgpu_stage_hit(const kst_kvgpu *g);
size_t kst_kvgpu_pool_bytes(const kst_kvgpu_pool *p);
/* Uploads KV head kv_head's table: K and V of ns * d values each, in the layout above. */
int kst_kvgpu_tail_put(kst_kvgpu *g, size_t kv_head, const void *K, const void *V, kst_error *err);
size_t kst_kvgpu_tail_stride(const kst_kvgpu *g);
/* Pinned host copy of the last step's items, valid once the partials are in (wait/ready/poll). */
const float *kst_kvgpu_tail_out(const kst_kvgpu *g);
/* 1 once the launched step's items of KV head kv_head (its query heads' items, kst_kvgpu_tail_out)
 * are in host memory, before the step's partials (the kernel writes them in place; 0 where it
 * does not: KESTREL_KV_GPU_DIRECT=0 or no mapped memory, then they come with the partials). Only
 * valid once the step's kst_kvgpu_partial_start has returned. */
int kst_kvgpu_items_ready(const kst_kvgpu *g, size_t kv_head);

/* The clustered tail's sample cache (index/kv_scache.h, kst_kvc_set_tail_cache) on the GPU: the
 * tail table above (kst_kvgpu_tail_reserve(cap, ch, nc)) with a cluster a slot (-1: free) and a
 * log weight a cluster (its rows weighted by it in the items, a free slot's rows left out), and
 * the KV heads' C centroids cent (kv_heads, d, C) float32 (held in the cache's dtype: for float16
 * caches they must be float16 values, as kst_kvtc_build makes them), scored for every query head in each
 * step's launch (scale <q_h, cent_c>, (q_heads, C); kst_kvgpu_sc_fetch). Every slot starts free
 * and every weight at -inf. cap 0 releases it. Where G = q_heads / kv_heads <= 8, d <= 128 and G
 * times the chunk's rows (rounded up to a power of two) <= 4,096, one block scores a chunk for
 * the KV head's G query heads at once (its keys then kept in 16-byte pieces, chunk-transposed
 * by piece), and one block the centroids of a KV head's heads; KESTREL_KV_GPU_TGRP=0 at creation
 * keeps a block a query head (the items are the same either way). q8: the table's keys and values
 * held in 8 bits with a scale a row each (kst_kvc_set_tail_cache_q8; the rows staged as they are,
 * quantized as they are written into the table), only in the grouped layout (else
 * KST_ERR_INVALID). */
int kst_kvgpu_sc_reserve(kst_kvgpu *g, size_t cap, size_t ch, size_t nc, size_t C, const float *cent, int q8,
                         kst_error *err);
/* Pinned staging for n slots of the table (grown as needed, never shrunk: the caller sends in
 * pieces, kv.c at most 4,096 slots a send; once the last send's scatter is done). The GPU reads
 * it in place through its mapped address; with KESTREL_KV_SC_MAPPED=0 (or where the driver gives
 * no device address) through a copy on the GPU of the same size, sent with it. *lw (may be NULL):
 * room for the clusters' log weights (kv_heads, C) to be sent (then pass it to kst_kvgpu_sc_send:
 * no copy). *hdr (n, 3) ints, each a KV head, its slot and its cluster (-1: free, its rows unread),
 * and *rows (n, 2, d) values in the cache's dtype, the slot's key and value rows (with q8, the table
 * in 8 bits, quantized on the GPU as kst_kv_q8 does on the CPU). Where the cache's rows are
 * registered (kst_kvgpu_sc_store), *rows is NULL and *hdr (n, 4) ints: the 4th the slot's row
 * in its KV head's keys and values, which the GPU reads there. An entry whose KV head is -1 is
 * skipped. */
int kst_kvgpu_sc_staging(kst_kvgpu *g, size_t n, int **hdr, void **rows, float **lw, kst_error *err);
/* Registers (pins and maps) the first `bytes` (rounded up to whole pages) of each KV head's cached
 * rows K[h], V[h] (the cache's dtype, (rows, d); page-aligned buffers of whole pages) so that the
 * sample cache's scatter reads the rows it adds where they are, none staged (only with
 * KESTREL_KV_SC_MAPPED=2 at creation; unset, 1 or 0, a no-op). The same buffers with more bytes
 * register the rest as a new segment (pinning only what the cache holds); other buffers, or K
 * NULL, unregister all first, once the last scatter is done (call it with NULL before the rows
 * move or are freed). Where the driver refuses (no room to pin), nothing stays registered and the
 * rows are staged: kst_kvgpu_sc_stored says which. Staged slots may only name rows registered. */
int kst_kvgpu_sc_store(kst_kvgpu *g, const void *const *K, const void *const *V, size_t bytes, kst_error *err);
int kst_kvgpu_sc_stored(const kst_kvgpu *g);
/* Queues the n slots of the last staging (n as staged; one kernel writes them into the table,
 * reading the staging, and the cache's rows where registered, in place or, not mapped, after one
 * copy with the weights) and, where lw is not NULL, the clusters' log weights lw (kv_heads, C)
 * on the step's stream: the next launch sees them. */
int kst_kvgpu_sc_send(kst_kvgpu *g, size_t n, const float *lw, kst_error *err);
/* The last step's centroid scores (q_heads, C) downloaded (queued once its partials are in: they
 * are not part of its downloads, so that the partials come in sooner), then waited for; then
 * kst_kvgpu_sc_scores points at them in pinned host memory (NULL without the cache). */
int kst_kvgpu_sc_fetch(kst_kvgpu *g, kst_error *err);
int kst_kvgpu_sc_fetched(kst_kvgpu *g, kst_error *err);
const float *kst_kvgpu_sc_scores(const kst_kvgpu *g);

/* The static tokens' partial split over s blocks a query head (split-K over the tokens, the
 * head's last block merging the s partials by log-sum-exp; 1: one block a head, as before
 * round 16), the step's kernel built for minb (2 or 3) blocks of 512 threads an SM (3: fewer
 * registers). Defaults KST_KVGPU_SPLIT and KST_KVGPU_MINB (KESTREL_KV_GPU_SPLIT,
 * KESTREL_KV_GPU_MINB at creation override them). H100, 1,028 static tokens x 32 query heads
 * beside 256 tail blocks (bench README, round 16): the kernel 98-101 us with 1, 45 with 4, 58
 * with 8 (48 built for 3 blocks an SM), 57 with 16. */
#define KST_KVGPU_SPLIT 4
#define KST_KVGPU_SPLIT_MAX 32
#define KST_KVGPU_MINB 2
void kst_kvgpu_split(kst_kvgpu *g, int s, int minb);
/* KESTREL_KV_GPU_TIME=1 at creation (benchmarks): the step runs without a graph, timed by CUDA
 * events; returns the steps timed since the last call and their summed spans, ms: query upload,
 * kernel, downloads (then cleared). 0 with timing off. */
size_t kst_kvgpu_times(kst_kvgpu *g, double ms[3]);

/* Exact top-k (k <= 64) keys by inner product for each query: K (n, d) and Q (nq, d) float32
 * host arrays, ids (nq, k) best first. */
int kst_kv_cuda_topk(const float *K, size_t n, size_t d, const float *Q, size_t nq, size_t k,
                     uint32_t *ids, kst_error *err);

#ifdef __cplusplus
}
#endif
#endif
