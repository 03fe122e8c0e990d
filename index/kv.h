/* kv.h - a KV cache with retrieval attention (RetrievalAttention): per layer and KV head, the
 * keys and values of every token; the static tokens (the first `sinks` and the last `window`)
 * are always attended to, the rest sit behind a per-head graph index (index/kv_graph.h) that the
 * decode step searches for each query head's top-k keys. The two partial attentions are merged
 * exactly (core/kv_attn.h), so with top_k >= the indexed tokens the result is full attention.
 *
 * Token states, by position p of n cached tokens in a layer:
 *   p < sinks                       static (sink)
 *   sinks <= p < sinks + indexed    in the index (after kst_kvc_build)
 *   sinks + indexed <= p < n        attended exactly: the recent window, and before any build
 *                                   every non-sink token
 * Appends after a build move tokens leaving the window into the index (in batches: the tokens
 * that left the window but are not indexed yet, "pending", are attended exactly with the window,
 * so sinks + indexed + exact = n always; see kst_kvc_append).
 *
 * Grouped-query attention: q_heads is a multiple of kv_heads; query head h reads KV head
 * h / (q_heads / kv_heads). Threads: one call at a time per cache (a cache belongs to one
 * sequence); inside a call heads are spread over OpenMP threads. This is the implementation
 * behind kestrel.h's kst_kv_*. */
#ifndef KST_INDEX_KV_H
#define KST_INDEX_KV_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef enum { KST_KVC_INDEX_ATTN = 0, KST_KVC_INDEX_KEYS = 1, KST_KVC_INDEX_NONE = 2 } kst_kvc_index;

typedef struct kst_kvc_opts {
    size_t layers, kv_heads, q_heads, head_dim;
    int f16;                  /* keys and values stored as IEEE float16 (else float32) */
    float scale;              /* score scale; 0: 1 / sqrt(head_dim) */
    size_t sinks, window;     /* static tokens */
    size_t top_k, ef;         /* retrieved keys per query head (0: ef, every key the search
                                 re-scores exactly), search beam */
    size_t degree;            /* graph out-degree */
    size_t build_top;         /* exact top keys linked per prefill query */
    size_t max_build_queries; /* prefill queries used per KV head (0: all; else evenly spaced) */
    size_t entries;           /* search entry points */
    size_t efc;               /* beam when linking keys in */
    kst_kvc_index index;
    int gpu;                  /* static tokens on the GPU (CUDA=1 builds with a device) */
    size_t tail_samples;      /* 0: attend to the retrieved keys alone (exact top-k attention);
                                 else also estimate the indexed keys left out from this many
                                 evenly spaced ones (see kst_kvc_attend) */
    int group_search;         /* 1: the query heads of a KV head search its graph once together
                                 (kst_kvg_search_group), each keeping its own top_k of the union
                                 of keys scored; n > 1: n of them per search (rounded down to a
                                 divisor of the group: more searches to spread over threads);
                                 0: one search per query head */
    int codes;                /* 1: keep 4-bit codes of the indexed keys (head_dim a multiple of
                                 32) and steer the searches by them, the pool re-scored exactly */
    size_t append_batch;      /* B: tokens leaving the window are linked into the index B at a
                                 time (0, 1: each at its append); see kst_kvc_append */
    float widen;              /* adaptive budget (kst_kvc_attend): a query head whose tail
                                 estimate holds more than this share of its softmax mass is
                                 searched again, wider; 0: off */
    size_t widen_top_k;       /* the widened searches' top_k at most (0: 16 x top_k) */
} kst_kvc_opts;

typedef struct kst_kvc kst_kvc;

typedef struct kst_kvc_stats {
    size_t tokens;    /* cached tokens in the layer */
    size_t exact;     /* tokens attended exactly per query head (sinks, window, not yet indexed) */
    size_t indexed;   /* tokens behind the index */
    size_t retrieved; /* keys retrieved, summed over query heads */
    size_t scanned;   /* keys scored by the searches, summed over query heads */
    size_t sampled;   /* tail keys sampled for the estimate, summed over query heads */
    size_t searches;  /* graph searches run (q_heads, or kv_heads with group_search) */
    size_t widened;   /* widened searches run (opts.widen), summed over query heads */
    size_t staged;    /* 1: the GPU found the step's tail table copied ahead (KST_KVC_Q8_STAGED) */
    size_t probed;    /* searches that ran the cluster probe (kst_kvc_set_probe) */
} kst_kvc_stats;

/* Validates opts (sizes, GQA divisibility) and creates an empty cache. */
int kst_kvc_create(const kst_kvc_opts *opts, kst_kvc **out, kst_error *err);
void kst_kvc_free(kst_kvc *c);
const kst_kvc_opts *kst_kvc_opts_of(const kst_kvc *c);
size_t kst_kvc_tokens(const kst_kvc *c, size_t layer);
size_t kst_kvc_indexed(const kst_kvc *c, size_t layer);

/* Appends n tokens to a layer: keys and values (n, kv_heads, head_dim) in the cache's dtype.
 * When the layer is indexed, tokens leaving the window are linked into the index: with
 * append_batch B > 1, B at a time. Until linked they are pending: attended exactly, as the
 * window is (on the GPU with it: the GPU's ring holds window + 4B slots). Once B are pending,
 * their links are planned (each a key-key search of its KV head's graph, which only reads it):
 * by the appending call on all its threads (the default), or by a background thread while
 * decode steps go on (kst_kvc_set_append_worker), in which case an append that finds the plans
 * done links them in (a few microseconds a token: the edges both ways, the code), between
 * steps, and one that would leave more than 4B pending first helps plan the batch in flight
 * (so the lag is bounded). On failure the layer's tokens stay (pending tokens stay pending). */
int kst_kvc_append(kst_kvc *c, size_t layer, const void *keys, const void *values, size_t n,
                   kst_error *err);

/* The engine's idle time lent to the cache (kst_kvc_set_append_idle; kestrel.h's
 * opts.append_idle): an
 * inference engine's CPU waits while the GPU runs the rest of a layer (the O projection, the
 * MLP, the next layer's QKV: ~0.15 ms for an 8B model on an H100), and a batch append's
 * planning (512 key-key searches at 8 KV heads and B = 64: ~2 ms on 16 threads, once per B
 * steps and layer) belongs there rather than in a decode step. With append_idle the append that
 * completes a batch only queues it (staging its norms); kst_kvc_work then plans the queued
 * batches of every layer in slices of one plan (one key-key search, tens of microseconds) on
 * the calling thread's OpenMP team, asking more(arg) between slices (e.g. "the GPU's event is
 * not ready": cudaEventQuery(ev) == cudaErrorNotReady), and links a planned batch in (all KV
 * heads at once, the edges both ways: ~0.25 ms at 8 KV heads) where more still says yes. With
 * more than one thread the first asks more() while the others plan, so the call returns within
 * one plan of more() saying no. It returns when more() says no or nothing is left to do
 * (*planned, may be NULL: the plans it made; more NULL: until nothing is left). No thread of
 * its own: nothing runs unless the engine calls it (as libuv's idle handles or redis's
 * incremental rehash in its cron), between the cache's other calls (one call at a time). With
 * whole-batch links (kst_kvc_set_link_piece 0) an append that finds its batch planned links it
 * in (if kst_kvc_work has not); by default kst_kvc_work links it in pieces. An append that would
 * leave more than 4B pending plans the batch itself (the lag stays bounded when the engine
 * lends too little time). The result does not depend on who planned: a batch's plans read the
 * graphs as they were when it was queued and each batch is queued at the same point, so after
 * kst_kvc_flush the graphs are the same whether the batches were planned by the appending
 * calls, by planner threads or here (test_kv_idle); before it, a step attends exactly to the
 * tokens not linked yet, so outputs differ within the retrieval's error only. With the sample
 * cache on the GPU (kst_kvc_set_tail_cache), idle mode also leaves a step's upkeep of it here:
 * the step returns once its output is made, and kst_kvc_work first holds each layer's plan and
 * sends the rows it adds to the GPU and, if more() says yes, makes the next step's plans in the
 * same parallel region (before the arms below; a layer's next append or step does the hold and
 * the copy if kst_kvc_work has not; the plans, which that step keeps unless its clusters took keys
 * since, are then made by kst_kvc_work later or by the step; test_gpu_idle_update: the same
 * outputs and held rows as without idle mode). */
int kst_kvc_work(kst_kvc *c, int (*more)(void *), void *arg, size_t *planned, kst_error *err);
/* 1: batch appends planned and linked in the engine's idle time (kst_kvc_work), the appending
 * call only queueing a completed batch; 0 (the default; KESTREL_KV_APPEND_IDLE=1 at creation
 * turns it on): the appending call plans it. Taken up at the next batch. */
void kst_kvc_set_append_idle(kst_kvc *c, int on);
/* Idle mode: kst_kvc_work links a planned batch n tokens at a time (every KV head; ~5-10 us a
 * token at 8 KV heads), asking more() before each piece, so that a link no longer overruns the
 * engine's window by a whole batch (0.3-0.7 ms at B = 64); an append then leaves a planned
 * batch to kst_kvc_work unless more than 4B tokens are pending. Between pieces every head's
 * index holds the same tokens (as if the batch were shorter), and each head's links are made
 * in the same order, so the graphs do not depend on where the pieces ran. 0: the whole batch
 * at once, linked by the next append if kst_kvc_work has not (rounds 13-15). Default 8
 * (KESTREL_KV_LINK_PIECE at creation overrides it). */
void kst_kvc_set_link_piece(kst_kvc *c, size_t n);
/* The GPU's partial (static tokens + tail sample): 1 (KESTREL_KV_GPU_EARLY=1 at creation)
 * launched by the calling thread before the decode step's parallel part; 0 (the default) by
 * thread 0 inside it, beside the other threads' searches (measured faster: round 16). Its static-token part split over s blocks a query head,
 * its kernel built for minb blocks an SM (kv_cuda.h, kst_kvgpu_split; 1, 2: as before round
 * 16). Benchmarks. */
void kst_kvc_set_gpu_early(kst_kvc *c, int on);
void kst_kvc_set_gpu_split(kst_kvc *c, int s, int minb);
/* A launch without host cost (round 17, experimental; kv_cuda.h, kst_kvgpu_arm): on (1;
 * KESTREL_KV_GPU_ARM=1 at creation), kst_kvc_work first queues each layer's next GPU partial on
 * its stream behind a wait on a flag word in pinned host memory (in the engine's idle time);
 * the next step's launch then only writes the query and the flag (the launch's 12-22 us of host
 * time on thread 0 gone), and its appends stage the new rows in pinned memory that the step's
 * first kernel copies in. Off (0, the default): launched as before. Where the device takes no
 * stream waits on host memory, or kst_kvc_work is not called, launched as before.
 * While a layer is armed its stream waits on host memory: an engine that synchronizes the
 * whole device (cudaDeviceSynchronize, or a cudaFree) between steps must call
 * kst_kvc_gpu_release first, or it waits forever. Queued from inside the decode step instead (by
 * its thread 0 once out of tasks) the 4-layer decoder loop deadlocked on the H100 (bench
 * README, round 17); that placement is not offered. */
void kst_kvc_set_gpu_arm(kst_kvc *c, int on);
/* Releases every layer's queued launch (its kernel skipped; the staged rows copied in; the
 * stream synchronized), and those of every other cache in the process (kv_cuda.h,
 * kst_kvgpu_release_all: all flags first). The next step launches as before and may arm again.
 * Kestrel's own GPU allocations and frees (cache creation and free, the index build) do this
 * first. */
int kst_kvc_gpu_release(kst_kvc *c, kst_error *err);

/* Links every pending token of the layer into its index now (waits for the batch in flight;
 * tests and callers that want the index complete). */
int kst_kvc_flush(kst_kvc *c, size_t layer, kst_error *err);
/* The background planner of batch appends: off (0, the default: the append that completes a
 * batch plans it on all its OpenMP threads) or n threads (1..16, or KESTREL_KV_APPEND_WORKER=n
 * in the environment at creation: n background threads plan the batches while decode steps go
 * on, for callers whose CPU has idle time between steps or cores the steps do not use (run the
 * steps on the others: omp_set_num_threads); an append that finds more than 4B pending helps
 * them finish). Threads once started stay until kst_kvc_free (a smaller n idles them). */
void kst_kvc_set_append_worker(kst_kvc *c, int n);
/* The workers at the idle scheduling class (1; Linux SCHED_IDLE: they run only on cores no other
 * thread wants, e.g. while the decode steps' threads sleep between steps) or the normal one (0,
 * the default; KESTREL_KV_APPEND_WORKER_IDLE=1 at creation). Taken up at a worker's next batch. */
void kst_kvc_set_append_worker_idle(kst_kvc *c, int on);
/* Benchmarks: the insertion beam of appended keys (kst_kvg.ins_sk, ins_ext) of every KV head:
 * entries from the entry table's sk best (0: from the hubs, before round 11), the pool's best
 * ext expanded (0: all). The batch in flight is finished first. */
void kst_kvc_set_insert(kst_kvc *c, size_t sk, size_t ext);
/* Room for n tokens in a layer (its rows and, once built, its index), so that appends up to n
 * tokens move no arrays (a growth copies the layer's rows: ~0.1 s at 128K tokens, 1 s at 1M). */
int kst_kvc_reserve(kst_kvc *c, size_t layer, size_t n, kst_error *err);
/* Pending tokens of a layer (left the window, not indexed yet). */
size_t kst_kvc_pending(const kst_kvc *c, size_t layer);

/* Builds the layer's index over the tokens between the sinks and the window from prefill
 * queries (nq, q_heads, head_dim) float32 (queries may be NULL with nq 0 for the key-only
 * index). Replaces an earlier index. */
int kst_kvc_build(kst_kvc *c, size_t layer, const float *queries, size_t nq, kst_error *err);

/* Decode step: q (q_heads, head_dim) float32 -> out (q_heads, head_dim). top_k and ef of 0 use
 * the cache's (its top_k 0: ef). stats may be NULL.
 *
 * With opts.tail_samples = m > 0 the indexed keys that retrieval left out (R, |R| = indexed -
 * retrieved) are not dropped but estimated: the indexed positions floor((j + 1/2) * n / m),
 * j < m (a systematic sample of the n keys indexed when the sample was drawn: it is drawn again
 * once the index has grown by more than n / 64, or when m changes, so that appends do not copy
 * it anew every step; the keys indexed since are represented by it), minus the retrieved ones,
 * are attended as one more partial whose lse is raised by log(|R| / sampled), so their exp-sum
 * stands for R's (a ratio estimator of the rest of the softmax mass and of its value mean), and
 * merged like the others. A sampled key that scores above tau, the least retrieved one (a key
 * the search missed), is not weighted by the whole ratio rho = |R| / sampled (one missed top key
 * counted ~rho times: 15 at 32K tokens and 2,048 samples, single queries' errors reached 1-4 on
 * SmolLM2's heads). It is capped (the default since round 37): it weighs exp(s) + lambda (rho -
 * 1) exp(tau), attended once and standing for the rest of its ratio at tau's weight, the least a
 * key missed above tau weighs, while the others keep rho; lambda = na / (na + 4) for a head's na
 * such samples (core/kv_attn.h, kst_kv_cap_shrink: the unsampled count they stand for is noisy
 * where na is small). So the keys above tau that the sample holds stand for those it does not
 * hold, at a bounded weight. KESTREL_KV_TAIL_CAP=0 restores the
 * rule before round 37: attended once, the others' ratio (|R| - a) / (sampled - a) for a such
 * keys, which took the missed keys above tau outside the sample for keys below it (Gemma 3's
 * heads at 32K: mean error 17% higher at the default budget; tests/bench/README.md, round 37).
 * In the stratified and clustered samples rho is the stratum's or the cluster's. With m >=
 * indexed every key of R is sampled once and the result is full attention again. The sample's
 * rows are kept per KV head in one block (remade when the sample is drawn), scored and
 * summed once per step for all the query heads of the group; each head then takes out its
 * retrieved samples' terms (or, where those held most of the sample's softmax mass, attends to
 * the rest of the sample anew).
 *
 * With the GPU (opts.gpu, the window full) the table is also kept on the GPU (uploaded when it
 * is remade, as the window's slots are) and scored there with the static tokens, launched
 * with them at the start of the step (it does not depend on the search): per query head and
 * chunk of 512 samples the GPU returns the chunk's best 32 samples (rows, weights) and the
 * rest's max, exp-sum and weighted value sum; the CPU then takes out the head's retrieved
 * samples (outside the 32: their weights recomputed from their keys and subtracted; inside:
 * skipped), adds back the best ones not retrieved, and where the subtraction would lose
 * precision scores the chunk on the CPU from its own table. The same estimator, the same
 * samples and exclusions; the CPU path (no GPU, chunks over 1,024 samples, or
 * kst_kvc_set_tail_gpu(c, 0)) is its twin.
 *
 * Adaptive budget (opts.widen = p > 0, with the tail estimate): once a query head's retrieved
 * keys and tail estimate are in, the estimate's share of the head's softmax mass (its lse
 * against the whole, the static tokens' included: on the GPU path their partial is waited for)
 * is compared with p. Above it, the head is searched again with top_k k2 = k f or k f^2 (f = 4;
 * ef scaled alike; at most widen_top_k, 0: 16 k): the least whose keys are predicted to leave at
 * most p of the mass outside, predicted from the chunks' best samples not retrieved (a search
 * for k2 keys gets about the (k2 - k) / ratio best samples' worth); the cap where none is but
 * the cap would at least halve the share; none where not even that (attention spread over more
 * keys than a widened search holds). Its retrieved and tail partials are then made anew from
 * the new keys (the tail estimate takes them out of the sample as any retrieved keys), and the
 * check repeated. Both paths decide from the same quantities (the GPU's tail items carry the
 * chunks' best samples and sums as the CPU's table does), each computed to float precision: they
 * widen alike and agree within float tolerance (test_kv) unless a share falls within rounding
 * of p. (kst_kvc_prof counts a widened search's time in `attn`.) With the sample cache
 * (kst_kvc_set_tail_cache) the prediction reads its items' best held rows not retrieved
 * (kst_kvsc_best), each standing for e^lw = len_c / m_c keys of its cluster: walked by score, a
 * search for k2 keys is predicted to get the mass of the best rows covering k2 - m keys; where no
 * k2 is predicted to leave at most p outside, the head is searched at widen_top_k even if that is
 * not predicted to halve its share (the held rows seldom hold a cluster's best keys, so they
 * understate the gain: SmolLM2 at 128K, bench README round 26). The
 * clustered tail's other forms (tail_clusters alone, tail_share) give no prediction: there the
 * head widens only with KESTREL_KV_WIDEN_PRED=0 (k f at each check, on the share alone).
 * Decided early (one query head per search, the default; kst_kvc_set_widen_early): where the
 * tail's items are in when a head's search starts (the CPU path waits for its chunks; the GPU's
 * come with the static partial, usually in by the second round of searches), the same
 * prediction is made from the whole sample before the search (nothing retrieved yet: the k2 / ratio
 * best samples' worth), and the head is searched once at that top_k instead of at k and again
 * wider: no first search wasted, and the wide searches start first, where the threads' other
 * searches fill around them. The check after the search is unchanged (it widens further where
 * the prediction fell short). stats.widened counts the searches run wider than top_k. */
int kst_kvc_attend(kst_kvc *c, size_t layer, const float *q, size_t top_k, size_t ef, float *out,
                   kst_kvc_stats *stats, kst_error *err);

/* Retrieval alone, for one query head: positions (up to k, best first) of the indexed tokens
 * with the largest <q, k>; *found and *scanned (may be NULL) get the counts. */
int kst_kvc_search(kst_kvc *c, size_t layer, size_t q_head, const float *q, size_t k, size_t ef,
                   int64_t *pos, size_t *found, size_t *scanned, kst_error *err);

/* Retrieval for the G = q_heads / kv_heads query heads of one KV head, Q (G, head_dim), as
 * kst_kvc_attend does it under the cache's group_search and codes settings: pos (G, k) and
 * found (G); *scanned gets the keys scored by the search(es) (may be NULL). */
int kst_kvc_search_group(kst_kvc *c, size_t layer, size_t kv_head, const float *Q, size_t k,
                         size_t ef, int64_t *pos, size_t *found, size_t *scanned, kst_error *err);

/* Benchmarks: query heads per task when each searches alone (group_search 0): n searches of a
 * KV head run interleaved on one thread (kst_kvg_search_multi; 1, the default: one at a time;
 * rounded down to a divisor of the group, at most 8); 0: one at a time by the earlier heap-based
 * search (kst_kvg_search_group with G = 1, or kst_kvg_search without codes). */
void kst_kvc_set_interleave(kst_kvc *c, size_t n);
/* Benchmarks: with codes, the beam's r best by code score are re-scored exactly (0, the
 * default: all ef of them). */
void kst_kvc_set_rerank(kst_kvc *c, size_t r);

/* Benchmarks: 1 (the default): the interleaved searches read a node's edges once it joins a
 * beam; 0: as soon as it is scored. */
void kst_kvc_set_prefetch(kst_kvc *c, int on_push);

/* Benchmarks and tests: 0 makes the searches score codes in float32 even where the CPU has
 * AVX-512 VNNI (int8 coefficients, the default there); 1 restores it. */
void kst_kvc_set_vnni(kst_kvc *c, int on);

/* Entry points chosen per query in the per-head searches (codes or not; not the group search):
 * each scores the graph's hub entries and n evenly spaced indexed keys, and starts from the
 * `keep` best (0: 8) instead of from all the hubs, so the beam starts near its answer: fewer
 * hops for the same recall where the hubs lie far from the decode queries (the synthetic layer
 * bench: half the hops at 128K); on real MiniLM heads the hubs already start well, and the
 * spaced keys only add to the keys scanned (bench README). n = 0: from all the hubs;
 * KST_KVC_SPREAD_AUTO, the default (round 6; round 5's was one in 64, best 16): one indexed key
 * in 128 (at most 4,096) from 32,768 indexed keys on, none below. */
#define KST_KVC_SPREAD_AUTO ((size_t)-1)
/* With codes, each KV head keeps the spaced keys' codes in one block (kst_kvg_entry_table, made
 * here, at builds and as appends grow the index by 1/64), which the searches score 16 at a time
 * where the CPU has AVX-512 VNNI: the same entries, ~1/3 of the time (bench README, round 5). */
void kst_kvc_set_spread(kst_kvc *c, size_t n, size_t keep);

/* The cluster probe of the per-head searches by codes (kst_kvg_scratch.probe; graphs ordered
 * by kst_kvc_set_order, the default): each search also scores the codes of the KV head's n
 * clusters (of its node order, one per 256 keys) whose centroids' codes score best and starts
 * from the 8 best of their keys too, so that a key that dominates a query's attention but lies
 * far from every entry in the graph (a needle) is reached. KST_KVC_PROBE_AUTO, the default: one
 * cluster where a KV head indexes 16,384 keys or more (below, a cluster is over 1.6% of them) and
 * where at least KST_KVC_PROBE_PEAKED of its build's queries (with RoPE, moved to the decode
 * position) put half or more of their top keys' softmax mass on one key (kst_kvg.peaked); none
 * else. 0: off. KESTREL_KV_PROBE overrides it (bench README, rounds 40 and 41). */
#define KST_KVC_PROBE_AUTO ((size_t)-1)
#define KST_KVC_PROBE_PEAKED 0.04f
void kst_kvc_set_probe(kst_kvc *c, size_t n);

/* Benchmarks: changes group_search and the use of codes (when the index was built with them)
 * of a live cache. */
void kst_kvc_set_search(kst_kvc *c, int group_search, int codes);

/* Benchmarks: candidates a search expands at a time: the group search (and codes) path's, and
 * the per-head pool search's (its best unexpanded entries, up to 8) (1: plain best-first; more
 * overlap the memory latency of several expansions; 2 is ~7% faster per search at 128K keys, at
 * the same recall: bench README). */
void kst_kvc_set_expand(kst_kvc *c, size_t b);

/* The graphs' node order (kst_kvg_order), applied at the next kst_kvc_build of the attention-
 * aware index: n > 0 keys a cluster on average (the default KST_KVC_ORDER, or KESTREL_KV_ORDER
 * at create; at most KST_KVC_ORDER_MAX clusters a KV head); 0: nodes in position order (before
 * round 30). Ordered, a decode search reads nearby lines, ~1.2x faster at 128K keys on the
 * H200's host (bench README, round 30). */
#define KST_KVC_ORDER 256
#define KST_KVC_ORDER_MAX 1024
void kst_kvc_set_order(kst_kvc *c, size_t n);

/* The layer's rotary position embedding (kst_kv_set_rope, api/kestrel.h): nf inverse
 * frequencies (at most head_dim / 2; copied), pairs interleaved or half a head apart
 * (kst_rope_shift); NULL or nf 0 removes it. Used by the next kst_kvc_build: the attention-aware
 * index is then built from the prefill queries as given and moved to the position of the next
 * token (the decode steps' queries'), both forms of every other one by default (as many rows as
 * without RoPE). KST_ERR_INVALID names a frequency that is negative or not finite, or too many
 * of them. */
int kst_kvc_set_rope(kst_kvc *c, size_t layer, const float *inv_freq, size_t nf, int interleaved, kst_error *err);

/* Bytes of CPU memory the layer's index takes beyond the keys and values (edges, codes, clusters,
 * the tail's control variate sums). */
size_t kst_kvc_index_bytes(const kst_kvc *c, size_t layer);

/* Benchmarks whose KV heads are inner-product-preserving transforms of head 0 (signed
 * permutations of the dimensions, as bench_kv_gpu's layer mode makes them): builds head 0's
 * index like kst_kvc_build and gives every other KV head of the layer its own copy of it (a
 * graph over the same inner products, so as good for that head as head 0's is for head 0 when
 * their queries are drawn alike): each head searches its own memory, at 1/kv_heads of the build
 * cost. Not for real caches, whose heads differ. */
int kst_kvc_build_copied(kst_kvc *c, size_t layer, const float *queries, size_t nq, kst_error *err);

/* Benchmarks: 0 makes kst_kvc_attend ignore the GPU (the CPU path), 1 restores it. */
void kst_kvc_use_gpu(kst_kvc *c, int on);
/* Benchmarks and tests: 0 scores the tail sample on the CPU even where the GPU holds it (as
 * KESTREL_KV_TAIL_GPU=0 in the environment when the cache is created); 1 (the default) restores
 * it. */
void kst_kvc_set_tail_gpu(kst_kvc *c, int on);
/* The evenly spaced tail sample (opts.tail_samples, without tail clusters) in 8 bits, each row
 * quantized as kst_kv_q8 does; with 1, 3 and 4 none of it in a layer's GPU memory, which then
 * holds only the static tokens. on:
 * - 1 (KST_KVC_Q8_HOST): with a GPU the table sits in pinned host memory and the GPU's step
 *   reads it over PCIe in place (kst_kvgpu_tail_q8 2), scoring it for a KV head's query heads at
 *   once beside the static tokens: the GPU's items, in float32 but for the 8-bit rows. Where that
 *   layout does not fit (G <= 8, head_dim <= 128 and a multiple of 16), or without a GPU, as 3.
 * - 2 (KST_KVC_Q8_GPU): the same table held in the GPU's memory (half the float16 table's bytes).
 * - 3 (KST_KVC_Q8_CPU): held and scored on the CPU (core/kv_q8t.h; AVX-512 VNNI, else a plain C
 *   path ~12x slower than the float16 table's): each query quantized too, 8-bit dot products for
 *   the scores and the value sums (each weight rounded to a byte of its chunk's largest; a
 *   sample's own term taken out as it went in); the 32 best samples a chunk and query head, and
 *   any retrieved, weighted in float32.
 * - 4 (KST_KVC_Q8_STAGED): with a GPU and two layers or more, the table in pinned host memory
 *   as with 1, and each layer's step has the next layer's table copied into a GPU buffer shared
 *   by the layers (kst_kvgpu_tail_q8 3: two buffers, three for an odd number of layers) while
 *   it runs; the next step reads it there, as 2 does. kst_kvc_gpu_bytes counts the buffers;
 *   kst_kvc_stats.staged says whether a step found its table copied ahead. Layers attended in
 *   order 0, 1, ..., then 0 again, as a decoder does, find it so; another order, or a table
 *   remade since (a new sample), copies it in the step (slower, the same output). With one
 *   layer, or where 1 would not fit, as 1.
 * 0 (the default) restores the float rows. KESTREL_KV_TAIL_Q8 in the environment (read here and
 * when the cache is created) overrides on. KST_ERR_INVALID unless head_dim is a multiple of 4, at
 * most 512, or for another on. */
#define KST_KVC_Q8_HOST 1
#define KST_KVC_Q8_GPU 2
#define KST_KVC_Q8_CPU 3
#define KST_KVC_Q8_STAGED 4
int kst_kvc_set_tail_q8(kst_kvc *c, int on, kst_error *err);
/* Benchmarks and tests: 1 (the default) has the tail items (the GPU's, and the CPU table's)
 * carry their best samples' weighted value sum, so that each query head's estimate adds it and
 * subtracts only the best samples that were retrieved or score above the least retrieved (d
 * floats more per item; without it, each head's estimate sums the 32 best rows of every chunk
 * itself, rows that on the CPU another core's item read); 0 (or KESTREL_KV_TAIL_TOPSUM=0 in the
 * environment when the cache is created) without. */
void kst_kvc_set_tail_topsum(kst_kvc *c, int on);
/* The evenly spaced tail sample's control variate (kst_kv_opts.tail_cv; 1 on, 0 off, the default;
 * KESTREL_KV_TAIL_CV at creation overrides it). With u = 1 + s - sbar for each key of T (the
 * indexed keys not retrieved; s its scaled score, sbar their mean), the sums over T of u v and
 * of u are known exactly: each KV head keeps sum v (k - c)^T, sum (k - c) and sum v over its
 * indexed keys (c: their mean at the build; brought up to date as batches are linked, or at
 * the next step), the retrieved keys' terms taken out. Its sample keeps the same sums over the
 * sampled keys (made when drawn), and the estimate of T's sums from the sample (its ratio rho,
 * the retrieved samples out) is set against them: the estimate's weight and value sum gain b
 * (exact - estimated) with b = the estimate's weight / |T|, in core/kv_attn.h's
 * kst_kv_cv_apply. Only an improvement: where its sums are missing (a memory failure, a
 * stratified sample) the plain estimate stands. */
void kst_kvc_set_tail_cv(kst_kvc *c, int on);
/* Benchmarks: changes opts.widen of a live cache (the adaptive budget; 0: off). */
void kst_kvc_set_widen(kst_kvc *c, float widen);
/* Benchmarks and tests: the adaptive budget's decision before the first search (as
 * KESTREL_KV_WIDEN_EARLY): 1 (the default) where the tail's items are in by then, 2 also
 * waiting for the GPU's (the same decisions on both paths: tests), 0 off (after it only). */
void kst_kvc_set_widen_early(kst_kvc *c, int mode);
/* Benchmarks: changes opts.tail_samples of a live cache. */
void kst_kvc_set_tail_samples(kst_kvc *c, size_t m);
/* Spread attention at a fixed budget (kst_kvc_attend; tests/bench/README.md, round 17); the
 * environment overrides both for experiments (KESTREL_KV_STRAT, KESTREL_KV_TIER):
 * - strata f > 1: the tail sample stratified by position: one stratum per chunk of the sample
 *   table (512 samples; KESTREL_KV_TT_CH=n: n), stratum c the indexed nodes b[c] .. b[c+1] - 1,
 *   each f times as long as the next one nearer the window, estimated from its own systematic
 *   sample with its own ratio (the nodes of the stratum neither attended nor above tau, over
 *   its kept samples below tau); uniform where the nearest stratum would hold fewer nodes than
 *   samples. 0 or 1: one evenly spaced sample (before round 17). Applies at the next draw.
 * - tier n > 0: with the interleaved code search (the default), the first search's every
 *   re-scored key (its ef best, not only top_k) is attended, and the n best by code score of
 *   the other keys it scored (kst_kvg_scratch.tier), re-scored exactly; the tail's sample
 *   stands for the keys outside them, tau still the top_k-th best score
 *   (KESTREL_KV_TAU_ALL=1: the least attended). Not for searches widened (opts.widen). */
void kst_kvc_set_spread_budget(kst_kvc *c, float strata, size_t tier);
/* The clustered tail estimate (kv_tclust.h; tests/bench/README.md, round 18): n > 0 clusters
 * per KV head, made by k-means at kst_kvc_build (in its time: ~1.5 s per KV head of 128K keys
 * and 1,024 clusters on 16 threads), keys indexed later assigned at the next decode step. The tail's tail_samples keys
 * are then drawn each step, for each query head, from the clusters where its attention is (the
 * plan: n_c proportional to the cluster's keys left out times exp(temp * its centroid's scaled
 * score)), each cluster its own ratio, on the CPU from the cache's rows (no sample on the GPU);
 * a sample above tau (the least retrieved score) capped as the evenly spaced sample's
 * (kst_kvc_attend; kst_kvtc_partial's tau; the shared sample without the cache,
 * kst_kvtc_group_finish, keeps sums only and does not). 0: the evenly
 * spaced (or stratified) sample. temp <= 0: 0.7. The environment overrides both
 * (KESTREL_KV_TCLUST, KESTREL_KV_TCLUST_T). Applies at the next build. With it the adaptive
 * budget (opts.widen) does not widen: its prediction reads the evenly spaced sample's best rows
 * (KESTREL_KV_WIDEN_PRED=0 widens by the fixed factor instead). */
void kst_kvc_set_tail_clusters(kst_kvc *c, size_t n, float temp);
/* With the clustered tail estimate: 1 draws one sample a KV head for all its query heads (each
 * row read once and scored for each; kv_tclust.h, kst_kvtc_group_*), tail_samples rows, planned
 * from the heads' allocations averaged by one thread a KV head at the step's start, gathered in
 * pieces that any thread takes before its next search; 0 (the default): one sample a query head.
 * KESTREL_KV_TSHARE overrides it. Applies at the next decode step. */
void kst_kvc_set_tail_share(kst_kvc *c, int on);
/* With the clustered tail estimate: 1 plans each KV head's shared sample (its query heads'
 * allocations averaged, as kst_kvc_set_tail_share's) from the two steps before the current one
 * (made by the step's threads while they wait for the GPU) instead of from the current step, and
 * holds every cluster's planned prefix in a table of `slots` rows a KV head (0: 2 x tail_samples;
 * at most 16,384), on the GPU where the static tokens are (kv_scache.h): a step scores the table
 * there in its launch, beside the static tokens, and copies only the rows the last plan added
 * (at most 256 a KV head and step, KESTREL_KV_TCACHE_UP; more while the table fills) and those
 * pushed in by keys joining a prefix (up to 4,096 rows in one copy; more, as a whole table or one
 * filling, in copies of 2,048: the staging, pinned and on the GPU, stays a step's size); each held row weighted len_c / m_c, the retrieved ones
 * taken out as the GPU's tail items are, a chunk's best rows above tau capped (kst_kvsc_finish). The step after a build (or the first)
 * plans from its own scores and estimates as without the cache. Without the GPU, or with the tail
 * kept off it (kst_kvc_set_tail_gpu(c, 0), kst_kvc_set_tail_topsum(c, 0)), its items are made on
 * the CPU (the same estimate). KESTREL_KV_TCACHE=0/1 and KESTREL_KV_TCACHE_CAP=n in the
 * environment override the arguments. A table asked past 16,384 rows (either way) is held at
 * 16,384, a larger budget planned within it. */
void kst_kvc_set_tail_cache(kst_kvc *c, int on, size_t slots);
/* With tail_cache: 1 holds the table's keys and values in 8 bits, a scale a row each (kst_kv_q8:
 * round(x * (127 / max |x|)) to nearest even) on the GPU, which quantizes the rows as they are
 * copied in (the table 16.5 MiB a layer against 32 for 8 KV heads of d 128 and 8,192 rows), and
 * read so on the CPU (kst_kvsc q8: the items made there and the retrieved rows taken out quantize
 * each row they read the same way), so both give the same estimate. The GPU's table needs the
 * grouped layout (G <= 8, d <= 128 and a multiple of 16, G x rows a chunk <= 4,096,
 * KESTREL_KV_GPU_TGRP not 0): else the step fails, naming it. KESTREL_KV_TCACHE_Q8=0/1 overrides
 * it. Applies at the next decode step (the table set up anew). Speed: tests/bench/README.md,
 * round 25. */
void kst_kvc_set_tail_cache_q8(kst_kvc *c, int on);
struct kst_kvsc;
/* Tests: the sample cache of a KV head (NULL where none is set up). */
const struct kst_kvsc *kst_kvc_sample_cache(const kst_kvc *c, size_t layer, size_t kvh);
/* Tests: KV head kvh's clusters in a layer (NULL before a build with clusters, or out of range). */
const struct kst_kvtc *kst_kvc_tail_clusters(const kst_kvc *c, size_t layer, size_t kvh);

/* Benchmarks: where kst_kvc_attend's time goes. While a profile is set (NULL: off), every call
 * adds its figures: seconds summed over calls; the per-task phases summed over tasks too. */
typedef struct kst_kvc_prof {
    size_t steps, tasks, hops, scanned; /* tasks: searches (beams) run */
    double total;               /* the whole call */
    double gpu_start;           /* query upload and kernel launch (before the CPU part) */
    double region;              /* the parallel CPU part, fork to join */
    double enter;               /* mean over threads of (first task start - fork) */
    double busy_max, busy_mean; /* max / mean over threads of the time spent in tasks */
    double search, rerank, attn, tail; /* per task: graph search (key or code scoring), exact
                                          re-scoring of the beam, the retrieved keys' partial
                                          attention (gathers, softmax), the tail sample's */
    double entry;               /* per task: choosing the entry points (per-query entries; taken
                                   out of search) */
    double gpu_wait, merge;     /* waiting for the GPU's partials after the CPU part; merging */
    double enter_max;           /* max over threads of (first task start - fork) */
    size_t tasks_max;           /* max over threads of the tasks one ran (summed over calls) */
    size_t threads_used;        /* threads that ran a task (summed over calls) */
    /* kst_kvc_append (summed over calls): rows copied into the cache, the GPU's window update,
     * linking tokens that left the window into the graphs, the entry tables' upkeep */
    size_t appends;
    double app_total, app_copy, app_gpu, app_index, app_tables;
    double app_ibeam, app_iselect, app_iapply; /* of app_index, summed over the KV heads'
                                                  insertions: beam search, neighbour selection,
                                                  linking */
    /* batch appends (append_batch > 1): batches finished by an appending call, the wall
     * seconds it spent planning them (its threads' share and waiting for the worker's) and
     * linking them in (edges, codes, tables) */
    size_t app_batches;
    double app_bplan, app_blink;
    /* batches planned by the background workers (kst_kvc_set_append_worker) and linked by an
     * appending call that found them planned: count, wall seconds linking */
    size_t app_wbatches;
    double app_wlink;
    /* kst_kvc_work: calls, plans made, batches linked, wall seconds in it (all) and linking */
    size_t idle_calls, idle_plans, idle_batches;
    double idle_s, idle_link;
    size_t idle_pieces; /* kst_kvc_work's links, piece by piece (kst_kvc_set_link_piece) */
    /* the GPU's partial (static tokens + tail sample) per step, seconds from the call's start,
     * summed over the gpu_steps steps that had it: its launch returned (gpu_launched), a thread
     * first saw it in (gpu_seen; an upper bound where no thread was asking), and, over the
     * gpu_wanted_steps steps with the tail on the GPU, the first thread needing its tail items
     * (gpu_wanted; gpu_late: steps where that was before gpu_seen). Per thread, summed: waiting
     * for them within the tail phase (tail_wait) and the CPU's tail estimate from them
     * (tail_cpu; both inside `tail`). */
    size_t gpu_steps, gpu_wanted_steps, gpu_late;
    double gpu_launched, gpu_seen, gpu_wanted, tail_wait, tail_cpu;
    /* the tail sample's table on the CPU: its items (the chunks scored and summed), per thread,
     * summed (inside `tail`; the estimates from them in tail_cpu, waiting for them in tail_wait) */
    double tail_items;
    /* the GPU's tail chunks whose best rows came summed from the GPU (kst_kvc_set_tail_topsum);
     * those re-scored whole on the CPU instead (tail_table: retrieved samples outside its best
     * rows held most of the chunk's weight, or more than its best rows scored above tau) */
    size_t tail_topsum, tail_table;
    /* KESTREL_KV_GPU_TIME=1 at creation: the GPU partial's own spans by CUDA events (no graph),
     * seconds summed over gpu_timed steps: query upload, kernel, downloads */
    size_t gpu_timed;
    double gpu_h2d, gpu_kernel, gpu_d2h;
    /* kst_kvc_set_gpu_arm: steps whose GPU partial was launched through a queued chain; seconds
     * spent queueing the chains in kst_kvc_work */
    size_t gpu_armed;
    double gpu_arm_idle_s;
    /* the sample cache (kst_kvc_set_tail_cache) after its steps (sc_steps): KV heads' plans made
     * by the step's threads once out of tasks (sc_made_in) and after them (seconds: sc_make), held
     * (sc_apply: the KV heads' holds summed, each on its thread), the rows sent to the GPU
     * (sc_rows) and the sending (sc_up; of it sc_gather: the rows gathered into the staging, and
     * sc_send: the CUDA calls queueing them) */
    size_t sc_steps, sc_made_in, sc_rows;
    double sc_make, sc_apply, sc_up, sc_gather, sc_send;
    /* the region's end, seconds from the call's start summed over steps (each the last thread's):
     * out of tasks, out of the sample cache's plans, out of the GPU's wait and merge */
    double out_tasks, out_plans, out_done;
    double sc_ahead;     /* seconds making the next steps' plans ahead, in idle time (kst_kvc_work) */
    double sc_ahead_cpu; /* the same, the KV heads' plans summed (each on its thread) */
    double pre;          /* seconds of kst_kvc_attend before its parallel part (of gpu_start) */
    double sc_begin;     /* of it, the sample cache's own upkeep at a step's start (joins, copies) */
    size_t sc_begin_up;  /* steps that sent the table's changes from there */
    double sc_begin_max; /* the longest such upkeep at a step's start */
    size_t sc_regs;      /* the cache's rows registered for the GPU to read in place: calls that pinned more */
    double sc_reg;       /* seconds they took */
} kst_kvc_prof;
void kst_kvc_set_prof(kst_kvc *c, kst_kvc_prof *p);

/* GPU memory held by the cache (0 without the GPU): per layer the static tokens (sinks +
 * window) and, once a decode step has used the tail estimate there, the tail sample table
 * (tail_samples keys and values per KV head: 1 MB per KV head at 2,048 samples of head dim 128
 * in float16) with its per-step sums. So the GPU holds the static tokens and the tail sample,
 * never the indexed keys themselves beyond that sample. */
size_t kst_kvc_gpu_bytes(const kst_kvc *c);

/* Keys and values of one KV head ((tokens, head_dim) rows in the cache's dtype), valid until the
 * next append; for GPU mirrors and benchmarks. */
const void *kst_kvc_keys(const kst_kvc *c, size_t layer, size_t kv_head);
const void *kst_kvc_values(const kst_kvc *c, size_t layer, size_t kv_head);

#endif
