/* kv_graph.h - proximity graphs over cached attention keys, searched by inner product with a
 * query (RetrievalAttention's index, RoarGraph-style), and the key-only graph it is measured
 * against.
 *
 * Node i of a graph is key row i of the caller's key array K ((n, d), float32 or float16); the
 * graph keeps no copy of the keys, so K is passed to every call (it may move between calls,
 * its first n rows must not change).
 *
 * Two ways to build:
 * - attention-aware (kst_kvg_build_attn): from prefill queries Q, each query's exact top-T keys
 *   by inner product; keys retrieved by the same query are linked (the best one to the others
 *   and back, and consecutive ones in the list), each node keeps its 3M/4 most often
 *   co-retrieved neighbours, and the keys retrieved most often become the search's entry
 *   points. Every key's free slots then get diverse near keys by key-key search (connectivity;
 *   keys no query retrieved get all their edges so), as appended keys do.
 * - key-only (kst_kvg_build_keys): keys inserted one by one, each linked to diverse near keys
 *   (Euclidean, HNSW's neighbour heuristic): an HNSW bottom layer, the "ANN over keys" baseline.
 * Search is best-first beam search (HNSW's layer-0 search) from all entry points, by inner
 * product; `scanned` counts the keys whose score was computed.
 *
 * Threads: searches may run concurrently with one scratch each; build and insert need
 * exclusive use. */
#ifndef KST_INDEX_KV_GRAPH_H
#define KST_INDEX_KV_GRAPH_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct kst_kvg {
    size_t n, cap;     /* nodes, allocated nodes */
    size_t M;          /* maximum out-degree */
    uint32_t *adj;     /* (cap, M) neighbours, deg[i] of them valid */
    float *adist;      /* (cap, M) squared distance of each edge; -1: co-retrieval edge (kept) */
    uint16_t *deg;     /* (cap) */
    uint32_t *indeg;   /* (cap) edges into each node, kept by every change of the edges: a back
                          edge never takes a node's last edge in (add_back_edge), so no node of
                          the graph becomes unreachable as keys are added */
    float *norm2;      /* (cap) |k_i|^2 (Euclidean search for insertion) */
    uint32_t *entry;   /* (n_entry) search starts */
    size_t n_entry, max_entry;
    int hub_entries;   /* entries are the attention-aware build's hubs: kept as nodes are added */
    size_t efc;        /* beam width when inserting */
    /* Code-steered insertion (kst_kvg_insert, kst_kvg_plan_multi; where the graph has codes and
     * the CPU AVX2/FMA): the key-key beam scores the nodes' 4-bit codes against the new key
     * (||k - x||^2 = ||k||^2 + ||x||^2 - 2 <k, x>, <k, x> from x's codes, ||x||^2 exact), ins_ef
     * wide, then its ins_ef candidates are re-scored exactly and the nearest efc go on to the
     * neighbour selection. ins_codes 0 (or KESTREL_KV_INS_CODES=0 at init): every key's float
     * row scored (before round 9). ins_ef: KESTREL_KV_INS_EF, else efc. */
    int ins_codes;
    size_t ins_ef, ins_ex;
    /* Entries of the code-steered insertion beam (round 11): where the graph has an entry table
     * (kst_kvg_entry_table) and the CPU AVX-512 VNNI, the ins_sk best of its spaced nodes by
     * <k, x> (codes), instead of the hubs; 0: the hubs (before round 11). KESTREL_KV_INS_SK at
     * init, else KST_KVG_INS_SK. A beam so started expands only the best ins_ext of its pool
     * (KESTREL_KV_INS_EXT, else 3/4 of ins_ef): it starts near the key, so the pool's tail
     * adds little (bench README, round 11). */
    size_t ins_sk, ins_ext;
    /* The build's reachability repair (repair_reach in kv_graph.c; 1, or 0 with
     * KESTREL_KV_REPAIR=0 at init): every key reachable from the entries. Its cost where a
     * search can then enter regions it never reached: SmolLM2's layer 4 at 8K scored 25% more
     * keys at the same recall (tests/bench/README.md, round 36). */
    int repair;
    /* 4-bit codes of the keys (kst_kvg_search_group with use_codes): per dimension i,
     * code c in 0..15 stands for clo[i] + (c + 1/2) cstep[i], the range being the keys' min..max
     * at build time (keys added later are clamped). Laid out per 32-dimension block: byte j of a
     * block holds dimension j (low nibble) and j + 16 (high). One 64-byte line per key at d 128
     * instead of four of float16: the search's scattered reads are what bounds it. */
    int codes_on;      /* set before building: make and keep the codes */
    uint8_t *codes;    /* (cap, d / 2), NULL when off or not built */
    float *clo, *cstep; /* (cd) */
    size_t cd;
    /* Entry table (kst_kvg_entry_table): the codes of et_n evenly spaced nodes (of et_at nodes
     * when made) gathered into one contiguous block, 16 nodes to a 64-byte line per 8
     * dimensions, so that the per-query entry choice of kst_kvg_search_multi streams them and
     * scores 16 at a time (AVX-512 VNNI) instead of reading et_n scattered lines. */
    size_t et_n, et_at;
    uint32_t *et_id;   /* (et_n rounded up to 16) node ids */
    uint8_t *et_codes; /* (et_n rounded up to 16) / 16 blocks of (d / 8) lines of 64 bytes */
    /* Node order (kst_kvg_order): node x < nperm is key row row_of[x]; nodes from nperm on (keys
     * added later) are their own rows. NULL / 0: node i is row i. Edges, codes, norms and entries
     * are by node; the searches return rows. */
    uint32_t *row_of;
    size_t nperm;
    /* The order's clusters (kst_kvg_order, with codes): cluster c is nodes [pc_at[c],
     * pc_at[c + 1]), its centroid's 4-bit codes (as a key's) pc_codes + c * cd / 2. The cluster
     * probe of kst_kvg_search_multi reads them. NULL / 0: none. */
    uint8_t *pc_codes;
    uint32_t *pc_at;
    size_t pc_n;
    uint8_t *pc_tab;   /* the centroids' codes in the entry table's layout (16 scored at a time) */
    uint32_t *pc_tid;  /* (pc_n rounded up to 16) their cluster numbers */
    /* What the attention-aware build saw of its queries' attention (kst_kvg_peaks): the share of
     * the measured queries whose best key holds at least half of the softmax mass of their top T
     * keys (a needle-like key); -1: not measured. Kept by copies and the node order. */
    float peaked;
} kst_kvg;

/* The queries kst_kvg_build_attn measures for kst_kvg.peaked: from, from + step, ... (step 0:
 * 1), their top T's exact scores times scale (the attention's: 1 / sqrt(d) for most models)
 * in a softmax. */
typedef struct kst_kvg_peaks {
    float scale;
    size_t from, step;
} kst_kvg_peaks;

#define KST_KVG_INS_SK 16
#define KST_KVG_PROBE_MAX 1024 /* the most clusters the probe keeps (kst_kvg.pc_n) */

/* Per-thread search state; zero-initialise, free with kst_kvg_scratch_free. */
typedef struct kst_kvg_scratch {
    uint8_t *mark; size_t mark_cap; uint8_t epoch;   /* visited: mark[i] == epoch (one byte per
                                                      key: a quarter of the cache lines) */
    float *cs; uint32_t *ci; size_t cn, ccap;        /* candidates (max-heap) */
    float *rs; uint32_t *ri; size_t rn, rcap;        /* results (min-heap) */
    size_t scanned;                                  /* keys scored by the last search */
    /* group search (kst_kvg_search_group) */
    float *gv; uint32_t *gx; size_t gcap, gxcap;     /* pushed candidates: G scores, node */
    float *grs; uint32_t *gri; size_t grcap;         /* per-query result min-heaps */
    size_t *grn; size_t grncap;                      /* their sizes */
    float *gq; size_t gqcap;                         /* per-query code coefficients */
    float *rr; size_t rrcap;                         /* rerank pool ((score, id) pairs) */
    size_t expand;                                   /* group search: candidates expanded at a
                                                      time (0, 1: one; up to 16) */
    /* profiling (benchmarks): with prof set, the group search adds the seconds it spent
     * re-scoring to t_rerank; hops counts the nodes expanded by the last search */
    int prof;
    double t_rerank;
    double t_entry;  /* kst_kvg_search_multi: seconds choosing the entry points (with prof) */
    size_t hops;
    double t_ibeam, t_iselect, t_iapply; /* kst_kvg_insert with prof: its beam search, neighbour
                                            selection, linking (edges, back edges, code) */
    uint8_t *fl; size_t flcap;                       /* kst_kvg_search_multi: pool flags */
    /* code-steered insertion: the new key's code coefficients (d floats, then d int8), their
     * constant and int8 scale; ic_on while a beam is steered by them */
    float *ic; size_t iccap; float ic_c0, ic_sc; int ic_on, ic_vnni;
    int ic_tab;    /* the insertion beam started from the entry table (kst_kvg.ins_sk) */
    uint32_t ic_e0; /* then its best entry (tests) */
    float *srow; size_t srowcap;                     /* neighbour selection: kept rows, float32 */
    int no_vnni;   /* kst_kvg_search_multi: score codes in float even where AVX-512 VNNI is */
    int pf_push;   /* kst_kvg_search_multi: a node's edges are read once it joins the beam (1),
                      or as soon as it is scored (0) */
    size_t spread, spread_keep; /* kst_kvg_search_multi: with spread > 0, each search scores the
                      hub entries and `spread` evenly spaced keys, and starts from the
                      `spread_keep` best of them (0: 8) instead of from all the hubs; where the
                      graph has an entry table (and the codes are scored by AVX-512 VNNI) its
                      et_n nodes stand for the `spread` spaced keys */
    /* kst_kvg_search_multi with codes: the second tier. With tier > 0 (s[0]'s), each search
     * also re-scores exactly the `tier` best keys by code score that it scored but that fell
     * outside its pool (its visited keys ranked ef + 1 .. ef + tier by code score: the beam
     * reached them, so they sit near the top keys in the graph), and k may be up to ef + tier:
     * the first ef ids are the best ef of the pool and the tier by exact score, best first, the
     * tier's others follow in no order. Costs tier exact scores, no extra code scores. vl: the
     * pairs the pool rejected or evicted, logged (vlcap allocated). */
    size_t tier;
    void *vl; size_t vlcap;
    /* kst_kvg_search_multi by codes on an ordered graph (kst_kvg.pc_n > 0): the cluster probe.
     * Each search also scores the codes of the nodes of the `probe` clusters (at most 8) whose
     * centroids' codes score best, and puts the `probe_keep` best of them (0: 8; at most 64) in
     * its pool beside the entries, so that a key far from every entry but in the region of the
     * query's best centroid is reached. 0: off. */
    size_t probe, probe_keep;
} kst_kvg_scratch;
void kst_kvg_scratch_free(kst_kvg_scratch *s);

/* Sets up an empty graph of maximum degree M (4..1024) and up to max_entry entry points,
 * inserting with beam efc. Fails only on bad sizes. */
int kst_kvg_init(kst_kvg *g, size_t M, size_t max_entry, size_t efc, kst_error *err);
/* Frees; a zeroed graph is a no-op. */
void kst_kvg_free(kst_kvg *g);
/* Asks the kernel to back the whole 2 MiB pages inside [p, p + bytes) with huge pages
 * (madvise MADV_HUGEPAGE; where transparent huge pages are in "madvise" mode). The searches read
 * key rows and edge lists at random across hundreds of MB, so with 4 KiB pages nearly every
 * read also misses the TLB. Advisory: never fails, a no-op where unsupported. */
void kst_kvg_advise_huge(void *p, size_t bytes);
/* Grows (or first allocates) *p, holding old_bytes, to new_bytes: a fresh block aligned to 2 MiB
 * (64 bytes when small), advised huge before it is touched, the old contents copied over and the
 * old block freed (realloc would keep neither the alignment nor the huge pages: a moved range
 * is mapped with small pages). On failure *p is untouched. */
int kst_kvg_grow_big(void **p, size_t old_bytes, size_t new_bytes, const char *what, kst_error *err);
/* Makes dst (freed first) a deep copy of src. Fails on memory (dst left empty). */
int kst_kvg_copy(kst_kvg *dst, const kst_kvg *src, kst_error *err);

/* Builds the attention-aware graph over keys K (n, d) from queries Q (nq, d) float32, linking
 * each query's exact top-T keys. The graph must be empty. With pk, kst_kvg.peaked is measured on
 * the queries it names (NULL: -1). Fails on memory (graph left empty). */
int kst_kvg_build_attn(kst_kvg *g, const void *K, int f16, size_t n, size_t d, const float *Q,
                       size_t nq, size_t T, const kst_kvg_peaks *pk, kst_error *err);
/* Renumbers the nodes of a built graph so that keys near each other sit near each other in
 * memory: by k-means cluster of their keys (C clusters, kv_tclust's FAISS k-means), each
 * cluster's nodes in breadth-first order from the entries. A search reads one line of codes (and
 * a key row) per key it scores, each at a random place; so ordered, a node's neighbours mostly
 * lie in a few nearby ranges, which the CPU's caches and prefetchers serve faster (1.19x faster
 * searches at 128K keys on the H200 host, tests/bench/README.md, round 30). The edges, codes,
 * norms, entries and entry table move with their nodes (a copy of each is made, then the old
 * freed); searches then return the same rows as before up to ties, and the entry table's evenly
 * spaced nodes fall in every cluster. With codes (and C <= KST_KVG_PROBE_MAX) the clusters are
 * kept for the cluster probe (kst_kvg.pc_*: each one's node range and its centroid's codes).
 * Once only, on a graph that no search or plan is using; C < 2 or fewer than 2 nodes: a no-op.
 * Fails on memory (graph unchanged). */
int kst_kvg_order(kst_kvg *g, const void *K, int f16, size_t d, size_t C, kst_error *err);
/* Builds the key-only graph over K (n, d) by inserting every key in order. */
int kst_kvg_build_keys(kst_kvg *g, const void *K, int f16, size_t n, size_t d, kst_error *err);
/* Adds node g->n (row g->n of K) linked to its near keys, with edges back. */
int kst_kvg_insert(kst_kvg *g, const void *K, int f16, size_t d, kst_kvg_scratch *s,
                   kst_error *err);

/* Batch insertion (index/kv.c's appends): nodes g->n .. hi - 1 are planned apart, then linked
 * in order. kst_kvg_stage makes room for them and sets their norms (exclusive use: moves the
 * arrays; tmp d floats). kst_kvg_plan_multi plans the links of np (1..KST_KVG_PLAN_MAX)
 * staged nodes, of one graph or several: each among nodes [0, limit) by key-key search (as
 * kst_kvg_insert does) and among the staged nodes before it (up to 64: as if inserted one by
 * one), the nearest efc candidates kept; it only reads the graphs, so plans may run while
 * searches do, on other threads. The np beams run interleaved on the calling thread (each step
 * pops a node of every beam and asks for its neighbours' rows before scoring any, so the memory
 * latencies overlap), each with its own scratch s[i] and tmp[i] (2 * d floats); the same plans
 * as one at a time. sel / seld get up to M neighbours (squared distances); count (size_t)-1:
 * out of memory. kst_kvg_link applies a plan (exclusive use: edges both ways, the
 * code) and makes the graph hold nodes up to x; link x = g->n first. */
int kst_kvg_stage(kst_kvg *g, const void *K, int f16, size_t d, size_t hi, float *tmp, kst_error *err);
/* Room for n nodes (exclusive use: moves the arrays). */
int kst_kvg_reserve(kst_kvg *g, size_t n, kst_error *err);
#define KST_KVG_PLAN_MAX 8
typedef struct kst_kvg_plan_item {
    const kst_kvg *g;
    const void *K;
    uint32_t x;
    size_t limit;
    uint32_t *sel;
    float *seld;
    float norm2;  /* |k_x|^2 (set by the plan, from the staged norms) */
    size_t count; /* out: neighbours planned */
} kst_kvg_plan_item;
void kst_kvg_plan_multi(kst_kvg_plan_item *it, size_t np, int f16, size_t d, kst_kvg_scratch **s,
                        float **tmp);
void kst_kvg_link(kst_kvg *g, const void *K, int f16, size_t d, uint32_t x, const uint32_t *sel,
                  const float *seld, size_t n, float *tmp);

/* Exact top-k keys by inner product for each of nq queries: ids (nq, k) and scores (nq, k),
 * best first (scores may be NULL). k <= n. Uses sgemm in blocks. */
int kst_kvg_exact_topk(const void *K, int f16, size_t n, size_t d, const float *Q, size_t nq,
                       size_t k, uint32_t *ids, float *scores, kst_error *err);

/* Beam search for the k keys of largest inner product with q (d): writes up to k ids and
 * scores, best first, and returns how many; s->scanned gets the keys scored. ef < k is raised
 * to k. Fails (returns 0, s->scanned 0) only on memory, with *rc set. */
size_t kst_kvg_search(const kst_kvg *g, const void *K, int f16, size_t d, const float *q,
                      size_t k, size_t ef, kst_kvg_scratch *s, uint32_t *ids, float *scores,
                      int *rc);


/* Group search: G queries (G, d) that share the graph (the query heads of one KV head under
 * grouped-query attention) search it once. One beam with shared visited marks, ordered by the
 * best of the G scores (each divided by its query's norm); every key reached is scored for all
 * G queries from one read of its row, and each query keeps its own ef best, so each query's
 * result is its best among the union of the keys the joint beam scored. A key is expanded while
 * it is among some query's ef best. use_codes (and the graph has codes): the beam scores the
 * 4-bit codes, then each query's ef best are re-scored exactly and the k best kept. Writes
 * ids (G, k) and scores (G, k) (may be NULL), best first, found (G) counts; s->scanned gets the
 * keys scored by the beam (once for the group), re-scored ones not counted. G 1..64. Fails
 * only on memory (returns it, s->scanned 0). */
int kst_kvg_search_group(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q,
                         size_t G, size_t k, size_t ef, int use_codes, kst_kvg_scratch *s,
                         uint32_t *ids, float *scores, size_t *found);

/* nq independent searches of one graph (nq queries (nq, d), each its own beam, as
 * kst_kvg_search_group with G = 1 searches one query), run interleaved on the calling thread:
 * each round pops the best candidate of every search and issues the reads of its unvisited
 * neighbours (codes or key rows, and their edges) before any search scores one, so the memory
 * latencies of nq searches overlap instead of adding up. use_codes (and the graph has codes):
 * steered by the codes, then each search's `rerank` best by code score (0: all ef) re-scored
 * exactly, the k best kept. s: nq scratches (each its own visited marks); ids (nq, k), scores
 * (nq, k) (may be NULL), found (nq); s[0]->scanned gets the keys scored, summed, s[0]->hops the
 * nodes expanded. nq 1..8. Fails only on memory (returns it). */
int kst_kvg_search_multi(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q,
                         size_t nq, size_t k, size_t ef, size_t rerank, int use_codes,
                         kst_kvg_scratch **s, uint32_t *ids, float *scores, size_t *found);

/* (Re)makes the codes of the graph's g->n keys from K (ranges from these keys): for a copy of
 * a graph over other keys (kst_kvg_copy). A no-op unless codes_on. Fails on memory (codes
 * dropped: searches then score the keys). */
int kst_kvg_make_codes(kst_kvg *g, const void *K, int f16, size_t d, kst_error *err);

/* Makes the entry table of n evenly spaced nodes floor(e * g->n / n), e < n (n = 0 or a graph
 * without codes: drops it; n > g->n: g->n). Read by concurrent searches, so made only while none
 * runs. Fails on memory (table dropped: searches then score the spaced nodes' own codes). */
int kst_kvg_entry_table(kst_kvg *g, size_t n, kst_error *err);

/* Bytes the codes take (0 without), the entry table's included. */
size_t kst_kvg_code_bytes(const kst_kvg *g);

#endif
