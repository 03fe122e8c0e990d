/* kv.c - the retrieval-attention KV cache: per-head key/value rows, graph index, decode step. */
#include "kv.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/kv_attn.h"
#include "core/kv_q8t.h"
#include "core/mem.h"
#include "index/kv_graph.h"
#include "index/kv_scache.h"
#include "index/kv_tclust.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

/* The tail estimate's sample of one KV head (kv.h, kst_kvc_attend): the sampled indexed keys'
 * rows copied into one block, in nc chunks of up to ch rows, each chunk scored once per decode
 * step for all the query heads of the GQA group (a work item: the chunks spread over threads);
 * remade when the sample is drawn (tail_prepare). Per chunk c and query head g (index
 * c * G + g): */
#define KV_TT_CHUNKS 16 /* at most; chunks of 512 rows up to 8,192 samples */
typedef struct kv_tail {
    size_t n, nidx, cap;   /* samples in the table, indexed keys they were drawn from, rows allocated */
    size_t ch, nc, ccap;   /* rows per chunk, chunks, chunks allocated */
    int copy;              /* the rows are to be copied this step (made anew) */
    void *K, *V;           /* the sampled rows, in the cache's dtype: V (n, d); K per chunk
                              transposed, (d, rows) */
    float *w;              /* (nc, G, ch) this step's weights exp(s - mx), 0 for the chunk's top */
    float *o;              /* (nc, G, d) sum of w V over the chunk's other samples */
    float *ot;             /* (nc, G, d) sum of w V over its top samples (kst_kvc_set_tail_topsum) */
    double *sum;           /* (nc, G) sum of w, the same */
    float *mx;             /* (nc, G) the chunk's best score */
    uint32_t *top;         /* (nc, G, KV_TT_TOP) the chunk's best-scoring samples, kept apart */
    float *topw;           /* (nc, G, KV_TT_TOP) their weights */
    /* Stratified by position (kst_kvc.strat; round 17): chunk c's samples are a systematic
     * sample of its own stratum, indexed nodes b[c] .. b[c + 1] - 1, and stand for that stratum
     * alone (each chunk its ratio; the nodes indexed since the draw count in the last stratum,
     * the one next to the window). strat 0: one systematic sample over all nodes (b unused). */
    int strat;
    double tf;             /* kst_kvc.strat when drawn (drawn anew when it changes) */
    size_t b[KV_TT_CHUNKS + 1];
    /* tail_q8 (kst_kvc_set_tail_q8): the rows held in 8 bits instead of K, V (core/kv_q8t.h),
     * chunk c's block at rows c * ch8 (ch8 = KST_Q8T_ROWS(ch)), scored and summed with 8-bit dot
     * products; a step's value sums keep their weights in bytes (wq, wsc) so that a retrieved
     * row's term is taken out as it went in */
    int q8;
    size_t ch8, cap8;      /* rows a chunk's block, rows allocated */
    int8_t *K8, *V8;
    float *ks, *vs;
    int32_t *ksum;
    uint8_t *wq;           /* (nc, G, ch8) */
    float *wsc;            /* (nc, G) */
    uint8_t *qb;           /* (nc, G * d) the queries in bytes, a chunk's scratch */
} kv_tail;
/* Samples kept apart per query head and chunk: those most likely retrieved too (the head's
 * best), so that taking the retrieved ones out of the sums subtracts little. */
#define KV_TT_TOP 32
_Static_assert(KST_KVSC_NC * KST_KVSC_TOP <= KV_TT_CHUNKS * KV_TT_TOP, "kv_thread.tlw holds the sample cache's best rows");
/* The sample is drawn again once the index has grown by 1/KV_TT_LAG since it was drawn (not at
 * every append: at 128K tokens and 2,048 samples a draw copies 8 MB a layer, and the GPU's copy
 * is uploaded again). */
#ifndef KV_TT_LAG
#define KV_TT_LAG 64
#endif

/* The tail estimate's control variate sums over a set of nodes (kv.h, cv_sync): M = sum v (k -
 * c)^T (d, d), held transposed (row j: sum (k_j - c_j) v) in float64 and float32, sum (k - c)
 * and sum v (d), c the KV head's centre. */
typedef struct kv_cvs {
    size_t n; /* nodes summed (0: none) */
    double *M, *ks, *vs;
    float *Mf;
} kv_cvs;

typedef struct kv_hstore {
    void *K, *V;  /* (cap, d) in the cache's dtype */
    kst_kvg g;    /* nodes = rows sinks .. sinks + g.n - 1 */
    kv_tail tt;   /* the tail estimate's sample */
    kst_kvtc tc;  /* the clustered tail estimate's clusters (kst_kvc_set_tail_clusters) */
    kst_kvsc sc;  /* their sample cache (kst_kvc_set_tail_cache) */
    size_t sc_pna, sc_pbud; /* a plan made ahead in idle time (sc_plan_ahead): tc.na and the budget then */
    kv_cvs cv, cvs; /* the control variate's sums: the indexed nodes', the tail sample's (kst_kvc_set_tail_cv) */
    float *cvc;     /* (d) their centre: the keys' mean at the build */
    uint64_t *cvb;  /* the sampled nodes (bit x), for the retrieved ones' part; cvb_n words */
    size_t cvb_n;
} kv_hstore;

/* A batch of tokens being linked into a layer's index (kst_kvc_append): nodes lo .. lo + n - 1
 * of every KV head. Its plans are work items (item i: KV head i / n, node lo + i % n), claimed by
 * the background worker and, when an append must wait, by the appending call's threads. */
enum { KV_JOB_NONE = 0, KV_JOB_QUEUED = 1 };
typedef struct kv_job {
    int state;            /* KV_JOB_*, changed under the cache's mutex */
    size_t lo, n, items;
    size_t next, done;    /* items claimed, items planned (atomics) */
    int fail;             /* a plan ran out of memory (atomic) */
    int workers;          /* worker threads inside the item loop (under the mutex) */
    uint32_t *sel;        /* (items, M) planned neighbours */
    float *seld;          /* (items, M) their squared distances */
    size_t *cnt;          /* (items) neighbours planned */
    size_t cap;           /* items allocated */
    size_t linked;        /* tokens of the batch linked so far (every KV head; kst_kvc_set_link_piece) */
} kv_job;

typedef struct kv_layer {
    size_t n, cap;
    int built;
    kv_job job;       /* the batch of pending tokens being linked (append_batch > 1) */
    kv_hstore *heads; /* (kv_heads) */
    uint32_t *cost;   /* (q_heads) keys each decode-step task scored last step */
    uint32_t *order;  /* (q_heads) the tasks by that cost, largest first (the next step's order) */
    float *rope;      /* (rope_n) the layer's RoPE inverse frequencies (kst_kvc_set_rope; NULL: none) */
    size_t rope_n;
    int rope_il;      /* its pairs interleaved (1) or half a head apart (0) */
#ifdef KST_CUDA
    kst_kvgpu *gpu;  /* static tokens: slot p for sink p, a ring of `window` slots after */
    size_t gt_ns, gt_nidx; /* the tail sample on the GPU: ns of nidx indexed keys (0: none) */
    int gt_q8;             /* its table's kst_kvgpu_tail_q8 (where it is in 8 bits) */
    int sc_gpu;            /* the sample cache's table is on the GPU (kst_kvc_set_tail_cache) */
    int sc_pend;           /* the last step's sc_end left to the engine's idle time (sc_flush) */
    int sc_ahead;          /* its next plans may be made ahead (sc_plan_ahead, in kst_kv_work) */
    size_t sc_map;         /* bytes of each KV head's rows registered for the GPU to read in place
                              (kst_kvgpu_sc_store, sc_map_rows; 0: none since they last moved) */
#endif
} kv_layer;

/* One thread's scratch for the decode step. */
#define KV_IL_MAX 8 /* query heads searched interleaved by one task at most */
#define KV_PLAN_IL 4 /* batch appends: plans interleaved by one thread (<= KV_IL_MAX) */
#define KV_WK_MAX 16 /* background planner threads at most (kst_kvc_set_append_worker) */
#define KV_LINK_PIECE 8 /* tokens a planned batch is linked by at a time in kst_kvc_work */
#define SC_PIECE 2048    /* the sample cache's copies: a step's changes up to 2 x SC_PIECE rows (256 a KV \
                            head of 8, and keys joining prefixes) go in one, more (a whole table, a table \
                            filling) in pieces of SC_PIECE rows, so the staging stays a step's size */
#ifdef SCHED_IDLE
#define KV_SCHED_IDLE SCHED_IDLE
#else
#define KV_SCHED_IDLE 5 /* Linux's SCHED_IDLE (sched.h defines it with _GNU_SOURCE only) */
#endif

typedef struct kv_thread {
    kst_kvg_scratch s;
    kst_kvg_scratch sx[KV_IL_MAX - 1]; /* the other interleaved searches' */
    float *buf; size_t buf_cap; /* scores of a partial */
    uint32_t *ids; int64_t *rows; float *o2; size_t ids_cap;
    uint32_t *sret; int64_t *trows; size_t trows_cap; /* tail estimate: sorted retrieved, samples */
    float tlw[KV_TT_CHUNKS * KV_TT_TOP]; size_t ntlw; /* the adaptive budget: log-weights of the
                                                         chunks' best samples not retrieved */
    float tlk[KV_TT_CHUNKS * KV_TT_TOP]; int tlk_on;  /* with the sample cache: the log of the keys
                                                         each stands for (kst_kvsc_best), tlk_on 1 */
    double p_first, p_last, p_busy, p_search, p_attn, p_tail; /* profile (kst_kvc_set_prof) */
    double p_want, p_twait, p_tcpu; /* the GPU's tail items: first needed, waited for, used */
    double p_titems;                /* the CPU's tail table items (tail_chunk) */
    double p_out[3]; /* out of tasks, of the plans, of the GPU's wait (kst_kvc_prof out_*) */
    size_t p_hops, p_tasks, p_topsum, p_ttable;
    /* the clustered tail estimate (tail_clusters): per-cluster counts (2 C), scores (2 C), the
     * samples' rows and scores (2 x budget), marks of the attended nodes (nidx, kept all 0) */
    uint32_t *tcu; float *tcf, *tcs; int64_t *tcr; uint8_t *tmark;
    size_t tc_c, tc_b, tmark_cap;
    /* the shared sample (kst_kvc_set_tail_share): scores */
    float *tgs; size_t tg_s;
    /* the sample cache's items made on the CPU (kst_kvsc_item); kst_kvsc_finish's lists */
    float *scf; size_t scf_cap;
    uint32_t *scu; size_t scu_cap;
    char pad[64];       /* threads' hot fields on separate cache lines */
} kv_thread;

struct kst_kvc {
    kst_kvc_opts o;
    size_t esize; /* bytes per stored value */
    kv_layer *layers;
    kv_thread *th;
    int nth;
    float *lse_buf; /* (q_heads) each head's lse after the CPU part of a decode step */
    uint8_t *gpu_merged; /* (q_heads) 1: the CPU's partial is in, 2: the GPU's merged into it */
    /* decode step work items (kst_kvc_attend): each query head's retrieved ids (q_heads, top_k)
     * and counts; the tasks whose searches ended, in order (pub, pub_ok: published) */
    uint32_t *ids_all; size_t ids_all_cap;
    float *sc_all;  /* (q_heads, top_k...) the first search's exact scores of ids_all (unscaled), for
                       the attention (kst_attn_partial_scored: the rerank already read the keys) */
    size_t *fnd_all;
    uint32_t *pub;
    uint8_t *pub_ok;
    uint8_t *tt_ok; /* (kv_heads * chunks) the tail items: 1 done */
    int gpu_off;    /* kst_kvc_use_gpu(c, 0): attend on the CPU alone */
    int tail_gpu_off; /* kst_kvc_set_tail_gpu(c, 0) (or KESTREL_KV_TAIL_GPU=0): the tail on the CPU */
    int tail_q8;      /* kst_kvc_set_tail_q8 (or KESTREL_KV_TAIL_Q8): the tail in 8 bits, not on the GPU */
    int tail_q8_gpu;  /* with tail_q8 and the GPU, kst_kvgpu_tail_q8's where: 2 the table in pinned host
                       * memory, read by the GPU's step over PCIe (tail_q8 KST_KVC_Q8_HOST); 1 held on the GPU
                       * (KST_KVC_Q8_GPU); 0 scored on the CPU (KST_KVC_Q8_CPU); 3 staged into the pool's
                       * slots, the next layer's during each step (KST_KVC_Q8_STAGED) */
#ifdef KST_CUDA
    kst_kvgpu_pool *pool; /* KST_KVC_Q8_STAGED: the layers' slots (made at the first step that wants them) */
#endif
    int topsum_off;   /* kst_kvc_set_tail_topsum(c, 0) (or KESTREL_KV_TAIL_TOPSUM=0) */
    int gpu_arm;      /* kst_kvc_set_gpu_arm (KESTREL_KV_GPU_ARM=1): the next launches queued in kst_kvc_work */
    int gpu_late;     /* 1 (the default; kst_kvc_set_gpu_early(c, 1) or KESTREL_KV_GPU_EARLY=1: 0): the
                         GPU's partial launched by thread 0 inside the parallel part */
    int group, use_codes; /* searches as kst_kvc_set_search last set them (opts at first) */
    size_t expand;        /* candidates expanded at a time by the group search (kst_kvc_set_expand) */
    size_t order;         /* keys a cluster of the graphs' node order (kst_kvc_set_order; 0: off) */
    kst_kvc_prof *prof;   /* kst_kvc_set_prof */
    size_t il;            /* query heads per task, searched interleaved (kst_kvc_set_interleave) */
    size_t rerank;        /* codes: beam entries re-scored exactly (0: all ef; kst_kvc_set_rerank) */
    int pf_push;          /* kst_kvc_set_prefetch */
    int no_vnni;          /* kst_kvc_set_vnni(c, 0) */
    size_t spread, spread_keep; /* kst_kvc_set_spread */
    size_t probe;               /* kst_kvc_set_probe (KST_KVC_PROBE_AUTO: probe_of) */
    size_t batch, pmax;   /* append_batch (>= 1); pending tokens allowed before an append helps */
    size_t ring;          /* GPU ring slots: window + pmax */
    size_t plan_il;       /* plans interleaved per thread (1..KV_PLAN_IL; KESTREL_KV_PLAN_IL) */
    float widen;          /* adaptive budget: opts.widen (KESTREL_KV_WIDEN overrides it) */
    size_t widen_k;       /* the widened searches' top_k at most (opts.widen_top_k, 0: 16 x top_k) */
    size_t widen_f;       /* top_k and ef multiplied by this per widening (4; KESTREL_KV_WIDEN_F) */
    int widen_pred;       /* the widened top_k predicted from the tail sample (1; KESTREL_KV_WIDEN_PRED) */
    double widen_gain;    /* widen to the cap where predicted to cut the tail's share by this (0.5) */
    int widen_early;      /* the widened top_k predicted before the first search (kst_kvc_set_widen_early;
                             KESTREL_KV_WIDEN_EARLY): 2 (default) waiting for the GPU's items, so that
                             the GPU path decides as the CPU path does; 1 only where they are in by
                             then (timing-dependent on the GPU path); 0 off */
    size_t *kw_all;       /* (q_heads) the top_k each head's first search of the step ran with */
    /* Spread attention at a fixed budget (kst_kvc_attend; bench README, round 17): the first
     * search's keys attended beyond its top_k: att_ef 1, every key its rerank scored exactly (ef);
     * tier n, also the n best visited keys outside its pool (kst_kvg_scratch.tier); tau_all 1: the
     * tail's tau is the least of all those (else the top_k-th best's) */
    int att_ef, tau_all;
    int tail_cap;         /* the capped tail estimate (tt_rho1; 1 by default, KESTREL_KV_TAIL_CAP=0 off) */
    int tail_cv;          /* the tail's control variate (cv_pre; kst_kvc_set_tail_cv) */
    size_t tier;
    size_t tt_ch;         /* with strat: rows per chunk (stratum) (KESTREL_KV_TT_CH; 0: 512) */
    double strat;         /* the tail sample stratified by position (kv_tail.strat): each chunk's
                             stratum strat times as long as the next one's, nearer the window
                             (0 or 1: one uniform sample; KESTREL_KV_STRAT) */
    size_t tclust;        /* the clustered tail estimate (kv_tclust.h): clusters per KV head made
                             at build (0: the sample above; KESTREL_KV_TCLUST) */
    float tc_temp;        /* its allocation's temperature (0.7; KESTREL_KV_TCLUST_T) */
    float *tc_cs;         /* (q_heads, C) this step's centroid scores, made once per KV head by
                             the first of its query heads to need them (tc_st: 0 not yet, 1 being
                             made, 2 made) */
    uint8_t *tc_st;
    float *cv_y;          /* (q_heads, 2, d) the tail's control variate products of a step (cv_mq), made per KV head */
    uint8_t *cv_st;       /* (kv_heads) 2 once made (at the step's start) */
    size_t tc_cs_cap;
    int tshare;           /* one clustered sample a KV head for its query heads (kst_kvc_set_tail_share;
                             KESTREL_KV_TSHARE) */
    kst_kvtc_group *tg;   /* (kv_heads) this step's shared samples */
    size_t tg_n;
    uint32_t *tg_next;    /* (kv_heads) the step's gather pieces claimed (atomic) */
    uint32_t *tg_done;    /* (kv_heads) pieces gathered; tg_st: 0 not planned, 1 planned, -1 failed */
    int8_t *tg_st;
    int tcache;           /* the shared sample planned a step ahead and held (on the GPU where the
                             static tokens are; kst_kvc_set_tail_cache, KESTREL_KV_TCACHE) */
    size_t tcache_cap;    /* its table's slots a KV head (0: 2 x tail_samples; KESTREL_KV_TCACHE_CAP) */
    size_t tcache_up;     /* rows a plan adds a KV head and step at most (256; KESTREL_KV_TCACHE_UP) */
    int tcache_q8;        /* its table in 8 bits (kst_kvc_set_tail_cache_q8, KESTREL_KV_TCACHE_Q8) */
    size_t sc_piece;      /* rows an upload's piece holds at most (SC_PIECE; KESTREL_KV_SC_PIECE, for tests) */
    size_t sc_sends;      /* the sample cache's copies queued (KV_PROF's count of those a step's start made) */
    float *sc_it;         /* (q_heads, chunks, stride) the cache's items made on the CPU */
    uint8_t *sc_ok;       /* (kv_heads, chunks) 1: made */
    size_t sc_it_cap, sc_ok_cap;
    size_t *sc_off;       /* (kv_heads + 1) the uploads' offsets */
    size_t sc_next;       /* KV heads whose plan a step's thread took (atomic) */
    float *sc_cs;         /* (q_heads, C) the step's centroid scores made on the CPU for the plans */
    size_t sc_cs_cap;
    float *sc_lw;         /* (kv_heads, C) the clusters' log weights, uploaded */
    size_t sc_lcap;
    float *os_all, *lse_s_all; /* (q_heads, head_dim), (q_heads): the static partial, where made early */
    uint8_t *os_ok;       /* (q_heads) 1: os_all holds this step's static partial */
    float *ptmp;          /* (nth, 2 * head_dim) the appending call's threads' plan scratch */
    /* the background planner (kst_kvc_set_append_worker) */
    int wk_on, wk_started, wk_stop; /* worker threads wanted, started (KV_WK_MAX at most) */
    int wk_idle;                    /* workers at the idle scheduling class (Linux SCHED_IDLE) */
    int app_idle;                   /* batches planned in the engine's idle time (kst_kvc_work) */
    size_t link_piece;              /* tokens a planned batch is linked by at a time (all KV heads;
                                       0: the whole batch at once; kst_kvc_set_link_piece) */
    pthread_t wk[KV_WK_MAX];
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_idle;
};

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void kst_kvc_set_prof(kst_kvc *c, kst_kvc_prof *p) { c->prof = p; }
void kst_kvc_set_interleave(kst_kvc *c, size_t n) { c->il = n; }
void kst_kvc_set_rerank(kst_kvc *c, size_t r) { c->rerank = r; }
void kst_kvc_set_prefetch(kst_kvc *c, int on_push) { c->pf_push = on_push; }
void kst_kvc_set_vnni(kst_kvc *c, int on) { c->no_vnni = !on; }
/* The spaced entry candidates of a search over nidx indexed keys: n (KST_KVC_SPREAD_AUTO: one
 * key in 128 from 32,768 indexed keys on, at most 4,096; none below, where the hubs suffice). */
static size_t spread_of(const kst_kvc *c, size_t nidx) {
    if (c->spread != KST_KVC_SPREAD_AUTO) return c->spread;
    return nidx < 32768 ? 0 : nidx / 128 < 4096 ? nidx / 128 : 4096;
}
/* The clusters a search of graph g probes (KST_KVC_PROBE_AUTO: one from 16,384 indexed keys on,
 * where a cluster of the node order, 256 keys, is at most 1.6% of them, and where the build's
 * queries showed needle-like keys (kst_kvg.peaked, unmeasured counting as shown); none else). */
static size_t probe_of(const kst_kvc *c, const kst_kvg *g) {
    if (c->probe != KST_KVC_PROBE_AUTO) return c->probe;
    return g->n >= 16384 && !(g->peaked >= 0 && g->peaked < KST_KVC_PROBE_PEAKED) ? 1 : 0;
}
void kst_kvc_set_probe(kst_kvc *c, size_t n) {
    const char *e = getenv("KESTREL_KV_PROBE");
    c->probe = e && *e ? (size_t)atol(e) : n;
}
static void refresh_tables(kst_kvc *c, kv_layer *L, int force);
static int job_finish(kst_kvc *c, kv_layer *L, kst_error *err);
static void cvs_free(kv_cvs *s);
static void cv_sync(const kst_kvc *c, kv_hstore *H, int anew);
static void cv_sample(const kst_kvc *c, kv_hstore *H);
void kst_kvc_set_spread(kst_kvc *c, size_t n, size_t keep) {
    c->spread = n;
    c->spread_keep = keep;
    for (size_t l = 0; l < c->o.layers; l++) {
        /* the batch in flight first: its plans read the entry table (the insertion beam's
         * entries), which is remade here */
        kst_error e;
        (void)job_finish(c, &c->layers[l], &e);
        refresh_tables(c, &c->layers[l], 1);
    }
}

/* Each KV head's entry table (kst_kvg_entry_table: the spaced entry candidates' codes in one
 * block, scored 16 at a time) for the spread asked for: made anew when forced (a build, a new
 * spread) or once the index has grown by 1/64 since it was made (appends; in between, the
 * newest keys are not among the candidates). Only a speed-up: on a memory failure the head
 * goes without (its searches then score the spaced keys' own codes). */
static void refresh_tables(kst_kvc *c, kv_layer *L, int force) {
    if (!L->built || !L->heads) return;
    for (size_t h = 0; h < c->o.kv_heads; h++) {
        kst_kvg *g = &L->heads[h].g;
        size_t n = g->codes ? spread_of(c, g->n) : 0;
        if (!force && (n == 0) == (g->et_n == 0) && g->n - g->et_at <= g->et_at / 64) continue;
        if (kst_kvg_entry_table(g, n, NULL) != KST_OK) kst_kvg_entry_table(g, 0, NULL);
    }
}

void kst_kvc_use_gpu(kst_kvc *c, int on) { c->gpu_off = !on; }
void kst_kvc_set_gpu_early(kst_kvc *c, int on) { c->gpu_late = !on; }
void kst_kvc_set_gpu_arm(kst_kvc *c, int on) {
    c->gpu_arm = on != 0;
    if (!c->gpu_arm) kst_kvc_gpu_release(c, NULL);
}
int kst_kvc_gpu_release(kst_kvc *c, kst_error *err) {
    int rc = KST_OK;
#ifdef KST_CUDA
    for (size_t l = 0; c && c->layers && l < c->o.layers; l++) {
        int r = c->layers[l].gpu ? kst_kvgpu_disarm(c->layers[l].gpu, rc == KST_OK ? err : NULL) : KST_OK;
        if (rc == KST_OK) rc = r;
    }
#else
    (void)c;
    (void)err;
#endif
    return rc;
}
void kst_kvc_set_gpu_split(kst_kvc *c, int s, int minb) {
#ifdef KST_CUDA
    for (size_t l = 0; l < c->o.layers; l++)
        if (c->layers[l].gpu) kst_kvgpu_split(c->layers[l].gpu, s, minb);
#else
    (void)c;
    (void)s;
    (void)minb;
#endif
}
void kst_kvc_set_tail_gpu(kst_kvc *c, int on) { c->tail_gpu_off = !on; }
int kst_kvc_set_tail_q8(kst_kvc *c, int on, kst_error *err) {
    const char *e = getenv("KESTREL_KV_TAIL_Q8");
    on = e ? atoi(e) : on;
    if (on < 0 || on > KST_KVC_Q8_STAGED)
        return kst_fail(err, KST_ERR_INVALID,
                        "tail_q8: %d (expected 0 off, 1 on, 2 held on the GPU, 3 scored on the CPU, 4 staged on the GPU "
                        "a layer ahead)", on);
    if (on && (c->o.head_dim % 4 || c->o.head_dim > 512))
        return kst_fail(err, KST_ERR_INVALID, "tail_q8: head_dim %zu (expected a multiple of 4, at most 512)",
                        c->o.head_dim);
    c->tail_q8 = on != 0;
    c->tail_q8_gpu = on == KST_KVC_Q8_GPU ? 1 : on == KST_KVC_Q8_CPU ? 0 : on == KST_KVC_Q8_STAGED ? 3 : 2;
    return KST_OK;
}
void kst_kvc_set_tail_topsum(kst_kvc *c, int on) {
    c->topsum_off = !on;
#ifdef KST_CUDA
    for (size_t l = 0; l < c->o.layers; l++)
        if (c->layers[l].gpu) {
            kst_kvgpu_tail_topsum(c->layers[l].gpu, on);
            c->layers[l].gt_ns = 0; /* the tables put again with the new layout */
        }
#endif
}
void kst_kvc_set_tail_samples(kst_kvc *c, size_t m) { c->o.tail_samples = m; }
void kst_kvc_set_tail_cv(kst_kvc *c, int on) {
    const char *e = getenv("KESTREL_KV_TAIL_CV");
    c->tail_cv = e && *e ? atoi(e) != 0 : on != 0; /* (the sums are made at the next step that wants them) */
}
void kst_kvc_set_spread_budget(kst_kvc *c, float strata, size_t tier) {
    c->strat = getenv("KESTREL_KV_STRAT") ? atof(getenv("KESTREL_KV_STRAT")) : strata;
    if (!(c->strat > 1) || !isfinite(c->strat)) c->strat = 0;
    c->tier = getenv("KESTREL_KV_TIER") ? (size_t)atol(getenv("KESTREL_KV_TIER")) : tier;
    c->att_ef = getenv("KESTREL_KV_ATT_EF") ? atoi(getenv("KESTREL_KV_ATT_EF")) != 0 : c->tier > 0;
}
void kst_kvc_set_tail_clusters(kst_kvc *c, size_t n, float temp) {
    const char *e = getenv("KESTREL_KV_TCLUST"), *et = getenv("KESTREL_KV_TCLUST_T");
    c->tclust = e ? (size_t)atol(e) : n;
    c->tc_temp = et ? (float)atof(et) : temp > 0 && isfinite(temp) ? temp : 0.7f;
    if (!(c->tc_temp >= 0) || !isfinite(c->tc_temp)) c->tc_temp = 0.7f;
}
void kst_kvc_set_tail_share(kst_kvc *c, int on) {
    const char *e = getenv("KESTREL_KV_TSHARE");
    c->tshare = e ? atoi(e) != 0 : on != 0;
}
void kst_kvc_set_tail_cache(kst_kvc *c, int on, size_t slots) {
    const char *e = getenv("KESTREL_KV_TCACHE"), *es = getenv("KESTREL_KV_TCACHE_CAP");
    c->tcache = e ? atoi(e) != 0 : on != 0;
    c->tcache_cap = es ? (size_t)atol(es) : slots;
    c->tcache_up = getenv("KESTREL_KV_TCACHE_UP") ? (size_t)atol(getenv("KESTREL_KV_TCACHE_UP")) : 256;
    if (getenv("KESTREL_KV_TCACHE_Q8")) c->tcache_q8 = atoi(getenv("KESTREL_KV_TCACHE_Q8")) != 0; /* (benchmarks) */
    c->sc_piece = getenv("KESTREL_KV_SC_PIECE") ? (size_t)atol(getenv("KESTREL_KV_SC_PIECE")) : SC_PIECE;
    if (!c->sc_piece) c->sc_piece = SC_PIECE;
}
void kst_kvc_set_tail_cache_q8(kst_kvc *c, int on) {
    const char *e = getenv("KESTREL_KV_TCACHE_Q8");
    c->tcache_q8 = e ? atoi(e) != 0 : on != 0;
}
const kst_kvsc *kst_kvc_sample_cache(const kst_kvc *c, size_t layer, size_t kvh) {
    if (layer >= c->o.layers || kvh >= c->o.kv_heads || !c->layers[layer].built) return NULL;
    const kst_kvsc *S = &c->layers[layer].heads[kvh].sc;
    return S->C ? S : NULL;
}
const kst_kvtc *kst_kvc_tail_clusters(const kst_kvc *c, size_t layer, size_t kvh) {
    if (layer >= c->o.layers || kvh >= c->o.kv_heads || !c->layers[layer].built) return NULL;
    const kst_kvtc *T = &c->layers[layer].heads[kvh].tc;
    return T->C ? T : NULL;
}
void kst_kvc_set_widen(kst_kvc *c, float widen) { c->widen = widen > 0 && isfinite(widen) ? widen : 0; }
void kst_kvc_set_widen_early(kst_kvc *c, int mode) { c->widen_early = mode < 0 ? 0 : mode > 2 ? 2 : mode; }
void kst_kvc_set_expand(kst_kvc *c, size_t b) { c->expand = b; }
void kst_kvc_set_order(kst_kvc *c, size_t n) { c->order = n; }
void kst_kvc_set_search(kst_kvc *c, int group_search, int codes) {
    c->group = group_search;
    c->use_codes = codes;
}

/* Query heads per search: 1, or with group_search the whole group (1) or that many of it (n > 1,
 * at most G, rounded down to a divisor of G). */
static size_t heads_per_search(const kst_kvc *c) {
    size_t G = c->o.q_heads / c->o.kv_heads, n = c->group <= 0 ? (c->il ? c->il : 1) : c->group == 1 ? G : (size_t)c->group;
    if (n > G) n = G;
    if (n > (c->group <= 0 ? KV_IL_MAX : 64)) n = c->group <= 0 ? KV_IL_MAX : 64;
    while (G % n) n--;
    return n;
}

/* ------------------------------------------------------------------------------------------ */

int kst_kvc_create(const kst_kvc_opts *opts, kst_kvc **out, kst_error *err) {
    *out = NULL;
    kst_kvc_opts o = *opts;
    if (o.layers == 0 || o.layers > 4096)
        return kst_fail(err, KST_ERR_INVALID, "kv cache: layers = %zu (expected 1..4096)", o.layers);
    if (o.kv_heads == 0 || o.q_heads == 0 || o.q_heads % o.kv_heads != 0)
        return kst_fail(err, KST_ERR_INVALID,
                        "kv cache: q_heads = %zu is not a positive multiple of kv_heads = %zu",
                        o.q_heads, o.kv_heads);
    if (o.head_dim < 4 || o.head_dim > 512)
        return kst_fail(err, KST_ERR_INVALID, "kv cache: head_dim = %zu (expected 4..512)", o.head_dim);
    if (o.index > KST_KVC_INDEX_NONE)
        return kst_fail(err, KST_ERR_INVALID, "kv cache: unknown index kind %d", (int)o.index);
    if (o.degree < 4 || o.degree > 1024)
        return kst_fail(err, KST_ERR_INVALID, "kv cache: degree = %zu (expected 4..1024)", o.degree);
    if (o.scale == 0) o.scale = 1.0f / sqrtf((float)o.head_dim);
    if (!(o.scale > 0) || !isfinite(o.scale))
        return kst_fail(err, KST_ERR_INVALID, "kv cache: scale must be positive and finite");
    if (o.build_top < 2) o.build_top = 2;
#ifdef KST_CUDA
    if (o.gpu && kst_kv_cuda_devices() == 0)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "kv cache: gpu requested but no CUDA device is visible");
#else
    if (o.gpu)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "kv cache: gpu requested but Kestrel was built without CUDA (make CUDA=1)");
#endif
    kst_kvc *c = kst_calloc(1, sizeof *c, "kv cache", err);
    if (!c) return KST_ERR_NOMEM;
    c->o = o;
    c->group = o.group_search;
    c->use_codes = o.codes;
    c->il = 1;
    c->pf_push = 1;
    /* the default budget's search (bench README, round 6): entries per query from one indexed
     * key in 128 (the best 8), two expansions at a time */
    c->spread = getenv("KESTREL_KV_SPREAD") ? (size_t)atol(getenv("KESTREL_KV_SPREAD")) : KST_KVC_SPREAD_AUTO; /* (benchmarks) */
    c->tail_gpu_off = getenv("KESTREL_KV_TAIL_GPU") && atoi(getenv("KESTREL_KV_TAIL_GPU")) == 0;
    (void)kst_kvc_set_tail_q8(c, 0, NULL); /* (KESTREL_KV_TAIL_Q8; a head_dim it refuses leaves it off) */
    c->topsum_off = getenv("KESTREL_KV_TAIL_TOPSUM") && atoi(getenv("KESTREL_KV_TAIL_TOPSUM")) == 0;
    c->gpu_arm = getenv("KESTREL_KV_GPU_ARM") && atoi(getenv("KESTREL_KV_GPU_ARM")) == 1;
    c->gpu_late = !(getenv("KESTREL_KV_GPU_EARLY") && atoi(getenv("KESTREL_KV_GPU_EARLY")) == 1);
    c->spread_keep = 8;
    kst_kvc_set_probe(c, KST_KVC_PROBE_AUTO);
    c->expand = 2;
    c->order = getenv("KESTREL_KV_ORDER") ? (size_t)atol(getenv("KESTREL_KV_ORDER")) : KST_KVC_ORDER;
    c->esize = o.f16 ? 2 : 4;
    c->nth = omp_get_max_threads();
    c->batch = o.append_batch > 1 ? o.append_batch : 1;
    c->pmax = c->batch > 1 ? 4 * c->batch : 0;
    c->ring = o.window + c->pmax ? o.window + c->pmax : 1;
    c->plan_il = getenv("KESTREL_KV_PLAN_IL") ? (size_t)atoi(getenv("KESTREL_KV_PLAN_IL")) : KV_PLAN_IL;
    if (c->plan_il < 1 || c->plan_il > KV_PLAN_IL) c->plan_il = KV_PLAN_IL;
    /* off by default: with every core in the decode steps (bench README) the workers only take
     * time from them, and an append that must wait for its plan waits for a thread the step's
     * spinning threads keep off the cores; KESTREL_KV_APPEND_WORKER=n: n threads */
    c->wk_on = 0;
    kst_kvc_set_append_worker(c, getenv("KESTREL_KV_APPEND_WORKER") ? atoi(getenv("KESTREL_KV_APPEND_WORKER")) : 0);
    /* the adaptive budget (kst_kvc_attend); the environment overrides it for experiments */
    c->widen = getenv("KESTREL_KV_WIDEN") ? (float)atof(getenv("KESTREL_KV_WIDEN")) : o.widen;
    if (!(c->widen > 0) || !isfinite(c->widen)) c->widen = 0;
    c->widen_k = getenv("KESTREL_KV_WIDEN_TOP_K") ? (size_t)atol(getenv("KESTREL_KV_WIDEN_TOP_K")) : o.widen_top_k;
    c->widen_f = getenv("KESTREL_KV_WIDEN_F") ? (size_t)atol(getenv("KESTREL_KV_WIDEN_F")) : 4;
    if (c->widen_f < 2) c->widen_f = 2;
    c->widen_pred = getenv("KESTREL_KV_WIDEN_PRED") ? atoi(getenv("KESTREL_KV_WIDEN_PRED")) : 1;
    c->widen_gain = getenv("KESTREL_KV_WIDEN_GAIN") ? atof(getenv("KESTREL_KV_WIDEN_GAIN")) : 0.5;
    c->app_idle = getenv("KESTREL_KV_APPEND_IDLE") && atoi(getenv("KESTREL_KV_APPEND_IDLE")) != 0;
    c->link_piece = getenv("KESTREL_KV_LINK_PIECE") ? (size_t)atol(getenv("KESTREL_KV_LINK_PIECE")) : KV_LINK_PIECE;
    c->wk_idle = getenv("KESTREL_KV_APPEND_WORKER_IDLE") && atoi(getenv("KESTREL_KV_APPEND_WORKER_IDLE")) == 1;
    c->widen_early = getenv("KESTREL_KV_WIDEN_EARLY") ? atoi(getenv("KESTREL_KV_WIDEN_EARLY")) : 2;
    kst_kvc_set_spread_budget(c, 0, 0);
    c->tau_all = getenv("KESTREL_KV_TAU_ALL") ? atoi(getenv("KESTREL_KV_TAU_ALL")) != 0 : 0;
    c->tail_cap = !(getenv("KESTREL_KV_TAIL_CAP") && atoi(getenv("KESTREL_KV_TAIL_CAP")) == 0);
    kst_kvc_set_tail_cv(c, 0);
    c->tt_ch = getenv("KESTREL_KV_TT_CH") ? (size_t)atol(getenv("KESTREL_KV_TT_CH")) : 0;
    kst_kvc_set_tail_clusters(c, 0, 0);
    kst_kvc_set_tail_share(c, 0);
    kst_kvc_set_tail_cache(c, 0, 0);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv_work, NULL);
    pthread_cond_init(&c->cv_idle, NULL);
    c->ptmp = kst_malloc((size_t)c->nth * 2 * KV_PLAN_IL, o.head_dim * sizeof(float), "kv cache plan scratch", err);
    c->layers = kst_calloc(o.layers, sizeof *c->layers, "kv cache layers", err);
    c->th = kst_calloc((size_t)c->nth, sizeof *c->th, "kv cache threads", err);
    c->lse_buf = kst_calloc(o.q_heads, sizeof(float), "kv cache lse", err);
    c->gpu_merged = kst_calloc(o.q_heads, 1, "kv cache merge flags", err);
    c->fnd_all = kst_calloc(o.q_heads, sizeof(size_t), "kv cache step items", err);
    c->pub = kst_calloc(o.q_heads, sizeof(uint32_t), "kv cache step items", err);
    c->pub_ok = kst_calloc(o.q_heads, 1, "kv cache step items", err);
    c->tt_ok = kst_calloc(o.kv_heads * KV_TT_CHUNKS, 1, "kv cache step items", err);
    c->kw_all = kst_calloc(o.q_heads, sizeof(size_t), "kv cache step items", err);
    c->os_all = kst_calloc(o.q_heads * o.head_dim, sizeof(float), "kv cache step items", err);
    c->lse_s_all = kst_calloc(o.q_heads, sizeof(float), "kv cache step items", err);
    c->os_ok = kst_calloc(o.q_heads, 1, "kv cache step items", err);
    if (!c->layers || !c->th || !c->lse_buf || !c->gpu_merged || !c->fnd_all || !c->pub || !c->pub_ok || !c->tt_ok ||
        !c->ptmp || !c->kw_all || !c->os_all || !c->lse_s_all || !c->os_ok) goto fail;
    for (size_t l = 0; l < o.layers; l++) {
        c->layers[l].heads = kst_calloc(o.kv_heads, sizeof(kv_hstore), "kv cache heads", err);
        c->layers[l].cost = kst_calloc(o.q_heads, sizeof(uint32_t), "kv cache task costs", err);
        c->layers[l].order = kst_calloc(o.q_heads, sizeof(uint32_t), "kv cache task order", err);
        if (!c->layers[l].heads || !c->layers[l].cost || !c->layers[l].order) goto fail;
        for (size_t h = 0; h < o.kv_heads; h++) {
            kst_kvg_init(&c->layers[l].heads[h].g, o.degree, o.entries, o.efc, NULL);
            c->layers[l].heads[h].sc_pna = SIZE_MAX;
            c->layers[l].heads[h].g.codes_on = o.codes;
        }
#ifdef KST_CUDA
        if (o.gpu && kst_kvgpu_create(o.q_heads, o.kv_heads, o.head_dim, o.sinks, c->ring, o.f16,
                                       o.scale, &c->layers[l].gpu, err) != KST_OK) {
            kst_kvc_free(c);
            return KST_ERR_INTERNAL;
        }
        if (c->layers[l].gpu && c->topsum_off) kst_kvgpu_tail_topsum(c->layers[l].gpu, 0);
#endif
    }
    *out = c;
    return KST_OK;
fail:
    kst_kvc_free(c);
    return KST_ERR_NOMEM;
}

void kst_kvc_free(kst_kvc *c) {
    if (!c) return;
    /* every layer's queued GPU launch released before any layer's memory is freed (a cudaFree
     * waits for the whole device) */
    kst_kvc_gpu_release(c, NULL);
    if (c->wk_started) {
        pthread_mutex_lock(&c->mu);
        c->wk_stop = 1;
        pthread_cond_broadcast(&c->cv_work);
        pthread_mutex_unlock(&c->mu);
        for (int w = 0; w < c->wk_started; w++) pthread_join(c->wk[w], NULL);
    }
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv_work);
    pthread_cond_destroy(&c->cv_idle);
    kst_free(c->ptmp);
    if (c->layers) {
        for (size_t l = 0; l < c->o.layers; l++) {
            kv_layer *L = &c->layers[l];
            kst_free(L->job.sel);
            kst_free(L->job.seld);
            kst_free(L->job.cnt);
            kst_free(L->cost);
            kst_free(L->order);
            kst_free(L->rope);
            if (!L->heads) continue;
#ifdef KST_CUDA
            if (L->gpu) kst_kvgpu_sc_store(L->gpu, NULL, NULL, 0, NULL); /* (the rows unregistered before they go) */
#endif
            for (size_t h = 0; h < c->o.kv_heads; h++) {
                kst_free(L->heads[h].K);
                kst_free(L->heads[h].V);
                kst_kvg_free(&L->heads[h].g);
                kv_tail *T = &L->heads[h].tt;
                kst_free(T->K);
                kst_free(T->V);
                kst_free(T->w);
                kst_free(T->o);
                kst_free(T->ot);
                kst_free(T->sum);
                kst_free(T->mx);
                kst_free(T->top);
                kst_free(T->topw);
                kst_free(T->K8);
                kst_free(T->V8);
                kst_free(T->ks);
                kst_free(T->vs);
                kst_free(T->ksum);
                kst_free(T->wq);
                kst_free(T->wsc);
                kst_free(T->qb);
                kst_kvtc_free(&L->heads[h].tc);
                kst_kvsc_free(&L->heads[h].sc);
                cvs_free(&L->heads[h].cv);
                cvs_free(&L->heads[h].cvs);
                kst_free(L->heads[h].cvc);
                kst_free(L->heads[h].cvb);
            }
            kst_free(L->heads);
#ifdef KST_CUDA
            kst_kvgpu_free(L->gpu);
#endif
        }
        kst_free(c->layers);
    }
#ifdef KST_CUDA
    kst_kvgpu_pool_free(c->pool); /* (after the layers' handles, which it served) */
#endif
    if (c->th) {
        for (int t = 0; t < c->nth; t++) {
            kst_kvg_scratch_free(&c->th[t].s);
            for (int i = 0; i < KV_IL_MAX - 1; i++) kst_kvg_scratch_free(&c->th[t].sx[i]);
            kst_free(c->th[t].buf);
            kst_free(c->th[t].ids);
            kst_free(c->th[t].rows);
            kst_free(c->th[t].o2);
            kst_free(c->th[t].sret);
            kst_free(c->th[t].trows);
            kst_free(c->th[t].tcu);
            kst_free(c->th[t].tcf);
            kst_free(c->th[t].tcs);
            kst_free(c->th[t].tcr);
            kst_free(c->th[t].tmark);
            kst_free(c->th[t].tgs);
            kst_free(c->th[t].scf);
            kst_free(c->th[t].scu);
        }
        kst_free(c->th);
    }
    kst_free(c->lse_buf);
    kst_free(c->tc_cs);
    kst_free(c->tc_st);
    kst_free(c->cv_y);
    kst_free(c->cv_st);
    for (size_t h = 0; c->tg && h < c->tg_n; h++) kst_kvtc_group_free(&c->tg[h]);
    kst_free(c->tg);
    kst_free(c->tg_done);
    kst_free(c->tg_st);
    kst_free(c->tg_next);
    kst_free(c->sc_it);
    kst_free(c->sc_ok);
    kst_free(c->sc_off);
    kst_free(c->sc_cs);
    kst_free(c->sc_lw);
    kst_free(c->gpu_merged);
    kst_free(c->ids_all);
    kst_free(c->fnd_all);
    kst_free(c->sc_all);
    kst_free(c->pub);
    kst_free(c->pub_ok);
    kst_free(c->tt_ok);
    kst_free(c->kw_all);
    kst_free(c->os_all);
    kst_free(c->lse_s_all);
    kst_free(c->os_ok);
    kst_free(c);
}

size_t kst_kvc_index_bytes(const kst_kvc *c, size_t layer) {
    if (!c || layer >= c->o.layers || !c->layers[layer].heads) return 0;
    size_t b = 0;
    for (size_t h = 0; h < c->o.kv_heads; h++) {
        const kst_kvg *g = &c->layers[layer].heads[h].g;
        b += g->cap * (g->M * (sizeof(uint32_t) + sizeof(float)) + sizeof(uint16_t) + sizeof(uint32_t) + sizeof(float)) +
             g->nperm * sizeof(uint32_t) + kst_kvg_code_bytes(g) + kst_kvtc_bytes(&c->layers[layer].heads[h].tc) +
             (g->pc_n ? (g->pc_n + (g->pc_n + 15) / 16 * 16) * (g->cd / 2 + sizeof(uint32_t)) + sizeof(uint32_t) : 0);
        const kv_hstore *H = &c->layers[layer].heads[h]; /* the control variate's sums (tail_cv) */
        size_t d = c->o.head_dim;
        b += (H->cv.M ? d * d * 12 + d * 16 : 0) + (H->cvs.M ? d * d * 12 + d * 16 : 0) + (H->cvc ? d * 4 : 0) +
             H->cvb_n * sizeof(uint64_t);
    }
    return b;
}

size_t kst_kvc_gpu_bytes(const kst_kvc *c) {
    size_t b = 0;
#ifdef KST_CUDA
    for (size_t l = 0; c && l < c->o.layers; l++) b += kst_kvgpu_bytes(c->layers[l].gpu);
    if (c) b += kst_kvgpu_pool_bytes(c->pool);
#else
    (void)c;
#endif
    return b;
}

const kst_kvc_opts *kst_kvc_opts_of(const kst_kvc *c) { return &c->o; }
size_t kst_kvc_tokens(const kst_kvc *c, size_t layer) {
    return layer < c->o.layers ? c->layers[layer].n : 0;
}
size_t kst_kvc_indexed(const kst_kvc *c, size_t layer) {
    return layer < c->o.layers && c->layers[layer].built ? c->layers[layer].heads[0].g.n : 0;
}
const void *kst_kvc_keys(const kst_kvc *c, size_t layer, size_t kvh) {
    return layer < c->o.layers && kvh < c->o.kv_heads ? c->layers[layer].heads[kvh].K : NULL;
}
const void *kst_kvc_values(const kst_kvc *c, size_t layer, size_t kvh) {
    return layer < c->o.layers && kvh < c->o.kv_heads ? c->layers[layer].heads[kvh].V : NULL;
}

static int check_layer(const kst_kvc *c, size_t layer, const char *fn, kst_error *err) {
    if (!c) return kst_fail(err, KST_ERR_MISUSE, "%s: cache is NULL", fn);
    if (layer >= c->o.layers)
        return kst_fail(err, KST_ERR_INVALID, "%s: layer %zu of a %zu-layer cache", fn, layer,
                        c->o.layers);
    return KST_OK;
}

int kst_kvc_set_rope(kst_kvc *c, size_t layer, const float *inv_freq, size_t nf, int interleaved, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_set_rope", err);
    if (rc != KST_OK) return rc;
    kv_layer *L = &c->layers[layer];
    if (!inv_freq || nf == 0) {
        kst_free(L->rope);
        L->rope = NULL;
        L->rope_n = 0;
        return KST_OK;
    }
    if (2 * nf > c->o.head_dim)
        return kst_fail(err, KST_ERR_INVALID, "kst_kv_set_rope: layer %zu: %zu frequencies rotate %zu dimensions of %zu "
                        "(expected at most head_dim / 2 = %zu frequencies)", layer, nf, 2 * nf, c->o.head_dim,
                        c->o.head_dim / 2);
    for (size_t i = 0; i < nf; i++)
        if (!(inv_freq[i] >= 0) || !isfinite(inv_freq[i]))
            return kst_fail(err, KST_ERR_INVALID, "kst_kv_set_rope: layer %zu: inv_freq[%zu] = %g (expected a finite "
                            "frequency >= 0, what the model multiplies positions by)", layer, i, (double)inv_freq[i]);
    float *f = kst_malloc(nf, sizeof(float), "kv RoPE frequencies", err);
    if (!f) return KST_ERR_NOMEM;
    memcpy(f, inv_freq, nf * sizeof(float));
    kst_free(L->rope);
    L->rope = f;
    L->rope_n = nf;
    L->rope_il = interleaved != 0;
    return KST_OK;
}

/* Rows of one head start here (row 0 = position 0). */
static const void *rows_at(const kst_kvc *c, const void *base, size_t row) {
    return (const char *)base + row * c->o.head_dim * c->esize;
}

/* Links tokens that left the window into each head's index. */

/* The first failure of a parallel region wins: its status into *rc and its message into *err. */
static void first_err(int *rc, kst_error *err, int r, const kst_error *e) {
#pragma omp critical(kv_err)
    {
        if (*rc == KST_OK) {
            *rc = r;
            if (err) *err = *e;
        }
    }
}
static int index_leavers(kst_kvc *c, kv_layer *L, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    if (!L->built || L->n < o->sinks + o->window) return KST_OK;
    size_t target = L->n - o->window - o->sinks; /* indexed nodes wanted */
    int rc = KST_OK;
#pragma omp parallel for schedule(dynamic) if (o->kv_heads > 1)
    for (size_t h = 0; h < o->kv_heads; h++) {
        kv_hstore *H = &L->heads[h];
        kst_kvg_scratch *s = &c->th[omp_get_thread_num()].s;
        s->prof = c->prof != NULL;
        kst_error e2;
        while (H->g.n < target) {
            int r = kst_kvg_insert(&H->g, rows_at(c, H->K, o->sinks), o->f16, o->head_dim, s, &e2);
            if (r != KST_OK) {
                first_err(&rc, err, r, &e2);
                break;
            }
        }
    }
    double t1 = c->prof ? mono_s() : 0;
    if (c->prof)
        for (int i = 0; i < c->nth; i++) {
            kst_kvg_scratch *s = &c->th[i].s;
            c->prof->app_ibeam += s->t_ibeam;
            c->prof->app_iselect += s->t_iselect;
            c->prof->app_iapply += s->t_iapply;
            s->t_ibeam = s->t_iselect = s->t_iapply = 0;
            s->prof = 0;
        }
    refresh_tables(c, L, 0);
    if (c->prof) c->prof->app_tables += mono_s() - t1;
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* batch appends (kv.h, kst_kvc_append) */

/* Plans the job's next il items (fewer at its end), interleaved on one thread (their memory
 * latencies overlap: kst_kvg_plan_multi), by a worker, a thread of the appending call or of
 * kst_kvc_work: s (KV_PLAN_IL scratches) and tmp (KV_PLAN_IL * 2 * head_dim floats) the
 * caller's own. Returns the items planned (0: none was left to claim). */
static size_t job_slice(kst_kvc *c, kv_layer *L, kv_job *J, kst_kvg_scratch **s, float *tmp, size_t il) {
    const kst_kvc_opts *o = &c->o;
    size_t M = L->heads[0].g.M;
    size_t i0 = __atomic_fetch_add(&J->next, il, __ATOMIC_ACQ_REL);
    if (i0 >= J->items) return 0;
    size_t np = J->items - i0 < il ? J->items - i0 : il;
    kst_kvg_plan_item it[KV_PLAN_IL];
    float *tp[KV_PLAN_IL];
    for (size_t a = 0; a < np; a++) {
        size_t i = i0 + a;
        kv_hstore *H = &L->heads[i / J->n];
        kst_kvg_plan_item x = {&H->g, rows_at(c, H->K, o->sinks), (uint32_t)(J->lo + i % J->n), J->lo,
                               J->sel + i * M, J->seld + i * M, 0, 0};
        it[a] = x;
        tp[a] = tmp + a * 2 * o->head_dim;
    }
    kst_kvg_plan_multi(it, np, o->f16, o->head_dim, s, tp);
    for (size_t a = 0; a < np; a++) {
        size_t r = it[a].count;
        if (r == (size_t)-1) {
            __atomic_store_n(&J->fail, 1, __ATOMIC_RELAXED);
            r = 0;
        }
        J->cnt[i0 + a] = r;
    }
    __atomic_fetch_add(&J->done, np, __ATOMIC_RELEASE);
    return np;
}

/* The job's items that are left, il at a time, until none is left or *stop (may be NULL) is
 * set; returns the items this thread planned. */
static size_t job_work(kst_kvc *c, kv_layer *L, kv_job *J, kst_kvg_scratch **s, float *tmp, size_t il,
                       const int *stop) {
    size_t planned = 0, np;
    while (!(stop && __atomic_load_n(stop, __ATOMIC_ACQUIRE)) && (np = job_slice(c, L, J, s, tmp, il)) > 0)
        planned += np;
    return planned;
}

/* Thread t's KV_PLAN_IL scratches for job_work: its search scratch and interleaved ones. */
static void plan_scratches(kst_kvc *c, int t, kst_kvg_scratch **s) {
    s[0] = &c->th[t].s;
    for (size_t a = 1; a < KV_PLAN_IL; a++) s[a] = &c->th[t].sx[a - 1];
}

static void *worker_main(void *arg) {
    kst_kvc *c = arg;
    kst_kvg_scratch sc[KV_PLAN_IL], *s[KV_PLAN_IL];
    memset(sc, 0, sizeof sc);
    for (size_t a = 0; a < KV_PLAN_IL; a++) s[a] = &sc[a];
    float *tmp = malloc(KV_PLAN_IL * 2 * c->o.head_dim * sizeof(float));
    int idle = 0;
    pthread_mutex_lock(&c->mu);
    while (!c->wk_stop) {
        int want = __atomic_load_n(&c->wk_idle, __ATOMIC_RELAXED); /* kst_kvc_set_append_worker_idle */
        if (idle != want) {
            idle = want;
#ifdef __linux__
            struct sched_param sp;
            memset(&sp, 0, sizeof sp);
            (void)pthread_setschedparam(pthread_self(), idle ? KV_SCHED_IDLE : SCHED_OTHER, &sp);
#endif
        }
        kv_layer *L = NULL;
        for (size_t l = 0; l < c->o.layers && !L && tmp; l++) {
            kv_job *J = &c->layers[l].job;
            if (J->state == KV_JOB_QUEUED && __atomic_load_n(&J->next, __ATOMIC_ACQUIRE) < J->items) L = &c->layers[l];
        }
        if (!L) {
            pthread_cond_wait(&c->cv_work, &c->mu);
            continue;
        }
        L->job.workers++;
        pthread_mutex_unlock(&c->mu);
        (void)job_work(c, L, &L->job, s, tmp, 1, NULL); /* one plan at a time: an append that must finish
                                               the batch waits for one plan at most */
        pthread_mutex_lock(&c->mu);
        L->job.workers--;
        pthread_cond_broadcast(&c->cv_idle);
    }
    pthread_mutex_unlock(&c->mu);
    for (size_t a = 0; a < KV_PLAN_IL; a++) kst_kvg_scratch_free(&sc[a]);
    free(tmp);
    return NULL;
}

void kst_kvc_set_append_worker_idle(kst_kvc *c, int on) { __atomic_store_n(&c->wk_idle, on != 0, __ATOMIC_RELAXED); }

void kst_kvc_set_append_worker(kst_kvc *c, int n) { c->wk_on = n < 0 ? 0 : n > KV_WK_MAX ? KV_WK_MAX : n; }

/* Queues a job of the n pending tokens after the indexed ones (no job in flight): the graphs
 * made room for them, the plans' buffers sized, then the worker woken (if on). */
static int job_launch(kst_kvc *c, kv_layer *L, size_t n, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    kv_job *J = &L->job;
    size_t lo = L->heads[0].g.n, items = o->kv_heads * n, M = L->heads[0].g.M;
    int rc = KST_OK;
    /* no worker may still be inside an earlier job's item loop (it reads the job's fields) */
    pthread_mutex_lock(&c->mu);
    while (J->workers) pthread_cond_wait(&c->cv_idle, &c->mu);
    pthread_mutex_unlock(&c->mu);
    for (size_t h = 0; h < o->kv_heads; h++)
        KST_TRY(kst_kvg_stage(&L->heads[h].g, rows_at(c, L->heads[h].K, o->sinks), o->f16, o->head_dim, lo + n,
                              c->ptmp, err));
    if (J->cap < items) {
        KST_TRY(kst_realloc((void **)&J->sel, items, M * sizeof(uint32_t), "kv append plans", err));
        KST_TRY(kst_realloc((void **)&J->seld, items, M * sizeof(float), "kv append plans", err));
        KST_TRY(kst_realloc((void **)&J->cnt, items, sizeof(size_t), "kv append plans", err));
        J->cap = items;
    }
    while (c->wk_started < c->wk_on && !c->wk_stop) {
        if (pthread_create(&c->wk[c->wk_started], NULL, worker_main, c) != 0) break;
        c->wk_started++; /* (none started: the appending calls plan the batches) */
    }
    pthread_mutex_lock(&c->mu);
    J->lo = lo;
    J->n = n;
    J->items = items;
    J->next = J->done = 0;
    J->linked = 0;
    J->fail = 0;
    J->state = KV_JOB_QUEUED;
    if (c->wk_on && c->wk_started) pthread_cond_broadcast(&c->cv_work);
    pthread_mutex_unlock(&c->mu);
done:
    return rc;
}

static int job_planned(kv_job *J) {
    return J->state == KV_JOB_QUEUED && __atomic_load_n(&J->done, __ATOMIC_ACQUIRE) == J->items;
}

/* Links up to `piece` more of the job's planned tokens in (0: all that are left), every KV head
 * (exclusive use of the graphs: between steps), and ends the job once all are in. A piece
 * leaves every head's graph holding the same tokens (the index as if the batch were shorter),
 * and each head's links are made in the same order whatever the pieces, so the graphs do not
 * depend on where the pieces ran. *ended (may be NULL): 1 when the job ended. */
static int job_apply_piece(kst_kvc *c, kv_layer *L, size_t piece, int *ended, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    kv_job *J = &L->job;
    size_t M = L->heads[0].g.M;
    int fail = __atomic_load_n(&J->fail, __ATOMIC_RELAXED);
    size_t i0 = J->linked, i1 = piece && J->n - i0 > piece ? i0 + piece : J->n;
    if (ended) *ended = 0;
    if (!fail) {
#pragma omp parallel for schedule(static) if (o->kv_heads > 1)
        for (size_t h = 0; h < o->kv_heads; h++) {
            kv_hstore *H = &L->heads[h];
            float *tmp = c->ptmp + (size_t)omp_get_thread_num() * KV_PLAN_IL * 2 * o->head_dim;
            for (size_t i = i0; i < i1; i++) {
                size_t it = h * J->n + i;
                kst_kvg_link(&H->g, rows_at(c, H->K, o->sinks), o->f16, o->head_dim, (uint32_t)(J->lo + i),
                             J->sel + it * M, J->seld + it * M, J->cnt[it], tmp);
            }
            if (H->cv.M) cv_sync(c, H, 0); /* (the tail's control variate sums: the nodes linked) */
        }
        J->linked = i1;
        if (i1 < J->n) return KST_OK;
    }
    pthread_mutex_lock(&c->mu);
    J->state = KV_JOB_NONE;
    pthread_mutex_unlock(&c->mu);
    if (ended) *ended = 1;
    if (fail) return kst_fail(err, KST_ERR_NOMEM, "kst_kv_append: out of memory linking tokens into the index");
    refresh_tables(c, L, 0);
    return KST_OK;
}

/* Links the job's planned nodes in (what is left of them), each KV head in order, and ends the
 * job. */
static int job_apply(kst_kvc *c, kv_layer *L, kst_error *err) { return job_apply_piece(c, L, 0, NULL, err); }

/* The job in flight planned to the end (this call's threads claim the items left, beside the
 * worker, then wait for the worker's last) and linked in. */
static int job_finish(kst_kvc *c, kv_layer *L, kst_error *err) {
    kv_job *J = &L->job;
    if (J->state != KV_JOB_QUEUED) return KST_OK;
    double t0 = c->prof ? mono_s() : 0;
    if (job_planned(J)) { /* the workers planned it all: linked as kv_advance would */
        int rc = job_apply(c, L, err);
        if (c->prof) {
            c->prof->app_wbatches++;
            c->prof->app_wlink += mono_s() - t0;
        }
        return rc;
    }
    if (__atomic_load_n(&J->next, __ATOMIC_ACQUIRE) < J->items) {
#pragma omp parallel if (J->items > KV_PLAN_IL)
        {
            kst_kvg_scratch *s[KV_PLAN_IL];
            plan_scratches(c, omp_get_thread_num(), s);
            (void)job_work(c, L, J, s, c->ptmp + (size_t)omp_get_thread_num() * KV_PLAN_IL * 2 * c->o.head_dim, c->plan_il,
                           NULL);
        }
    }
    while (__atomic_load_n(&J->done, __ATOMIC_ACQUIRE) < J->items) sched_yield();
    double t1 = c->prof ? mono_s() : 0;
    int rc = job_apply(c, L, err);
    if (c->prof) {
        c->prof->app_batches++;
        c->prof->app_bplan += t1 - t0;
        c->prof->app_blink += mono_s() - t1;
    }
    return rc;
}

void kst_kvc_set_insert(kst_kvc *c, size_t sk, size_t ext) {
    for (size_t l = 0; l < c->o.layers; l++) {
        kv_layer *L = &c->layers[l];
        kst_error e;
        if (L->built) (void)job_finish(c, L, &e); /* the batch in flight planned as it was */
        for (size_t h = 0; L->heads && h < c->o.kv_heads; h++) {
            kst_kvg *g = &L->heads[h].g;
            g->ins_sk = sk;
            g->ins_ext = ext ? ext : g->ins_ef;
        }
    }
}

/* After an append (batch > 1): lands a planned batch, keeps the pending tokens within pmax
 * (helping), and queues the next batch once B are pending. */
static int kv_advance(kst_kvc *c, kv_layer *L, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    int rc = KST_OK;
    if (!L->built) return KST_OK;
    kv_job *J = &L->job;
    /* idle mode with pieces: a planned batch is left to kst_kvc_work, which links it piece by
     * piece within the engine's idle time, unless the tokens pending pass the lag */
    int defer = c->app_idle && c->link_piece > 0;
    if (job_planned(J) && !(defer && kst_kvc_pending(c, (size_t)(L - c->layers)) <= c->pmax)) {
        double t0 = c->prof ? mono_s() : 0;
        KST_TRY(job_apply(c, L, err));
        if (c->prof) {
            c->prof->app_wbatches++;
            c->prof->app_wlink += mono_s() - t0;
        }
    }
    for (;;) {
        size_t target = L->n >= o->sinks + o->window ? L->n - o->sinks - o->window : 0, nidx = L->heads[0].g.n;
        size_t pend = target > nidx ? target - nidx : 0;
        if (J->state == KV_JOB_QUEUED) {
            if (pend <= c->pmax) break;
            KST_TRY(job_finish(c, L, err)); /* too far behind: this step helps */
            continue;
        }
        if (pend < c->batch) break;
        KST_TRY(job_launch(c, L, c->batch, err));
        /* planned by the workers or in the engine's idle time (kst_kvc_work), within the lag */
        if (!((c->wk_on && c->wk_started) || c->app_idle) || pend > c->pmax) KST_TRY(job_finish(c, L, err));
    }
done:
    return rc;
}

void kst_kvc_set_append_idle(kst_kvc *c, int on) { c->app_idle = on != 0; }

void kst_kvc_set_link_piece(kst_kvc *c, size_t n) { c->link_piece = n; }

/* kst_kvc_work's plans of one job (more() has said yes): the team's threads claim one plan at a
 * time until none is left or more() says no. With more than one thread the first only asks
 * more() (its answer is seen at once) while the others plan; alone, a thread asks after each
 * plan. Returns the plans made. */
static size_t work_plan(kst_kvc *c, kv_layer *L, int (*more)(void *), void *arg, int *stop) {
    kv_job *J = &L->job;
    size_t planned = 0;
    int nt = omp_get_max_threads() < c->nth ? omp_get_max_threads() : c->nth;
#pragma omp parallel num_threads(nt) reduction(+ : planned) if (nt > 1)
    {
        int t = omp_get_thread_num();
        float *tmp = c->ptmp + (size_t)t * KV_PLAN_IL * 2 * c->o.head_dim;
        kst_kvg_scratch *s[KV_PLAN_IL];
        plan_scratches(c, t, s);
        if (omp_get_num_threads() == 1) { /* (the caller asked before the first) */
            size_t np;
            while ((np = job_slice(c, L, J, s, tmp, 1)) > 0) {
                planned += np;
                if (__atomic_load_n(&J->next, __ATOMIC_ACQUIRE) >= J->items) break;
                if (more && !more(arg)) {
                    *stop = 1;
                    break;
                }
            }
        } else if (t == 0 && more) {
            while (__atomic_load_n(&J->next, __ATOMIC_ACQUIRE) < J->items)
                if (more && !more(arg)) {
                    __atomic_store_n(stop, 1, __ATOMIC_RELEASE);
                    break;
                }
        } else {
            planned += job_work(c, L, J, s, tmp, 1, stop);
        }
    }
    return planned;
}

static int sc_flush(kst_kvc *c, kv_layer *L, int ahead, kst_error *err);
#ifdef KST_CUDA
static int sc_plan_ahead(kst_kvc *c, kv_layer *L, kst_error *err);
#endif

int kst_kvc_work(kst_kvc *c, int (*more)(void *), void *arg, size_t *planned, kst_error *err) {
    if (planned) *planned = 0;
    if (!c) return kst_fail(err, KST_ERR_MISUSE, "kst_kv_work: the cache is NULL");
    int rc = KST_OK, stop = 0;
    size_t np = 0, linked = 0, pieces = 0;
    double t0 = c->prof ? mono_s() : 0, tl = 0;
    for (size_t l = 0; l < c->o.layers; l++) { /* the last steps' sample cache updates first (their uploads precede the
                                                  arms), with the next plans where there is time */
        kv_layer *L = &c->layers[l];
#ifdef KST_CUDA
        KST_TRY(sc_flush(c, L, L->sc_pend && (!more || more(arg)), err));
#else
        KST_TRY(sc_flush(c, L, 0, err));
#endif
    }
#ifdef KST_CUDA
    if (c->gpu_arm && !c->gpu_off) { /* the layers' next GPU launches queued (idle time: the GPU is busy) */
        for (size_t l = 0; l < c->o.layers; l++)
            if (c->layers[l].gpu) KST_TRY(kst_kvgpu_arm(c->layers[l].gpu, NULL, err));
        if (c->prof) c->prof->gpu_arm_idle_s += mono_s() - t0;
    }
    for (size_t l = 0; l < c->o.layers; l++) /* the next steps' plans, while the engine lends time */
        if (c->layers[l].sc_ahead) {
            if (more && !more(arg)) break;
            KST_TRY(sc_plan_ahead(c, &c->layers[l], err));
        }
#endif
    while (!stop) {
        /* a planned batch first (linked: its tokens leave the exact part), then plans to make */
        kv_layer *L = NULL;
        int link = 0;
        for (size_t l = 0; l < c->o.layers && !L; l++)
            if (c->layers[l].built && job_planned(&c->layers[l].job)) {
                L = &c->layers[l];
                link = 1;
            }
        for (size_t l = 0; l < c->o.layers && !L; l++) {
            kv_job *J = &c->layers[l].job;
            if (c->layers[l].built && J->state == KV_JOB_QUEUED && __atomic_load_n(&J->next, __ATOMIC_ACQUIRE) < J->items)
                L = &c->layers[l];
        }
        if (!L) break; /* nothing left (or only plans a background worker is making) */
        if (link) {
            if (more && !more(arg)) break;
            double a = c->prof ? mono_s() : 0;
            int ended = 0;
            KST_TRY(job_apply_piece(c, L, c->link_piece, &ended, err));
            pieces++;
            if (!ended) { /* more() asked again before the next piece */
                if (c->prof) tl += mono_s() - a;
                continue;
            }
            linked++;
            /* the next batch queued where B more are pending, as the appending call would */
            const kst_kvc_opts *o = &c->o;
            size_t target = L->n >= o->sinks + o->window ? L->n - o->sinks - o->window : 0, nidx = L->heads[0].g.n;
            if (target >= nidx + c->batch) KST_TRY(job_launch(c, L, c->batch, err));
            if (c->prof) tl += mono_s() - a;
            continue;
        }
        if (more && !more(arg)) break;
        np += work_plan(c, L, more, arg, &stop);
    }
done:
    if (c->prof) {
        c->prof->idle_calls++;
        c->prof->idle_plans += np;
        c->prof->idle_batches += linked;
        c->prof->idle_pieces += pieces;
        c->prof->idle_s += mono_s() - t0;
        c->prof->idle_link += tl;
    }
    if (planned) *planned = np;
    return rc;
}

int kst_kvc_flush(kst_kvc *c, size_t layer, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_flush", err);
    if (rc != KST_OK) return rc;
    kv_layer *L = &c->layers[layer];
    KST_TRY(sc_flush(c, L, 0, err)); /* (the last step's sample cache update first) */
    const kst_kvc_opts *o = &c->o;
    if (!L->built) return KST_OK;
    KST_TRY(job_finish(c, L, err));
    /* batch by batch (B at a time, then the rest), as the appends link them: a batch's plans
     * see the staged nodes before them, so the graphs after a flush are the same whether the
     * earlier batches were planned by the appending calls, the workers or kst_kvc_work */
    for (;;) {
        size_t target = L->n >= o->sinks + o->window ? L->n - o->sinks - o->window : 0, nidx = L->heads[0].g.n;
        if (target <= nidx) break;
        KST_TRY(job_launch(c, L, c->batch > 1 && target - nidx > c->batch ? c->batch : target - nidx, err));
        KST_TRY(job_finish(c, L, err));
    }
done:
    return rc;
}

size_t kst_kvc_pending(const kst_kvc *c, size_t layer) {
    if (!c || layer >= c->o.layers || !c->layers[layer].built) return 0;
    const kv_layer *L = &c->layers[layer];
    size_t target = L->n >= c->o.sinks + c->o.window ? L->n - c->o.sinks - c->o.window : 0;
    return target - L->heads[0].g.n;
}

/* Rows of n tokens per KV head (the batch in flight, which reads them, finished first). */
static int grow_rows(kst_kvc *c, kv_layer *L, size_t n, kst_error *err) {
    int rc = KST_OK;
    if (n <= L->cap) return KST_OK;
    KST_TRY(job_finish(c, L, err));
    size_t rowb = c->o.head_dim * c->esize, cap = L->cap ? L->cap : 256;
    while (cap < n) cap *= 2;
#ifdef KST_CUDA
    if (L->gpu && L->sc_map) { /* (registered for the GPU: unregistered first, its last reads done) */
        KST_TRY(kst_kvgpu_sc_store(L->gpu, NULL, NULL, 0, err));
        L->sc_map = 0;
    }
#endif
    for (size_t h = 0; h < c->o.kv_heads; h++) {
        KST_TRY(kst_kvg_grow_big(&L->heads[h].K, L->n * rowb, cap * rowb, "cached keys", err));
        KST_TRY(kst_kvg_grow_big(&L->heads[h].V, L->n * rowb, cap * rowb, "cached values", err));
    }
    L->cap = cap;
done:
    return rc;
}

#ifdef KST_CUDA
static int sc_map_rows(kst_kvc *c, kv_layer *L, kst_error *err);
#endif

int kst_kvc_reserve(kst_kvc *c, size_t layer, size_t n, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_reserve", err);
    if (rc != KST_OK) return rc;
    kv_layer *L = &c->layers[layer];
    KST_TRY(sc_flush(c, L, 0, err)); /* (the last step's sample cache update first) */
    KST_TRY(grow_rows(c, L, n, err));
    if (L->built && n > c->o.sinks + c->o.window) {
        KST_TRY(job_finish(c, L, err));
        for (size_t h = 0; h < c->o.kv_heads; h++)
            KST_TRY(kst_kvg_reserve(&L->heads[h].g, n - c->o.sinks - c->o.window, err));
    }
#ifdef KST_CUDA
    if (L->built && c->tclust && c->tcache) KST_TRY(sc_map_rows(c, L, err)); /* (moved rows pinned again here, not at a step) */
#endif
done:
    return rc;
}

int kst_kvc_append(kst_kvc *c, size_t layer, const void *keys, const void *values, size_t n,
                   kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_append", err);
    if (rc != KST_OK) return rc;
    if (n == 0) return KST_OK;
    if (!keys || !values) return kst_fail(err, KST_ERR_MISUSE, "kst_kv_append: keys or values is NULL");
    kv_layer *L = &c->layers[layer];
    if ((rc = sc_flush(c, L, 0, err)) != KST_OK) return rc; /* (the last step's sample cache update first) */
    const kst_kvc_opts *o = &c->o;
    if (L->n + n > UINT32_MAX - 1)
        return kst_fail(err, KST_ERR_INVALID, "kst_kv_append: layer %zu would hold more than 2^32 tokens", layer);
    size_t rowb = o->head_dim * c->esize;
    double pa0 = c->prof ? mono_s() : 0, pa1 = pa0, pa2 = pa0;
    KST_TRY(grow_rows(c, L, L->n + n, err)); /* the rows may move */
    /* (n, kv_heads, d) -> per head (n, d) */
    for (size_t t = 0; t < n; t++)
        for (size_t h = 0; h < o->kv_heads; h++) {
            size_t src = (t * o->kv_heads + h) * rowb;
            memcpy((char *)L->heads[h].K + (L->n + t) * rowb, (const char *)keys + src, rowb);
            memcpy((char *)L->heads[h].V + (L->n + t) * rowb, (const char *)values + src, rowb);
        }
    if (c->prof) pa1 = mono_s();
#ifdef KST_CUDA
    if (L->gpu) {
        /* sinks to their slots; of the rest only the last `window` tokens matter (ring) */
        size_t n0 = L->n, n1 = L->n + n, tokb = o->kv_heads * rowb;
        for (size_t p = n0; p < n1 && p < o->sinks; p++)
            KST_TRY(kst_kvgpu_put(L->gpu, p, (const char *)keys + (p - n0) * tokb,
                                   (const char *)values + (p - n0) * tokb, 1, err));
        /* the ring: the window and the pending tokens (c->ring slots) */
        size_t lo = n0 > o->sinks ? n0 : o->sinks, R = c->ring;
        if (n1 > R + lo) lo = n1 - R;
        for (size_t p = lo; p < n1;) {
            size_t slot = (p - o->sinks) % R, run = R - slot;
            if (run > n1 - p) run = n1 - p;
            KST_TRY(kst_kvgpu_put(L->gpu, o->sinks + slot, (const char *)keys + (p - n0) * tokb,
                                   (const char *)values + (p - n0) * tokb, run, err));
            p += run;
        }
    }
#endif
    L->n += n;
    if (c->prof) pa2 = mono_s();
    rc = c->batch > 1 ? kv_advance(c, L, err) : index_leavers(c, L, err);
done:
    if (c->prof) {
        double pa3 = mono_s();
        c->prof->appends++;
        c->prof->app_total += pa3 - pa0;
        c->prof->app_copy += pa1 - pa0;
        c->prof->app_gpu += pa2 - pa1;
        c->prof->app_index += pa3 - pa2; /* the tables' share is also in app_tables */
    }
    return rc;
}

#ifdef KST_CUDA
/* The rows the sample cache may hold (every token's so far) registered for the GPU's scatter to
 * read them where they are (kst_kvgpu_sc_store; a no-op where KESTREL_KV_SC_MAPPED < 2), a quarter
 * more than needed each time (room for as many decode steps as a quarter of the prompt) so that
 * few segments are pinned: at the build, and before a staging names rows past those registered
 * (pinning 128K rows of 8 KV heads at d 128 in float16, 512 MB, takes ~0.1 s). Refused, the rows
 * are staged (kst_kvgpu_sc_staging knows). */
static int sc_map_rows(kst_kvc *c, kv_layer *L, kst_error *err) {
    size_t H = c->o.kv_heads, rowb = c->o.head_dim * c->esize, need = L->n * rowb, want = need + need / 4;
    if (need <= L->sc_map || !L->gpu) return KST_OK;
    if (want < L->sc_map + L->sc_map / 4) want = L->sc_map + L->sc_map / 4;
    if (want > L->cap * rowb) want = L->cap * rowb;
    const void **kv = kst_malloc(2 * H, sizeof(void *), "tail sample cache rows", err);
    if (!kv) return KST_ERR_NOMEM;
    for (size_t h = 0; h < H; h++) kv[h] = L->heads[h].K, kv[H + h] = L->heads[h].V;
    double t0 = c->prof ? mono_s() : 0;
    int rc = kst_kvgpu_sc_store(L->gpu, kv, kv + H, want, err);
    if (c->prof) c->prof->sc_regs++, c->prof->sc_reg += mono_s() - t0;
    kst_free(kv);
    if (rc == KST_OK) L->sc_map = want;
    return rc;
}
#endif

/* Builds the heads' indexes; copied: head 0's only, the others get copies of it. */
static int build_layer(kst_kvc *c, size_t layer, const float *queries, size_t nq, int copied,
                       kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_build", err);
    if (rc != KST_OK) return rc;
    const kst_kvc_opts *o = &c->o;
    if (nq && !queries) return kst_fail(err, KST_ERR_MISUSE, "kst_kv_build: queries is NULL");
    kv_layer *L = &c->layers[layer];
    if ((rc = sc_flush(c, L, 0, err)) != KST_OK) return rc; /* (the last step's sample cache update first) */
    if (o->index == KST_KVC_INDEX_NONE) return KST_OK;
    if (o->index == KST_KVC_INDEX_ATTN && nq == 0)
        return kst_fail(err, KST_ERR_INVALID,
                        "kst_kv_build: the attention-aware index needs the prefill queries (nq = 0)");
    size_t n = L->n > o->sinks + o->window ? L->n - o->sinks - o->window : 0;
    size_t G = o->q_heads / o->kv_heads, d = o->head_dim;
    /* a KV head's queries: all of its group's heads; with the layer's RoPE (kst_kvc_set_rope)
     * each twice, as given and moved to the next token's position */
    size_t forms = L->rope && nq ? 2 : 1, per = nq * G;
    /* as many rows as without RoPE unless max_build_queries (which counts both forms) allows more:
     * both forms of half the queries gave the same recall and error as both of all (round 39) */
    size_t use = o->max_build_queries ? (o->max_build_queries < per * forms ? o->max_build_queries : per * forms) : per;
    use = use < forms ? forms : use - use % forms;
    float *Q = NULL;
    double cs[512]; /* the moved queries' cos and sin (head_dim <= 512) */
    if (o->index == KST_KVC_INDEX_ATTN) {
        Q = kst_malloc(use ? use : 1, d * sizeof(float), "prefill queries", err);
        if (!Q) return KST_ERR_NOMEM;
    }
    /* a batch in flight reads the graphs: finished first (then replaced with the rest) */
    rc = job_finish(c, L, err);
    if (rc != KST_OK) {
        kst_free(Q);
        return rc;
    }
    for (size_t h = 0; h < o->kv_heads; h++) {
        kst_kvg_free(&L->heads[h].g);
        L->heads[h].tt.n = 0; /* the tail sample is remade at the next decode step */
    }
#ifdef KST_CUDA
    L->gt_ns = 0;
#endif
    L->built = 0;
    for (size_t h = 0; h < (copied ? 1 : o->kv_heads) && rc == KST_OK; h++) {
        kv_hstore *H = &L->heads[h];
        kst_kvg_init(&H->g, o->degree, o->entries, o->efc, NULL);
        H->g.codes_on = o->codes;
        const void *K = rows_at(c, H->K, o->sinks);
        if (o->index == KST_KVC_INDEX_ATTN) {
            /* Evenly spaced of the group's nq * G (token, head) queries, each in its `forms`:
             * as given, then moved (query t is at position L->n - nq + t, the last nq tokens';
             * moved to L->n, where the decode steps' queries are). With both forms the heads
             * rotate with the token, so that every head is used where half the queries are. */
            size_t at = (size_t)-1; /* the token whose angles cs holds (a token's heads come together) */
            for (size_t i = 0; i < use; i++) {
                size_t r = i / forms * per / (use / forms), t = r / G, g = forms > 1 ? (r + t) % G : r % G;
                memcpy(Q + i * d, queries + (t * o->q_heads + h * G + g) * d, d * sizeof(float));
                if (i % forms == 0) continue;
                if (t != at) kst_rope_angles(cs, L->rope, L->rope_n, (double)(nq - t));
                at = t;
                kst_rope_rotate(Q + i * d, d, cs, L->rope_n, L->rope_il);
            }
            /* its queries' attention measured for the probe (probe_of): with RoPE on the moved
             * forms alone, which ask from where the decode steps' queries will */
            const kst_kvg_peaks pk = {o->scale, forms > 1 ? 1 : 0, forms};
            rc = kst_kvg_build_attn(&H->g, K, o->f16, n, d, Q, use, o->build_top, &pk, err);
            if (rc == KST_OK && c->order) { /* nearby keys at nearby nodes (kst_kvg_order) */
                size_t nc = n / c->order;
                rc = kst_kvg_order(&H->g, K, o->f16, d, nc < KST_KVC_ORDER_MAX ? nc : KST_KVC_ORDER_MAX, err);
            }
        } else {
            rc = kst_kvg_build_keys(&H->g, K, o->f16, n, d, err);
        }
    }
    kst_free(Q);
    for (size_t h = 1; copied && h < o->kv_heads && rc == KST_OK; h++) {
        rc = kst_kvg_copy(&L->heads[h].g, &L->heads[0].g, err);
        /* the codes are of head 0's keys: this head's own */
        if (rc == KST_OK && L->heads[h].g.codes)
            rc = kst_kvg_make_codes(&L->heads[h].g, rows_at(c, L->heads[h].K, o->sinks), o->f16, d, err);
    }
    if (rc != KST_OK) {
        for (size_t h = 0; h < o->kv_heads; h++) {
            kst_kvg_free(&L->heads[h].g);
            kst_kvg_init(&L->heads[h].g, o->degree, o->entries, o->efc, NULL);
            L->heads[h].g.codes_on = o->codes;
        }
        return kst_error_prefix(err, "kst_kv_build: layer %zu", layer);
    }
    /* the clustered tail estimate's clusters, per KV head (its own keys, copied graphs too) */
    for (size_t h = 0; h < o->kv_heads && rc == KST_OK; h++) {
        kv_hstore *H = &L->heads[h];
        if (c->tclust)
            rc = kst_kvtc_build(&H->tc, rows_at(c, H->K, o->sinks), o->f16, H->g.n, d, c->tclust,
                                1 + layer * 4096 + h, err);
        else
            kst_kvtc_free(&H->tc);
        kst_kvsc_free(&H->sc); /* (set up anew for the new clusters at the next step) */
    }
#ifdef KST_CUDA
    L->sc_gpu = 0;
    if (rc == KST_OK && c->tclust && c->tcache) rc = sc_map_rows(c, L, err); /* (at the build, not the first step) */
#endif
    if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_build: layer %zu", layer);
    L->built = 1;
    rc = index_leavers(c, L, err);
    refresh_tables(c, L, 1);
#pragma omp parallel for schedule(dynamic) if (c->tail_cv && o->kv_heads > 1)
    for (size_t h = 0; h < (c->tail_cv ? o->kv_heads : 0); h++) cv_sync(c, &L->heads[h], 1); /* (the tail's control variate sums, anew) */
    return rc;
}

int kst_kvc_build(kst_kvc *c, size_t layer, const float *queries, size_t nq, kst_error *err) {
    return build_layer(c, layer, queries, nq, 0, err);
}

int kst_kvc_build_copied(kst_kvc *c, size_t layer, const float *queries, size_t nq, kst_error *err) {
    return build_layer(c, layer, queries, nq, 1, err);
}

/* ------------------------------------------------------------------------------------------ */
/* decode step */

static int thread_reserve(kv_thread *t, size_t nscore, size_t k, size_t d, kst_error *err) {
    int rc = KST_OK;
    if (t->buf_cap < nscore) {
        KST_TRY(kst_realloc((void **)&t->buf, nscore, sizeof(float), "attention scores", err));
        t->buf_cap = nscore;
    }
    if (t->ids_cap < k || !t->o2) {
        size_t cap = k > 1 ? k : 1;
        KST_TRY(kst_realloc((void **)&t->ids, cap, sizeof(uint32_t), "retrieved ids", err));
        KST_TRY(kst_realloc((void **)&t->rows, cap, sizeof(int64_t), "retrieved rows", err));
        KST_TRY(kst_realloc((void **)&t->o2, 512, sizeof(float), "partial output", err));
        KST_TRY(kst_realloc((void **)&t->sret, cap, sizeof(uint32_t), "retrieved ids", err));
        t->ids_cap = cap;
    }
done:
    return rc;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* The systematic sample of the tail estimate (kv.h, kst_kvc_attend): ns of nidx indexed nodes at
 * positions floor((2j + 1) nidx / (2 ns)), j < ns (ns <= nidx: strictly increasing). */
static size_t sample_pos(size_t j, size_t nidx, size_t ns) {
    return (size_t)((2 * (uint64_t)j + 1) * nidx / (2 * (uint64_t)ns));
}
/* The sample index j of node x, or ns when x is not sampled. */
static size_t sample_of(size_t x, size_t nidx, size_t ns) {
    /* the least j with (2j + 1) nidx >= 2 ns x */
    uint64_t a = 2 * (uint64_t)ns * x, j = a <= nidx ? 0 : (a - nidx + 2 * (uint64_t)nidx - 1) / (2 * (uint64_t)nidx);
    return j < ns && sample_pos((size_t)j, nidx, ns) == x ? (size_t)j : ns;
}

/* Node of sample j in T's table (kv_tail.strat: within its chunk's stratum). */
static size_t tt_pos(const kv_tail *T, size_t j) {
    if (!T->strat) return sample_pos(j, T->nidx, T->n);
    size_t c = j / T->ch, nr = T->n - c * T->ch < T->ch ? T->n - c * T->ch : T->ch;
    return T->b[c] + sample_pos(j - c * T->ch, T->b[c + 1] - T->b[c], nr);
}
/* The stratum (chunk) of node x (kv_tail.strat; nodes indexed since the draw: the last). */
static size_t tt_stratum(const kv_tail *T, size_t x) {
    size_t lo = 0, hi = T->nc - 1;
    while (lo < hi) {
        size_t mid = (lo + hi + 1) / 2;
        if (T->b[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}
/* The sample index of node x in T's table, or T->n when x is not sampled. */
static size_t tt_of(const kv_tail *T, size_t x) {
    if (!T->strat) return sample_of(x, T->nidx, T->n);
    if (x >= T->nidx) return T->n;
    size_t c = tt_stratum(T, x), nr = T->n - c * T->ch < T->ch ? T->n - c * T->ch : T->ch;
    size_t j = sample_of(x - T->b[c], T->b[c + 1] - T->b[c], nr);
    return j < nr ? c * T->ch + j : T->n;
}
/* Stratum bounds of a sample of ns in chunks of ch (nc of them) over nidx nodes, stratum c
 * f times as long as stratum c + 1 (the last one next to the window): returns 0 (uniform
 * sample) where a stratum would hold fewer nodes than samples. */
static int tt_strata(size_t *b, double f, size_t nidx, size_t ns, size_t ch, size_t nc) {
    if (!(f > 1) || nc < 2 || ns >= nidx) return 0;
    double tot = 0, w = 1;
    for (size_t c = 0; c < nc; c++, w *= f) tot += w;
    double acc = 0;
    w = 1;
    b[nc] = nidx;
    for (size_t c = nc; c-- > 0; w *= f) { /* from the window back */
        acc += w;
        b[c] = c ? (size_t)((1 - acc / tot) * (double)nidx + 0.5) : 0;
    }
    for (size_t c = 0; c < nc; c++) {
        size_t nr = ns - c * ch < ch ? ns - c * ch : ch;
        if (b[c + 1] - b[c] < nr) return 0;
    }
    return 1;
}

/* The rows of a sample table's chunks for ns samples. */
static size_t tail_rows(const kst_kvc *c, size_t ns) {
    size_t c0 = c->strat > 1 && c->tt_ch ? c->tt_ch : 512;
    return ns <= c0 * KV_TT_CHUNKS ? c0 : (ns + KV_TT_CHUNKS - 1) / KV_TT_CHUNKS;
}

/* Before a decode step's parallel part: each KV head's sample table sized for ns samples of
 * nidx indexed keys, marked for copying where the index or ns changed. */

static int tail_prepare(kst_kvc *c, kv_layer *L, size_t nidx, size_t ns, int q8, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    size_t d = o->head_dim, G = o->q_heads / o->kv_heads, rowb = d * c->esize;
    size_t ch = tail_rows(c, ns), nc = (ns + ch - 1) / ch;
    int rc = KST_OK;
    for (size_t h = 0; h < o->kv_heads; h++) {
        kv_tail *T = &L->heads[h].tt;
        T->copy = 0;
        /* drawn anew when the sample size changed (every key sampled: with each growth) or the
         * index grew by more than 1/KV_TT_LAG since the draw; until then the keys indexed since
         * are not in the sample (tail_partial's ratio stands for them too) */
        if (T->n == ns && T->tf == c->strat && T->q8 == q8 && T->nidx <= nidx && nidx - T->nidx <= T->nidx / KV_TT_LAG)
            continue;
        T->n = 0;
        if (q8) {
            size_t ch8 = KST_Q8T_ROWS(ch);
            if (T->cap8 < nc * ch8) {
                KST_TRY(kst_realloc((void **)&T->K8, nc * ch8, d, "tail sample keys (8 bits)", err));
                KST_TRY(kst_realloc((void **)&T->V8, nc * ch8, d, "tail sample values (8 bits)", err));
                KST_TRY(kst_realloc((void **)&T->ks, nc * ch8, sizeof(float), "tail sample scales", err));
                KST_TRY(kst_realloc((void **)&T->vs, nc * ch8, sizeof(float), "tail sample scales", err));
                KST_TRY(kst_realloc((void **)&T->ksum, nc * ch8, sizeof(int32_t), "tail sample scales", err));
                KST_TRY(kst_realloc((void **)&T->wq, nc * ch8, G, "tail sample weights (8 bits)", err));
                KST_TRY(kst_realloc((void **)&T->wsc, KV_TT_CHUNKS, G * sizeof(float), "tail sample weights (8 bits)", err));
                KST_TRY(kst_realloc((void **)&T->qb, KV_TT_CHUNKS, G * d, "tail sample queries (8 bits)", err));
                T->cap8 = nc * ch8;
            }
            T->ch8 = ch8;
        } else if (T->cap < ns) {
            KST_TRY(kst_realloc(&T->K, ns, rowb, "tail sample keys", err));
            KST_TRY(kst_realloc(&T->V, ns, rowb, "tail sample values", err));
            T->cap = ns;
        }
        if (T->ccap < nc * ch) { /* (a chunk's sums for as many chunks as a table has at most) */
            const size_t NC = KV_TT_CHUNKS;
            KST_TRY(kst_realloc((void **)&T->w, nc * G * ch, sizeof(float), "tail sample weights", err));
            KST_TRY(kst_realloc((void **)&T->o, NC * G * d, sizeof(float), "tail sample sums", err));
            KST_TRY(kst_realloc((void **)&T->ot, NC * G * d, sizeof(float), "tail sample sums", err));
            KST_TRY(kst_realloc((void **)&T->sum, NC * G, sizeof(double), "tail sample sums", err));
            KST_TRY(kst_realloc((void **)&T->mx, NC * G, sizeof(float), "tail sample sums", err));
            KST_TRY(kst_realloc((void **)&T->top, NC * G * KV_TT_TOP, sizeof(uint32_t), "tail sample tops", err));
            KST_TRY(kst_realloc((void **)&T->topw, NC * G * KV_TT_TOP, sizeof(float), "tail sample tops", err));
            T->ccap = nc * ch;
        }
        T->n = ns;
        T->nidx = nidx;
        T->ch = ch;
        T->nc = nc;
        T->strat = tt_strata(T->b, c->strat, nidx, ns, ch, nc);
        T->tf = c->strat;
        T->q8 = q8;
        T->copy = 1;
    }
    /* the control variate's sums: the sample's where drawn anew, the index's brought up to date
     * (without it, a sample drawn anew only drops its sums) */
    int cvw = 0;
    for (size_t h = 0; h < o->kv_heads; h++) {
        kv_hstore *H = &L->heads[h];
        if (!c->tail_cv) H->cvs.n = H->tt.copy ? 0 : H->cvs.n;
        else cvw |= H->tt.copy || (!H->tt.strat && H->cvs.n != H->tt.n) || H->cv.n != H->g.n || !H->cv.M;
    }
#pragma omp parallel for schedule(dynamic) if (cvw && o->kv_heads > 1)
    for (size_t h = 0; h < (cvw ? o->kv_heads : 0); h++) {
        kv_hstore *H = &L->heads[h];
        if (H->tt.copy || (!H->tt.strat && H->cvs.n != H->tt.n)) cv_sample(c, H); /* (the index's first) */
        else cv_sync(c, H, 0);
    }
done:
    return rc;
}

/* A tail item of the decode step: chunk cc of H's sample table (rows copied first if the table
 * was made anew), scored for the G query heads Qg (G, d) and its value rows summed by their
 * weights, once for the group. Cannot fail. */
static void tail_copy(const kst_kvc *c, kv_hstore *H, size_t cc) {
    const kst_kvc_opts *o = &c->o;
    size_t d = o->head_dim, rowb = d * c->esize;
    kv_tail *T = &H->tt;
    size_t j0 = cc * T->ch, nr = T->n - j0 < T->ch ? T->n - j0 : T->ch;
    const char *K = H->K, *V = H->V;
    if (T->q8) {
        size_t b = cc * T->ch8;
        int8_t *K8 = T->K8 + b * d, *V8 = T->V8 + b * d;
        for (size_t j = 0; j < nr; j++) {
            size_t r = o->sinks + tt_pos(T, j0 + j);
            kst_q8t_put(K8, T->ks + b, T->ksum + b, V8, T->vs + b, j, nr, K + r * rowb, V + r * rowb, o->f16, d);
        }
        kst_q8t_pad(K8, T->ks + b, T->ksum + b, V8, T->vs + b, nr, d);
        return;
    }
    char *Kc = (char *)T->K + j0 * rowb, *Vc = (char *)T->V + j0 * rowb;
    for (size_t j = 0; j < nr; j++) {
        size_t r = o->sinks + tt_pos(T, j0 + j);
        memcpy(Vc + j * rowb, V + r * rowb, rowb);
        /* keys transposed: column j of (d, nr) */
        if (o->f16)
            for (size_t i = 0; i < d; i++) ((uint16_t *)Kc)[i * nr + j] = ((const uint16_t *)(K + r * rowb))[i];
        else
            for (size_t i = 0; i < d; i++) ((float *)Kc)[i * nr + j] = ((const float *)(K + r * rowb))[i];
    }
}
/* out += w v for row j (of the table's chunk cc, whose rows start at Vc when not in 8 bits) */
static void tt_vaxpy(float *out, float w, const kv_tail *T, size_t cc, size_t j, const char *Vc, int f16, size_t d) {
    size_t nr = T->n - cc * T->ch < T->ch ? T->n - cc * T->ch : T->ch;
    if (T->q8) kst_q8t_vaxpy(out, w * T->vs[cc * T->ch8 + j], T->V8 + cc * T->ch8 * d, j, nr, d);
    else kst_kv_axpy(out, w, Vc + j * d * (f16 ? 2 : 4), f16, d);
}

static void tail_chunk(const kst_kvc *c, kv_hstore *H, size_t cc, const float *Qg) {
    const kst_kvc_opts *o = &c->o;
    size_t d = o->head_dim, G = o->q_heads / o->kv_heads, rowb = d * c->esize;
    kv_tail *T = &H->tt;
    size_t j0 = cc * T->ch, nr = T->n - j0 < T->ch ? T->n - j0 : T->ch, b = cc * T->ch8;
    if (T->copy) tail_copy(c, H, cc);
    float *W = T->w + cc * G * T->ch; /* (G, nr) */
    if (T->q8)
        kst_q8t_scores(W, Qg, G, T->K8 + b * d, T->ks + b, T->ksum + b, nr, d, o->scale, T->qb + cc * G * d);
    else
        kst_kv_scores_t(W, Qg, G, (char *)T->K + j0 * rowb, o->f16, nr, d, o->scale);
    size_t nt = nr < KV_TT_TOP ? nr : KV_TT_TOP;
    for (size_t g = 0; g < G; g++) {
        size_t ix = cc * G + g;
        float *w = W + g * nr, *tw = T->topw + ix * KV_TT_TOP;
        uint32_t *tp = T->top + ix * KV_TT_TOP;
        kst_kv_top(w, nr, nt, tw, tp); /* the nt best scores, best first */
        float mx = tw[0];
        kst_kv_exp_shift(w, nr, mx);
        for (size_t i = 0; i < nt; i++) {
            tw[i] = w[tp[i]];
            w[tp[i]] = 0;
        }
        double sum = kst_kv_sum(w, nr);
        T->mx[ix] = mx;
        T->sum[ix] = sum;
        if (!c->topsum_off) { /* the top samples' sum too, their rows hot here (tail_partial) */
            float *ot = T->ot + ix * d;
            memset(ot, 0, d * sizeof(float));
            const char *Vc = T->q8 ? NULL : (const char *)T->V + j0 * rowb;
            for (size_t i = 0; i < nt; i++) tt_vaxpy(ot, tw[i], T, cc, tp[i], Vc, o->f16, d);
        }
    }
    if (T->q8)
        kst_q8t_wsum(T->o + cc * G * d, W, G, T->V8 + b * d, T->vs + b, nr, d, T->wq + cc * G * T->ch8,
                     T->wsc + cc * G);
    else
        kst_kv_wsum_multi(T->o + cc * G * d, W, G, (char *)T->V + j0 * rowb, o->f16, nr, d);
}

/* ------------------------------------------------------------------------------------------ */
/* The tail estimate's control variate (kv.h, kst_kvc_set_tail_cv). Each KV head keeps, over its
 * indexed keys (nodes 0..n-1), M = sum v (k - c)^T, sum (k - c) and sum v, c the centre of its
 * keys at the build (any fixed c gives the same estimate; near the keys' mean it keeps M's
 * entries small); its tail sample keeps the same sums over the sampled nodes, made when the
 * sample is drawn. With s = scale <q, k> a key's score, s~ = s - scale <q, c> and u = 1 + s -
 * sbar (sbar: the mean score of T, the indexed keys not retrieved), the sums over T of u v and of
 * u are known exactly from M q, and the sample stands for them with its own ratio rho: their
 * differences (da, dz) correct the estimate by b = (its estimated weight over T) / |T|, the
 * slope of w = exp(s) on s where scores are Gaussian (Stein's lemma), so that the part of the
 * weights linear in the score costs no variance. */
static void cvs_free(kv_cvs *s) {
    kst_free(s->M);
    kst_free(s->Mf);
    kst_free(s->ks);
    kst_free(s->vs);
    memset(s, 0, sizeof *s);
}
static int cvs_reset(kv_cvs *s, size_t d) {
    s->n = 0;
    if (!s->M) {
        s->M = kst_malloc(d * d, sizeof(double), "tail control variate sums", NULL);
        s->Mf = kst_malloc(d * d, sizeof(float), "tail control variate sums", NULL);
        s->ks = kst_malloc(d, sizeof(double), "tail control variate sums", NULL);
        s->vs = kst_malloc(d, sizeof(double), "tail control variate sums", NULL);
        if (!s->M || !s->Mf || !s->ks || !s->vs) {
            cvs_free(s);
            return KST_ERR_NOMEM;
        }
    }
    memset(s->M, 0, d * d * sizeof(double));
    memset(s->ks, 0, d * sizeof(double));
    memset(s->vs, 0, d * sizeof(double));
    return KST_OK;
}
/* Adds the rows of nodes ids[0..n) (ids NULL: lo .. lo + n - 1) of H to the sums s, centre cen;
 * Mf refreshed. Blocks of 64 rows through kst_sgemm. Fails only on memory (s then dropped). */
#define CV_BLK 64
#define KV_CV_M 8192 /* retrieved keys a query head at most (ef is at most 8,192) */
static void cvs_add(const kst_kvc *c, const kv_hstore *H, kv_cvs *s, const float *cen, const uint32_t *ids, size_t lo,
                    size_t n) {
    const kst_kvc_opts *o = &c->o;
    size_t d = o->head_dim;
    if (!s->M) return;
    float *Kb = kst_malloc(CV_BLK * d * 2 + d * d, sizeof(float), "tail control variate scratch", NULL);
    if (!Kb) {
        cvs_free(s);
        return;
    }
    float *Vb = Kb + CV_BLK * d, *P = Vb + CV_BLK * d;
    for (size_t b0 = 0; b0 < n; b0 += CV_BLK) {
        size_t nb = n - b0 < CV_BLK ? n - b0 : CV_BLK;
        for (size_t j = 0; j < nb; j++) {
            size_t r = o->sinks + (ids ? ids[b0 + j] : lo + b0 + j);
            float *k = Kb + j * d, *v = Vb + j * d;
            kst_kv_rows_f32(k, H->K, o->f16, r, 1, d);
            kst_kv_rows_f32(v, H->V, o->f16, r, 1, d);
            for (size_t i = 0; i < d; i++) {
                k[i] -= cen[i];
                s->ks[i] += k[i];
                s->vs[i] += v[i];
            }
        }
        kst_sgemm(1, 0, (int)d, (int)d, (int)nb, 1.0f, Kb, (int)d, Vb, (int)d, 0.0f, P, (int)d); /* Kb^T Vb: M^T */
        for (size_t i = 0; i < d * d; i++) s->M[i] += P[i];
    }
    for (size_t i = 0; i < d * d; i++) s->Mf[i] = (float)s->M[i];
    s->n += n;
    kst_free(Kb);
}
/* Brings H's index sums up to its graph's nodes (anew, as at a build: the centre the keys'
 * mean). Only an improvement: on a memory failure the head goes without (cv_pre). */
static void cv_sync(const kst_kvc *c, kv_hstore *H, int anew) {
    size_t d = c->o.head_dim, n = H->g.n;
    if (!c->tail_cv) return;
    if (anew || H->cv.n > n || !H->cv.M) {
        if (!H->cvc && !(H->cvc = kst_malloc(d, sizeof(float), "tail control variate centre", NULL))) return;
        if (cvs_reset(&H->cv, d) != KST_OK) return;
        double *a = H->cv.ks; /* (zeroed: the centre's sums, then the sums' own) */
        float row[512];
        for (size_t x = 0; x < n; x++) {
            kst_kv_rows_f32(row, H->K, c->o.f16, c->o.sinks + x, 1, d);
            for (size_t i = 0; i < d; i++) a[i] += row[i];
        }
        for (size_t i = 0; i < d; i++) {
            H->cvc[i] = n ? (float)(a[i] / (double)n) : 0.0f;
            a[i] = 0;
        }
    }
    if (H->cv.n < n) cvs_add(c, H, &H->cv, H->cvc, NULL, H->cv.n, n - H->cv.n);
}
/* The sample's sums for a table drawn anew (uniform samples only: a stratified one's strata have
 * their own ratios); the index's brought up to date first. */
static void cv_sample(const kst_kvc *c, kv_hstore *H) {
    kv_tail *T = &H->tt;
    H->cvs.n = 0;
    cv_sync(c, H, 0);
    if (!c->tail_cv || !H->cv.M || T->strat || T->n == 0) return;
    uint32_t *ids = kst_malloc(T->n, sizeof(uint32_t), "tail control variate scratch", NULL);
    size_t nw = T->nidx / 64 + 1;
    if (nw > H->cvb_n) {
        kst_free(H->cvb);
        H->cvb_n = 0;
        if ((H->cvb = kst_malloc(nw, sizeof(uint64_t), "tail control variate sample marks", NULL))) H->cvb_n = nw;
    }
    if (!ids || !H->cvb || cvs_reset(&H->cvs, c->o.head_dim) != KST_OK) {
        kst_free(ids);
        return;
    }
    memset(H->cvb, 0, H->cvb_n * sizeof(uint64_t));
    for (size_t j = 0; j < T->n; j++) {
        ids[j] = (uint32_t)tt_pos(T, j);
        H->cvb[ids[j] / 64] |= (uint64_t)1 << (ids[j] % 64);
    }
    cvs_add(c, H, &H->cvs, H->cvc, ids, 0, T->n);
    kst_free(ids);
}

/* y (nq, 2, d): scale M q and scale M_sample q (the transposed float32 sums, kv_cvs) for the nq
 * queries Q (nq, d). */
static void cv_mq(const kv_hstore *H, const float *Q, size_t nq, size_t d, float scale, float *y) {
    float qs[512];
    memset(y, 0, nq * 2 * d * sizeof(float));
    for (size_t g = 0; g < nq; g++) {
        for (size_t j = 0; j < d; j++) qs[j] = scale * Q[g * d + j];
        kst_kv_gemv_t(y + g * 2 * d, H->cv.Mf, qs, d, d);
        kst_kv_gemv_t(y + g * 2 * d + d, H->cvs.Mf, qs, d, d);
    }
}

/* The control variate's parts for query head h (q: the step's queries, qh = q + h d) of H, KV
 * head h / G, before its tail estimate: the m retrieved ids rid with their scaled scores sr (the
 * retrieved partial's scratch), nidx indexed keys; with u = 1 + s - sbar, da (d) = sum over T of
 * u v less rho times the same over the kept samples, *dz the same of u. Returns 0 where it does
 * not apply (off, no sums, a stratified sample, nothing left out). */
static int cv_pre(const kst_kvc *c, const kv_hstore *H, const float *q, size_t h, const uint32_t *rid,
                  const float *sr, size_t m, size_t nidx, float *da, double *dz) {
    const kst_kvc_opts *o = &c->o;
    const kv_tail *T = &H->tt;
    size_t d = o->head_dim, ns = T->n, nin = 0, G = o->q_heads / o->kv_heads, kh = h / G;
    const float *qh = q + h * d;
    if (!c->tail_cv || !H->cv.M || H->cv.n != nidx || !H->cvs.M || H->cvs.n != ns || ns == 0 || T->strat || m >= nidx ||
        m > KV_CV_M)
        return 0;
    /* M q and M_sample q: the KV head's G query heads' made at the step's start, else (not
     * made yet) this head's alone */
    float yl[1024];
    const float *y = yl;
    if (c->cv_st && c->cv_y && __atomic_load_n(&c->cv_st[kh], __ATOMIC_ACQUIRE) == 2) y = c->cv_y + h * 2 * d;
    else cv_mq(H, qh, 1, d, o->scale, yl);
    float qs[512];
    double c0 = 0, sr_all = 0, sr_in = 0, qi = 0, qsm = 0;
    for (size_t i = 0; i < d; i++) {
        qs[i] = o->scale * qh[i];
        c0 += (double)qs[i] * H->cvc[i];
        qi += (double)qs[i] * H->cv.ks[i];
        qsm += (double)qs[i] * H->cvs.ks[i];
    }
    uint8_t inS[KV_CV_M];
    for (size_t i = 0; i < m; i++) { /* (nodes indexed since the draw are not in the sample) */
        int in = rid[i] < T->nidx && (H->cvb[rid[i] / 64] >> (rid[i] % 64) & 1);
        inS[i] = (uint8_t)in;
        nin += (size_t)in;
        sr_all += sr[i] - c0;
        if (in) sr_in += sr[i] - c0;
    }
    if (nin >= ns) return 0;
    double NT = (double)(nidx - m), rho = NT / (double)(ns - nin);
    double sT = qi - sr_all, sbar = sT / NT; /* (scores less c0 = scale <q, c>: u is the same) */
    *dz = sT - rho * (qsm - sr_in);
    for (size_t i = 0; i < d; i++)
        da[i] = (float)((1 - sbar) * (H->cv.vs[i] - rho * H->cvs.vs[i]) + y[i] - rho * y[d + i]);
    for (size_t i = 0; i < m; i++) {
        double u = 1 - sbar + (sr[i] - c0), f = inS[i] ? 1 - rho : 1;
        kst_kv_axpy(da, (float)(-u * f), rows_at(c, H->V, o->sinks + rid[i]), o->f16, d);
    }
    return 1;
}

/* The start of a tail estimate: o = 0, *lse = -inf, and t->sret[0..nex) the sample indices of
 * the m retrieved ids rid that are in T's sample, ascending; returns nex. */
static size_t tail_begin(kv_thread *t, const kv_tail *T, const uint32_t *rid, size_t m, float *o,
                         float *lse, size_t d) {
    size_t ns = T->n, nex = 0;
    for (size_t i = 0; i < m; i++) {
        size_t j = tt_of(T, rid[i]);
        if (j < ns) t->sret[nex++] = (uint32_t)j;
    }
    memset(o, 0, d * sizeof(float));
    *lse = -INFINITY;
    if (nex > 1) qsort(t->sret, nex, sizeof(uint32_t), cmp_u32);
    return nex;
}

/* The capped estimate (kst_kvc.tail_cap; kv.h): a kept sample above tau stands for itself and, at
 * tau's weight (the least a key the search missed above it weighs), for the rest of its ratio rho:
 * rho - 1 in tau's frame, summed apart (kst_kv_cap, core/kv_attn.h) and merged at the end, taken
 * down by kst_kv_cap_shrink. The other kept samples are weighted by rho. tt_rho1: rho - 1 for
 * chunk cc (rho: its stratum's keys not retrieved over its kept samples, or the whole sample's),
 * 0 with the cap off. */
static float tt_rho1(const kst_kvc *c, const kv_tail *T, const size_t *mc, size_t cc, size_t nidx, size_t m,
                     size_t kept, size_t nr, size_t nex_c) {
    if (!c->tail_cap) return 0;
    double rho;
    if (T->strat) {
        size_t N = T->b[cc + 1] - T->b[cc] + (cc == T->nc - 1 ? nidx - T->nidx : 0);
        if (nr <= nex_c || N <= mc[cc]) return 0;
        rho = (double)(N - mc[cc]) / (double)(nr - nex_c);
    } else
        rho = (double)(nidx - m) / (double)kept;
    return rho > 1 ? (float)(rho - 1) : 0;
}
/* A kept sample of chunk cc (row j) above tau into the cap parts: r1 = rho - 1. */
static void tt_cap_add(kst_kv_cap *p, float r1, const kv_tail *T, size_t cc, size_t j, const char *Vc, int f16, size_t d) {
    if (kst_kv_cap_take(p, r1)) tt_vaxpy(p->o, r1, T, cc, j, Vc, f16, d);
}

/* The kept samples whose score exceeds tau (the least retrieved score: keys the search should
 * have found) are not plain estimators of the rest: each is attended once, as if retrieved.
 * Weighted by the whole ratio, one missed top key sampled counted ~|R| / kept times (15 at 32K,
 * 2,048 samples) and single queries' errors reached 1-4 on SmolLM2's heads. With the cap (the
 * default, tt_rho1) each also stands for the rest of its ratio at tau's weight, and every kept
 * sample's ratio is rho; without it (KESTREL_KV_TAIL_CAP=0, before round 37) the others stand for
 * the keys neither retrieved nor such (the ratio (|R| - na) / (kept - na)), which takes the
 * missed keys above tau outside the sample for keys below it. tail_acc adds a kept sample of
 * weight w = exp(s - mx) (its chunk's frame) to the estimate (a, sa) or, above thr = exp(tau -
 * mx), to the exact part (x, sx), counting it in *na, and r1 = rho - 1 to the cap parts
 * (tt_cap_add). */
static void tail_acc(float *a, double *sa, float *x, double *sx, size_t *na, float w, float thr, float r1, kst_kv_cap *cp,
                     const kv_tail *T, size_t cc, size_t j, const char *Vc, int f16, size_t d) {
    if (w > thr) {
        *sx += w;
        (*na)++;
        tt_vaxpy(x, w, T, cc, j, Vc, f16, d);
        tt_cap_add(cp, r1, T, cc, j, Vc, f16, d);
    } else {
        *sa += w;
        tt_vaxpy(a, w, T, cc, j, Vc, f16, d);
    }
}
/* The least of a chunk's nt best weights tw: the GPU's grouped items (the 8-bit tables) list them
 * in row order, not best first. */
static float tw_least(const float *tw, size_t nt) {
    float m = INFINITY;
    for (size_t a = 0; a < nt; a++) m = tw[a] < m ? tw[a] : m;
    return m;
}
/* A chunk's nt top samples (weights tw, rows tp; topx: those retrieved) into the estimate oc and
 * the exact part (ox, *sx, *na): from their sum of w V made by the item (ot; NULL: none, with
 * kst_kvc_set_tail_topsum(c, 0)) less the retrieved ones and those above thr (those to the exact
 * part), where those hold at most 7/8 of the top's weight (else the difference would lose
 * precision); else row by row (tail_acc, *s0 their weights). Returns 1 where ot was used. */
static int tail_top(float *oc, double *s0, float *ox, double *sx, size_t *na, const float *ot, const float *tw,
                    const uint32_t *tp, size_t nt, uint64_t topx, float thr, float r1, kst_kv_cap *cp,
                    const kv_tail *T, size_t cc,
                    const char *Vc, int f16, size_t d) {
    double ttot = 0, trm = 0;
    for (size_t a = 0; ot && a < nt; a++) {
        ttot += tw[a];
        if ((topx >> a & 1) || tw[a] > thr) trm += tw[a];
    }
    if (!ot || !(trm <= ttot * 0.875)) {
        for (size_t a = 0; a < nt; a++)
            if (!(topx >> a & 1)) tail_acc(oc, s0, ox, sx, na, tw[a], thr, r1, cp, T, cc, tp[a], Vc, f16, d);
        return 0;
    }
    for (size_t i = 0; i < d; i++) oc[i] += ot[i];
    for (size_t a = 0; a < nt; a++) {
        if (!(topx >> a & 1) && !(tw[a] > thr)) continue;
        tt_vaxpy(oc, -tw[a], T, cc, tp[a], Vc, f16, d);
        if (!(topx >> a & 1)) { /* above tau: to the exact part, and the cap partial (tail_acc) */
            *sx += tw[a];
            (*na)++;
            tt_cap_add(cp, r1, T, cc, tp[a], Vc, f16, d);
            tt_vaxpy(ox, tw[a], T, cc, tp[a], Vc, f16, d);
        }
    }
    return 1;
}
/* The end of a tail estimate: the estimate's lse raised by the ratio (cap: c->tail_cap), the exact part merged. */
static void tail_end(float *o, float *lse, const float *oe, float lse_e, size_t nidx, size_t m,
                     size_t kept, size_t na, int cap, size_t d) {
    if (cap) *lse += (float)log((double)(nidx - m) / (double)kept); /* (the capped estimate: every kept sample's ratio) */
    else if (kept > na) *lse += (float)log((double)(nidx - m - na) / (double)(kept - na));
    else *lse = -INFINITY;
    kst_attn_merge(o, lse, oe, lse_e, d);
}

/* A stratified sample's (kv_tail.strat) log ratio for chunk cc: the nodes of its stratum neither
 * attended (mc[cc]) nor above tau (na) over its kept samples below tau; -inf where none is left
 * to stand for them. mc (T->nc): the m attended ids rid counted per stratum when cc == 0. */
static void tt_counts(const kv_tail *T, const uint32_t *rid, size_t m, size_t *mc) {
    for (size_t c = 0; c < T->nc; c++) mc[c] = 0;
    for (size_t i = 0; i < m; i++) mc[rid[i] >= T->nidx ? T->nc - 1 : tt_stratum(T, rid[i])]++;
}
static float tt_lratio(const kst_kvc *c, const kv_tail *T, const size_t *mc, size_t cc, size_t nidx, size_t nr,
                       size_t nex_c, size_t na) {
    size_t N = T->b[cc + 1] - T->b[cc] + (cc == T->nc - 1 ? nidx - T->nidx : 0);
    if (c->tail_cap) na = 0; /* (the capped estimate's ratio: every kept sample's) */
    size_t kept = nr - nex_c, out = mc[cc] + na;
    if (kept <= na || N <= out) return -INFINITY;
    return (float)log((double)(N - out) / (double)(kept - na));
}

/* The tail estimate (kv.h, kst_kvc_attend) of query head g of H's group from its table: partial
 * (o, *lse) over the sampled nodes minus the m retrieved ids rid (tau: the least retrieved
 * score, tail_acc), the estimate's lse raised by the ratio. Per chunk: the group's sums over the
 * samples outside the head's top, less the retrieved ones among them, plus the head's top
 * samples that were not retrieved (where the retrieved outside the top held most of the sums, so
 * that the difference would lose precision, or samples outside the top may score above tau, the
 * chunk's kept rows are attended anew); the chunks merged. Returns the kept count (0: o = 0,
 * *lse = -inf). t->buf and t->trows hold >= ns entries, t->sret >= m. */
static size_t tail_partial(kv_thread *t, const kst_kvc *c, const kv_hstore *H, size_t g,
                           const float *q, const uint32_t *rid, size_t nidx, size_t m, float tau,
                           float *o, float *lse) {
    const kst_kvc_opts *op = &c->o;
    const kv_tail *T = &H->tt;
    size_t ns = T->n, d = op->head_dim, rowb = d * c->esize, G = op->q_heads / op->kv_heads;
    size_t nex = tail_begin(t, T, rid, m, o, lse, d), kept = ns - nex, na = 0, mc[KV_TT_CHUNKS];
    t->ntlw = 0;
    if (kept == 0) return 0;
    if (T->strat) tt_counts(T, rid, m, mc);
    float oc[512], oe[512], ox[512], lse_e = -INFINITY;
    kst_kv_cap cp;
    memset(oe, 0, d * sizeof(float));
    kst_kv_cap_init(&cp, d);
    size_t e = 0; /* t->sret[e..) are in chunks cc.. */
    for (size_t cc = 0; cc < T->nc; cc++) {
        size_t j0 = cc * T->ch, nr = ns - j0 < T->ch ? ns - j0 : T->ch, ix = cc * G + g, e0 = e, na0 = na;
        while (e < nex && t->sret[e] < j0 + nr) e++;
        const float *w = T->w + cc * G * T->ch + g * nr, *tw = T->topw + ix * KV_TT_TOP;
        const uint32_t *tp = T->top + ix * KV_TT_TOP;
        size_t nt = nr < KV_TT_TOP ? nr : KV_TT_TOP;
        const char *Vc = T->q8 ? NULL : (const char *)T->V + j0 * rowb;
        if (e - e0 == nr) continue; /* the whole chunk retrieved */
        float thr = expf(tau - T->mx[ix]), r1 = tt_rho1(c, T, mc, cc, nidx, m, kept, nr, e - e0);
        double sum = T->sum[ix], sub = 0, sx = 0;
        uint64_t topx = 0; /* the top samples retrieved (bit a: tp[a]) */
        memcpy(oc, T->o + ix * d, d * sizeof(float));
        memset(ox, 0, d * sizeof(float));
        for (size_t i = e0; i < e; i++) {
            size_t j = t->sret[i] - j0;
            if (w[j] == 0) { /* in the head's top (or a weight of 0) */
                for (size_t a = 0; a < nt; a++)
                    if (tp[a] == j) topx |= (uint64_t)1 << a;
                continue;
            }
            sub += w[j];
            if (T->q8) { /* (the term as the 8-bit sum took it in) */
                float u = (float)T->wq[cc * G * T->ch8 + g * KST_Q8T_ROWS(nr) + j];
                kst_q8t_vaxpy(oc, -(T->wsc[ix] * u), T->V8 + cc * T->ch8 * d, j, nr, d);
            } else
                kst_kv_axpy(oc, -w[j], Vc + j * rowb, op->f16, d);
        }
        double rest = sum - sub;
        for (size_t a = 0; a < nt; a++)
            if (!(topx >> a & 1)) rest += tw[a] > thr ? 0 : tw[a];
        for (size_t a = 0; c->widen > 0 && a < nt; a++) /* the adaptive budget's signal (widen_pick) */
            if (!(topx >> a & 1) && tw[a] > 0) t->tlw[t->ntlw++] = logf(tw[a]) + T->mx[ix];
        if ((sub > 0 && !(sub <= sum * 0.875)) || (nt < nr && tw_least(tw, nt) > thr) || !(rest > 0) ||
            !isfinite(rest)) {
            /* the kept rows summed anew from their weights (the top's from topw) */
            size_t r = e0;
            double s2 = 0;
            memset(oc, 0, d * sizeof(float));
            for (size_t j = 0; j < nr; j++) {
                if (r < e && t->sret[r] == j0 + j) {
                    r++;
                    continue;
                }
                float wj = w[j];
                if (wj == 0)
                    for (size_t a = 0; a < nt; a++)
                        if (tp[a] == j) wj = tw[a];
                if (wj == 0) continue;
                tail_acc(oc, &s2, ox, &sx, &na, wj, thr, r1, &cp, T, cc, j, Vc, op->f16, d);
            }
            float lr = T->strat ? tt_lratio(c, T, mc, cc, nidx, nr, e - e0, na - na0) : 0;
            if (lr > -INFINITY) kst_attn_merge_sum(o, lse, oc, s2, T->mx[ix] + lr, d); /* 0 when every kept weight underflowed */
        } else {
            double s0 = 0; /* the top samples (with the item's sum of them) */
            if (tail_top(oc, &s0, ox, &sx, &na, c->topsum_off ? NULL : T->ot + ix * d, tw, tp, nt, topx, thr, r1, &cp, T, cc, Vc,
                         op->f16, d) &&
                c->prof)
                t->p_topsum++;
            float lr = T->strat ? tt_lratio(c, T, mc, cc, nidx, nr, e - e0, na - na0) : 0;
            if (lr > -INFINITY) kst_attn_merge_sum(o, lse, oc, rest, T->mx[ix] + lr, d);
        }
        kst_attn_merge_sum(oe, &lse_e, ox, sx, T->mx[ix], d);
    }
    if (T->strat) kst_attn_merge(o, lse, oe, lse_e, d);
    else tail_end(o, lse, oe, lse_e, nidx, m, kept, na, c->tail_cap, d);
    kst_kv_cap_merge(&cp, o, lse, tau, d);
    return kept;
}

/* A thread's scratch for tail_clusters: C clusters, a budget of B samples, nidx indexed keys. */
static int tc_reserve(kv_thread *t, size_t C, size_t B, size_t nidx, kst_error *err) {
    int rc = KST_OK;
    if (t->tc_c < C) {
        KST_TRY(kst_realloc((void **)&t->tcu, 2 * C, sizeof(uint32_t), "tail cluster plan", err));
        KST_TRY(kst_realloc((void **)&t->tcf, 3 * C, sizeof(float), "tail cluster plan", err));
        t->tc_c = C;
    }
    if (t->tc_b < B) {
        KST_TRY(kst_realloc((void **)&t->tcs, 2 * B, sizeof(float), "tail cluster samples", err));
        KST_TRY(kst_realloc((void **)&t->tcr, B, sizeof(int64_t), "tail cluster samples", err));
        t->tc_b = B;
    }
    if (t->tmark_cap < nidx) {
        size_t cap = nidx + nidx / 4 + 1024;
        KST_TRY(kst_realloc((void **)&t->tmark, cap, 1, "tail cluster marks", err));
        memset(t->tmark + t->tmark_cap, 0, cap - t->tmark_cap);
        t->tmark_cap = cap;
    }
done:
    return rc;
}
/* The clustered tail estimate (kv_tclust.h) of query head h (queries Q: the step's, all heads)
 * over H's indexed keys outside the m attended ids rid (distinct): partial (o, *lse); returns the
 * keys sampled. The centroid scores of the KV head's query heads are made once (c->tc_cs) by the
 * first of them here; a head that finds them being made scores its own. */
static size_t tail_clusters(kv_thread *t, const kst_kvc *c, const kv_hstore *H, size_t h, const float *Q,
                            const uint32_t *rid, size_t m, float tau, float *o, float *lse) {
    const kst_kvc_opts *op = &c->o;
    const kst_kvtc *T = &H->tc;
    size_t C = T->C, B = op->tail_samples, kept = 0, G = op->q_heads / op->kv_heads, kvh = h / G, d = op->head_dim;
    const float *q = Q + h * d, *cs = c->tc_cs + kvh * G * C + (h % G) * C;
    uint8_t *st = &c->tc_st[kvh], zero = 0;
    if (__atomic_load_n(st, __ATOMIC_ACQUIRE) != 2) {
        if (__atomic_compare_exchange_n(st, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            kst_kvtc_scores(T, Q + kvh * G * d, G, op->scale, c->tc_cs + kvh * G * C);
            __atomic_store_n(st, 2, __ATOMIC_RELEASE);
        } else if (__atomic_load_n(st, __ATOMIC_ACQUIRE) != 2) {
            kst_kvtc_scores(T, q, 1, op->scale, t->tcf + 2 * C);
            cs = t->tcf + 2 * C;
        }
    }
    t->ntlw = 0;
    for (size_t i = 0; i < m; i++)
        if (rid[i] < t->tmark_cap) t->tmark[rid[i]] = 1;
    size_t tot = kst_kvtc_plan(T, cs, c->tc_temp, rid, m, B, t->tcu, t->tcu + C, t->tcf);
    if (tot)
        kept = kst_kvtc_partial(T, q, H->K, H->V, op->f16, d, op->scale, op->sinks, t->tmark, t->tcu,
                                t->tcu + C, tau, c->tail_cap, t->tcr, t->tcs, t->tcs + B, o, lse);
    else {
        memset(o, 0, d * sizeof(float));
        *lse = -INFINITY;
    }
    for (size_t i = 0; i < m; i++)
        if (rid[i] < t->tmark_cap) t->tmark[rid[i]] = 0;
    return kept;
}

#ifdef KST_CUDA
/* tail_partial from the GPU's items for query head h (it: its nc items, kst_kvgpu_tail_out,
 * stride st floats each): the same estimator, the same exclusions. A retrieved sample among the
 * chunk's best is skipped; one outside them has its weight exp(s - mx) recomputed from its key
 * (s at float precision, as the GPU's) and its terms subtracted; where the subtraction would
 * lose precision (as tail_partial: > 7/8 of the rest's weight), or samples outside the best may
 * score above tau, the chunk's kept rows are scored and summed anew on the CPU from its table. */
static size_t tail_partial_gpu(kv_thread *t, const kst_kvc *c, const kv_hstore *H, const float *it,
                               size_t st, const float *q, const uint32_t *rid, size_t nidx, size_t m,
                               float tau, float *o, float *lse) {
    const kst_kvc_opts *op = &c->o;
    const kv_tail *T = &H->tt;
    size_t ns = T->n, d = op->head_dim, rowb = d * c->esize;
    size_t nex = tail_begin(t, T, rid, m, o, lse, d), kept = ns - nex, na = 0, mc[KV_TT_CHUNKS];
    t->ntlw = 0;
    if (kept == 0) return 0;
    if (T->strat) tt_counts(T, rid, m, mc);
    float oc[512], oe[512], ox[512], lse_e = -INFINITY;
    kst_kv_cap cp;
    memset(oe, 0, d * sizeof(float));
    kst_kv_cap_init(&cp, d);
    size_t e = 0;
    for (size_t cc = 0; cc < T->nc; cc++) {
        size_t j0 = cc * T->ch, nr = ns - j0 < T->ch ? ns - j0 : T->ch, e0 = e, na0 = na;
        while (e < nex && t->sret[e] < j0 + nr) e++;
        if (e - e0 == nr) continue; /* the whole chunk retrieved */
        const float *ic = it + cc * st, *tw = ic + 2 + d + KST_KVGPU_TT_TOP;
        float mx = ic[0], thr = expf(tau - mx), r1 = tt_rho1(c, T, mc, cc, nidx, m, kept, nr, e - e0);
        size_t nt = nr < KST_KVGPU_TT_TOP ? nr : KST_KVGPU_TT_TOP;
        uint32_t tp[KST_KVGPU_TT_TOP]; /* (int32 bits, non-negative) */
        memcpy(tp, ic + 2 + d, nt * sizeof(uint32_t));
        const char *Vc = (const char *)T->V + j0 * rowb;
        double sum = ic[1], sub = 0, sx = 0;
        uint64_t topx = 0;
        memcpy(oc, ic + 2, d * sizeof(float));
        memset(ox, 0, d * sizeof(float));
        for (size_t i = e0; i < e; i++) {
            size_t j = t->sret[i] - j0, a = 0;
            for (; a < nt; a++)
                if ((size_t)tp[a] == j) break;
            if (a < nt) {
                topx |= (uint64_t)1 << a;
                continue;
            }
            const void *kr = rows_at(c, H->K, op->sinks + tt_pos(T, t->sret[i]));
            float w = expf(kst_kv_dot(q, kr, op->f16, d) * op->scale - mx);
            sub += w;
            kst_kv_axpy(oc, -w, Vc + j * rowb, op->f16, d);
        }
        double rest = sum - sub;
        for (size_t a = 0; a < nt; a++)
            if (!(topx >> a & 1)) rest += tw[a] > thr ? 0 : tw[a];
        for (size_t a = 0; c->widen > 0 && a < nt; a++) /* the adaptive budget's signal (widen_pick; none without it) */
            if (!(topx >> a & 1) && tw[a] > 0) t->tlw[t->ntlw++] = logf(tw[a]) + mx;
        if ((sub > 0 && !(sub <= sum * 0.875)) || (nt < nr && tw_least(tw, nt) > thr) || !(rest > 0) ||
            !isfinite(rest)) {
            /* the CPU table path: the chunk's kept rows scored and summed anew */
            if (c->prof) t->p_ttable++;
            float *w = t->buf;
            kst_kv_scores_t(w, q, 1, (const char *)T->K + j0 * rowb, op->f16, nr, d, op->scale);
            size_t r = e0;
            float mk = -INFINITY;
            for (size_t j = 0; j < nr; j++) {
                if (r < e && t->sret[r] == j0 + j) {
                    r++;
                    continue;
                }
                if (w[j] > mk) mk = w[j];
            }
            kst_kv_exp_shift(w, nr, mk);
            float thk = expf(tau - mk);
            double s2 = 0;
            memset(oc, 0, d * sizeof(float));
            memset(ox, 0, d * sizeof(float));
            sx = 0;
            r = e0;
            for (size_t j = 0; j < nr; j++) {
                if (r < e && t->sret[r] == j0 + j) { /* retrieved */
                    r++;
                    continue;
                }
                if (!(w[j] > 0)) continue;
                tail_acc(oc, &s2, ox, &sx, &na, w[j], thk, r1, &cp, T, cc, j, Vc, op->f16, d);
            }
            float lr = T->strat ? tt_lratio(c, T, mc, cc, nidx, nr, e - e0, na - na0) : 0;
            if (lr > -INFINITY) kst_attn_merge_sum(o, lse, oc, s2, mk + lr, d);
            kst_attn_merge_sum(oe, &lse_e, ox, sx, mk, d);
        } else {
            double s0 = 0; /* the best rows (with their sum of w V from the GPU's items) */
            if (tail_top(oc, &s0, ox, &sx, &na, c->topsum_off ? NULL : ic + 2 + d + 2 * KST_KVGPU_TT_TOP, tw, tp, nt, topx,
                         thr, r1, &cp, T, cc, Vc, op->f16, d) &&
                c->prof)
                t->p_topsum++;
            float lr = T->strat ? tt_lratio(c, T, mc, cc, nidx, nr, e - e0, na - na0) : 0;
            if (lr > -INFINITY) kst_attn_merge_sum(o, lse, oc, rest, mx + lr, d);
            kst_attn_merge_sum(oe, &lse_e, ox, sx, mx, d);
        }
    }
    if (T->strat) kst_attn_merge(o, lse, oe, lse_e, d);
    else tail_end(o, lse, oe, lse_e, nidx, m, kept, na, c->tail_cap, d);
    kst_kv_cap_merge(&cp, o, lse, tau, d);
    return kept;
}

/* KST_KVC_Q8_STAGED: layer's handle bound to its slot of the pool (made here at first): slot l % 2,
 * but the last of an odd number of layers the third, so that no two adjacent layers (the last
 * and the first adjacent too) share one. *ok 0 with one layer: nothing to stage ahead of. */
static int stage_bind(kst_kvc *c, size_t layer, int *ok, kst_error *err) {
    size_t n = c->o.layers;
    *ok = 0;
    if (n < 2) return KST_OK;
    int rc = c->pool ? KST_OK : kst_kvgpu_pool_create(n % 2 ? 3 : 2, &c->pool, err);
    if (rc != KST_OK) return rc;
    kst_kvgpu_tail_stage(c->layers[layer].gpu, c->pool, n % 2 && layer == n - 1 ? 2 : layer % 2);
    *ok = 1;
    return KST_OK;
}

/* After layer's launch: the next layer's table copied into its slot while this step runs. */
static void stage_next(kst_kvc *c, size_t layer, int *rc, kst_error *err) {
    kst_kvgpu *nx = c->layers[(layer + 1) % c->o.layers].gpu;
    kst_error e;
    int r = nx ? kst_kvgpu_prefetch(nx, &e) : KST_OK;
    if (r != KST_OK) first_err(rc, err, r, &e);
}

/* The GPU's copy of each KV head's sample table, uploaded where it is not the one the CPU's
 * tables hold now (they were just made anew, or the GPU's was of another sample); rows copied
 * into the CPU's tables first where those were made anew (the fallback reads them). */
static int tail_upload(kst_kvc *c, kv_layer *L, size_t nidx, size_t ns, int q8g, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    const kv_tail *T0 = &L->heads[0].tt;
    int any = 0;
    for (size_t h = 0; h < o->kv_heads; h++) any |= L->heads[h].tt.copy;
    if (any) {
        size_t nc = T0->nc, n = o->kv_heads * nc;
#pragma omp parallel for schedule(static) if (n > 1)
        for (size_t i = 0; i < n; i++)
            if (L->heads[i / nc].tt.copy) tail_copy(c, &L->heads[i / nc], i % nc);
        for (size_t h = 0; h < o->kv_heads; h++) L->heads[h].tt.copy = 0;
    }
    if (!any && L->gt_ns == ns && L->gt_nidx == T0->nidx && L->gt_q8 == q8g) return KST_OK;
    int rc = KST_OK;
    L->gt_ns = 0;
    /* (kst_kvc_set_gpu_arm: every layer's queued launch released first; a reallocation's
     * cudaFree would wait for them) */
    KST_TRY(kst_kvc_gpu_release(c, err));
    KST_TRY(kst_kvgpu_tail_reserve(L->gpu, ns, T0->ch, T0->nc, err));
    for (size_t h = 0; h < o->kv_heads; h++)
        KST_TRY(kst_kvgpu_tail_put(L->gpu, h, L->heads[h].tt.K, L->heads[h].tt.V, err));
    L->gt_ns = ns;
    L->gt_nidx = T0->nidx;
    L->gt_q8 = q8g;
done:
    return rc;
}
#endif

static int cmp_f32_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y;
}

typedef struct kv_best {
    float s, x, k; /* a best row's score (log mass less log keys), log mass, keys */
} kv_best;
static int cmp_best_desc(const void *a, const void *b) {
    float x = ((const kv_best *)a)->s, y = ((const kv_best *)b)->s;
    return x > y ? -1 : x < y;
}

/* widen_pick where the tail estimate is the sample cache's (t->tlk_on): its best rows outside R
 * (kst_kvsc_best), each standing for e^lk keys whose softmax mass it estimates as e^x, walked by
 * score (x - lk, what a wider search ranks keys by): a search for k2 keys is predicted to get the
 * mass of the best rows covering k2 - m keys (the last one in part); the least k2 predicted to
 * leave at most c->widen of the mass outside, else kcap. Unlike widen_pick, kcap also where it is
 * not predicted to halve the share: the held rows are a random prefix of each cluster and seldom
 * hold its best keys, so the rows understate what a wider search takes out of the estimate
 * (SmolLM2 at 128K: heads predicted not to halve theirs fell from 1.9e-2 to 2.6e-3; bench README,
 * round 26). widen_top_k bounds the cost. */
static size_t widen_pick_cache(const kst_kvc *c, kv_thread *t, double share, float lse_all, size_t m, size_t kw,
                               size_t kcap) {
    size_t n = t->ntlw, f = c->widen_f;
    kv_best b[KV_TT_CHUNKS * KV_TT_TOP];
    for (size_t i = 0; i < n; i++) {
        b[i].x = t->tlw[i];
        b[i].s = t->tlw[i] - t->tlk[i];
        b[i].k = expf(t->tlk[i]);
    }
    qsort(b, n, sizeof *b, cmp_best_desc);
    size_t k2 = kw;
    for (;;) {
        k2 = k2 * f < kcap ? k2 * f : kcap;
        double r = k2 > m ? (double)(k2 - m) : 0, cum = 0, cov = 0;
        for (size_t i = 0; i < n && cov < r; i++) {
            double part = cov + b[i].k <= r ? 1 : (r - cov) / b[i].k;
            cum += part * exp((double)b[i].x - (double)lse_all);
            cov += part * b[i].k;
        }
        if (share - cum <= c->widen || k2 >= kcap) return k2;
    }
}

/* The adaptive budget (kv.h, kst_kvc_attend): the top_k a query head is searched again with, or
 * 0 to keep its kw retrieved (m found). Its tail estimate (lse_t, from kept samples, each
 * standing for ratio = (nidx - m) / kept indexed keys) holds share = exp(lse_t - lse_all) of its
 * softmax mass; above c->widen the head is widened: to the least of kw f, kw f^2, ... (at most
 * kcap) whose keys are predicted to leave no more than c->widen of the mass outside, the
 * prediction being that a search for k2 keys gets the (k2 - m) / ratio best samples' worth of
 * keys (t->tlw: the log-weights of the chunks' best samples not retrieved, tail_partial*). If
 * even kcap is predicted to leave more, kcap where it would at least halve the share
 * (c->widen_gain), else 0 (attention spread over more keys than a widened search can hold:
 * widening would cost a search and gain little). Without the prediction (widen_pred 0): kw f. */
static size_t widen_pick(const kst_kvc *c, kv_thread *t, float lse_t, float lse_all, size_t nidx, size_t m,
                         size_t kept, size_t kw, size_t kcap) {
    double share = exp((double)lse_t - (double)lse_all);
    if (!(share > c->widen) || kw >= kcap || kept == 0) return 0;
    size_t f = c->widen_f;
    if (!c->widen_pred) return kw * f < kcap ? kw * f : kcap;
    if (t->tlk_on) return widen_pick_cache(c, t, share, lse_all, m, kw, kcap);
    double ratio = (double)(nidx - m) / (double)kept, need = share - c->widen, least = share * (1 - c->widen_gain);
    if (least < need) need = least;
    size_t n = t->ntlw;
    float *x = t->tlw, mx = -INFINITY;
    for (size_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    /* at most (kcap - m) / ratio samples of weight <= the best: no sort where that is too little */
    double rcap = kcap > m ? (double)(kcap - m) / ratio : 0;
    if (!(rcap * ratio * exp((double)mx - (double)lse_all) >= need)) return 0;
    qsort(x, n, sizeof *x, cmp_f32_desc);
    double cum = 0;
    size_t i = 0, k2 = kw;
    for (;;) {
        k2 = k2 * f < kcap ? k2 * f : kcap;
        double r = k2 > m ? (double)(k2 - m) / ratio : 0;
        while (i < n && (double)i + 1 <= r) cum += exp((double)x[i++] - (double)lse_all);
        double resid = share - ratio * cum;
        if (resid <= c->widen) return k2;
        if (k2 >= kcap) return share - resid >= least ? k2 : 0;
    }
}

/* The adaptive budget decided before the first search (c->widen_early): the top_k a query head
 * is first searched with, from its tail estimate over the whole sample (nothing retrieved yet:
 * lse_t, kept samples each standing for nidx / kept indexed keys) against lse_all (with the
 * static tokens'). The sample misses the few top keys of a concentrated head more often than
 * not (their mass, which the search would find, is then absent from lse_all and the share looks
 * large), so this decision is the cautious one: k unless the k best keys are predicted to leave
 * more than 1.5 x c->widen of the mass outside (the k / ratio best samples' worth, as
 * widen_pick predicts) and widen_pick's k2 is predicted to leave at most c->widen (not its
 * "cap where it halves the share" choice). The check after the search (widen_pick) still widens
 * where this falls short. */
static size_t widen_first(const kst_kvc *c, kv_thread *t, float lse_t, float lse_all, size_t nidx, size_t kept,
                          size_t k, size_t kcap) {
    double share = exp((double)lse_t - (double)lse_all);
    if (!(share > 1.5 * c->widen) || k >= kcap || kept == 0 || nidx <= k) return k;
    double ratio = (double)nidx / (double)kept;
    size_t n = t->ntlw;
    qsort(t->tlw, n, sizeof *t->tlw, cmp_f32_desc);
    double cum = 0;
    for (size_t i = 0; i < n && (double)i + 1 <= (double)k / ratio; i++) cum += exp((double)t->tlw[i] - (double)lse_all);
    if (share - ratio * cum <= 1.5 * c->widen) return k;
    size_t k2 = widen_pick(c, t, lse_t, lse_all, nidx, 0, kept, k, kcap);
    if (k2 <= k) return k;
    cum = 0; /* widen_pick sorted t->tlw too */
    for (size_t i = 0; i < n && (double)i + 1 <= (double)k2 / ratio; i++) cum += exp((double)t->tlw[i] - (double)lse_all);
    return share - ratio * cum <= c->widen ? k2 : k;
}

/* Retrieval for query heads h0 .. h0 + gq - 1 (one KV head's, or one head) into ids (gq, k)
 * and fnd (gq): the per-head beam (kst_kvg_search) unless the group search or codes are on. */
static int retrieve(kst_kvc *c, const kv_hstore *H, kv_thread *t, const float *Q, size_t gq,
                    size_t k, size_t ef, size_t tier, uint32_t *ids, float *scores, size_t *fnd, size_t *scanned) {
    const kst_kvc_opts *o = &c->o;
    const void *K = rows_at(c, H->K, o->sinks);
    int rc = KST_OK;
    t->s.hops = 0;
    if (c->group <= 0 && c->il > 0) { /* gq independent searches, interleaved */
        kst_kvg_scratch *ss[KV_IL_MAX] = {&t->s};
        t->s.pf_push = c->pf_push;
        t->s.expand = c->expand;
        t->s.no_vnni = c->no_vnni;
        t->s.spread = spread_of(c, H->g.n);
        t->s.spread_keep = c->spread == KST_KVC_SPREAD_AUTO && !c->spread_keep ? 8 : c->spread_keep;
        t->s.probe = probe_of(c, &H->g);
        t->s.probe_keep = 0; /* (8) */
        t->s.tier = tier;
        for (size_t i = 1; i < gq; i++) ss[i] = &t->sx[i - 1];
        rc = kst_kvg_search_multi(&H->g, K, o->f16, o->head_dim, Q, gq, k, ef, c->rerank,
                                  c->use_codes, ss, ids, scores, fnd);
    } else if (gq == 1 && !c->use_codes) {
        fnd[0] = kst_kvg_search(&H->g, K, o->f16, o->head_dim, Q, k, ef, &t->s, ids, NULL, &rc);
    } else {
        t->s.expand = c->expand;
        rc = kst_kvg_search_group(&H->g, K, o->f16, o->head_dim, Q, gq, k, ef, c->use_codes, &t->s,
                                  ids, NULL, fnd);
    }
    *scanned = rc == KST_OK ? t->s.scanned : 0;
    return rc;
}

int kst_kvc_search(kst_kvc *c, size_t layer, size_t q_head, const float *q, size_t k, size_t ef,
                   int64_t *pos, size_t *found, size_t *scanned, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_search", err);
    if (rc != KST_OK) return rc;
    const kst_kvc_opts *o = &c->o;
    if (q_head >= o->q_heads)
        return kst_fail(err, KST_ERR_INVALID, "kst_kv_search: query head %zu of %zu", q_head, o->q_heads);
    kv_layer *L = &c->layers[layer];
    kv_hstore *H = &L->heads[q_head / (o->q_heads / o->kv_heads)];
    kv_thread *t = &c->th[omp_get_thread_num()];
    if (found) *found = 0;
    if (scanned) *scanned = 0;
    if (!L->built || k == 0) return KST_OK;
    KST_TRY(thread_reserve(t, 1, k, o->head_dim, err));
    size_t m, sc;
    rc = retrieve(c, H, t, q, 1, k, ef ? ef : o->ef, 0, t->ids, NULL, &m, &sc);
    if (rc != KST_OK) return kst_fail(err, rc, "kst_kv_search: out of memory");
    for (size_t i = 0; i < m; i++) pos[i] = (int64_t)(o->sinks + t->ids[i]);
    if (found) *found = m;
    if (scanned) *scanned = sc;
done:
    return rc;
}

int kst_kvc_search_group(kst_kvc *c, size_t layer, size_t kv_head, const float *Q, size_t k,
                         size_t ef, int64_t *pos, size_t *found, size_t *scanned, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_search_group", err);
    if (rc != KST_OK) return rc;
    const kst_kvc_opts *o = &c->o;
    if (kv_head >= o->kv_heads)
        return kst_fail(err, KST_ERR_INVALID, "kst_kv_search_group: KV head %zu of %zu", kv_head, o->kv_heads);
    if (!Q || (!pos && k) || !found) return kst_fail(err, KST_ERR_MISUSE, "kst_kv_search_group: NULL argument");
    size_t G = o->q_heads / o->kv_heads, gq = heads_per_search(c), d = o->head_dim;
    if (G > 64) return kst_fail(err, KST_ERR_INVALID, "kst_kv_search_group: %zu query heads per KV head (at most 64)", G);
    kv_layer *L = &c->layers[layer];
    kv_hstore *H = &L->heads[kv_head];
    kv_thread *t = &c->th[omp_get_thread_num()];
    for (size_t a = 0; a < G; a++) found[a] = 0;
    if (scanned) *scanned = 0;
    if (!L->built || k == 0) return KST_OK;
    KST_TRY(thread_reserve(t, 1, k * G, d, err));
    size_t fnd[64], sc, tot = 0;
    for (size_t a0 = 0; a0 < G; a0 += gq) {
        rc = retrieve(c, H, t, Q + a0 * d, gq, k, ef ? ef : o->ef, 0, t->ids, NULL, fnd, &sc);
        if (rc != KST_OK) return kst_fail(err, rc, "kst_kv_search_group: out of memory");
        tot += sc;
        for (size_t a = 0; a < gq; a++) {
            for (size_t i = 0; i < fnd[a]; i++) pos[(a0 + a) * k + i] = (int64_t)(o->sinks + t->ids[a * k + i]);
            found[a0 + a] = fnd[a];
        }
    }
    if (scanned) *scanned = tot;
done:
    return rc;
}

/* Thread t's scratch for A's gather and finish (kv_tclust.h): 1 once it holds enough, 0 on a
 * failure (recorded in *rc / err). */
static int tg_scratch(kv_thread *t, const kst_kvtc_group *A, int *rc, kst_error *err) {
    size_t need = KST_KVTC_GATHER_SC(A) > KST_KVTC_FINISH_SC(A) ? KST_KVTC_GATHER_SC(A) : KST_KVTC_FINISH_SC(A);
    if (t->tg_s >= need) return 1;
    kst_error e5;
    int r5 = kst_realloc((void **)&t->tgs, need, sizeof(float), "shared tail scores", &e5);
    if (r5 != KST_OK) {
        first_err(rc, err, r5, &e5);
        return 0;
    }
    t->tg_s = need;
    return 1;
}

/* One piece of a planned shared sample (kst_kvc_set_tail_share) gathered by thread t, if one is
 * ready and not yet taken (the KV heads tried from t's own on, so that threads spread over
 * them): returns 1 if it took one. A failure is recorded in *rc / err (the piece then counts as
 * done without its sums: the step fails). */
static int tg_help(kst_kvc *c, kv_layer *L, kv_thread *t, const float *q, int *rc, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    size_t G = o->q_heads / o->kv_heads, d = o->head_dim, t0 = (size_t)(t - c->th);
    for (size_t i = 0; i < o->kv_heads; i++) {
        size_t kh = (t0 + i) % o->kv_heads;
        int8_t st = __atomic_load_n(&c->tg_st[kh], __ATOMIC_ACQUIRE);
        if (st == 0 || __atomic_load_n(&c->tg_next[kh], __ATOMIC_RELAXED) >= KST_KVTC_PIECES) continue;
        uint32_t p = __atomic_fetch_add(&c->tg_next[kh], 1, __ATOMIC_ACQ_REL);
        if (p >= KST_KVTC_PIECES) continue;
        kst_kvtc_group *A = &c->tg[kh];
        if (st == 1 && tg_scratch(t, A, rc, err)) {
            const kv_hstore *H = &L->heads[kh];
            kst_kvtc_group_gather(&H->tc, A, p, q + kh * G * d, H->K, H->V, o->f16, o->scale, o->sinks, t->tgs);
        }
        __atomic_fetch_add(&c->tg_done[kh], 1, __ATOMIC_ACQ_REL);
        return 1;
    }
    return 0;
}

#ifdef KST_CUDA
/* The staging for a piece of an upload, entries [s0, s1) of each KV head's (its part at
 * c->sc_off[h]): of its slots changed since the last upload (its dirty list), or (all) of its
 * slots, those held. */
static int sc_stage(kst_kvc *c, kv_layer *L, int all, size_t s0, size_t s1, int **hdr, void **rows, float **lw,
                    kst_error *err) {
    size_t H = c->o.kv_heads, *off = c->sc_off;
    if (!off && !(off = c->sc_off = kst_malloc(H + 1, sizeof(size_t), "tail sample cache uploads", err))) return KST_ERR_NOMEM;
    int r = sc_map_rows(c, L, err);
    if (r != KST_OK) return r;
    off[0] = 0;
    for (size_t h = 0; h < H; h++) {
        const kst_kvsc *S = &L->heads[h].sc;
        size_t e = all ? S->cap : S->nd, n = 0;
        if (e > s1) e = s1;
        for (size_t i = s0; i < e; i++) n += !all || S->key[i] != KST_KVSC_FREE;
        off[h + 1] = off[h] + n;
    }
    return kst_kvgpu_sc_staging(L->gpu, off[H], hdr, rows, lw, err);
}

#define SC_PF 8 /* entries ahead whose rows sc_stage_head asks for */

/* KV head h's part of a piece staged at c->sc_off[h] (its slots' header and rows, or with rows
 * NULL, the rows registered, its slots' header naming their rows; entries [s0, s1) as sc_stage).
 * Once its dirty list is staged to its end, the list is forgotten and its clusters' weights put
 * into c->sc_lw (and into lw, the staging's, where not NULL). */
static void sc_stage_head(kst_kvc *c, kv_layer *L, size_t h, int all, size_t s0, size_t s1, int *hdr, void *rows,
                          float *lw) {
    const kst_kvc_opts *o = &c->o;
    size_t rowb = o->head_dim * c->esize;
    kv_hstore *Hs = &L->heads[h];
    kst_kvsc *S = &Hs->sc;
    size_t e = c->sc_off[h], n = all ? S->cap : S->nd;
    if (n > s1) n = s1;
    for (size_t i = s0; i < n; i++) {
        uint32_t sl = all ? (uint32_t)i : S->dirty[i], x = S->key[sl];
        if (!rows) { /* (the GPU reads row sinks + x where it is) */
            if (all && x == KST_KVSC_FREE) continue;
            hdr[4 * e] = (int)h;
            hdr[4 * e + 1] = (int)sl;
            hdr[4 * e + 2] = S->cid[sl];
            hdr[4 * e + 3] = x != KST_KVSC_FREE ? (int)(o->sinks + x) : 0;
            e++;
            continue;
        }
        if (!all && i + SC_PF < n) { /* (the rows a few entries on asked for: they come from all over the cache) */
            uint32_t xp = S->key[S->dirty[i + SC_PF]];
            if (xp != KST_KVSC_FREE)
                for (size_t b = 0; b < rowb; b += 64) {
                    __builtin_prefetch((const char *)rows_at(c, Hs->K, o->sinks + xp) + b);
                    __builtin_prefetch((const char *)rows_at(c, Hs->V, o->sinks + xp) + b);
                }
        }
        if (all && x == KST_KVSC_FREE) continue;
        hdr[3 * e] = (int)h;
        hdr[3 * e + 1] = (int)sl;
        hdr[3 * e + 2] = S->cid[sl];
        if (x != KST_KVSC_FREE) { /* (with tail_cache_q8 the GPU quantizes them as it writes them) */
            memcpy((char *)rows + 2 * e * rowb, rows_at(c, Hs->K, o->sinks + x), rowb);
            memcpy((char *)rows + (2 * e + 1) * rowb, rows_at(c, Hs->V, o->sinks + x), rowb);
        }
        e++;
    }
    if (all || s1 < S->nd) return;
    kst_kvsc_take_dirty(S, NULL);
    memcpy(c->sc_lw + h * S->C, S->lw, S->C * sizeof(float));
    if (lw) memcpy(lw + h * S->C, S->lw, S->C * sizeof(float));
}

/* With the rows registered (sc_end's fixed regions): KV head h's changed slots named in its own
 * region of per entries at hdr (4 ints each; the rest marked -1, which the scatter skips) and its
 * weights put into lw and c->sc_lw. Returns its slots named, or SIZE_MAX where more changed than
 * the region holds (its list then kept for sc_upload, its region all -1). */
static size_t sc_stage_fixed(kst_kvc *c, kv_layer *L, size_t h, size_t per, int *hdr, float *lw) {
    kst_kvsc *S = &L->heads[h].sc;
    size_t n = S->nd <= per ? S->nd : 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t sl = S->dirty[i], x = S->key[sl];
        hdr[4 * i] = (int)h;
        hdr[4 * i + 1] = (int)sl;
        hdr[4 * i + 2] = S->cid[sl];
        hdr[4 * i + 3] = x != KST_KVSC_FREE ? (int)(c->o.sinks + x) : 0;
    }
    for (size_t i = n; i < per; i++) hdr[4 * i] = -1;
    memcpy(c->sc_lw + h * S->C, S->lw, S->C * sizeof(float));
    memcpy(lw + h * S->C, S->lw, S->C * sizeof(float));
    if (S->nd > per) return SIZE_MAX;
    kst_kvsc_take_dirty(S, NULL);
    return n;
}

static int sc_send(kst_kvc *c, kv_layer *L, size_t n, const float *lw, kst_error *err) {
    double ts = c->prof ? mono_s() : 0;
    int rc = kst_kvgpu_sc_send(L->gpu, n, lw, err);
    if (c->prof) c->prof->sc_send += mono_s() - ts;
    c->sc_sends++;
    if (rc == KST_OK) L->sc_gpu = 1;
    return rc;
}

/* The sample cache's slots changed since the last upload (or, all: a new table, every slot held)
 * sent with the clusters' weights, in pieces of at most c->sc_piece rows (each KV head's part of a
 * piece staged by its own thread), so that the staging, pinned and on the GPU, stays the size of a
 * step's changes rather than a table's (a table filling adds a whole plan at once). */
static int sc_upload(kst_kvc *c, kv_layer *L, int all, kst_error *err) {
    size_t H = c->o.kv_heads, w = c->sc_piece / H ? c->sc_piece / H : 1, end = 0;
    int rc = KST_OK, *hdr, sent = 0;
    void *rows;
    for (size_t h = 0; h < H; h++) {
        kst_kvsc *S = &L->heads[h].sc;
        size_t n = all ? S->cap : S->nd;
        end = n > end ? n : end;
        if (!all) continue;
        kst_kvsc_take_dirty(S, NULL);
        memcpy(c->sc_lw + h * S->C, S->lw, S->C * sizeof(float));
    }
    if (all) L->sc_gpu = 0;
    for (size_t s0 = 0; s0 < end || !sent; s0 += w) {
        KST_TRY(sc_stage(c, L, all, s0, s0 + w, &hdr, &rows, NULL, err));
        if (!c->sc_off[H] && s0 + w < end) continue; /* (nothing held there; the weights go with a later piece) */
        double tg = c->prof ? mono_s() : 0;
#pragma omp parallel for schedule(static) num_threads(c->nth) if (c->sc_off[H] > 512 && H > 1)
        for (size_t h = 0; h < H; h++) sc_stage_head(c, L, h, all, s0, s0 + w, hdr, rows, NULL);
        if (c->prof) c->prof->sc_gather += mono_s() - tg;
        KST_TRY(sc_send(c, L, c->sc_off[H], c->sc_lw, err));
        sent = 1;
    }
done:
    return rc;
}
#endif

/* The sample cache (kst_kvc_set_tail_cache; kv_scache.h) at a step's start: each KV head's set up
 * for its clusters (anew after a build) and brought in line with the keys its clusters took since
 * the last step; with the GPU (gpu 1), its table reserved there (every slot held sent anew) and
 * the slots changed since the last upload sent with the clusters' weights (the step's launch sees
 * them). *ready: 1 where every KV head holds a plan (the step then estimates from the cache). */
static int sc_begin(kst_kvc *c, kv_layer *L, int gpu, int *ready, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    size_t G = o->q_heads / o->kv_heads, want = c->tcache_cap ? c->tcache_cap : 2 * o->tail_samples;
    if (want < o->tail_samples) want = o->tail_samples;
    if (want > KST_KVSC_NC * KST_KVSC_CH) want = KST_KVSC_NC * KST_KVSC_CH; /* (kv.h: at most 16,384; a larger budget planned within) */
    int rc = KST_OK, all = 1, moved = 0;
    for (size_t h = 0; h < o->kv_heads; h++) {
        kv_hstore *H = &L->heads[h];
        kst_kvsc *S = &H->sc;
        if (S->C != H->tc.C || S->G != G || S->cap < want || S->cap >= want + S->nc || S->q8 != c->tcache_q8) {
            KST_TRY(kst_kvsc_setup(S, &H->tc, G, want, err));
            if (c->tcache_q8 && o->head_dim > KST_KVSC_DMAX)
                return kst_fail(err, KST_ERR_INVALID, "tail_cache_q8: head_dim %zu, at most %d", o->head_dim, KST_KVSC_DMAX);
            S->q8 = c->tcache_q8;
#ifdef KST_CUDA
            L->sc_gpu = 0;
#endif
        } else {
            moved |= S->na != H->tc.na;
            KST_TRY(kst_kvsc_joined(S, &H->tc, err));
        }
        moved |= S->nd > 0;
        all &= S->ready;
    }
    *ready = all;
#ifdef KST_CUDA
    if (!gpu) {
        L->sc_gpu = 0; /* (sent whole when the GPU is back) */
        return KST_OK;
    }
    if (L->sc_gpu && !moved) return KST_OK; /* (the GPU's table and weights are this step's) */
    {
        const kst_kvsc *S0 = &L->heads[0].sc;
        size_t C = S0->C, d = o->head_dim;
        if (c->sc_lcap < o->kv_heads * C * d) {
            KST_TRY(kst_realloc((void **)&c->sc_lw, o->kv_heads * C * d, sizeof(float), "tail sample cache weights", err));
            c->sc_lcap = o->kv_heads * C * d;
        }
        if (!L->sc_gpu) { /* the centroids (kv_heads, d, C), as kst_kvtc keeps them transposed */
            for (size_t h = 0; h < o->kv_heads; h++)
                memcpy(c->sc_lw + h * d * C, L->heads[h].tc.cent_t, d * C * sizeof(float));
            KST_TRY(kst_kvgpu_sc_reserve(L->gpu, S0->cap, S0->ch, S0->nc, C, c->sc_lw, S0->q8, err));
            L->gt_ns = 0; /* (the GPU's tail table is the cache's now: the evenly spaced sample's put anew) */
        }
        KST_TRY(sc_upload(c, L, !L->sc_gpu, err));
    }
#else
    (void)gpu;
    (void)moved;
#endif
done:
    return rc;
}

/* One KV head's plan for the next step made by thread t of a step (its plan from the two steps
 * before this one, kst_kvsc_push'ed: nothing it writes is read by the heads still finishing), if
 * one is left: returns 1 if it made one. */
static int sc_help(kst_kvc *c, kv_layer *L, int *rc, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    if (__atomic_load_n(&c->sc_next, __ATOMIC_RELAXED) >= o->kv_heads) return 0;
    size_t kh = __atomic_fetch_add(&c->sc_next, 1, __ATOMIC_ACQ_REL);
    if (kh >= o->kv_heads) return 0;
    kv_hstore *H = &L->heads[kh];
    if (H->sc.made) return 1; /* (made ahead, sc_plan_ahead) */
    kst_error e;
    int r = kst_kvsc_plan_make(&H->sc, &H->tc, c->tc_temp, o->tail_samples, &e);
    if (r != KST_OK) first_err(rc, err, r, &e);
    return 1;
}

#ifdef KST_CUDA
static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* KV head h's plan for the step after next made ahead (sc_plan_ahead, sc_end with ahead); next:
 * made as the next plan (kst_kvsc_plan_make_next) while another thread holds the one before. */
static void sc_plan_one(kst_kvc *c, kv_layer *L, size_t h, int next, int *rc, kst_error *err) {
    kv_hstore *H = &L->heads[h];
    kst_error e;
    H->sc_pna = SIZE_MAX;
    if (!H->sc.ready) return;
    double tp = c->prof ? mono_s() : 0;
    int r = next ? kst_kvsc_plan_make_next(&H->sc, &H->tc, c->tc_temp, c->o.tail_samples, &e)
                 : kst_kvsc_plan_make(&H->sc, &H->tc, c->tc_temp, c->o.tail_samples, &e);
    if (c->prof) {
        double dt = mono_s() - tp;
#pragma omp atomic
        c->prof->sc_ahead_cpu += dt;
    }
    if (r != KST_OK) first_err(rc, err, r, &e);
    H->sc_pna = H->tc.na;
    H->sc_pbud = c->o.tail_samples;
}
#endif

/* The sample cache after a step: the plans the step's threads have not made made, then each KV
 * head's held, adding at most c->tcache_up rows (kst_kvsc_plan_apply), and this step's centroid
 * scores pushed for the next plans (cs: (q_heads, C), the GPU's, or NULL: scored here from q).
 * A cache not ready yet (the first step) plans from this step's scores at once. The rows added
 * are sent to the GPU (gpu 1) at once, so that the copies overlap the time to the next step;
 * with ahead (kst_kv_work), the plans for the step after next are made too (sc_plan_ahead). One
 * parallel region: a thread a KV head holds it; once every hold is done (the staging's offsets),
 * its rows are staged and its next plan made (by two threads where the team has them, see
 * below), and the copies queued. Where the GPU reads the rows where they are (registered,
 * kst_kvgpu_sc_store), each KV head has its own region of the staging instead, named by its
 * thread as soon as it is held (sc_stage_fixed), the last to finish queueing the copy: no wait
 * for every hold, no gather; and where the team has two threads a KV head and every plan to hold
 * is made, a second thread pushes its scores and makes its next plan while the first holds
 * (kst_kvsc_plan_make_next). Each KV head touches ~5 cache lines a row it adds or drops. */
static int sc_end(kst_kvc *c, kv_layer *L, const float *q, const float *cs, int gpu, int ahead, kst_error *err) {
    const kst_kvc_opts *o = &c->o;
    size_t G = o->q_heads / o->kv_heads, C = L->heads[0].sc.C, H = o->kv_heads;
    int rc = KST_OK, *hdr = NULL;
    void *rows = NULL;
    float *plw = NULL; /* (the staging's weights, written by each KV head's staging: no serial copy) */
    kst_kvc_prof *pf = c->prof;
    double t0 = pf ? mono_s() : 0, t2 = t0, t3 = t0, t5 = t0; /* (t3, t5: the rows staged, the copies queued) */
    size_t nd = 0, nrows = 0, staged = 0, per = 0, over = 0;
    int up = 0, big = 0, fast = 0; /* (big: more rows than two pieces, as where a table fills: sent in pieces after;
                                      fast: the fixed regions) */
#ifndef KST_CUDA
    (void)gpu, (void)hdr, (void)rows, (void)plw, (void)nrows, (void)staged, (void)t3, (void)t5, (void)big, (void)per,
        (void)over;
    ahead = 0;
#else
    if (gpu && (rc = sc_map_rows(c, L, err)) != KST_OK) return rc;
    if (gpu && kst_kvgpu_sc_stored(L->gpu)) { /* (the rows registered: the regions reserved first; else staged after) */
        per = 2 * c->tcache_up + 128; /* (a hold adds and drops at most tcache_up rows each, joins may add a few) */
        if (c->sc_piece != SC_PIECE && per > 2 * c->sc_piece / H) per = 2 * c->sc_piece / H ? 2 * c->sc_piece / H : 1; /* (tests) */
        if (!c->sc_off && !(c->sc_off = kst_malloc(H + 1, sizeof(size_t), "tail sample cache uploads", err)))
            return KST_ERR_NOMEM;
        if ((rc = kst_kvgpu_sc_staging(L->gpu, H * per, &hdr, &rows, &plw, err)) != KST_OK) return rc;
        fast = !rows;
    }
#endif
    int par0 = fast && ahead && cs && c->nth >= 2 * (int)H; /* (the next plans made beside the holds) */
    for (size_t h = 0; h < H; h++) {
        nd += !L->heads[h].sc.made;
        par0 &= L->heads[h].sc.made && L->heads[h].sc.ready;
    }
    if (pf) pf->sc_made_in += H - nd;
#pragma omp parallel num_threads(c->nth) if (H > 1) /* (the steps' team: another size costs its threads' wake-up) */
    {
        int par = par0 && omp_get_num_threads() >= 2 * (int)H; /* (the same in every thread) */
        size_t ntask = par ? 2 * H : H;
#pragma omp for schedule(static, 1) nowait
        for (size_t i = 0; i < ntask; i++) {
#ifdef KST_CUDA
            if (i >= H) { /* (par: KV head i - H's scores pushed and its next plan made, beside its hold) */
                kst_kvsc_push(&L->heads[i - H].sc, cs + (i - H) * G * C);
                sc_plan_one(c, L, i - H, 1, &rc, err);
                continue;
            }
#endif
            size_t h = i;
            kv_hstore *Hh = &L->heads[h];
            kst_kvsc *S = &Hh->sc;
            kst_error e;
            int r = KST_OK, boot = !S->ready;
            if (boot) { /* (bootstrap: this step's scores first) */
                const float *ch = cs ? cs + h * G * C : NULL;
                if (!ch) {
                    kst_kvtc_scores(&Hh->tc, q + h * G * o->head_dim, G, o->scale, c->sc_cs + h * G * C);
                    ch = c->sc_cs + h * G * C;
                }
                kst_kvsc_push(S, ch);
                S->made = 0;
            }
            if (!S->made) r = kst_kvsc_plan_make(S, &Hh->tc, c->tc_temp, o->tail_samples, &e);
            double ta = pf ? mono_s() : 0;
            if (r == KST_OK) kst_kvsc_plan_apply(S, &Hh->tc, c->tcache_up);
            if (pf) {
                double dt = mono_s() - ta;
#pragma omp atomic
                pf->sc_apply += dt;
            }
            if (r == KST_OK && !boot && cs) {
                if (!par) kst_kvsc_push(S, cs + h * G * C);
            } else if (r == KST_OK && !boot) {
                kst_kvtc_scores(&Hh->tc, q + h * G * o->head_dim, G, o->scale, c->sc_cs + h * G * C);
                kst_kvsc_push(S, c->sc_cs + h * G * C);
            }
            if (r != KST_OK) first_err(&rc, err, r, &e);
#ifdef KST_CUDA
            if (fast) {
                size_t k = r == KST_OK ? sc_stage_fixed(c, L, h, per, hdr + 4 * h * per, plw) : 0;
                if (k == SIZE_MAX) __atomic_add_fetch(&over, 1, __ATOMIC_RELAXED);
                else __atomic_add_fetch(&nrows, k, __ATOMIC_RELAXED);
                if (__atomic_add_fetch(&staged, 1, __ATOMIC_ACQ_REL) == H) { /* (the last KV head held queues the copy) */
                    size_t n = __atomic_load_n(&nrows, __ATOMIC_RELAXED);
                    if (pf) t2 = t3 = mono_s(), pf->sc_rows += n;
                    if (n) {
                        kst_error e2;
                        int r2 = sc_send(c, L, H * per, plw, &e2);
                        if (r2 != KST_OK) first_err(&rc, err, r2, &e2);
                        else up = 1;
                    }
                    if (pf) t5 = mono_s();
                }
            }
#endif
        }
#ifdef KST_CUDA
        if (fast && !par) {
#pragma omp for schedule(static, 1) nowait
            for (size_t h = 0; h < H; h++) /* (the same thread as held it: its plan made after its hold) */
                if (ahead) sc_plan_one(c, L, h, 0, &rc, err);
        }
#endif
#pragma omp barrier
        if (!fast) {
#pragma omp single
        {
            if (pf) t2 = mono_s();
#ifdef KST_CUDA
            for (size_t h = 0; h < H; h++) nrows += L->heads[h].sc.nd; /* (the weights change only with the slots) */
            if (pf) pf->sc_rows += nrows;
            big = nrows > 2 * c->sc_piece; /* (a step's changes, joins with them, in the region: staged beside the
                                              plans and queued as soon as staged, so the next step's copy is in early) */
            if (rc == KST_OK && gpu && nrows && !big) {
                int r = sc_stage(c, L, 0, 0, SIZE_MAX, &hdr, &rows, &plw, err);
                if (r != KST_OK) rc = r;
                else up = 1;
            }
#endif
            if (rc != KST_OK) ahead = 0;
        }
#ifdef KST_CUDA
        /* the plans need none of the staging (they read the pushed scores and the clusters): with
         * two threads a KV head, thread h makes KV head h's plan while thread H + h stages its
         * rows, the last to stage queueing the copies; else thread h does both, and the first
         * thread without a KV head (or the last to stage, its plan then after) queues them */
        int tid = omp_get_thread_num(), nth = omp_get_num_threads(), two = up && nth >= 2 * (int)H;
        int sender = up && !two && nth > (int)H && tid == (int)H;
        size_t skip = SIZE_MAX;
        if (two) {
            if (tid >= (int)H && tid < 2 * (int)H) {
                sc_stage_head(c, L, (size_t)tid - H, 0, 0, SIZE_MAX, hdr, rows, plw);
                sender = __atomic_add_fetch(&staged, 1, __ATOMIC_ACQ_REL) == H;
            } else if (tid < (int)H && ahead)
                sc_plan_one(c, L, (size_t)tid, 0, &rc, err);
        } else {
#pragma omp for schedule(static) nowait
            for (size_t h = 0; h < H; h++) {
                if (up) {
                    sc_stage_head(c, L, h, 0, 0, SIZE_MAX, hdr, rows, plw);
                    if (__atomic_add_fetch(&staged, 1, __ATOMIC_ACQ_REL) == H && nth <= (int)H) sender = 1, skip = h;
                }
                if (ahead && h != skip) sc_plan_one(c, L, h, 0, &rc, err);
            }
        }
        if (sender) {
            while (__atomic_load_n(&staged, __ATOMIC_ACQUIRE) < H) spin_pause();
            if (pf) t3 = mono_s();
            kst_error e;
            int r = sc_send(c, L, c->sc_off[H], plw, &e);
            if (r != KST_OK) first_err(&rc, err, r, &e);
            if (pf) t5 = mono_s();
            if (ahead && skip != SIZE_MAX) sc_plan_one(c, L, skip, 0, &rc, err);
        }
#endif
        }
    }
#ifdef KST_CUDA
    if (par0) /* (the next plans made beside the holds become the plans) */
        for (size_t h = 0; h < H; h++) kst_kvsc_plan_take_next(&L->heads[h].sc);
    if (rc == KST_OK && gpu && (big || over)) rc = sc_upload(c, L, 0, err); /* (over: KV heads past their regions) */
#endif
    if (rc != KST_OK) return rc;
#ifdef KST_CUDA
    if (ahead) L->sc_ahead = 0;
#endif
    if (pf) {
        double t4 = mono_s();
        pf->sc_steps++;
        pf->sc_make += t2 - t0;
        if (up) pf->sc_up += (t5 > t2 ? t5 : t4) - t2;
        if (up) pf->sc_gather += (t3 > t2 ? t3 : t4) - t2;
        if (ahead) pf->sc_ahead += t4 - t2;
    }
    return rc;
}

/* The sample cache's update after a step left to the engine's idle time (opts.append_idle: the
 * step returns once its output is made; sc_end runs in kst_kv_work, or else first thing in the
 * layer's next append or step, before anything that moves the clusters, the index or the GPU's
 * stream). The GPU's centroid scores stay in their pinned buffer until the next step's. */
static int sc_flush(kst_kvc *c, kv_layer *L, int ahead, kst_error *err) {
#ifdef KST_CUDA
    if (!L->sc_pend) return KST_OK;
    L->sc_pend = 0;
    int rc = kst_kvgpu_sc_fetched(L->gpu, err);
    if (rc == KST_OK) rc = sc_end(c, L, NULL, kst_kvgpu_sc_scores(L->gpu), 1, ahead, err);
    if (rc == KST_OK && !ahead) L->sc_ahead = 1; /* (made later in kst_kv_work if it may) */
    return rc;
#else
    (void)c;
    (void)L;
    (void)ahead;
    (void)err;
    return KST_OK;
#endif
}

/* kst_kv_work, once the update ran (L->sc_ahead): the next step's plans made ahead from the
 * scores just pushed (the step keeps each where its clusters took no key and the budget held
 * since, else makes it anew, as it makes them without idle time). */
#ifdef KST_CUDA
static int sc_plan_ahead(kst_kvc *c, kv_layer *L, kst_error *err) {
    int rc = KST_OK;
    double t0 = c->prof ? mono_s() : 0;
    L->sc_ahead = 0;
#pragma omp parallel for schedule(static) num_threads(c->nth) if (c->o.kv_heads > 1)
    for (size_t h = 0; h < c->o.kv_heads; h++) sc_plan_one(c, L, h, 0, &rc, err);
    if (c->prof) c->prof->sc_ahead += mono_s() - t0;
    return rc;
}
#endif

int kst_kvc_attend(kst_kvc *c, size_t layer, const float *q, size_t top_k, size_t ef, float *out,
                   kst_kvc_stats *stats, kst_error *err) {
    int rc = check_layer(c, layer, "kst_kv_attend", err);
    if (rc != KST_OK) return rc;
    if ((rc = sc_flush(c, &c->layers[layer], 0, err)) != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
    if (!q || !out) return kst_fail(err, KST_ERR_MISUSE, "kst_kv_attend: q or out is NULL");
    const kst_kvc_opts *o = &c->o;
    kv_layer *L = &c->layers[layer];
    size_t d = o->head_dim, G = o->q_heads / o->kv_heads;
    if (!ef) ef = o->ef;
    /* top_k 0 (the cache's default): every key the search re-scores exactly, ef of them, is
     * attended rather than left to the tail estimate (no more keys scanned; bench README, round 26) */
    size_t k = top_k ? top_k : o->top_k ? o->top_k : ef;
    size_t nidx = L->built ? L->heads[0].g.n : 0;
    size_t sink_end = L->n < o->sinks ? L->n : o->sinks;
    size_t exact_lo = o->sinks + nidx < L->n ? o->sinks + nidx : L->n;
    if (exact_lo < sink_end) exact_lo = sink_end;
    if (k > nidx) k = nidx;
    if (d > 512) return kst_fail(err, KST_ERR_INTERNAL, "kst_kv_attend: head_dim > 512");
    /* the adaptive budget's top_k at most (kv.h): widened searches retrieve up to kcap keys */
    size_t kcap = c->widen && k > 0 ? (c->widen_k ? c->widen_k : 16 * k) : k;
    if (kcap > nidx) kcap = nidx;
    if (kcap < k) kcap = k;
    /* one task per query head, or per KV head (its G query heads) with the group search */
    size_t gq = heads_per_search(c), ntask = o->q_heads / gq;
    size_t scanned = 0, retrieved = 0, sampled = 0, widened = 0;
    /* the clustered tail estimate (kv_tclust.h) in place of the sample table: its clusters take
     * the keys indexed since the last step first */
    int tcl = c->tclust && nidx > 0 && L->heads[0].tc.C && o->tail_samples > 0;
    size_t tcC = 0; /* the most clusters a KV head has (all have as many: the same keys count) */
    for (size_t h = 0; tcl && h < o->kv_heads; h++) {
        kv_hstore *H = &L->heads[h];
        rc = kst_kvtc_add(&H->tc, rows_at(c, H->K, o->sinks), o->f16, H->g.n, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        tcC = H->tc.C > tcC ? H->tc.C : tcC;
    }
    if (tcl) { /* this step's centroid scores (tail_clusters) */
        size_t need = o->q_heads * tcC;
        if (c->tc_cs_cap < need) {
            rc = kst_realloc((void **)&c->tc_cs, need, sizeof(float), "tail cluster scores", err);
            if (rc != KST_OK) return rc;
            c->tc_cs_cap = need;
        }
        if (!c->tc_st && !(c->tc_st = kst_calloc(o->kv_heads, 1, "tail cluster scores", err))) return KST_ERR_NOMEM;
        memset(c->tc_st, 0, o->kv_heads);
    }
    /* the tail's control variate products (cv_mq), made at the step's start a KV head at a time
     * (below); without the room, each query head makes its own (cv_pre) */
    int cvy_on = 0;
    if (c->tail_cv && o->tail_samples > 0 && nidx > 0) {
        if (!c->cv_y) c->cv_y = kst_malloc(o->q_heads * 2, d * sizeof(float), "tail control variate products", NULL);
        if (!c->cv_st) c->cv_st = kst_malloc(o->kv_heads, 1, "tail control variate products", NULL);
        if (c->cv_st) memset(c->cv_st, 0, o->kv_heads);
        cvy_on = c->cv_st && c->cv_y;
    }
    /* the shared sample (kst_kvc_set_tail_share): each KV head's planned by one thread, then
     * gathered in KST_KVTC_PIECES pieces taken by any thread before its next search */
    int tsh = tcl && c->tshare && G > 1;
    if (tsh) {
        if (!c->tg) {
            c->tg = kst_calloc(o->kv_heads, sizeof *c->tg, "shared tail samples", err);
            c->tg_done = kst_calloc(o->kv_heads, sizeof *c->tg_done, "shared tail samples", err);
            c->tg_st = kst_calloc(o->kv_heads, 1, "shared tail samples", err);
            c->tg_next = kst_calloc(o->kv_heads, sizeof *c->tg_next, "shared tail samples", err);
            if (!c->tg || !c->tg_done || !c->tg_st || !c->tg_next) return KST_ERR_NOMEM; /* (freed with the cache) */
            c->tg_n = o->kv_heads;
        }
        memset(c->tg_done, 0, o->kv_heads * sizeof *c->tg_done);
        memset(c->tg_st, 0, o->kv_heads);
        memset(c->tg_next, 0, o->kv_heads * sizeof *c->tg_next);
    }
    /* the adaptive budget decided before the first search too (widen_first; one head per task):
     * the heads' retrieved ids then take up to kcap each */
    int early = c->widen && c->widen_early && gq == 1 && k > 0 && kcap > k && o->tail_samples > 0 && nidx > k && !tcl;
    size_t ks = early ? kcap : k;
    /* keys attended beyond the first search's top_k (c->att_ef, c->tier; the interleaved code
     * search only, and not where it was widened before it ran) */
    size_t xk = c->group <= 0 && c->il > 0 && c->use_codes && k > 0 ? (c->att_ef && ef > k ? ef - k : 0) + c->tier : 0;
    if (xk > nidx - k) xk = nidx - k;
    if (ks < k + xk) ks = k + xk;
    int on_gpu = 0;
    kst_kvc_prof *pf = c->prof;
    double pt0 = pf ? mono_s() : 0, pt1 = pt0;
    if (pf)
        for (int i = 0; i < c->nth; i++) {
            kv_thread *t = &c->th[i];
            t->p_first = t->p_last = t->p_busy = t->p_search = t->p_attn = t->p_tail = 0;
            t->p_want = t->p_twait = t->p_tcpu = t->p_titems = 0;
            t->p_out[0] = t->p_out[1] = t->p_out[2] = 0;
            t->p_topsum = t->p_ttable = 0;
            t->p_hops = t->p_tasks = 0;
            t->s.prof = 1;
            t->s.t_rerank = 0;
            t->s.t_entry = 0;
        }
#ifdef KST_CUDA
    /* GPU: the static tokens (sinks + the window ring) are attended there while the CPU
     * searches: thread 0 starts it on entering the parallel part below (its launch overlaps
     * the other threads' searches), and a task that finds the GPU's partials in (one thread
     * at a time asks, without waiting) merges them into its heads at once; the heads of tasks
     * that ended before the GPU (gpu_merged 1: the CPU's partial in out and lse_buf) are merged
     * by the threads that run out of tasks while others still search, and what is left after
     * the parallel part. gpu_state: 0 not started yet, 1 started, -1 failed to start;
     * gpu_ready: 1 once the partials are in (gpu_o, gpu_lse), -1 on a failure; gpu_asking: a
     * thread is asking. */
    /* the GPU's ring holds the window and the pending tokens: every exact token past the sinks */
    on_gpu = L->gpu && !c->gpu_off && L->built && L->n >= o->sinks && exact_lo >= o->sinks && L->n - exact_lo <= c->ring;
    const float *gpu_o = NULL, *gpu_lse = NULL;
#endif
    int gpu_state = 0, gpu_ready = 0, gpu_asking = 0;
    size_t gpu_armed0 = 0;
    double gpu_seen = 0, gpu_launched = 0; /* profile: the partials first seen in; launch returned */
    if (on_gpu) memset(c->gpu_merged, 0, o->q_heads);
#ifdef KST_CUDA
    if (on_gpu) gpu_armed0 = kst_kvgpu_armed_steps(L->gpu);
#endif
    if (c->ids_all_cap < o->q_heads * (ks ? ks : 1)) {
        rc = kst_realloc((void **)&c->ids_all, o->q_heads * (ks ? ks : 1), sizeof(uint32_t), "retrieved ids", err);
        if (rc != KST_OK) return rc;
        rc = kst_realloc((void **)&c->sc_all, o->q_heads * (ks ? ks : 1), sizeof(float), "retrieved scores", err);
        if (rc != KST_OK) return rc;
        c->ids_all_cap = o->q_heads * (ks ? ks : 1);
    }
    memset(c->os_ok, 0, o->q_heads);
    memset(c->pub_ok, 0, ntask);
    /* the sample cache (kst_kvc_set_tail_cache): the step estimates from it once every KV head
     * holds a plan (the first step only plans: its estimate is made as without the cache); its
     * items come from the GPU where the static tokens are attended (sc_g), else are made here */
    int tqc = tcl && c->tcache, scu = 0, sc_g = 0, sc_fetch = 0; /* (sc_fetch: the scores' download queued) */
    size_t scnc = 0, scst = 0;
    const float *sc_tt = NULL;
#ifdef KST_CUDA
    /* (the cache turned off, or the clustered tail: the GPU's table freed; also where the GPU holds
     * one that sc_gpu no longer marks, after a build or steps with the tail off the GPU: its
     * cluster ids would weight the evenly spaced sample's rows) */
    if (!tqc && L->gpu && (L->sc_gpu || kst_kvgpu_sc_scores(L->gpu))) {
        rc = kst_kvc_gpu_release(c, err);
        if (rc == KST_OK) rc = kst_kvgpu_sc_reserve(L->gpu, 0, 0, 0, 0, NULL, 0, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        L->sc_gpu = 0;
    }
    sc_g = tqc && on_gpu && !c->tail_gpu_off && !c->topsum_off; /* (its items need the best rows' sums) */
#endif
    if (tqc) {
        double tb = pf ? mono_s() : 0;
        size_t nup = c->sc_sends;
        rc = sc_begin(c, L, sc_g, &scu, err);
        if (pf) {
            double dt = mono_s() - tb;
            pf->sc_begin += dt;
            if (dt > pf->sc_begin_max) pf->sc_begin_max = dt;
            pf->sc_begin_up += c->sc_sends != nup;
        }
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        scnc = L->heads[0].sc.nc;
        scst = KST_KVSC_STRIDE(d);
#ifdef KST_CUDA
        if (sc_g) {
            scst = kst_kvgpu_tail_stride(L->gpu);
            sc_tt = kst_kvgpu_tail_out(L->gpu); /* filled once the partials are in */
        }
#endif
        if (scu) tsh = 0;
        c->sc_next = 0;
        if (c->sc_cs_cap < o->q_heads * tcC) {
            rc = kst_realloc((void **)&c->sc_cs, o->q_heads * tcC, sizeof(float), "tail sample cache scores", err);
            if (rc != KST_OK) return rc;
            c->sc_cs_cap = o->q_heads * tcC;
        }
#ifdef KST_CUDA
        L->sc_ahead = 0;
#endif
        for (size_t h = 0; h < o->kv_heads; h++) { /* (a plan made ahead kept where still this step's) */
            kv_hstore *H = &L->heads[h];
            if (!(H->sc.made && H->sc_pna == H->tc.na && H->sc_pbud == o->tail_samples)) H->sc.made = 0;
            H->sc_pna = SIZE_MAX;
        }
        if (scu && !sc_g) {
            if (c->sc_it_cap < o->q_heads * scnc * scst) {
                rc = kst_realloc((void **)&c->sc_it, o->q_heads * scnc * scst, sizeof(float), "tail sample cache items", err);
                if (rc != KST_OK) return rc;
                c->sc_it_cap = o->q_heads * scnc * scst;
            }
            if (c->sc_ok_cap < o->kv_heads * scnc) {
                rc = kst_realloc((void **)&c->sc_ok, o->kv_heads * scnc, 1, "tail sample cache items", err);
                if (rc != KST_OK) return rc;
                c->sc_ok_cap = o->kv_heads * scnc;
            }
            memset(c->sc_ok, 0, o->kv_heads * scnc);
            sc_tt = c->sc_it;
        }
    }
    /* the tail estimate: one item per KV head (its sample scored for the group), done first */
    size_t ns = tcl ? 0 : o->tail_samples < nidx ? o->tail_samples : nidx, nT = 0, tnc = 0;
    /* tail_q8 with the GPU: its table in 8 bits read by the GPU where it fits (q8g: in pinned host
     * memory, or held), else on the CPU in 8 bits; the GPU then holds only the static tokens */
    int q8g = 0;
#ifdef KST_CUDA
    if (ns && on_gpu && !c->tail_gpu_off) {
        int want = c->tail_q8 ? c->tail_q8_gpu : 0;
        int staged_ok = 1;
        if (want == 3) {
            rc = stage_bind(c, layer, &staged_ok, err);
            if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
            if (!staged_ok) want = 2; /* (one layer: read in place) */
        }
        q8g = want && kst_kvgpu_tail_q8(L->gpu, want, tail_rows(c, ns)) ? want : 0;
        if (!q8g) (void)kst_kvgpu_tail_q8(L->gpu, 0, 0);
    }
#endif
    if (ns) {
        rc = tail_prepare(c, L, nidx, ns, c->tail_q8 && !q8g && ns <= (size_t)KV_TT_CHUNKS * 65535, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        tnc = L->heads[0].tt.nc;
        nT = o->kv_heads * tnc;
    }
    /* the tail sample scored on the GPU beside the static tokens (launched with them) */
    int tail_gpu = 0;
#ifdef KST_CUDA
    const float *gpu_tt = NULL;
    size_t gpu_st = 0;
    if (on_gpu && ns && !c->tail_gpu_off && !L->heads[0].tt.q8 && L->heads[0].tt.ch <= 1024) {
        rc = tail_upload(c, L, nidx, ns, q8g, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        tail_gpu = 1;
        nT = 0;
        gpu_st = kst_kvgpu_tail_stride(L->gpu);
        gpu_tt = kst_kvgpu_tail_out(L->gpu); /* filled once the partials are in */
    } else if (on_gpu && L->gt_ns) { /* the GPU's tail off for this step */
        rc = kst_kvc_gpu_release(c, err);
        if (rc == KST_OK) rc = kst_kvgpu_tail_reserve(L->gpu, 0, 0, 0, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
        L->gt_ns = 0;
    }
#endif
    memset(c->tt_ok, 0, nT);
    size_t next_a = 0, next_b = 0, npub = 0;
    double gpu_dt = 0;
    int gpu_early = 0;
#ifdef KST_CUDA
    /* kst_kvc_set_gpu_early: the GPU's partial launched before the parallel part, as soon as
     * the tail sample's table is on the GPU (off by default: the launch's ~8-10 us of host
     * time then delay the fork, while inside the part thread 0 pays them beside the others'
     * searches, and with the split kernel the partial is in before it is needed anyway;
     * bench README, round 16) */
    if (on_gpu && !c->gpu_late) {
        kst_error e3;
        int r = kst_kvgpu_partial_start(L->gpu, q, sink_end, exact_lo - o->sinks, L->n - exact_lo, &e3);
        if (r != KST_OK) first_err(&rc, err, r, &e3);
        gpu_state = r == KST_OK ? 1 : -1;
        if (pf) gpu_launched = mono_s();
        gpu_early = 1;
        if (r == KST_OK && q8g == 3) stage_next(c, layer, &rc, err);
    }
#endif
    if (pf) pt1 = mono_s();
    /* Longest task first: the threads take the tasks in the order of the keys each scored in the
     * previous step (a head's search costs about the same from step to step), so that no thread
     * is left with two long searches while others idle (ties keep the head order). */
    for (size_t i = 0; i < ntask; i++) {
        size_t j = i;
        for (; j > 0 && L->cost[L->order[j - 1]] < L->cost[i]; j--) L->order[j] = L->order[j - 1];
        L->order[j] = (uint32_t)i;
    }
#pragma omp parallel reduction(+ : scanned, retrieved, sampled, widened) if (ntask > 1) num_threads(c->nth)
    {
#ifdef KST_CUDA
/* a KV head's tail items in host memory before the step's partials (kst_kvgpu_items_ready; the
 * launch seen first, so that the step's number is this step's) */
#define ITEMS_IN(kh) (__atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1 && kst_kvgpu_items_ready(L->gpu, (kh)))
    /* One thread at a time asks the GPU whether its partials are in, without waiting. */
#define GPU_ASK()                                                                                 \
    do {                                                                                          \
        if (!__atomic_exchange_n(&gpu_asking, 1, __ATOMIC_ACQ_REL)) {                             \
            int done_ = 0;                                                                        \
            kst_error e3_;                                                                        \
            if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0) {                             \
                int r_ = kst_kvgpu_partial_poll(L->gpu, &gpu_o, &gpu_lse, &done_, &e3_);          \
                if (r_ != KST_OK) {                                                               \
                    first_err(&rc, err, r_, &e3_);                                                \
                }                                                                                 \
                if (pf && done_) gpu_seen = mono_s();                                             \
                if (r_ != KST_OK || done_) __atomic_store_n(&gpu_ready, r_ == KST_OK ? 1 : -1, __ATOMIC_RELEASE); \
            }                                                                                     \
            __atomic_store_n(&gpu_asking, 0, __ATOMIC_RELEASE);                                   \
        }                                                                                         \
    } while (0)
    if (on_gpu && !gpu_early && omp_get_thread_num() == 0) {
        double g0 = pf ? mono_s() : 0;
        kst_error e3;
        int r = kst_kvgpu_partial_start(L->gpu, q, sink_end, exact_lo - o->sinks, L->n - exact_lo, &e3);
        if (r != KST_OK) {
            first_err(&rc, err, r, &e3);
        }
        __atomic_store_n(&gpu_state, r == KST_OK ? 1 : -1, __ATOMIC_RELEASE);
        if (pf) {
            gpu_launched = mono_s();
            gpu_dt = gpu_launched - g0;
        }
        if (r == KST_OK && q8g == 3) stage_next(c, layer, &rc, err); /* (the next layer's table, while this step runs) */
    }
#endif
    /* Work items: first the KV heads' tail items (T: their samples scored for the group, about
     * as long as a search; assigned to threads below), then, taken dynamically, the tasks'
     * searches (A, longest first), then
     * the tasks' attention (B: the retrieved keys' partial, the tail, the GPU's merge) in the
     * order their searches ended. A thread takes a search while any is left, so the last ~50 us
     * searches are not what the step ends on: the ~7 us attention items fill the gaps. */
    kv_thread *t = &c->th[omp_get_thread_num()];
    size_t need = (L->n - exact_lo) > sink_end ? (L->n - exact_lo) : sink_end;
    if (need < k) need = k;
    if (need < ns) need = ns;
    if (need < kcap) need = kcap;
    if (need < ks) need = ks;
    kst_error e2;
    size_t kres = k * gq > kcap ? k * gq : kcap;
    if (kres < ks * gq) kres = ks * gq;
    int r = thread_reserve(t, need + 1, kres, d, &e2);
    if (r == KST_OK && t->trows_cap < ns) {
        r = kst_realloc((void **)&t->trows, ns, sizeof(int64_t), "tail samples", &e2);
        if (r == KST_OK) t->trows_cap = ns;
    }
    if (r == KST_OK && tcl) r = tc_reserve(t, tcC, o->tail_samples, nidx, &e2);
    if (r == KST_OK && tqc && t->buf_cap < L->heads[0].sc.ch) /* (kst_kvsc_finish's scratch) */
        r = thread_reserve(t, L->heads[0].sc.ch, kres, d, &e2);
    if (r == KST_OK && scu && t->scu_cap < 3 * kres) {
        r = kst_realloc((void **)&t->scu, 3 * kres, sizeof(uint32_t), "tail sample cache lists", &e2);
        if (r == KST_OK) t->scu_cap = 3 * kres;
    }
    if (r == KST_OK && scu && !sc_g && t->scf_cap < G * L->heads[0].sc.ch) {
        r = kst_realloc((void **)&t->scf, G * L->heads[0].sc.ch, sizeof(float), "tail sample cache scores", &e2);
        if (r == KST_OK) t->scf_cap = G * L->heads[0].sc.ch;
    }
    /* the tail's control variate products, each KV head's query heads at once, before the
     * searches: thread i takes KV heads i, i + threads, ..., so that each KV head's sums are
     * read once a step, not once a query head */
    for (size_t kh = (size_t)omp_get_thread_num(); cvy_on && kh < o->kv_heads; kh += (size_t)omp_get_num_threads()) {
        const kv_hstore *H = &L->heads[kh];
        if (ns && H->cv.Mf && H->cvs.Mf && H->cv.n == nidx && H->cvs.n == ns)
            cv_mq(H, q + kh * G * d, G, d, o->scale, c->cv_y + kh * G * 2 * d);
        __atomic_store_n(&c->cv_st[kh], 2, __ATOMIC_RELEASE); /* (cv_pre checks the sums first) */
    }
    if (r != KST_OK && tsh) /* (the pieces below would wait for this thread's plans) */
        for (size_t kh = (size_t)omp_get_thread_num(); kh < o->kv_heads; kh += (size_t)omp_get_num_threads())
            __atomic_store_n(&c->tg_st[kh], -1, __ATOMIC_RELEASE);
    /* the shared samples: plans (thread i: KV heads i, i + threads, ...); their pieces are then
     * taken before any other task (tg_help), by threads whose searches they interleave */
    for (size_t kh = (size_t)omp_get_thread_num(); r == KST_OK && tsh && kh < o->kv_heads;
         kh += (size_t)omp_get_num_threads()) {
        const kst_kvtc *T = &L->heads[kh].tc;
        float *cs = c->tc_cs + kh * G * T->C;
        kst_kvtc_scores(T, q + kh * G * d, G, o->scale, cs);
        kst_error e5;
        int r5 = kst_kvtc_group_plan(T, &c->tg[kh], cs, G, c->tc_temp, o->tail_samples, &e5);
        if (r5 != KST_OK) first_err(&rc, err, r5, &e5);
        __atomic_store_n(&c->tg_st[kh], r5 == KST_OK ? 1 : -1, __ATOMIC_RELEASE);
    }
    /* T: the KV heads' sample chunks, thread i taking items i, i + threads, ... (the same each
     * step, so a chunk's rows, 256 KB at 512 samples of d 128 float16, may stay in that core's
     * caches) */
    for (size_t it = (size_t)omp_get_thread_num(); it < nT; it += (size_t)omp_get_num_threads()) {
        double ta = pf ? mono_s() : 0;
        if (pf && t->p_first == 0) t->p_first = ta;
        size_t hh = it / tnc;
        tail_chunk(c, &L->heads[hh], it % tnc, q + hh * G * d);
        __atomic_store_n(&c->tt_ok[it], 1, __ATOMIC_RELEASE);
        if (pf) {
            double tb = mono_s();
            t->p_tail += tb - ta;
            t->p_busy += tb - ta;
            t->p_titems += tb - ta;
        }
    }
    /* the sample cache's items on the CPU (thread i: items i, i + threads, ...; made empty by a
     * thread without scratch, whose failure fails the step) */
    for (size_t it = (size_t)omp_get_thread_num(); scu && !sc_g && it < o->kv_heads * scnc;
         it += (size_t)omp_get_num_threads()) {
        double ta = pf ? mono_s() : 0;
        if (pf && t->p_first == 0) t->p_first = ta;
        size_t kh = it / scnc, cc = it % scnc;
        const kv_hstore *H = &L->heads[kh];
        float *ib = c->sc_it + (kh * G * scnc + cc) * scst;
        if (r == KST_OK)
            kst_kvsc_item(&H->sc, cc, q + kh * G * d, G, H->K, H->V, o->f16, d, o->scale, o->sinks, ib, scnc * scst, t->scf);
        else
            for (size_t g = 0; g < G; g++) ib[g * scnc * scst] = -INFINITY;
        __atomic_store_n(&c->sc_ok[it], 1, __ATOMIC_RELEASE);
        if (pf) {
            double tb = mono_s();
            t->p_tail += tb - ta;
            t->p_busy += tb - ta;
        }
    }
    while (r == KST_OK) {
        if (tsh && tg_help(c, L, t, q, &rc, err)) continue; /* a shared sample's piece first */
        size_t ti = __atomic_fetch_add(&next_a, 1, __ATOMIC_ACQ_REL);
        double ta = pf ? mono_s() : 0, tb = ta;
        if (pf && t->p_first == 0) t->p_first = ta;
        if (ti < ntask) { /* A: a search */
            const size_t tk = L->order[ti];
            size_t h0 = tk * gq, *fnd = c->fnd_all + h0;
            const kv_hstore *H = &L->heads[h0 / G];
            for (size_t a = 0; a < gq; a++) fnd[a] = 0;
            size_t kA = k, efA = ef;
            if (early) { /* widen_first: from the tail estimate over the whole sample */
                const float *qh = q + h0 * d;
                float lse_t = -INFINITY, lse_st = -INFINITY;
                size_t kept = 0;
                int have = 0;
#ifdef KST_CUDA
                if (on_gpu) { /* the static partial (and the tail's items) come from the GPU */
                    if (c->widen_early >= 2)
                        while (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 && __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) >= 0)
                            if (__atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1) GPU_ASK();
                    if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 && __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1)
                        GPU_ASK();
                    if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 1) {
                        lse_st = gpu_lse[h0];
                        have = 1;
                        if (tail_gpu)
                            kept = tail_partial_gpu(t, c, H, gpu_tt + h0 * tnc * gpu_st, gpu_st, qh, NULL, nidx, 0,
                                                    INFINITY, t->o2, &lse_t);
                    }
                }
#endif
                if (!on_gpu) { /* the static partial made here, kept for the attention item */
                    float *os = c->os_all + h0 * d, lse2;
                    kst_attn_partial(os, &c->lse_s_all[h0], t->buf, qh, H->K, H->V, o->f16, NULL, 0, sink_end, d, o->scale);
                    kst_attn_partial(t->o2, &lse2, t->buf, qh, H->K, H->V, o->f16, NULL, exact_lo,
                                     L->n - exact_lo, d, o->scale);
                    kst_attn_merge(os, &c->lse_s_all[h0], t->o2, lse2, d);
                    c->os_ok[h0] = 1;
                    lse_st = c->lse_s_all[h0];
                    have = 1;
                }
                if (have && !tail_gpu) {
                    for (size_t cc = 0; cc < tnc; cc++)
                        while (!__atomic_load_n(&c->tt_ok[h0 / G * tnc + cc], __ATOMIC_ACQUIRE)) {
                        } /* its T items still running */
                    kept = tail_partial(t, c, H, h0 % G, qh, NULL, nidx, 0, INFINITY, t->o2, &lse_t);
                }
                if (have && kept && lse_t > -INFINITY) {
                    float hi = lse_st > lse_t ? lse_st : lse_t, lo = lse_st > lse_t ? lse_t : lse_st;
                    kA = widen_first(c, t, lse_t, hi + log1pf(expf(lo - hi)), nidx, kept, k, kcap);
                    if (kA > k) {
                        efA = ef * kA / k > kA ? ef * kA / k : kA;
                        widened++;
                    }
                }
                c->kw_all[h0] = kA;
            }
            if (k > 0) {
                size_t sc;
                size_t x = kA == k ? xk : 0;
                int r2 = retrieve(c, H, t, q + h0 * d, gq, kA + x, efA, x > (c->att_ef && ef > k ? ef - k : 0) ? c->tier : 0,
                                  c->ids_all + h0 * ks, c->sc_all + h0 * ks, fnd, &sc);
                if (r2 != KST_OK) {
                    kst_error e4;
                    kst_fail(&e4, r2, "kst_kv_attend: out of memory in the index search");
                    first_err(&rc, err, r2, &e4);
                }
                scanned += sc;
                L->cost[tk] = sc > UINT32_MAX ? UINT32_MAX : (uint32_t)sc;
                if (pf) {
                    tb = mono_s();
                    t->p_search += tb - ta;
                    t->p_hops += t->s.hops;
                    t->p_tasks++;
                    t->p_busy += tb - ta;
                }
            }
            size_t j = __atomic_fetch_add(&npub, 1, __ATOMIC_ACQ_REL);
            c->pub[j] = (uint32_t)tk;
            __atomic_store_n(&c->pub_ok[j], 1, __ATOMIC_RELEASE);
            continue;
        }
        size_t j = __atomic_fetch_add(&next_b, 1, __ATOMIC_ACQ_REL);
        if (j >= ntask) break;
        while (!__atomic_load_n(&c->pub_ok[j], __ATOMIC_ACQUIRE)) {
        } /* a search still running: its attention is the next item */
        if (pf) ta = tb = mono_s();
        const size_t tk = c->pub[j];
        size_t h0 = tk * gq;
        const size_t *fnd = c->fnd_all + h0;
        const kv_hstore *H = &L->heads[h0 / G];
        for (size_t a = 0; a < gq; a++) { /* B: the task's attention */
            size_t h = h0 + a;
            const float *qh = q + h * d;
            float *oh = out + h * d, lse, lse2, os[512], lse_s = -INFINITY;
            /* sinks, then the exact tail (window and tokens not yet indexed): os, then retrieved */
            if (on_gpu) {
                memset(os, 0, d * sizeof(float));
            } else if (c->os_ok[h]) { /* made before the search (widen_first) */
                memcpy(os, c->os_all + h * d, d * sizeof(float));
                lse_s = c->lse_s_all[h];
            } else {
                kst_attn_partial(os, &lse_s, t->buf, qh, H->K, H->V, o->f16, NULL, 0, sink_end, d, o->scale);
                kst_attn_partial(t->o2, &lse2, t->buf, qh, H->K, H->V, o->f16, NULL, exact_lo,
                                 L->n - exact_lo, d, o->scale);
                kst_attn_merge(os, &lse_s, t->o2, lse2, d);
            }
            size_t m = k > 0 ? fnd[a] : 0, kw = early ? c->kw_all[h] : k, efw = ef, kept = 0;
            if (kw > k) efw = ef * kw / k > kw ? ef * kw / k : kw;
            const uint32_t *rid = c->ids_all + h * ks;
            double tc = tb;
            /* Adaptive budget (kv.h, kst_kvc_attend): after the retrieved keys and the tail
             * estimate, a head whose estimate holds more than c->widen of its softmax mass is
             * searched again with top_k and ef widen_f times larger (up to kcap) and attended
             * anew from its static partial. */
            for (;;) {
                memcpy(oh, os, d * sizeof(float));
                lse = lse_s;
                if (m > 0) {
                    for (size_t i = 0; i < m; i++) t->rows[i] = (int64_t)(o->sinks + rid[i]);
                    if (rid == c->ids_all + h * ks && c->group <= 0 && c->il > 0) /* scored by the search */
                        kst_attn_partial_scored(t->o2, &lse2, t->buf, c->sc_all + h * ks, H->V, o->f16, t->rows, m, d,
                                                o->scale);
                    else
                        kst_attn_partial(t->o2, &lse2, t->buf, qh, H->K, H->V, o->f16, t->rows, 0, m, d,
                                         o->scale);
                    kst_attn_merge(oh, &lse, t->o2, lse2, d);
                }
                if (pf) {
                    double tn = mono_s();
                    t->p_attn += tn - tc;
                    tc = tn;
                }
                /* the least retrieved score (t->buf: the retrieved partial's) among the top_k
                 * (rid best first), or among all attended (c->tau_all) */
                float tau = INFINITY;
                size_t mt = c->tau_all || m < kw ? m : kw;
                for (size_t i = 0; i < mt; i++) tau = t->buf[i] < tau ? t->buf[i] : tau;
                float lse_t = -INFINITY; /* the tail estimate's */
                /* the control variate's parts (cv_pre; t->buf: the retrieved scores) */
                float cva[512];
                double cvz = 0;
                int cv = ns && m < nidx && cv_pre(c, H, q, h, rid, t->buf, m, nidx, cva, &cvz);
                kept = 0;
                t->tlk_on = 0;
                /* the indexed keys retrieval left out, estimated from a sample (kv.h) */
#ifdef KST_CUDA
                if (ns && m < nidx && tail_gpu) { /* from the GPU's items: wait for them */
                    double w0 = pf ? mono_s() : 0;
                    if (pf && t->p_want == 0) t->p_want = w0;
                    while (!ITEMS_IN(h / G) && __atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 &&
                           __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) >= 0)
                        if (__atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1) GPU_ASK();
                    double w1 = pf ? mono_s() : 0;
                    if (ITEMS_IN(h / G) || __atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 1) {
                        kept = tail_partial_gpu(t, c, H, gpu_tt + h * tnc * gpu_st, gpu_st, qh, rid, nidx, m,
                                                tau, t->o2, &lse_t);
                        if (cv && kept) kst_kv_cv_apply(t->o2, &lse_t, cva, cvz, (double)(nidx - m), d);
                        kst_attn_merge(oh, &lse, t->o2, lse_t, d);
                    }
                    if (pf) {
                        t->p_twait += w1 - w0;
                        t->p_tcpu += mono_s() - w1;
                    }
                }
#endif
                if (scu && m < nidx) { /* the sample cache's items: the GPU's, or this step's on the CPU */
                    size_t kh = h / G;
                    const float *its = NULL;
                    double w0 = pf ? mono_s() : 0;
                    if (pf && t->p_want == 0) t->p_want = w0;
#ifdef KST_CUDA
                    if (sc_g) { /* (the next step's plans made while waiting) */
                        while (!ITEMS_IN(kh) && __atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 &&
                               __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) >= 0)
                            if (!sc_help(c, L, &rc, err) && __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1) GPU_ASK();
                        if (ITEMS_IN(kh) || __atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 1) its = sc_tt + h * scnc * scst;
                    }
#endif
                    if (!sc_g) {
                        for (size_t cc = 0; cc < scnc; cc++)
                            while (!__atomic_load_n(&c->sc_ok[kh * scnc + cc], __ATOMIC_ACQUIRE)) {
                            } /* its items still being made */
                        its = sc_tt + h * scnc * scst;
                    }
                    double w1 = pf ? mono_s() : 0;
                    t->ntlw = 0;
                    if (its) {
                        /* (the retrieved keys' scores: the search's where it re-scored them) */
                        const float *rs = rid == c->ids_all + h * ks && c->group <= 0 && c->il > 0 ? c->sc_all + h * ks : NULL;
                        kept = kst_kvsc_finish(&H->sc, its, scst, qh, H->K, H->V, o->f16, d, o->scale, o->sinks, rid, rs, m,
                                               tau, c->tail_cap, t->scu, t->buf, t->o2, &lse_t);
                        kst_attn_merge(oh, &lse, t->o2, lse_t, d);
                        if (c->widen && kept) { /* the adaptive budget's signal: the items' best rows left out */
                            t->ntlw = kst_kvsc_best(&H->sc, its, scst, d, rid, m, t->tlw, t->tlk);
                            t->tlk_on = 1;
                        }
                    }
                    if (pf) {
                        t->p_twait += w1 - w0;
                        t->p_tcpu += mono_s() - w1;
                    }
                } else if (tsh && m < nidx) { /* the KV head's shared sample, once gathered */
                    size_t kh = h / G;
                    t->ntlw = 0; /* (no signal for the adaptive budget, which does not widen here) */
                    while (__atomic_load_n(&c->tg_done[kh], __ATOMIC_ACQUIRE) < KST_KVTC_PIECES)
                        tg_help(c, L, t, q, &rc, err); /* (its pieces, or others', being gathered) */
                    kst_kvtc_group *A = &c->tg[kh];
                    /* (the scratch sized here too: this thread may have gathered no piece of it) */
                    if (__atomic_load_n(&c->tg_st[kh], __ATOMIC_ACQUIRE) == 1 && tg_scratch(t, A, &rc, err)) {
                        for (size_t i = 0; i < m; i++)
                            if (rid[i] < t->tmark_cap) t->tmark[rid[i]] = 1;
                        kept = kst_kvtc_group_finish(&H->tc, A, h % G, qh, H->K, H->V, o->f16, o->scale, o->sinks, rid, m,
                                                     t->tmark, t->tgs, t->o2, &lse_t);
                        for (size_t i = 0; i < m; i++)
                            if (rid[i] < t->tmark_cap) t->tmark[rid[i]] = 0;
                        kst_attn_merge(oh, &lse, t->o2, lse_t, d);
                    }
                } else if (tcl && m < nidx) {
                    kept = tail_clusters(t, c, H, h, q, rid, m, tau, t->o2, &lse_t);
                    kst_attn_merge(oh, &lse, t->o2, lse_t, d);
                }
                if (ns && m < nidx && !tail_gpu) {
                    double w0 = pf ? mono_s() : 0;
                    for (size_t cc = 0; cc < tnc; cc++)
                        while (!__atomic_load_n(&c->tt_ok[h0 / G * tnc + cc], __ATOMIC_ACQUIRE)) {
                        } /* its T items still running */
                    double w1 = pf ? mono_s() : 0;
                    kept = tail_partial(t, c, H, h % G, qh, rid, nidx, m, tau, t->o2, &lse_t);
                    if (cv && kept) kst_kv_cv_apply(t->o2, &lse_t, cva, cvz, (double)(nidx - m), d);
                    kst_attn_merge(oh, &lse, t->o2, lse_t, d);
                    if (pf) {
                        t->p_twait += w1 - w0;
                        t->p_tcpu += mono_s() - w1;
                    }
                }
                if (!c->widen || kept == 0 || kw >= kcap || m >= nidx || !(lse_t > -INFINITY)) break;
                float lse_all = lse; /* the whole denominator: with the static tokens' */
#ifdef KST_CUDA
                if (on_gpu) { /* theirs come from the GPU (with the tail's items when on the GPU) */
                    while (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 && __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) >= 0)
                        if (__atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1) GPU_ASK();
                    if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) != 1) break;
                    float hi = gpu_lse[h] > lse_all ? gpu_lse[h] : lse_all, lo = gpu_lse[h] > lse_all ? lse_all : gpu_lse[h];
                    if (hi > -INFINITY) lse_all = hi + log1pf(expf(lo - hi));
                }
#endif
                size_t k2 = widen_pick(c, t, lse_t, lse_all, nidx, m, kept, kw, kcap);
                if (!k2) break;
                efw = efw * k2 / kw > k2 ? efw * k2 / kw : k2;
                kw = k2;
                size_t sc2 = 0;
                int r2 = retrieve(c, H, t, qh, 1, kw, efw, 0, t->ids, NULL, &m, &sc2);
                if (r2 != KST_OK) {
                    kst_error e4;
                    kst_fail(&e4, r2, "kst_kv_attend: out of memory in the widened index search");
                    first_err(&rc, err, r2, &e4);
                    m = 0;
                    break;
                }
                rid = t->ids;
                scanned += sc2;
                widened++;
                {
                    uint32_t cst = L->cost[tk];
                    L->cost[tk] = cst + sc2 < cst || cst + sc2 > UINT32_MAX ? UINT32_MAX : (uint32_t)(cst + sc2);
                }
            }
            retrieved += m;
            sampled += kept;
            c->lse_buf[h] = lse;
#ifdef KST_CUDA
            if (on_gpu) { /* the static tokens' partial, from the GPU, if in */
                if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 0 && __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE) == 1)
                    GPU_ASK();
                if (__atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE) == 1) {
                    kst_attn_merge(oh, &c->lse_buf[h], gpu_o + h * d, gpu_lse[h], d);
                    __atomic_store_n(&c->gpu_merged[h], 2, __ATOMIC_RELAXED);
                } else {
                    __atomic_store_n(&c->gpu_merged[h], 1, __ATOMIC_RELEASE);
                }
            }
#endif
            if (pf) {
                tb = mono_s();
                t->p_tail += tb - tc;
            }
        }
        if (pf) t->p_busy += mono_s() - ta;
    }
    if (r != KST_OK) { /* this thread takes no items: the others take them all */
        first_err(&rc, err, r, &e2);
    }
    if (pf) t->p_out[0] = mono_s();
    /* Out of tasks: the sample cache's plans for the next step */
    while (tqc && r == KST_OK && sc_help(c, L, &rc, err)) {
    }
    if (pf) t->p_out[1] = mono_s();
#ifdef KST_CUDA
    /* Out of tasks: wait for the GPU (asking) and merge the heads of tasks that ended before
     * it, while other threads still search. */
    if (on_gpu && ntask > 1) {
        int rdy;
        while ((rdy = __atomic_load_n(&gpu_ready, __ATOMIC_ACQUIRE)) == 0) {
            int st = __atomic_load_n(&gpu_state, __ATOMIC_ACQUIRE);
            if (st < 0) break;
            if (st == 1) GPU_ASK();
        }
        if (rdy == 1 && sc_g && !__atomic_exchange_n(&sc_fetch, 1, __ATOMIC_ACQ_REL)) {
            /* the centroid scores for the next plans (the stream is free now) */
            kst_error e5;
            int r5 = kst_kvgpu_sc_fetch(L->gpu, &e5);
            if (r5 != KST_OK) first_err(&rc, err, r5, &e5);
        }
        if (rdy == 1)
            for (size_t h = 0; h < o->q_heads; h++) {
                uint8_t one = 1;
                if (__atomic_load_n(&c->gpu_merged[h], __ATOMIC_ACQUIRE) == 1 &&
                    __atomic_compare_exchange_n(&c->gpu_merged[h], &one, 2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                    kst_attn_merge(out + h * d, &c->lse_buf[h], gpu_o + h * d, gpu_lse[h], d);
            }
    }
    if (pf) t->p_out[2] = mono_s();
#undef GPU_ASK
#undef ITEMS_IN
#endif
    }
    double pt2 = pf ? mono_s() : 0, pt3 = pt2;
#ifdef KST_CUDA
    if (on_gpu && gpu_state == 1) {
        /* heads still waiting (a task ended just as the others merged, or one thread ran all) */
        int r2 = gpu_ready == 1 ? KST_OK
                 : gpu_ready == 0 ? kst_kvgpu_partial_ready(L->gpu, &gpu_o, &gpu_lse, rc == KST_OK ? err : NULL)
                                  : KST_ERR_INTERNAL;
        if (pf) pt3 = mono_s();
        if (pf && gpu_seen == 0) gpu_seen = pt3;
        if (r2 == KST_OK && rc == KST_OK)
            for (size_t h = 0; h < o->q_heads; h++)
                if (c->gpu_merged[h] == 1) kst_attn_merge(out + h * d, &c->lse_buf[h], gpu_o + h * d, gpu_lse[h], d);
        if (rc == KST_OK) rc = r2;
        if (pf) pf->gpu_armed += kst_kvgpu_armed_steps(L->gpu) - gpu_armed0;
    }
#endif
    /* the sample cache's plan for the next step, from this step's centroid scores (the GPU's where
     * its partials came in) */
    if (tqc && rc == KST_OK) {
        const float *cs = NULL;
        int later = 0;
#ifdef KST_CUDA
        if (sc_g && gpu_state == 1) {
            if (!sc_fetch) rc = kst_kvgpu_sc_fetch(L->gpu, err);
            later = c->app_idle; /* (sc_flush: in the engine's idle time) */
            if (rc == KST_OK && !later) rc = kst_kvgpu_sc_fetched(L->gpu, err);
            if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
            cs = kst_kvgpu_sc_scores(L->gpu);
            L->sc_pend = later;
        }
#endif
        if (!later) rc = sc_end(c, L, q, cs, sc_g, 0, err);
        if (rc != KST_OK) return kst_error_prefix(err, "kst_kv_attend: layer %zu", layer);
    }
    (void)sc_fetch;
    (void)gpu_state;
    (void)gpu_armed0;
    (void)gpu_ready;
    (void)gpu_asking;
    (void)gpu_early;
    if (pf) {
        double pt4 = mono_s(), bmax = 0, bsum = 0, esum = 0, emax = 0, want = 0, omax[3] = {0, 0, 0};
        size_t tmax = 0;
        int used = 0;
        for (int i = 0; i < c->nth; i++) {
            kv_thread *t = &c->th[i];
            t->s.prof = 0;
            if (t->p_first == 0) continue;
            used++;
            if (t->p_busy > bmax) bmax = t->p_busy;
            bsum += t->p_busy;
            esum += t->p_first - pt1;
            if (t->p_first - pt1 > emax) emax = t->p_first - pt1;
            if (t->p_tasks > tmax) tmax = t->p_tasks;
            pf->search += t->p_search - t->s.t_rerank - t->s.t_entry;
            pf->entry += t->s.t_entry;
            pf->rerank += t->s.t_rerank;
            pf->attn += t->p_attn;
            pf->tail += t->p_tail;
            pf->hops += t->p_hops;
            pf->tail_wait += t->p_twait;
            pf->tail_items += t->p_titems;
            pf->tail_cpu += t->p_tcpu;
            pf->tail_topsum += t->p_topsum;
            pf->tail_table += t->p_ttable;
            if (t->p_want > 0 && (want == 0 || t->p_want < want)) want = t->p_want;
            for (int a = 0; a < 3; a++)
                if (t->p_out[a] > 0 && t->p_out[a] - pt0 > omax[a]) omax[a] = t->p_out[a] - pt0;
        }
        pf->out_tasks += omax[0];
        pf->out_plans += omax[1];
        pf->out_done += omax[2];
        pf->steps++;
        pf->tasks += c->group > 0 ? ntask : o->q_heads; /* searches (beams) */
        pf->scanned += scanned;
        pf->total += pt4 - pt0;
        pf->gpu_start += pt1 - pt0 + gpu_dt; /* the launch runs inside the region now */
        pf->pre += pt1 - pt0;
        pf->region += pt2 - pt1;
        pf->enter += used ? esum / used : 0;
        pf->enter_max += emax;
        pf->tasks_max += tmax;
        pf->threads_used += (size_t)used;
        pf->busy_max += bmax;
        pf->busy_mean += used ? bsum / used : 0;
        pf->gpu_wait += pt3 - pt2;
        pf->merge += pt4 - pt3;
#ifdef KST_CUDA
        if (on_gpu) { /* KESTREL_KV_GPU_TIME=1: the GPU's own spans */
            double ms[3];
            size_t nt = kst_kvgpu_times(L->gpu, ms);
            pf->gpu_timed += nt;
            pf->gpu_h2d += 1e-3 * ms[0];
            pf->gpu_kernel += 1e-3 * ms[1];
            pf->gpu_d2h += 1e-3 * ms[2];
        }
#endif
        if (gpu_launched > 0 && gpu_seen > 0) { /* the GPU's partial's life (on_gpu steps) */
            pf->gpu_steps++;
            pf->gpu_launched += gpu_launched - pt0;
            pf->gpu_seen += gpu_seen - pt0;
            if (want > 0) {
                pf->gpu_wanted_steps++;
                pf->gpu_wanted += want - pt0;
                if (want < gpu_seen) pf->gpu_late++;
            }
        }
    }
    if (rc != KST_OK) return rc;
    if (stats) {
        stats->tokens = L->n;
        stats->exact = sink_end + (L->n - exact_lo);
        stats->indexed = nidx;
        stats->retrieved = retrieved;
        stats->scanned = scanned;
        stats->sampled = sampled;
        stats->searches = k > 0 && nidx > 0 ? (c->group > 0 ? ntask : o->q_heads) : 0;
        /* the per-head searches by codes of the KV heads that probe_of gives clusters */
        stats->probed = 0;
        int per_head = stats->searches && c->group <= 0 && c->il > 0 && c->use_codes;
        for (size_t h = 0; h < (per_head ? o->kv_heads : 0); h++)
            if (L->heads[h].g.pc_n > 1 && probe_of(c, &L->heads[h].g) > 0) stats->probed += o->q_heads / o->kv_heads;
        stats->widened = widened;
        stats->staged = 0;
#ifdef KST_CUDA
        stats->staged = on_gpu && q8g == 3 && kst_kvgpu_stage_hit(L->gpu);
#endif
    }
    return KST_OK;
}
