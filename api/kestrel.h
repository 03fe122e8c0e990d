/* kestrel.h - Kestrel's one public header: encoders for dense, late-interaction (ColBERT) and
 * cross-encoder checkpoints in the Hugging Face / sentence-transformers / colbert-ai layouts.
 *
 * Conventions (the same for every call):
 * - Every fallible call returns a status: KST_OK (0) or a negative kst_status. When `err` is not
 *   NULL it also receives the code and a message naming the file, line, field or tensor at fault.
 *   The caller owns `err`; no later call overwrites it.
 * - Results written through out-pointers are valid only when the call returned KST_OK. Every
 *   result type has a free function, and every free function accepts NULL.
 * - Threads: an open kst_model may be used from any number of threads at once (each call keeps
 *   its scratch to itself); opening and closing it are not concurrent with other calls on it.
 *   Inside one call the work is spread over OpenMP threads (see kst_model_opts.num_threads).
 */
#ifndef KESTREL_H
#define KESTREL_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h" /* status codes and kst_error; spliced in by `make install` */

#ifdef __cplusplus
extern "C" {
#endif

#define KESTREL_VERSION_MAJOR 0
#define KESTREL_VERSION_MINOR 1
#define KESTREL_VERSION_PATCH 0
#define KESTREL_VERSION_STRING "0.1.0"

/* The library's version string (may differ from the header's when linked dynamically). */
const char *kst_version(void);
/* How this build computes: the BLAS kernels in use (e.g. "OpenBLAS SkylakeX kernels"), and the
 * GPU backend when built with CUDA=1. Valid until the process ends. */
const char *kst_build_info(void);

/* ------------------------------------------------------------------------------------------ */
/* Models */

typedef struct kst_model kst_model;

/* What a checkpoint computes. */
typedef enum kst_model_kind {
    KST_MODEL_AUTO = 0, /* detect from the folder (the default) */
    KST_MODEL_DENSE,    /* one vector per text (sentence-transformers or bare BERT: CLS) */
    KST_MODEL_COLBERT,  /* one vector per token, scored by MaxSim */
    KST_MODEL_CROSS     /* one or more logits per (query, passage) pair */
} kst_model_kind;

/* Where the transformer runs (kst_model_opts.device, kst_index_opts.device). The GPU needs a
 * build with `make CUDA=1` and a CUDA device; it computes in bf16 with float32 accumulation
 * (embeddings within cosine 0.999 of the CPU's); asking for it otherwise fails with
 * KST_ERR_UNSUPPORTED and a message saying why. */
#define KST_DEVICE_CPU 0
#define KST_DEVICE_CUDA 1

typedef struct kst_model_opts {
    kst_model_kind kind; /* default KST_MODEL_AUTO */
    int num_threads;     /* default 0: OpenMP's default (all cores) */
    int device;          /* KST_DEVICE_CPU (default) or KST_DEVICE_CUDA */
} kst_model_opts;

/* The defaults above. */
kst_model_opts kst_model_opts_default(void);

/* Opens a checkpoint folder (config.json + model.safetensors + vocab.txt or tokenizer.json, and
 * the sentence-transformers or colbert-ai files when present). opts may be NULL (defaults).
 * *out is set only on success; close it with kst_model_close. */
int kst_model_open(const char *dir, const kst_model_opts *opts, kst_model **out, kst_error *err);
/* NULL is a no-op. */
void kst_model_close(kst_model *m);

kst_model_kind kst_model_kind_of(const kst_model *m);
/* "dense", "colbert" or "cross". */
const char *kst_model_kind_name(kst_model_kind kind);
/* Vector size (dense and ColBERT); 0 for cross-encoders. */
size_t kst_model_dim(const kst_model *m);
/* Scores per pair kst_model_score writes: num_labels for a cross-encoder, 1 otherwise. */
size_t kst_model_num_scores(const kst_model *m);
/* Default maximum tokens: dense max_seq_length, ColBERT doc_maxlen, cross pair length. */
size_t kst_model_max_len(const kst_model *m);

typedef struct kst_encode_opts {
    int is_query;      /* default 0: encode as documents (ColBERT marker, prompts) */
    size_t max_len;    /* default 0: the model's own */
    size_t batch_size; /* default 32; texts are grouped by length within the call */
} kst_encode_opts;

kst_encode_opts kst_encode_opts_default(void);

/* Dense models: embeds n texts into out, caller-allocated with n * kst_model_dim floats, row i
 * for texts[i]. lens may be NULL (texts are then NUL-terminated); any bytes are accepted
 * (invalid UTF-8 is replaced as Python's errors="replace" does). opts may be NULL. */
int kst_model_embed(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err);

/* Token vectors of a ColBERT model: `vectors` holds total rows of dim floats; the rows of text i
 * are offsets[i] .. offsets[i+1]-1. */
typedef struct kst_token_vectors {
    size_t n, dim, total;
    float *vectors;   /* (total, dim) */
    int64_t *offsets; /* (n + 1) */
} kst_token_vectors;

/* ColBERT models: per-token vectors (queries: query_maxlen each, [MASK]-padded; documents: the
 * kept tokens). *out is the caller's; free with kst_token_vectors_free. */
int kst_model_embed_tokens(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                           const kst_encode_opts *opts, kst_token_vectors **out, kst_error *err);
void kst_token_vectors_free(kst_token_vectors *v);

/* Scores n (query, passage) pairs into out, caller-allocated with n * kst_model_num_scores
 * floats: dense = the model's similarity (cosine unless its config says dot), ColBERT = MaxSim,
 * cross = logits. opts->max_len applies to passages (ColBERT), pairs (cross) or both texts
 * (dense). qlens/plens may be NULL. */
int kst_model_score(kst_model *m, const char *const *queries, const size_t *qlens,
                    const char *const *passages, const size_t *plens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err);

/* Token ids exactly as the model would see them (special tokens, ColBERT markers and padding
 * included). passage may be NULL for a single text. *ids is allocated here (free with
 * kst_ids_array_free), *n its length. */
int kst_model_tokenize(kst_model *m, const char *text, size_t len, const char *passage,
                       size_t plen, const kst_encode_opts *opts, int32_t **ids,
                       int32_t **type_ids, size_t *n, kst_error *err);
void kst_ids_array_free(int32_t *ids);


/* ------------------------------------------------------------------------------------------ */
/* Indexes
 *
 * An index is a folder: documents in SQLite (with an FTS5 table for BM25), dense vectors in a
 * FAISS index, ColBERT token vectors in a float16 store, and a manifest naming the models it was
 * built with. Writes are atomic: a crash leaves the old or the new content, never a mix. One
 * writer at a time (others wait, then fail with a message); readers in other processes keep
 * working during a write and see it after reopening. One open index serves concurrent searches
 * from any number of threads; writes through a handle must not overlap searches on it. */

typedef struct kst_index kst_index;

typedef struct kst_index_opts {
    const char *model;   /* dense model folder; create: NULL for a BM25-only index; open: NULL
                            uses the folder recorded at creation (default NULL) */
    const char *colbert; /* ColBERT model for MaxSim re-ranking (default NULL) */
    const char *cross;   /* cross-encoder for re-ranking (default NULL) */
    const char *factory; /* create: "auto" (default: chosen from the collection size) or a FAISS
                            factory string: "Flat", "IVF1024,PQ48", "OPQ48,IVF1024,PQ48", "HNSW32" */
    int readonly;        /* open: 1 to search only (default 0) */
    int num_threads;     /* default 0: all cores */
    int device;          /* KST_DEVICE_CPU (default) or KST_DEVICE_CUDA: encoders, and exact
                            search of a Flat index, on the GPU (other index types search on the
                            CPU) */
} kst_index_opts;

kst_index_opts kst_index_opts_default(void);

/* Creates an index in `dir` (absent or empty). */
int kst_index_create(const char *dir, const kst_index_opts *opts, kst_index **out, kst_error *err);
/* Opens an existing index. A model given in opts must be the one the index was built with (the
 * sha256 of its weights is checked); otherwise the error says so. */
int kst_index_open(const char *dir, const kst_index_opts *opts, kst_index **out, kst_error *err);
/* NULL is a no-op. */
void kst_index_close(kst_index *ix);

/* Progress of a long call: documents done, input bytes read and total (0 when unknown). */
typedef void (*kst_progress_fn)(void *ctx, size_t docs, uint64_t bytes, uint64_t total);

typedef struct kst_add_stats {
    size_t docs, replaced, tokens;
    double read_s, store_s, encode_s, train_s, add_s, write_s; /* seconds per stage */
    char note[256]; /* a choice made for the caller (e.g. "nlist lowered to 25: ..."), or "" */
} kst_add_stats;

/* Adds the documents of a collection file in one commit. path: a file, a gzipped file, "-" for
 * stdin, or an http(s):// URL. format: NULL or "auto" (detected), "tsv" (id<TAB>text or
 * id<TAB>title<TAB>text), "beir" (corpus.jsonl: _id, title, text), "pyserini" (id, contents).
 * Re-adding an external id replaces the document. A malformed line stops the call with the file,
 * line and what was expected, and nothing is added. progress and stats may be NULL. */
int kst_index_add_file(kst_index *ix, const char *path, const char *format,
                       kst_progress_fn progress, void *ctx, kst_add_stats *stats, kst_error *err);
/* Deletes documents by external id (absent ids are ignored); *removed (may be NULL) gets how many
 * were deleted. */
int kst_index_delete(kst_index *ix, const char *const *ids, size_t n, size_t *removed,
                     kst_error *err);

typedef struct kst_index_info {
    int64_t docs, generation;
    size_t dim;             /* dense vector size, 0 for BM25-only */
    char factory[256];      /* FAISS factory string in use ("" when none yet) */
    char fingerprint[65];   /* sha256 of the dense model's weights ("" for BM25-only) */
    int64_t vectors;        /* vectors in the FAISS index */
    int has_colbert, has_cross;
    char query_model[64];   /* the query encoder trained with the index (`kestrel train vq
                               --train-query-encoder`): its folder inside the index, "" when
                               queries use the index's own model */
} kst_index_info;

int kst_index_info_get(kst_index *ix, kst_index_info *out, kst_error *err);

/* Search stages (bits). */
#define KST_SEARCH_DENSE 1u  /* dense ANN over the FAISS index */
#define KST_SEARCH_BM25 2u   /* BM25 over FTS5; with DENSE, fused by reciprocal rank fusion */
#define KST_SEARCH_MAXSIM 4u /* ColBERT MaxSim re-ranking of the top maxsim_m */
#define KST_SEARCH_CROSS 8u  /* cross-encoder re-ranking of the top cross_k */

typedef struct kst_search_opts {
    unsigned stages;  /* KST_SEARCH_* bits; default 0: dense (or BM25 for a BM25-only index),
                         then MaxSim and cross-encoder when the index has those models */
    size_t k;         /* hits returned (default 10) */
    size_t dense_n, bm25_n;   /* first-stage candidates (default 100 each) */
    size_t maxsim_m, cross_k; /* re-ranked candidates (default 100 and 20) */
    int nprobe;       /* IVF lists probed (default 16) */
    int ef_search;    /* HNSW search list (default 64) */
    int ids_only;     /* 1: hits carry id and score only (title and text NULL); a dense-only
                         search then reads no document rows at all: the ids come from a
                         memory-mapped map written beside each FAISS file (default 0) */
} kst_search_opts;

kst_search_opts kst_search_opts_default(void);
/* Parses "dense,bm25,maxsim,cross" (any subset with a first stage; ',' or '+' separated) into
 * KST_SEARCH_* bits. */
int kst_search_stages_parse(const char *s, unsigned *out, kst_error *err);

typedef struct kst_hit {
    const char *id;    /* external id */
    const char *title; /* NULL when the document has none */
    const char *text;
    double score;      /* the last stage's score: cosine/dot, RRF, MaxSim or logit */
    unsigned stage;    /* that stage (KST_SEARCH_*; DENSE|BM25 for a fused first stage) */
} kst_hit;

typedef struct kst_hits {
    size_t n;
    kst_hit *hit;      /* (n) best first; strings valid until kst_hits_free */
    void *owner_;      /* private */
} kst_hits;

/* Searches one query. opts may be NULL. *out is the caller's (free with kst_hits_free). */
int kst_index_search(kst_index *ix, const char *query, const kst_search_opts *opts,
                     kst_hits **out, kst_error *err);
void kst_hits_free(kst_hits *hits);

/* Searches every query of a file (qid<TAB>text, or BEIR queries.jsonl) and writes a TREC run
 * (qid Q0 docid rank score tag) to run_path, atomically. */
int kst_index_search_file(kst_index *ix, const char *queries_path, const char *run_path,
                          const char *tag, const kst_search_opts *opts, kst_progress_fn progress,
                          void *ctx, kst_error *err);

/* ------------------------------------------------------------------------------------------ */
/* KV-cache retrieval for long-context decoding (RetrievalAttention)
 *
 * A cache of one sequence's attention keys and values, per layer and KV head, for an inference
 * engine to call at each decode step. The static tokens (the first `sinks` and the last
 * `window`) are always attended to; the others sit behind a per-head graph index built from the
 * prefill queries (attention-aware: keys retrieved by the same queries are linked, so a search
 * by a query, which comes from a different projection than the keys, reaches its top keys
 * after scoring a few percent of them). kst_kv_attend merges the attention over the static
 * tokens and over each query head's top_k retrieved keys exactly (log-sum-exp), so with top_k
 * at least the indexed tokens it is full attention.
 *
 * Usage: create; per layer append the prompt's keys/values and kst_kv_build with its queries;
 * then per decode step and layer append the new token's key/value and kst_kv_attend its query.
 * Tokens leaving the window are linked into the index as they go. Grouped-query attention:
 * q_heads is a multiple of kv_heads, query head h reads KV head h / (q_heads / kv_heads).
 * Threads: one call at a time per cache; inside a call heads are spread over OpenMP threads. */

typedef struct kst_kv kst_kv;

typedef enum kst_kv_dtype { KST_KV_F32 = 0, KST_KV_F16 = 1 } kst_kv_dtype;

typedef enum kst_kv_index_kind {
    KST_KV_INDEX_ATTN = 0, /* attention-aware graph from the prefill queries (default) */
    KST_KV_INDEX_KEYS = 1, /* graph over the keys alone (HNSW bottom layer): the baseline */
    KST_KV_INDEX_NONE = 2  /* no index: every token attended exactly (full attention) */
} kst_kv_index_kind;

typedef struct kst_kv_opts {
    size_t layers, kv_heads, q_heads, head_dim; /* required (head_dim 4..512; 64-128 typical) */
    kst_kv_dtype dtype;       /* keys and values as given to kst_kv_append (default F32) */
    float scale;              /* score scale (default 0: 1/sqrt(head_dim)) */
    size_t sinks;             /* first tokens always attended (default 4) */
    size_t window;            /* last tokens always attended (default 1024) */
    size_t top_k;             /* keys retrieved and attended per query head and step (default
                                 0: ef, every key the search re-scores exactly; attending them
                                 costs no keys scanned and lowers the output error against
                                 top_k 100, the default until round 26: SmolLM2 at 32K / 64K
                                 4.7e-2 -> 4.1e-2 / 1.0e-1 -> 8.1e-2 at the default budget,
                                 6.7e-3 -> 6.5e-3 / 7.0e-3 -> 6.9e-3 with tail_cache;
                                 tests/bench/README.md, round 26) */
    size_t ef;                /* search effort: beam width, >= top_k (default 128) */
    size_t degree;            /* graph out-degree (default 32) */
    size_t build_top;         /* exact top keys linked per prefill query (default 32) */
    size_t max_build_queries; /* prefill queries used per KV head (default 0: all) */
    size_t entries;           /* search entry points (default 32) */
    kst_kv_index_kind index;  /* default KST_KV_INDEX_ATTN */
    int num_threads;          /* default 0: OpenMP's default */
    int gpu;                  /* default 0; 1: keep the static tokens on the GPU and attend to
                                 them there while the CPU searches (needs a `make CUDA=1` build
                                 and a device, else kst_kv_create fails with KST_ERR_UNSUPPORTED);
                                 the other tokens stay in CPU memory */
    size_t tail_samples;      /* default 2048; 0: attend to the retrieved keys alone. m > 0: also
                                 estimate the attention over the indexed keys that were not
                                 retrieved from m evenly spaced ones (their softmax mass scaled
                                 up to the whole rest, merged like the other partials); an
                                 approximation that helps where attention is spread over many
                                 keys; m >= the indexed tokens is full attention */
    int group_search;         /* default 0; 1: the query heads sharing a KV head search its
                                 graph once together, each keeping its own top_k of the union of
                                 the keys scored (about half the keys scored per head at equal
                                 recall on real GQA heads, but fewer searches to spread over
                                 threads, so a slower step on an idle many-core CPU); n > 1: n
                                 query heads per search */
    int codes;                /* default -1: 1 from head_dim 64 on, else 0 (at head_dim 32 the
                                 codes cost recall: real all-MiniLM-L6-v2 heads 0.80 against 0.91
                                 at ef 128); 0: none. 1: also keep a 4-bit code of each indexed key (a
                                 quarter of a float16 key's bytes; head_dim a multiple of 32, else
                                 ignored) and steer the searches by the codes, the ef best
                                 re-scored exactly from the keys */
    size_t append_batch;      /* default 64; tokens leaving the window join the index this many
                                 at a time, linked by the append that completes a batch (on all
                                 its threads; KESTREL_KV_APPEND_WORKER=n: by n background threads
                                 while decode steps go on); until then they are attended exactly
                                 with the window (the GPU holds window + 4 * append_batch ring
                                 slots). 0 or 1: each token is linked by the append that moves
                                 it out of the window */
    float widen;              /* adaptive budget, default 0 (off: the fixed budget above, whose
                                 step cost is predictable); 0.02 recommended where attention is
                                 spread past top_k (e.g. a model run past its trained context
                                 with RoPE scaling). Needs tail_samples. With it,
                                 a query head whose tail estimate holds more than this share of
                                 its softmax mass (sinks, window, retrieved and the estimated
                                 rest) is searched again, top_k and ef 4x or 16x larger (the
                                 least predicted from the tail sample's best keys to leave at
                                 most this share outside; up to widen_top_k), and attended from
                                 that. Only the heads whose attention is spread past top_k pay:
                                 SmolLM2-135M at 32K tokens (YaRN x4) 4.5e-2 -> 8.7e-3 mean
                                 output error, keys scanned 3.8% -> 20%; at 8K 8.3e-3 -> 6.1e-3;
                                 on the synthetic 128K layer bench (diffuse attention) 0.31 ->
                                 0.038 error but a 3.3x slower step; on keys whose attention
                                 shares match SmolLM2's at 32K, 10x slower than full attention
                                 at 128K (tests/bench/README.md, rounds 10 and 12);
                                 stats.widened counts the widened searches. With
                                 tail_cache the prediction reads the cache's best held
                                 rows, and a head over the share is searched again (at
                                 the size predicted to suffice, else at widen_top_k; set
                                 it to 4 x ef there, as 16 x doubles the keys scanned).
                                 SmolLM2 at 128K, YaRN x16: 1.9e-2 -> 8.9e-3 at 6.9% of
                                 the keys scanned with widen_top_k 1024 (round 26). With
                                 tail_clusters alone or tail_share there is no
                                 prediction, and no head widens */
    size_t widen_top_k;       /* the widened searches' top_k at most (default 0: 16 x top_k) */
    int append_idle;          /* default 0; 1: a completed batch of appends is only queued by
                                 kst_kv_append and planned and linked by kst_kv_work, in the
                                 time the engine's CPU waits for the GPU (see kst_kv_work); with
                                 tail_cache on the GPU, a step's upkeep of the cache (its held
                                 rows, their copy, the next plans) moves there too (recommended:
                                 without it the plans end each step) */
    /* Spread attention at a fixed budget (tests/bench/README.md, round 17): */
    float tail_strata;        /* default 0 (one evenly spaced tail sample); f > 1: the sample
                                 stratified by position, for decoders whose attention favours
                                 recent tokens: the indexed tokens split into one stratum per
                                 512 samples, each f times as long as the next one nearer the
                                 window, each estimated from its own samples (as many in each);
                                 the same cost. Uniform where the nearest stratum would hold
                                 fewer tokens than samples (e.g. 8K tokens at 2,048 samples) */
    size_t tier;              /* default 0; n > 0 (with codes): every key the search re-scored
                                 exactly (ef, not only top_k) is attended, and the n best by
                                 code score of the other keys it reached too (re-scored
                                 exactly): n more key and value rows read per query head, no
                                 more keys scanned; the tail estimate covers the rest */
    size_t tail_clusters;     /* default 0; n > 0: the tail estimate's samples drawn each step
                                 where that query's attention is: kst_kv_build clusters each KV
                                 head's indexed keys into n (k-means; 2048 recommended), and each
                                 query head's tail_samples keys are shared over the clusters in
                                 proportion to their keys left out times exp(0.7 x the
                                 centroid's scaled score), each cluster's sample scaled to its
                                 rest; a sample scoring above the least retrieved key (one the
                                 search missed) counts once, not scaled (round 32). Read from
                                 the CPU's rows each step (no sample on the
                                 GPU, which holds only the static tokens). SmolLM2 at 32K
                                 tokens (YaRN x4): 4.7e-2 mean output error -> 6.9e-3 with
                                 tail_samples 3072 and tier 256. Costs CPU reads: on an H100
                                 host a 128K-token step is 2-5x slower than SDPA's, a 1M one
                                 1.6x faster (tests/bench/README.md, round 18) */
    int tail_share;           /* default 0; 1 (with tail_clusters and GQA, q_heads > kv_heads):
                                 one sample of tail_samples keys a KV head, planned from its query
                                 heads' allocations averaged before the searches, each row read
                                 once and scored for each head (Horvitz-Thompson weights, the
                                 retrieved keys taken out after retrieval; without tail_cache a
                                 missed key it holds keeps its cluster's weight: its pieces keep
                                 sums only). SmolLM2 at 32K, tier
                                 256: 4096 shared rows 7.7e-3 mean output error against 6.9e-3 for
                                 3072 a query head (9216 rows); one layer at 128K on the H100
                                 0.75 ms against 0.95 (tests/bench/README.md, round 19) */
    int tail_cache;           /* default 0; 1 (with tail_clusters): each KV head's shared sample
                                 planned from the two steps before (a step late) and held in a
                                 table of 2 x tail_samples rows a KV head on the GPU (beside the
                                 static tokens; the CPU without one), scored there in the step's
                                 launch: only the rows a plan adds are copied each step (about 100
                                 a KV head on SmolLM2). Every held row counts, each weighted by its
                                 cluster's keys over its rows held (unbiased as tail_share), but a
                                 chunk's best rows that score above the least retrieved key count
                                 once (round 32: SmolLM2 at 128K, ef 768, 1.06e-2 -> 9.7e-3).
                                 SmolLM2 at 32K, tier 0, tail 4096: 6.7e-3 mean output error; one
                                 layer at 128K on the H100 0.19-0.23 ms where successive queries
                                 plan alike (SDPA 0.20-0.22), 0.34-0.41 where each is new; GPU
                                 memory 43.5 MiB a layer at 128K, tail 4096, 8 KV heads of d 128
                                 (the table 32, its centroids 4 in float16, the static tokens 5,
                                 the copies' staging 1.6; about 28 with tail_cache_q8, 26.4
                                 since round 27 reads the staging in pinned CPU memory in place;
                                 tests/bench/README.md, rounds 20, 24, 25) */
    int tail_cache_q8;        /* default 0; 1 (with tail_cache): the table's keys and values held
                                 in 8 bits, a scale a row each (round(x * 127 / max |x|)),
                                 quantized on the GPU as copied in and read so by the CPU (the
                                 same estimate either way): the table 16.5 MiB a layer instead of
                                 32 (8 KV heads of d 128; tests/bench/README.md, round 25).
                                 On the GPU it needs G = q_heads / kv_heads <= 8 and head_dim
                                 <= 128, a multiple of 16 (else the step fails, naming it) */
    int tail_q8;              /* default 0; the evenly spaced tail sample (tail_samples, without
                                 tail_clusters) in 8 bits (rows quantized as tail_cache_q8's);
                                 with 1, 3 and 4 none of it in a layer's GPU memory, which then
                                 holds only the static tokens. KST_KV_TAIL_Q8_HOST (1): with gpu the table sits
                                 in pinned host memory and the GPU's step reads it over PCIe in
                                 place, scoring it beside the static tokens (it needs G <= 8 and
                                 head_dim <= 128, a multiple of 16; else, and without gpu, as
                                 KST_KV_TAIL_Q8_CPU). KST_KV_TAIL_Q8_GPU (2): the same table held
                                 in the GPU's memory (half the float16 table's bytes).
                                 KST_KV_TAIL_Q8_CPU (3): held and scored on the CPU (queries in 8
                                 bits too, 8-bit dot products for the scores and the value sums,
                                 each weight a byte of its chunk's largest; the 32 best samples a
                                 chunk in float32); it needs AVX-512 VNNI to pay: without it the
                                 plain C path (the same bits) is ~12x slower than the float16
                                 table. KST_KV_TAIL_Q8_STAGED (4): with gpu and two layers or
                                 more, the tables in pinned host memory as with 1, and while a
                                 layer's step runs the next layer's table is copied into one of
                                 two GPU buffers shared by all layers (three for an odd number
                                 of layers: kst_kv_gpu_bytes counts them), where that layer's
                                 step reads it as with 2. It pays where layers are attended in
                                 order (0, 1, ..., then 0: a decoder's loop); a step that finds
                                 its table not copied ahead (another order, a sample remade)
                                 copies it first (kst_kv_stats.staged 0), with the same output.
                                 With one layer, as 1. tests/bench/README.md, rounds 33-35.
                                 head_dim a multiple of 4, at most 512 (else KST_ERR_INVALID) */
    int tail_cv;              /* default 0; 1: the evenly spaced tail sample's estimate (not
                                 tail_strata's, tail_clusters' or tail_cache's) corrected by a
                                 control variate, the part of each key's weight linear in its
                                 score: its sum over the keys left out is known exactly from
                                 each KV head's sum of v k^T over its indexed keys (kept as keys
                                 are indexed), and the sample's own estimate of it is taken out,
                                 at the slope the estimated mean weight (Stein's lemma: the
                                 least-squares slope where scores are Gaussian). Mean output
                                 error at the default budget: SmolLM2 at 8K 7.25e-3 -> 6.36e-3
                                 (11 of 12 heads lower), Gemma 3 at 32K 8.02e-2 -> 7.43e-2 (12 of
                                 12). Costs a step per KV head its G query heads' products
                                 with two d x d sums (the KV head's and its sample's, 128 KB
                                 at d 128, made at the step's start), per query head a pass
                                 over the retrieved values; per KV head 2 x d x d x 12 bytes;
                                 a sample drawn anew sums its rows (d x d x rows). On the
                                 H200's 16-thread host the 128K step is 0-12% longer
                                 (0.141-0.158 ms -> 0.152-0.179; SDPA 0.145-0.156), so it is
                                 off by default (tests/bench/README.md, round 38).
                                 KESTREL_KV_TAIL_CV=1 or 0 at creation overrides it */
    int probe;                /* the cluster probe, default -1 (auto: 1 where a KV head indexes
                                 16,384 keys or more and its build's queries showed needle-like
                                 keys, else 0: below); 0: off; n > 0: n clusters on every KV
                                 head. Each search by codes also
                                 scores the codes of the `probe` clusters of the index's k-means
                                 node order (one per 256 keys) whose centroids score best for
                                 its query (the cluster of its best entry not counted), and
                                 starts from the 8 best of those keys as well as from its
                                 entries: a key that holds much of a query's attention but that
                                 the graph search would not reach (a needle) is found. Gemma 3,
                                 default budget: at 32K mean error 6.84e-2 -> 6.03e-2 (layer 5
                                 head 1's worst query 0.896 -> 0.231), keys scanned 3.14% ->
                                 3.73% (the probe's included); at 128K 1.46e-1 -> 1.25e-1.
                                 Costs about 7 us a search on the H200's host (the 128K step
                                 8-12% longer), so the automatic choice probes only where 4%
                                 or more of the build's queries (with kst_kv_set_rope, moved
                                 to the decode position) put half or more of their top
                                 build_top keys' softmax mass on one key: Gemma 3's layer 5,
                                 not its layers 11 and 17 nor SmolLM2's heads (32K mean error
                                 6.07e-2 at 3.31% scanned; kst_kv_stats.probed counts the
                                 searches that probed). KESTREL_KV_PROBE at creation overrides
                                 it (tests/bench/README.md, rounds 40 and 41) */
} kst_kv_opts;
#define KST_KV_TAIL_Q8_HOST 1
#define KST_KV_TAIL_Q8_GPU 2
#define KST_KV_TAIL_Q8_CPU 3
#define KST_KV_TAIL_Q8_STAGED 4

/* The defaults above (sizes left 0 for the caller to set). */
kst_kv_opts kst_kv_opts_default(void);

/* Creates an empty cache. Fails with KST_ERR_INVALID naming the field on bad sizes. */
int kst_kv_create(const kst_kv_opts *opts, kst_kv **out, kst_error *err);
/* NULL is a no-op. */
void kst_kv_free(kst_kv *kv);

/* Appends n tokens' keys and values, each (n, kv_heads, head_dim) in opts.dtype (float16 as
 * IEEE half bits). Tokens leaving the window move into the index when the layer has one. */
int kst_kv_append(kst_kv *kv, size_t layer, const void *keys, const void *values, size_t n,
                  kst_error *err);
/* Builds the layer's index over the tokens between the sinks and the window from the prefill
 * queries (nq, q_heads, head_dim) float32 (NULL/0 allowed for KST_KV_INDEX_KEYS). The
 * attention-aware index's nodes are then ordered by k-means cluster of their keys, so that a
 * decode search's reads fall near each other (README, "Node order"; KESTREL_KV_ORDER=0: not). */
int kst_kv_build(kst_kv *kv, size_t layer, const float *queries, size_t nq, kst_error *err);

/* The layer's rotary position embedding (RoPE), for models that rotate queries and keys by
 * position: its inverse frequencies inv_freq (n of them, at most head_dim / 2: what the model
 * multiplies positions by, its RoPE scaling (linear, YaRN, Llama 3) included, e.g. transformers'
 * rotary_emb.inv_freq), the pairs rotated half a head apart (interleaved 0: dimensions i and
 * i + n, transformers' rotate_half: Llama, Gemma, Qwen, Mistral) or adjacent (1: 2i and 2i + 1,
 * GPT-J). Optional; set before kst_kv_build, whose attention-aware index it changes: the
 * prefill queries are used as given and rotated on to the position of the next token, where the
 * decode steps' queries are. Moved, a prefill query retrieves the keys it would retrieve from
 * there (its content asking, the keys' distances from the decode position), not those near its
 * own place in the prompt. Both forms of every other query (token and head) are used, as many
 * as without RoPE, so the build costs the same; max_build_queries counts both forms and may
 * allow both of all (twice the build: no better at 32K, but at 128K it keeps a Gemma 3 needle
 * head's recall, which the default's half loses). The prefill queries (nq of them) are
 * taken to be the cache's last nq tokens', and the cache's first token at position 0. Gemma 3
 * 270M at 32K, default budget: 3.65% -> 3.14% of the keys scanned, recall@100 0.819 -> 0.833,
 * mean output error 7.44e-2 -> 6.84e-2 (tests/bench/README.md, round 39). inv_freq NULL or n 0
 * removes it. KST_ERR_INVALID names a negative or non-finite frequency, or more than
 * head_dim / 2 of them. */
int kst_kv_set_rope(kst_kv *kv, size_t layer, const float *inv_freq, size_t n, int interleaved, kst_error *err);

typedef struct kst_kv_stats {
    size_t tokens;    /* tokens cached in the layer */
    size_t exact;     /* tokens attended exactly per query head (sinks, window, not yet indexed) */
    size_t indexed;   /* tokens behind the index */
    size_t retrieved; /* keys retrieved, summed over query heads */
    size_t scanned;   /* keys scored by the index searches, summed over query heads */
    size_t sampled;   /* keys sampled for the tail estimate (opts.tail_samples), summed */
    size_t searches;  /* index searches run: q_heads, or kv_heads with group_search */
    size_t widened;   /* widened searches run (opts.widen), summed over query heads */
    size_t staged;    /* 1: with tail_q8 KST_KV_TAIL_Q8_STAGED the GPU found the step's tail table
                         copied ahead, during the previous layer's step; else 0 */
    size_t probed;    /* searches that ran the cluster probe (opts.probe) */
} kst_kv_stats;

/* Decode step of one layer: q (q_heads, head_dim) float32 -> out (q_heads, head_dim), the
 * attention over the static, not-yet-indexed and retrieved tokens. top_k and ef of 0 use the
 * cache's (top_k 0 there: ef). stats may be NULL. */
int kst_kv_attend(kst_kv *kv, size_t layer, const float *q, size_t top_k, size_t ef, float *out,
                  kst_kv_stats *stats, kst_error *err);
/* Retrieval alone for one query head: positions of up to k indexed tokens with the largest
 * <q, key>, best first; *found and *scanned (may be NULL) get the counts. */
int kst_kv_search(kst_kv *kv, size_t layer, size_t q_head, const float *q, size_t k, size_t ef,
                  int64_t *pos, size_t *found, size_t *scanned, kst_error *err);
/* Tokens cached in a layer, and how many of them are indexed (with opts.append_batch > 1 up to
 * 4 x append_batch tokens that left the window may not be yet: see kst_kv_flush). */
size_t kst_kv_tokens(const kst_kv *kv, size_t layer);
size_t kst_kv_indexed(const kst_kv *kv, size_t layer);
/* GPU memory the cache holds, in bytes (0 unless opts.gpu). */
size_t kst_kv_gpu_bytes(const kst_kv *kv);
/* Changes opts.tail_samples for the following kst_kv_attend calls (0 turns the estimate off).
 * Fails only on a NULL cache. */
int kst_kv_set_tail_samples(kst_kv *kv, size_t m, kst_error *err);
/* Room for n tokens in a layer (its keys, values and index), so that appends up to n tokens
 * move no arrays (a growth copies the layer in the append that needs it: ~0.1 s at 128K tokens,
 * 1 s at 1M). Optional. */
int kst_kv_reserve(kst_kv *kv, size_t layer, size_t n, kst_error *err);
/* Links every token of the layer that has left the window but waits for its batch
 * (opts.append_batch) into the index now; kst_kv_indexed then counts every token but the sinks
 * and the window. Optional: the output is the same either way (pending tokens are attended
 * exactly). */
int kst_kv_flush(kst_kv *kv, size_t layer, kst_error *err);

/* Lends the cache the engine's idle time (with opts.append_idle = 1): first the last steps'
 * upkeep of tail_cache (each layer's held rows, their copy to the GPU and, if more(arg) says yes,
 * the next step's plans, in one parallel region: ~0.06-0.18 ms a layer on the H100 host), then plans
 * the queued batch appends of every layer (key-key searches, ~2 ms on 16 threads per batch of 64
 * tokens at 8 KV heads) in slices of one search on the calling thread's OpenMP team and links
 * planned batches in, asking more(arg) before each slice, until it returns 0 or nothing is left
 * (more NULL: until nothing is left). Call it between a layer's kst_kv_attend and the next, while the GPU runs
 * the rest of the layer, e.g. with more = "cudaEventQuery(ev) == cudaErrorNotReady"; it returns
 * within one search of more() saying no. No hidden threads; the same index after kst_kv_flush
 * whoever planned. An append that would leave more than 4 x append_batch tokens pending plans
 * the batch itself. */
int kst_kv_work(kst_kv *kv, int (*more)(void *arg), void *arg, kst_error *err);

#ifdef __cplusplus
}
#endif
#endif
