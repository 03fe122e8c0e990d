/* kv_graph.c - attention-aware and key-only proximity graphs over attention keys, beam search by
 * inner product. */
#include "kv_graph.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/half.h"
#include "core/kv_attn.h"
#include "core/mem.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif
#include "index/kv_tclust.h"

/* ------------------------------------------------------------------------------------------ */
/* helpers */

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const void *krow(const void *K, int f16, size_t i, size_t d) {
    return f16 ? (const void *)((const uint16_t *)K + i * d) : (const void *)((const float *)K + i * d);
}

/* Node x's key row (kst_kvg_order renumbers the first nperm nodes) and that row of K. */
static inline size_t node_row(const kst_kvg *g, size_t x) {
    return x < g->nperm ? g->row_of[x] : x;
}
static inline const void *nrow(const kst_kvg *g, const void *K, int f16, size_t x, size_t d) {
    return krow(K, f16, node_row(g, x), d);
}

/* Max-heap (candidates) and min-heap (results) of (score, id), sift by the sign `dir`. */
static void heap_push(float *s, uint32_t *id, size_t *n, float v, uint32_t x, int maxheap) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (maxheap ? s[p] >= v : s[p] <= v) break;
        s[i] = s[p];
        id[i] = id[p];
        i = p;
    }
    s[i] = v;
    id[i] = x;
}

/* Replaces the top of a heap of n by (v, x) and restores it: a pop and a push in one pass. */
static void heap_replace_top(float *s, uint32_t *id, size_t n, float v, uint32_t x, int maxheap) {
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && (maxheap ? s[c + 1] > s[c] : s[c + 1] < s[c])) c++;
        if (maxheap ? v >= s[c] : v <= s[c]) break;
        s[i] = s[c];
        id[i] = id[c];
        i = c;
    }
    s[i] = v;
    id[i] = x;
}

/* Removes the top: the last element replaces it in a heap one shorter. */
static void heap_pop(float *s, uint32_t *id, size_t *n, int maxheap) {
    size_t m = --(*n);
    if (m) heap_replace_top(s, id, m, s[m], id[m], maxheap);
}

void kst_kvg_scratch_free(kst_kvg_scratch *s) {
    if (!s) return;
    kst_free(s->mark);
    kst_free(s->cs);
    kst_free(s->ci);
    kst_free(s->rs);
    kst_free(s->ri);
    kst_free(s->gv);
    kst_free(s->gx);
    kst_free(s->grs);
    kst_free(s->gri);
    kst_free(s->grn);
    kst_free(s->gq);
    kst_free(s->rr);
    kst_free(s->fl);
    kst_free(s->ic);
    kst_free(s->srow);
    kst_free(s->vl);
    memset(s, 0, sizeof *s);
}

static int scratch_reserve(kst_kvg_scratch *s, size_t n, size_t ef, size_t M, kst_error *err) {
    int rc = KST_OK;
    if (s->mark_cap < n) {
        size_t cap = n + n / 2 + 1024;
        uint8_t *m = kst_calloc(cap, sizeof *m, "kv search marks", err);
        if (!m) return KST_ERR_NOMEM;
        kst_free(s->mark);
        s->mark = m;
        s->mark_cap = cap;
        s->epoch = 0;
    }
    /* Candidates: every scored key may be pushed once, so cap by what one expansion adds. */
    size_t cneed = ef * (M + 1) + 64;
    if (s->ccap < cneed) {
        KST_TRY(kst_realloc((void **)&s->cs, cneed, sizeof(float), "kv search candidates", err));
        KST_TRY(kst_realloc((void **)&s->ci, cneed, sizeof(uint32_t), "kv search candidates", err));
        s->ccap = cneed;
    }
    if (s->rcap < ef + 1) {
        KST_TRY(kst_realloc((void **)&s->rs, ef + 1, sizeof(float), "kv search results", err));
        KST_TRY(kst_realloc((void **)&s->ri, ef + 1, sizeof(uint32_t), "kv search results", err));
        s->rcap = ef + 1;
    }
    if (++s->epoch == 0) { /* wrapped: clear the marks once every 255 searches */
        memset(s->mark, 0, s->mark_cap * sizeof *s->mark);
        s->epoch = 1;
    }
done:
    return rc;
}

/* Score of key i for q: <q, k_i>, or <q, k_i> - |k_i|^2 / 2 (l2: larger is nearer in Euclidean
 * distance, since |q - k|^2 = |q|^2 - 2 (<q, k> - |k|^2 / 2)). */
static inline float score_of(const kst_kvg *g, const void *K, int f16, size_t d, const float *q,
                             uint32_t i, int l2) {
    float s = kst_kv_dot(q, nrow(g, K, f16, i, d), f16, d);
    return l2 ? s - 0.5f * g->norm2[i] : s;
}

/* Code-steered insertion (kst_kvg.ins_codes), defined with the code kernels below: ins_prepare
 * sets s up to score codes against q (a new key, float32) and returns whether it did;
 * ins_code_dot is <q, x's code values> (plus the constant). */
static int ins_prepare(const kst_kvg *g, const float *q, size_t d, kst_kvg_scratch *s);
static float ins_code_dot(const kst_kvg *g, const kst_kvg_scratch *s, uint32_t x, size_t d);
static void row_f32(float *x, const void *row, size_t d);

/* A beam's score of node i: exact, or from its codes while s->ic_on (insertion: l2). */
static inline float beam_score(const kst_kvg *g, const void *K, int f16, size_t d, const float *q,
                               uint32_t i, int l2, const kst_kvg_scratch *s) {
    if (s->ic_on) return ins_code_dot(g, s, i, d) - 0.5f * g->norm2[i];
    return score_of(g, K, f16, d, q, i, l2);
}

/* The e-th entry point of g; when it has none yet (an empty or growing graph), node 0; past the
 * last, UINT32_MAX. */
static uint32_t entry_at(const kst_kvg *g, size_t e) {
    if (e < g->n_entry) return g->entry[e];
    return e == 0 ? 0 : UINT32_MAX;
}

/* Best-first beam search; leaves the ef best in s's result heap. Nodes at or past `limit` are
 * not visited (insertion searches the nodes before the new one). In three parts, so that several
 * beams can run interleaved on one thread (kst_kvg_plan_multi): beam_init scores the entry
 * points; beam_next pops the next node to expand (0: the beam has ended) and asks for its
 * unvisited neighbours' rows and edges; beam_expand scores them. */
static int beam_init(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, size_t ef,
                     int l2, size_t limit, kst_kvg_scratch *s, kst_error *err) {
    int rc = scratch_reserve(s, g->cap, ef, g->M, err);
    if (rc != KST_OK) return rc;
    s->cn = s->rn = s->scanned = s->hops = 0;
    uint8_t ep = s->epoch;
    for (size_t e = 0;; e++) {
        uint32_t x = entry_at(g, e);
        if (x == UINT32_MAX) break;
        if (x >= limit || s->mark[x] == ep) continue;
        s->mark[x] = ep;
        float v = beam_score(g, K, f16, d, q, x, l2, s);
        s->scanned++;
        heap_push(s->cs, s->ci, &s->cn, v, x, 1);
        heap_push(s->rs, s->ri, &s->rn, v, x, 0);
        if (s->rn > ef) heap_pop(s->rs, s->ri, &s->rn, 0);
    }
    return KST_OK;
}

static int beam_next(const kst_kvg *g, const void *K, int f16, size_t d, size_t ef, size_t limit,
                     kst_kvg_scratch *s, uint32_t *out) {
    if (s->cn == 0) return 0;
    float cv = s->cs[0];
    uint32_t c = s->ci[0];
    heap_pop(s->cs, s->ci, &s->cn, 1);
    if (s->rn >= ef && cv < s->rs[0]) {
        s->cn = 0;
        return 0;
    }
    s->hops++;
    const uint32_t *nb = g->adj + (size_t)c * g->M;
    size_t dg = g->deg[c];
    uint8_t ep = s->epoch;
    /* Ask for the unvisited neighbours' key rows (and their edges, read if they join the
     * beam) before scoring the first: on a cache larger than the CPU's caches the search is
     * bound by these scattered reads, and issuing them together overlaps their latency. */
    size_t rowb = d * (f16 ? 2 : 4);
    for (size_t j = 0; j < dg; j++) {
        uint32_t x = nb[j];
        if (x >= limit || s->mark[x] == ep) continue;
        if (s->ic_on) { /* one line of codes (d 128) and the norm instead of the row */
            const char *r = (const char *)(g->codes + (size_t)x * (d / 2));
            __builtin_prefetch(r);
            __builtin_prefetch(r + d / 2 - 1);
            __builtin_prefetch(g->norm2 + x);
        } else {
            const char *r = (const char *)nrow(g, K, f16, x, d);
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
        }
        __builtin_prefetch(g->adj + (size_t)x * g->M);
    }
    *out = c;
    return 1;
}

static void beam_expand(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, size_t ef,
                        int l2, size_t limit, kst_kvg_scratch *s, uint32_t c) {
    const uint32_t *nb = g->adj + (size_t)c * g->M;
    size_t dg = g->deg[c];
    uint8_t ep = s->epoch;
    for (size_t j = 0; j < dg; j++) {
        uint32_t x = nb[j];
        if (x >= limit || s->mark[x] == ep) continue;
        s->mark[x] = ep;
        float v = beam_score(g, K, f16, d, q, x, l2, s);
        s->scanned++;
        if (s->rn < ef || v > s->rs[0]) {
            if (s->cn < s->ccap) heap_push(s->cs, s->ci, &s->cn, v, x, 1);
            if (s->rn < ef) heap_push(s->rs, s->ri, &s->rn, v, x, 0);
            else heap_replace_top(s->rs, s->ri, s->rn, v, x, 0);
        }
    }
}

static int beam(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, size_t ef,
                int l2, size_t limit, kst_kvg_scratch *s, kst_error *err) {
    int rc = beam_init(g, K, f16, d, q, ef, l2, limit, s, err);
    uint32_t c;
    if (rc == KST_OK)
        while (beam_next(g, K, f16, d, ef, limit, s, &c)) beam_expand(g, K, f16, d, q, ef, l2, limit, s, c);
    return rc;
}

/* The insertion beam (kst_kvg_insert, kst_kvg_plan_multi): the same best-first search by
 * Euclidean distance (l2 scores) as beam(), over nodes [0, limit), but its ef best kept in one
 * array sorted best first (s->rs, s->ri; s->fl: expanded) instead of two heaps: a node scored
 * below the ef-th is dropped at once, the next node to expand is the best unexpanded one, and
 * the beam ends when all ef are expanded (the heap version's stop: its best candidate below the
 * ef-th result). Steered by codes while s->ic_on. In parts, as beam(), for interleaving. */
static void ipool_add(kst_kvg_scratch *s, size_t ef, float v, uint32_t x, const uint32_t *adj, size_t M) {
    size_t n = s->rn;
    if (n == ef && !(v > s->rs[n - 1])) return;
    size_t lo = 0, hi = n; /* first position whose score is below v */
    while (lo < hi) {
        size_t m = (lo + hi) / 2;
        if (s->rs[m] >= v) lo = m + 1;
        else hi = m;
    }
    size_t mv = (n == ef ? n - 1 : n) - lo;
    memmove(s->rs + lo + 1, s->rs + lo, mv * sizeof(float));
    memmove(s->ri + lo + 1, s->ri + lo, mv * sizeof(uint32_t));
    memmove(s->fl + lo + 1, s->fl + lo, mv);
    s->rs[lo] = v;
    s->ri[lo] = x;
    s->fl[lo] = 0;
    __builtin_prefetch(adj + (size_t)x * M); /* its edges, read if it is expanded */
    if (n < ef) s->rn = n + 1;
    if (lo < s->cn) s->cn = lo; /* cn: the first position that may be unexpanded */
}

#if defined(__x86_64__) && defined(__GNUC__)
static void table_best(const uint8_t *tab, const uint32_t *tid, size_t tn, size_t cd, const int8_t *w8, float c0,
                       float qsc, size_t keep, float *tv, uint32_t *tx, size_t *nt);
#endif

static void code_vec(const kst_kvg *g, const float *x, uint8_t *c);
static void table_put(uint8_t *tc, size_t e, const uint8_t *c, size_t d);

/* A query's int8 code coefficients in the codes' nibble order (lo, hi: d / 2 each) put in
 * dimension order (w8, d), as table_best reads them. */
static void table_coefs(const int8_t *lo, const int8_t *hi, size_t d, int8_t *w8) {
    for (size_t b = 0; b < d; b += 32)
        for (size_t j = 0; j < 16; j++) {
            w8[b + j] = lo[b / 2 + j];
            w8[b + 16 + j] = hi[b / 2 + j];
        }
}

static int ibeam_init(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, size_t ef,
                      size_t limit, kst_kvg_scratch *s) {
    int rc = scratch_reserve(s, g->cap, ef, g->M, NULL);
    if (rc != KST_OK) return rc;
    if (s->flcap < ef + 1) {
        if (kst_realloc((void **)&s->fl, ef + 1, 1, "kv insert pool", NULL) != KST_OK) return KST_ERR_NOMEM;
        s->flcap = ef + 1;
    }
    s->cn = s->rn = s->scanned = s->hops = 0;
    s->ic_tab = 0;
    uint8_t ep = s->epoch;
#if defined(__x86_64__) && defined(__GNUC__)
    /* entries chosen per key (kst_kvg.ins_sk): the ins_sk best of the entry table's spaced nodes
     * by <k, x> from their codes (16 at a time, as the decode searches choose theirs), each then
     * scored by the beam (code distance) and put in the pool, instead of the hubs (the prefill
     * queries' favourite keys, far from most new keys) */
    if (s->ic_on && s->ic_vnni && g->ins_sk && g->et_n > 0 && g->et_n <= g->n && d <= 512) {
        const int8_t *q8 = (const int8_t *)(s->ic + d);
        int8_t w8[512];
        table_coefs(q8, q8 + d / 2, d, w8);
        float tv[64];
        uint32_t tx[64];
        size_t nt = 0, keep = g->ins_sk < 64 ? g->ins_sk : 64;
        table_best(g->et_codes, g->et_id, g->et_n, g->cd, w8, s->ic_c0, s->ic_sc, keep, tv, tx, &nt);
        s->scanned += g->et_n;
        for (size_t j = 0; j < nt; j++) __builtin_prefetch(g->norm2 + tx[j]);
        for (size_t j = 0; j < nt; j++) {
            uint32_t x = tx[j];
            if (x >= limit || s->mark[x] == ep) continue;
            s->mark[x] = ep;
            ipool_add(s, ef, tv[j] - 0.5f * g->norm2[x], x, g->adj, g->M);
        }
        if (s->rn > 0) {
            s->ic_tab = 1;
            s->ic_e0 = s->ri[0];
            return KST_OK;
        }
    }
#endif
    for (size_t e = 0;; e++) {
        uint32_t x = entry_at(g, e);
        if (x == UINT32_MAX) break;
        if (x >= limit || s->mark[x] == ep) continue;
        s->mark[x] = ep;
        ipool_add(s, ef, beam_score(g, K, f16, d, q, x, 1, s), x, g->adj, g->M);
        s->scanned++;
    }
    return KST_OK;
}

static int ibeam_next(const kst_kvg *g, const void *K, int f16, size_t d, size_t limit, size_t ex,
                      kst_kvg_scratch *s, uint32_t *out) {
    size_t c = s->cn, top = s->rn < ex ? s->rn : ex;
    while (c < top && s->fl[c]) c++;
    s->cn = c;
    if (c >= top) return 0;
    s->fl[c] = 1;
    uint32_t x0 = s->ri[c];
    s->hops++;
    const uint32_t *nb = g->adj + (size_t)x0 * g->M;
    size_t dg = g->deg[x0], rowb = d * (f16 ? 2 : 4);
    uint8_t ep = s->epoch;
    for (size_t j = 0; j < dg; j++) {
        uint32_t x = nb[j];
        if (x >= limit || s->mark[x] == ep) continue;
        if (s->ic_on) {
            const char *r = (const char *)(g->codes + (size_t)x * (d / 2));
            __builtin_prefetch(r);
            __builtin_prefetch(r + d / 2 - 1);
            __builtin_prefetch(g->norm2 + x);
        } else {
            const char *r = (const char *)nrow(g, K, f16, x, d);
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
        }
    }
    *out = x0;
    return 1;
}

static void ibeam_expand(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, size_t ef,
                         size_t limit, kst_kvg_scratch *s, uint32_t c) {
    const uint32_t *nb = g->adj + (size_t)c * g->M;
    size_t dg = g->deg[c];
    uint8_t ep = s->epoch;
    for (size_t j = 0; j < dg; j++) {
        uint32_t x = nb[j];
        if (x >= limit || s->mark[x] == ep) continue;
        s->mark[x] = ep;
        ipool_add(s, ef, beam_score(g, K, f16, d, q, x, 1, s), x, g->adj, g->M);
        s->scanned++;
    }
}

/* The end of an insertion beam: its pool (re-scored exactly from the rows first where the
 * codes steered it, s->ic_on then cleared) into ids / dist as squared distances to q (norm2:
 * |q|^2), nearest first, at most k; returns the count. ids / dist may be s->ci / s->cs. */
static size_t ibeam_end(const kst_kvg *g, const void *K, int f16, size_t d, const float *q, float norm2,
                        kst_kvg_scratch *s, uint32_t *ids, float *dist, size_t k) {
    size_t n = s->rn;
    if (s->ic_on) {
        s->ic_on = 0;
        size_t rowb = d * (f16 ? 2 : 4);
        for (size_t i = 0; i < n; i++) {
            const char *r = (const char *)nrow(g, K, f16, s->ri[i], d);
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
        }
        for (size_t i = 0; i < n; i++) s->rs[i] = score_of(g, K, f16, d, q, s->ri[i], 1);
        for (size_t i = 1; i < n; i++) { /* insertion sort, best first (nearly sorted) */
            float v = s->rs[i];
            uint32_t x = s->ri[i];
            size_t j = i;
            for (; j > 0 && s->rs[j - 1] < v; j--) {
                s->rs[j] = s->rs[j - 1];
                s->ri[j] = s->ri[j - 1];
            }
            s->rs[j] = v;
            s->ri[j] = x;
        }
    }
    if (n > k) n = k;
    for (size_t i = 0; i < n; i++) {
        ids[i] = s->ri[i];
        dist[i] = norm2 - 2.0f * s->rs[i]; /* score -> squared distance */
    }
    s->rn = 0;
    return n;
}

/* Drains s's result heap into ids/scores, best first; returns the count. */
static size_t drain(kst_kvg_scratch *s, uint32_t *ids, float *scores, size_t k) {
    while (s->rn > k) heap_pop(s->rs, s->ri, &s->rn, 0);
    size_t n = s->rn;
    for (size_t i = n; i-- > 0;) {
        ids[i] = s->ri[0];
        if (scores) scores[i] = s->rs[0];
        heap_pop(s->rs, s->ri, &s->rn, 0);
    }
    return n;
}

size_t kst_kvg_search(const kst_kvg *g, const void *K, int f16, size_t d, const float *q,
                      size_t k, size_t ef, kst_kvg_scratch *s, uint32_t *ids, float *scores,
                      int *rc) {
    *rc = KST_OK;
    if (g->n == 0 || k == 0) {
        s->scanned = 0;
        return 0;
    }
    if (ef < k) ef = k;
    s->ic_on = 0;
    int r = beam(g, K, f16, d, q, ef, 0, g->n, s, NULL);
    if (r != KST_OK) {
        *rc = r;
        s->scanned = 0;
        return 0;
    }
    size_t m = drain(s, ids, scores, k);
    for (size_t i = 0; i < m; i++) ids[i] = (uint32_t)node_row(g, ids[i]);
    return m;
}

/* ------------------------------------------------------------------------------------------ */
/* set-up */

int kst_kvg_init(kst_kvg *g, size_t M, size_t max_entry, size_t efc, kst_error *err) {
    memset(g, 0, sizeof *g);
    if (M < 4 || M > 1024)
        return kst_fail(err, KST_ERR_INVALID, "kv graph degree %zu is outside 4..1024", M);
    g->M = M;
    g->max_entry = max_entry ? max_entry : 1;
    g->efc = efc ? efc : 64;
    const char *ic = getenv("KESTREL_KV_INS_CODES"), *ie = getenv("KESTREL_KV_INS_EF");
    g->ins_codes = !(ic && ic[0] == '0');
    g->ins_ef = ie && atol(ie) > 0 ? (size_t)atol(ie) : g->efc;
    const char *ix = getenv("KESTREL_KV_INS_EX");
    g->ins_ex = ix && atol(ix) > 0 ? (size_t)atol(ix) : g->ins_ef;
    const char *ik = getenv("KESTREL_KV_INS_SK");
    g->ins_sk = ik ? (size_t)atol(ik) : KST_KVG_INS_SK;
    const char *it = getenv("KESTREL_KV_INS_EXT");
    g->ins_ext = it && atol(it) > 0 ? (size_t)atol(it) : (3 * g->ins_ef + 3) / 4;
    const char *rp = getenv("KESTREL_KV_REPAIR");
    g->repair = !(rp && rp[0] == '0');
    g->peaked = -1;
    return KST_OK;
}

void kst_kvg_free(kst_kvg *g) {
    if (!g) return;
    kst_free(g->adj);
    kst_free(g->deg);
    kst_free(g->indeg);
    kst_free(g->norm2);
    kst_free(g->adist);
    kst_free(g->entry);
    kst_free(g->codes);
    kst_free(g->clo); /* cstep lies in the same block */
    kst_free(g->et_id);
    kst_free(g->et_codes);
    kst_free(g->row_of);
    kst_free(g->pc_codes);
    kst_free(g->pc_at);
    kst_free(g->pc_tab);
    kst_free(g->pc_tid);
    memset(g, 0, sizeof *g);
}

void kst_kvg_advise_huge(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t H = (uintptr_t)2 << 20;
    uintptr_t a = ((uintptr_t)p + H - 1) & ~(H - 1), b = ((uintptr_t)p + bytes) & ~(H - 1);
    if (p && b > a) (void)madvise((void *)a, b - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

int kst_kvg_grow_big(void **p, size_t old_bytes, size_t new_bytes, const char *what, kst_error *err) {
    const size_t H = (size_t)2 << 20, P = 4096; /* (from a page on: whole pages of its own, which the GPU may register) */
    size_t a = new_bytes >= H ? H : new_bytes >= P ? P : 64, nb = new_bytes >= P ? (new_bytes + P - 1) / P * P : new_bytes;
    void *q = kst_malloc_aligned(1, nb, a, what, err);
    if (!q) return KST_ERR_NOMEM;
    kst_kvg_advise_huge(q, new_bytes);
    if (*p && old_bytes) memcpy(q, *p, old_bytes < new_bytes ? old_bytes : new_bytes);
    kst_free(*p);
    *p = q;
    return KST_OK;
}

int kst_kvg_copy(kst_kvg *dst, const kst_kvg *src, kst_error *err) {
    kst_kvg_free(dst);
    int rc = kst_kvg_init(dst, src->M, src->max_entry, src->efc, err);
    if (rc != KST_OK) return rc;
    size_t cap = src->cap, M = src->M;
    if (cap) {
        if (kst_kvg_grow_big((void **)&dst->adj, 0, cap * M * sizeof(uint32_t), "kv graph copy", err)) dst->adj = NULL;
        dst->adist = kst_malloc(cap, M * sizeof(float), "kv graph copy", err);
        if (kst_kvg_grow_big((void **)&dst->deg, 0, cap * sizeof(uint16_t), "kv graph copy", err)) dst->deg = NULL;
        dst->norm2 = kst_malloc(cap, sizeof(float), "kv graph copy", err);
        dst->indeg = kst_malloc(cap, sizeof(uint32_t), "kv graph copy", err);
        dst->entry = kst_malloc(src->max_entry, sizeof(uint32_t), "kv graph copy", err);
        if (!dst->adj || !dst->adist || !dst->deg || !dst->norm2 || !dst->indeg || !dst->entry) {
            kst_kvg_free(dst);
            kst_kvg_init(dst, M, src->max_entry, src->efc, NULL);
            return KST_ERR_NOMEM;
        }
        memcpy(dst->adj, src->adj, cap * M * sizeof(uint32_t));
        memcpy(dst->adist, src->adist, cap * M * sizeof(float));
        memcpy(dst->deg, src->deg, cap * sizeof(uint16_t));
        memcpy(dst->norm2, src->norm2, cap * sizeof(float));
        memcpy(dst->indeg, src->indeg, cap * sizeof(uint32_t));
        if (src->entry) memcpy(dst->entry, src->entry, src->n_entry * sizeof(uint32_t));
        if (src->nperm) {
            dst->row_of = kst_malloc(src->nperm, sizeof(uint32_t), "kv graph copy", err);
            if (!dst->row_of) {
                kst_kvg_free(dst);
                kst_kvg_init(dst, M, src->max_entry, src->efc, NULL);
                return KST_ERR_NOMEM;
            }
            memcpy(dst->row_of, src->row_of, src->nperm * sizeof(uint32_t));
            dst->nperm = src->nperm;
        }
        if (src->pc_n) {
            const size_t nb = (src->pc_n + 15) / 16, tb = nb * (src->cd / 8) * 64;
            dst->pc_codes = kst_malloc(src->pc_n, src->cd / 2, "kv graph copy", err);
            dst->pc_at = kst_malloc(src->pc_n + 1, sizeof(uint32_t), "kv graph copy", err);
            dst->pc_tab = kst_malloc_aligned(1, tb, 64, "kv graph copy", err);
            dst->pc_tid = kst_malloc(nb * 16, sizeof(uint32_t), "kv graph copy", err);
            if (!dst->pc_codes || !dst->pc_at || !dst->pc_tab || !dst->pc_tid) {
                kst_kvg_free(dst);
                kst_kvg_init(dst, M, src->max_entry, src->efc, NULL);
                return KST_ERR_NOMEM;
            }
            memcpy(dst->pc_codes, src->pc_codes, src->pc_n * (src->cd / 2));
            memcpy(dst->pc_at, src->pc_at, (src->pc_n + 1) * sizeof(uint32_t));
            memcpy(dst->pc_tab, src->pc_tab, tb);
            memcpy(dst->pc_tid, src->pc_tid, nb * 16 * sizeof(uint32_t));
            dst->pc_n = src->pc_n;
        }
        if (src->codes) {
            size_t cb = src->cd / 2;
            if (kst_kvg_grow_big((void **)&dst->codes, 0, cap * cb, "kv graph codes copy", err)) dst->codes = NULL;
            dst->clo = kst_malloc(src->cd, 2 * sizeof(float), "kv graph codes copy", err);
            if (!dst->codes || !dst->clo) {
                kst_kvg_free(dst);
                kst_kvg_init(dst, M, src->max_entry, src->efc, NULL);
                return KST_ERR_NOMEM;
            }
            memcpy(dst->codes, src->codes, cap * cb);
            dst->cstep = dst->clo + src->cd;
            memcpy(dst->clo, src->clo, src->cd * sizeof(float));
            memcpy(dst->cstep, src->cstep, src->cd * sizeof(float));
        }
    }
    dst->codes_on = src->codes_on;
    dst->cd = src->cd;
    dst->n = src->n;
    dst->cap = cap;
    dst->n_entry = src->n_entry;
    dst->hub_entries = src->hub_entries;
    dst->ins_codes = src->ins_codes;
    dst->ins_ef = src->ins_ef;
    dst->ins_ex = src->ins_ex;
    dst->ins_sk = src->ins_sk;
    dst->ins_ext = src->ins_ext;
    dst->repair = src->repair;
    dst->peaked = src->peaked;
    return KST_OK;
}

static int reserve(kst_kvg *g, size_t n, kst_error *err) {
    if (n <= g->cap) return KST_OK;
    size_t cap = g->cap ? g->cap : 1024;
    while (cap < n) cap *= 2;
    int rc = KST_OK;
    KST_TRY(kst_kvg_grow_big((void **)&g->adj, g->cap * g->M * sizeof(uint32_t), cap * g->M * sizeof(uint32_t),
                             "kv graph edges", err));
    KST_TRY(kst_realloc((void **)&g->adist, cap, g->M * sizeof(float), "kv graph edges", err));
    KST_TRY(kst_kvg_grow_big((void **)&g->deg, g->cap * sizeof(uint16_t), cap * sizeof(uint16_t), "kv graph degrees", err));
    KST_TRY(kst_realloc((void **)&g->indeg, cap, sizeof(uint32_t), "kv graph degrees", err));
    KST_TRY(kst_realloc((void **)&g->norm2, cap, sizeof(float), "kv graph norms", err));
    if (!g->entry) {
        g->entry = kst_malloc(g->max_entry, sizeof(uint32_t), "kv graph entries", err);
        if (!g->entry) return KST_ERR_NOMEM;
    }
    if (g->codes) {
        KST_TRY(kst_kvg_grow_big((void **)&g->codes, g->cap * g->cd / 2, cap * g->cd / 2, "kv graph codes", err));
    }
    memset(g->deg + g->cap, 0, (cap - g->cap) * sizeof(uint16_t));
    memset(g->indeg + g->cap, 0, (cap - g->cap) * sizeof(uint32_t));
    g->cap = cap;
done:
    return rc;
}

static float sqnorm(const kst_kvg *g, const void *K, int f16, size_t i, size_t d, float *tmp) {
    if (f16) row_f32(tmp, nrow(g, K, f16, i, d), d);
    else kst_kv_rows_f32(tmp, K, f16, i, 1, d);
    float s = 0;
    for (size_t j = 0; j < d; j++) s += tmp[j] * tmp[j];
    return s;
}

/* Squared distance between keys a and b (xa: key a as float32). */
static float dist2(const kst_kvg *g, const void *K, int f16, size_t d, const float *xa, uint32_t a,
                   uint32_t b) {
    return g->norm2[a] + g->norm2[b] - 2.0f * kst_kv_dot(xa, nrow(g, K, f16, b, d), f16, d);
}

/* HNSW's neighbour heuristic: from candidates (ids, squared distances to x, nearest first) keep c
 * unless a kept neighbour a is nearer to c than x is; fills up with the skipped nearest when
 * fewer than want/2 survive (so a sparse region still gets edges). Returns the count in out
 * (distances in outd). */
static size_t select_diverse(const kst_kvg *g, const void *K, int f16, size_t d, const uint32_t *cid,
                             const float *cdist, size_t nc, size_t want, uint32_t *out, float *outd,
                             float *rows) {
    /* rows (want * d floats): the kept neighbours' rows in float32, each candidate's converted
     * once (into the next free slot) and compared with them in float32 */
    size_t n = 0;
    for (size_t i = 0; i < nc && n < want; i++) {
        float *xr = rows + n * d;
        if (f16) row_f32(xr, nrow(g, K, f16, cid[i], d), d);
        else memcpy(xr, nrow(g, K, f16, cid[i], d), d * sizeof(float));
        float nx = g->norm2[cid[i]];
        int keep = 1;
        for (size_t j = 0; j < n && keep; j++)
            if (nx + g->norm2[out[j]] - 2.0f * kst_kv_dot(xr, rows + j * d, 0, d) < cdist[i]) keep = 0;
        if (keep) {
            outd[n] = cdist[i];
            out[n++] = cid[i];
        }
    }
    for (size_t i = 0; i < nc && n < want / 2; i++) {
        int have = 0;
        for (size_t j = 0; j < n && !have; j++) have = out[j] == cid[i];
        if (!have) {
            outd[n] = cdist[i];
            out[n++] = cid[i];
        }
    }
    return n;
}

/* Edge a -> x (squared distance dax, -1: kept) in slot j of a: its next free slot (j = deg),
 * or in place of the edge there; the in-degrees follow. */
static void set_edge(kst_kvg *g, uint32_t a, size_t j, uint32_t x, float dax) {
    uint32_t *nb = g->adj + (size_t)a * g->M;
    if (j == g->deg[a]) g->deg[a] = (uint16_t)(j + 1);
    else g->indeg[nb[j]]--;
    nb[j] = x;
    g->adist[(size_t)a * g->M + j] = dax;
    g->indeg[x]++;
}

/* The slot of a that a new edge may take: a free one, else a's farthest key-key edge whose
 * target keeps another edge in and (tree, where given) that no node was reached through;
 * (size_t)-1 where there is none. Kept edges (distance -1) stay. */
static size_t link_slot(const kst_kvg *g, const uint8_t *tree, uint32_t a) {
    const uint32_t *nb = g->adj + (size_t)a * g->M;
    const float *nd = g->adist + (size_t)a * g->M;
    size_t dg = g->deg[a], far = (size_t)-1;
    if (dg < g->M) return dg;
    for (size_t j = 0; j < dg; j++)
        if (nd[j] >= 0 && !(tree && tree[(size_t)a * g->M + j]) && nb[j] < g->n && g->indeg[nb[j]] >= 2 &&
            (far == (size_t)-1 || nd[j] > nd[far]))
            far = j;
    return far;
}

/* Adds edge a -> x (squared distance dax); a full node keeps its nearest: x replaces the
 * farthest replaceable edge when nearer. Kept edges (distance -1: co-retrieval, and each
 * node's first edge in, below) are never replaced, nor an edge that is its target's last one
 * in (round 36 found 74 nodes left with none after 4,096 keys added to a Gemma 3 head's
 * graph). Returns the slot taken, or (size_t)-1. */
static size_t add_back_edge(kst_kvg *g, uint32_t a, uint32_t x, float dax) {
    const uint32_t *nb = g->adj + (size_t)a * g->M;
    for (size_t j = 0; j < g->deg[a]; j++)
        if (nb[j] == x) return (size_t)-1;
    size_t j = link_slot(g, NULL, a);
    if (j == (size_t)-1 || (j < g->deg[a] && dax >= g->adist[(size_t)a * g->M + j])) return (size_t)-1;
    set_edge(g, a, j, x, dax);
    return j;
}

/* Key row i as float32 (F16C where the CPU has it). */
static void key_f32(const kst_kvg *g, float *out, const void *K, int f16, size_t i, size_t d) {
    if (f16) row_f32(out, nrow(g, K, f16, i, d), d);
    else memcpy(out, nrow(g, K, f16, i, d), d * sizeof(float));
}

/* Room for the neighbour selection's float32 rows (M of d). */
static int srow_reserve(kst_kvg_scratch *s, size_t M, size_t d) {
    if (s->srowcap >= M * d) return KST_OK;
    if (kst_realloc((void **)&s->srow, M * d, sizeof(float), "kv insert rows", NULL) != KST_OK) return KST_ERR_NOMEM;
    s->srowcap = M * d;
    return KST_OK;
}

/* Plans the links of node x: diverse near keys among nodes [0, limit) (x and its present
 * neighbours excluded) for its free slots, by key-key search. Reads the graph only, so plans
 * for many nodes can run at once. sel/seld hold M entries; tmp 2 * d floats. Returns the count
 * or (size_t)-1 on memory failure. */
static size_t plan_links(const kst_kvg *g, const void *K, int f16, size_t d, uint32_t x,
                         size_t limit, kst_kvg_scratch *s, uint32_t *sel, float *seld, float *tmp) {
    size_t have = g->deg[x];
    if (have >= g->M || limit == 0) return 0;
    if (srow_reserve(s, g->M, d) != KST_OK) return (size_t)-1;
    float *q = tmp + d;
    key_f32(g, q, K, f16, x, d);
    double tb0 = s->prof ? mono_s() : 0;
    int ic = ins_prepare(g, q, d, s);
    size_t ef = ic ? g->ins_ef : g->efc, ex = ic ? g->ins_ex : g->efc;
    uint32_t c;
    if (ibeam_init(g, K, f16, d, q, ef, limit, s) != KST_OK) {
        s->ic_on = 0;
        return (size_t)-1;
    }
    if (s->ic_tab) ex = g->ins_ext;
    while (ibeam_next(g, K, f16, d, limit, ex, s, &c)) ibeam_expand(g, K, f16, d, q, ef, limit, s, c);
    /* into the candidate heap's own arrays, nearest first */
    uint32_t *cid = s->ci;
    float *cd = s->cs;
    size_t nc = ibeam_end(g, K, f16, d, q, g->norm2[x], s, cid, cd, g->efc);
    double tb1 = s->prof ? mono_s() : 0;
    if (s->prof) s->t_ibeam += tb1 - tb0;
    const uint32_t *nb = g->adj + (size_t)x * g->M;
    size_t m = 0;
    for (size_t i = 0; i < nc; i++) {
        int skip = cid[i] == x;
        for (size_t j = 0; j < have && !skip; j++) skip = nb[j] == cid[i];
        if (!skip) {
            cid[m] = cid[i];
            cd[m++] = cd[i];
        }
    }
    size_t r = select_diverse(g, K, f16, d, cid, cd, m, g->M - have, sel, seld, s->srow);
    if (s->prof) s->t_iselect += mono_s() - tb1;
    return r;
}

/* keep: x's first edge in is kept (keys added after the build; the builds' own linking leaves
 * its back edges replaceable, or later nearer ones could not take their place: freezing them
 * took the synthetic 1M layer's recall@100 from 0.759 to 0.645) */
static void apply_links(kst_kvg *g, uint32_t x, const uint32_t *sel, const float *seld, size_t n, int keep) {
    /* the new neighbours' edge lists and distances, read and changed by the back edges: asked
     * for together (scattered lines across the graph: their latencies overlap) */
    size_t lb = g->M * sizeof(uint32_t);
    for (size_t j = 0; j < n; j++) {
        const char *a = (const char *)(g->adj + (size_t)sel[j] * g->M), *e = (const char *)(g->adist + (size_t)sel[j] * g->M);
        for (size_t o = 0; o < lb; o += 64) {
            __builtin_prefetch(a + o, 1);
            __builtin_prefetch(e + o, 1);
        }
        __builtin_prefetch(g->deg + sel[j], 1);
    }
    int kept = !keep;
    for (size_t j = 0; j < n && g->deg[x] < g->M; j++) {
        size_t dg = g->deg[x];
        int dup = 0;
        for (size_t i = 0; i < dg && !dup; i++) dup = g->adj[(size_t)x * g->M + i] == sel[j];
        if (dup) continue;
        g->adj[(size_t)x * g->M + dg] = sel[j];
        g->adist[(size_t)x * g->M + dg] = seld[j];
        g->deg[x] = (uint16_t)(dg + 1);
        g->indeg[sel[j]]++;
        size_t slot = add_back_edge(g, sel[j], x, seld[j]);
        /* x's first edge in is kept: its neighbours were reached by the plan's beam, so x stays
         * reachable whatever edges later keys take (round 36) */
        if (!kept && slot != (size_t)-1) g->adist[(size_t)sel[j] * g->M + slot] = -1.0f, kept = 1;
    }
    /* every back edge refused (its targets full of nearer or kept edges): x takes the farthest
     * key-key edge of its nearest neighbour that has one to spare, or where none has (each full
     * of kept edges and of its targets' last edges in: 4 of 60 seeds of test_graph_reachable
     * lost their key so) of the first such among the nodes the neighbours' edges reach,
     * breadth-first, at most LINK_REACH looked at (reachable as the neighbours are, and near) */
    enum { LINK_REACH = 256 };
    uint32_t qv[LINK_REACH];
    size_t qn = 0;
    for (size_t j = 0; j < n && !kept && qn < LINK_REACH; j++) qv[qn++] = sel[j];
    for (size_t qh = 0; qh < qn && !kept; qh++) {
        uint32_t a = qv[qh];
        size_t slot = link_slot(g, NULL, a);
        if (slot != (size_t)-1) {
            set_edge(g, a, slot, x, -1.0f), kept = 1;
            break;
        }
        for (size_t e = 0; e < g->deg[a] && qn < LINK_REACH; e++) {
            uint32_t y = g->adj[(size_t)a * g->M + e];
            int seen = y == x || y >= g->n;
            for (size_t i = 0; i < qn && !seen; i++) seen = qv[i] == y;
            if (!seen) qv[qn++] = y;
        }
    }
}

/* Links nodes lo..hi-1 that have free slots, in batches: each batch's plans run in parallel
 * over the graph as it stands (searching nodes below `limit`, or below the batch when limit is
 * 0: incremental growth), then are applied in order. Deterministic for a given thread count's
 * batch size (fixed here). */
static int link_range(kst_kvg *g, const void *K, int f16, size_t d, size_t lo, size_t hi,
                      size_t limit, kst_error *err) {
    int nth = omp_get_max_threads();
    const size_t B = 1024;
    kst_kvg_scratch *sc = kst_calloc((size_t)nth, sizeof *sc, "kv link scratch", err);
    uint32_t *sel = kst_malloc(B, g->M * sizeof(uint32_t), "kv link plans", err);
    float *seld = kst_malloc(B, g->M * sizeof(float), "kv link plans", err);
    size_t *cnt = kst_malloc(B, sizeof(size_t), "kv link plans", err);
    float *tmp = kst_malloc((size_t)nth * 2, d * sizeof(float), "kv link plans", err);
    int rc = KST_OK;
    if (!sc || !sel || !seld || !cnt || !tmp) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    /* Scratch is sized once, outside the parallel loop (the searches then never allocate). */
    for (int t = 0; t < nth && rc == KST_OK; t++) rc = scratch_reserve(&sc[t], g->cap, g->efc, g->M, err);
    if (rc != KST_OK) goto done;
    for (size_t b0 = lo; b0 < hi;) {
        /* Growing graphs: small batches first, so every node sees a graph 8x its batch. */
        size_t lim = limit ? limit : b0;
        size_t nb = limit ? B : (b0 < 64 ? 1 : (b0 / 8 < B ? b0 / 8 : B));
        if (nb > hi - b0) nb = hi - b0;
        int fail = 0;
#pragma omp parallel for schedule(dynamic, 16) if (nb > 16)
        for (size_t i = 0; i < nb; i++) {
            int t = omp_get_thread_num();
            size_t c = plan_links(g, K, f16, d, (uint32_t)(b0 + i), lim, &sc[t],
                                  sel + i * g->M, seld + i * g->M, tmp + (size_t)t * 2 * d);
            if (c == (size_t)-1) {
                fail = 1;
                c = 0;
            }
            cnt[i] = c;
        }
        if (fail) {
            rc = kst_fail(err, KST_ERR_NOMEM, "kv graph: out of memory linking keys");
            goto done;
        }
        for (size_t i = 0; i < nb; i++)
            apply_links(g, (uint32_t)(b0 + i), sel + i * g->M, seld + i * g->M, cnt[i], 0);
        b0 += nb;
    }
done:
    if (sc)
        for (int t = 0; t < nth; t++) kst_kvg_scratch_free(&sc[t]);
    kst_free(sc);
    kst_free(sel);
    kst_free(seld);
    kst_free(cnt);
    kst_free(tmp);
    return rc;
}

static int codes_make(kst_kvg *g, const void *K, int f16, size_t n, size_t d, kst_error *err);
static void code_row(kst_kvg *g, const void *K, int f16, size_t i, size_t d, float *tmp);
/* Marks r and every node it reaches (breadth-first; queue holds the reached nodes, *qt of
 * them); tree marks the edge slots through which a node was first reached. */
static void reach_from(const kst_kvg *g, uint8_t *reach, uint8_t *tree, uint32_t *queue, size_t *qt, uint32_t r) {
    size_t qh = *qt;
    if (reach[r]) return;
    reach[r] = 1;
    queue[(*qt)++] = r;
    while (qh < *qt) {
        uint32_t v = queue[qh++];
        for (size_t j = 0; j < g->deg[v]; j++) {
            uint32_t y = g->adj[(size_t)v * g->M + j];
            if (y < g->n && !reach[y]) reach[y] = 1, tree[(size_t)v * g->M + j] = 1, queue[(*qt)++] = y;
        }
    }
}

/* One pass over the unreachable nodes: each x linked from the nearest reachable node with a
 * slot among its out-neighbours (step 0) or among nodes 0, step, 2 step, ... (the fallback),
 * through which it and what it reaches become reachable. Returns the edges added. */
static size_t reach_pass(kst_kvg *g, const void *K, int f16, size_t d, uint8_t *reach, uint8_t *tree,
                         uint32_t *queue, size_t *qt, size_t step, float *xa) {
    size_t n = g->n, M = g->M, added = 0;
    for (size_t x = 0; x < n && *qt < n; x++) {
        if (reach[x]) continue;
        key_f32(g, xa, K, f16, x, d);
        uint32_t best = UINT32_MAX;
        size_t bslot = 0, m = step ? (n + step - 1) / step : g->deg[x];
        float bd = INFINITY;
        for (size_t c = 0; c < m; c++) {
            uint32_t a = step ? (uint32_t)(c * step) : g->adj[x * M + c];
            if (a >= n || !reach[a]) continue;
            size_t slot = link_slot(g, tree, a);
            if (slot == (size_t)-1) continue;
            float da = !step && g->adist[x * M + c] >= 0 ? g->adist[x * M + c] : dist2(g, K, f16, d, xa, (uint32_t)x, a);
            if (da < bd) bd = da, best = a, bslot = slot;
        }
        if (best == UINT32_MAX) continue;
        set_edge(g, best, bslot, (uint32_t)x, bd);
        tree[(size_t)best * M + bslot] = 1;
        added++;
        reach_from(g, reach, tree, queue, qt, (uint32_t)x);
    }
    return added;
}

/* Reachability repair, for a built graph: makes every node reachable from the entries. A back
 * edge is dropped where its target is full of nearer or co-retrieval edges (add_back_edge), so
 * a node can end with no edge into it, or only edges from nodes no search reaches: no search
 * then ever finds it. On Gemma 3 270M's layer 11 head 1 at 32K, 155 of 31,484 nodes had no
 * edge in; the exact top-100 keys missed for that reason were 1.9%, and recall@100 stayed
 * under 0.96 however wide the search (tests/bench/README.md, round 36). Each unreachable node x gets
 * an edge from its nearest reachable out-neighbour a with a slot (a free one, or a's farthest
 * key-key edge that no node was reached through and whose target has another edge in), and
 * what x reaches becomes reachable with it; nodes with no such neighbour wait for the next
 * pass, or take the nearest of up to 4,096 evenly spaced reachable nodes with a slot (then of
 * all nodes). Fails on memory (graph unchanged). */
static int repair_reach(kst_kvg *g, const void *K, int f16, size_t d, kst_error *err) {
    size_t n = g->n, qt = 0;
    if (n == 0 || g->n_entry == 0) return KST_OK;
    uint8_t *reach = kst_calloc(n, 1, "kv graph reachability", err);
    uint8_t *tree = kst_calloc(n, g->M, "kv graph reachability", err);
    uint32_t *queue = kst_malloc(n, sizeof(uint32_t), "kv graph reachability", err);
    float *xa = kst_malloc(d, sizeof(float), "kv graph reachability", err);
    if (!reach || !tree || !queue || !xa) {
        kst_free(reach), kst_free(tree), kst_free(queue), kst_free(xa);
        return KST_ERR_NOMEM;
    }
    for (size_t e = 0; e < g->n_entry; e++) reach_from(g, reach, tree, queue, &qt, g->entry[e]);
    /* the edges nodes were reached through are never replaced, so a node once reachable stays
     * so; the fallback: up to 4,096 evenly spaced nodes, then every node */
    size_t spaced = n > 4096 ? n / 4096 : 1;
    while (qt < n) {
        size_t a = reach_pass(g, K, f16, d, reach, tree, queue, &qt, 0, xa);
        if (!a) a = reach_pass(g, K, f16, d, reach, tree, queue, &qt, spaced, xa);
        if (!a && spaced > 1) a = reach_pass(g, K, f16, d, reach, tree, queue, &qt, 1, xa);
        if (!a) break; /* (no reachable node has a slot left) */
    }
    /* the edges each node was first reached through are kept from now on (never replaced by a
     * later key's back edge), so the graph stays connected as keys are added */
    for (size_t i = 0; i < n * g->M; i++)
        if (tree[i]) g->adist[i] = -1.0f;
    kst_free(reach), kst_free(tree), kst_free(queue), kst_free(xa);
    return KST_OK;
}


/* Entry points of a key-only graph: evenly spread nodes. */
static void spread_entries(kst_kvg *g) {
    size_t ne = g->max_entry < g->n ? g->max_entry : g->n;
    for (size_t e = 0; e < ne; e++) g->entry[e] = (uint32_t)(e * g->n / ne);
    g->n_entry = ne;
}

int kst_kvg_insert(kst_kvg *g, const void *K, int f16, size_t d, kst_kvg_scratch *s,
                   kst_error *err) {
    if (g->n >= UINT32_MAX - 1)
        return kst_fail(err, KST_ERR_INVALID, "kv graph holds the most keys it can (%zu)", g->n);
    int rc = reserve(g, g->n + 1, err);
    if (rc != KST_OK) return rc;
    rc = scratch_reserve(s, g->cap, g->efc, g->M, err);
    if (rc != KST_OK) return rc;
    float *tmp = kst_malloc(2 * d + 2 * g->M, sizeof(float), "kv insert", err);
    if (!tmp) return KST_ERR_NOMEM;
    uint32_t x = (uint32_t)g->n;
    g->norm2[x] = sqnorm(g, K, f16, x, d, tmp);
    g->deg[x] = 0;
    g->indeg[x] = 0;
    uint32_t *sel = (uint32_t *)(tmp + 2 * d);
    float *seld = tmp + 2 * d + g->M;
    size_t c = plan_links(g, K, f16, d, x, x, s, sel, seld, tmp);
    if (c == (size_t)-1) {
        kst_free(tmp);
        return kst_fail(err, KST_ERR_NOMEM, "kv graph: out of memory linking a key");
    }
    double ta0 = s->prof ? mono_s() : 0;
    apply_links(g, x, sel, seld, c, 1);
    if (g->codes) code_row(g, K, f16, x, d, tmp);
    if (s->prof) s->t_iapply += mono_s() - ta0;
    kst_free(tmp);
    g->n++;
    /* A graph without entry points of its own (key-only, or still small) spreads them anew as
     * it grows; the attention-aware one keeps its hubs. */
    if (!g->hub_entries && g->n_entry < g->max_entry) spread_entries(g);
    return KST_OK;
}

int kst_kvg_reserve(kst_kvg *g, size_t n, kst_error *err) {
    if (n >= UINT32_MAX - 1) return kst_fail(err, KST_ERR_INVALID, "kv graph holds the most keys it can (%zu)", g->n);
    return reserve(g, n, err);
}

int kst_kvg_stage(kst_kvg *g, const void *K, int f16, size_t d, size_t hi, float *tmp, kst_error *err) {
    if (hi >= UINT32_MAX - 1) return kst_fail(err, KST_ERR_INVALID, "kv graph holds the most keys it can (%zu)", g->n);
    int rc = reserve(g, hi, err);
    if (rc != KST_OK) return rc;
    for (size_t x = g->n; x < hi; x++) {
        g->norm2[x] = sqnorm(g, K, f16, x, d, tmp);
        g->deg[x] = 0;
        g->indeg[x] = 0;
    }
    return KST_OK;
}

/* The end of a plan: its beam's candidates (in s) and the batch's nodes before x merged by
 * distance, then the diverse ones kept (tmp: x's row in tmp[d..2d), scratch in tmp[0..d)). */
static size_t plan_end(kst_kvg_plan_item *it, int f16, size_t d, kst_kvg_scratch *s, float *tmp) {
    const kst_kvg *g = it->g;
    const void *K = it->K;
    uint32_t x = it->x;
    size_t limit = it->limit;
    size_t nc = ibeam_end(g, K, f16, d, tmp + d, it->norm2, s, s->ci, s->cs, g->efc), m = 0;
    uint32_t *cid = s->ci;
    float *cd = s->cs;
    for (size_t i = 0; i < nc; i++)
        if (cid[i] != x) {
            cid[m] = cid[i];
            cd[m++] = cd[i];
        }
    /* the batch's nodes before x (up to 64 of them), not linked yet (their norms staged): merged
     * into the candidates by distance, as if inserted one by one; the nearest efc kept */
    size_t b0 = x - limit > 64 ? x - 64 : limit;
    for (size_t y = b0; y < x && m < s->ccap; y++) {
        float dy = it->norm2 + g->norm2[y] - 2.0f * kst_kv_dot(tmp + d, nrow(g, K, f16, y, d), f16, d);
        size_t i = m++;
        for (; i > 0 && cd[i - 1] > dy; i--) {
            cd[i] = cd[i - 1];
            cid[i] = cid[i - 1];
        }
        cd[i] = dy;
        cid[i] = (uint32_t)y;
    }
    if (m > g->efc) m = g->efc;
    return select_diverse(g, K, f16, d, cid, cd, m, g->M, it->sel, it->seld, s->srow);
}

void kst_kvg_plan_multi(kst_kvg_plan_item *it, size_t np, int f16, size_t d, kst_kvg_scratch **s,
                        float **tmp) {
    uint32_t c[KST_KVG_PLAN_MAX];
    size_t ef[KST_KVG_PLAN_MAX], ex[KST_KVG_PLAN_MAX];
    int on[KST_KVG_PLAN_MAX];
    size_t live = 0;
    double t0 = np && s[0]->prof ? mono_s() : 0;
    for (size_t i = 0; i < np && i < KST_KVG_PLAN_MAX; i++) {
        /* the new node's norm was staged and its edges are not read (x >= g->n, no search
         * reaches it): a plan reads the graph only */
        it[i].norm2 = it[i].g->norm2[it[i].x];
        it[i].count = 0;
        on[i] = 0;
        if (it[i].limit == 0) continue;
        key_f32(it[i].g, tmp[i] + d, it[i].K, f16, it[i].x, d);
        int ic = ins_prepare(it[i].g, tmp[i] + d, d, s[i]);
        ef[i] = ic ? it[i].g->ins_ef : it[i].g->efc;
        ex[i] = ic ? it[i].g->ins_ex : it[i].g->efc;
        if (srow_reserve(s[i], it[i].g->M, d) != KST_OK ||
            ibeam_init(it[i].g, it[i].K, f16, d, tmp[i] + d, ef[i], it[i].limit, s[i]) != KST_OK) {
            s[i]->ic_on = 0;
            it[i].count = (size_t)-1;
            continue;
        }
        if (s[i]->ic_tab) ex[i] = it[i].g->ins_ext;
        on[i] = 1;
        live++;
    }
    if (np > KST_KVG_PLAN_MAX) np = KST_KVG_PLAN_MAX;
    while (live) {
        for (size_t i = 0; i < np; i++)
            if (on[i] && !ibeam_next(it[i].g, it[i].K, f16, d, it[i].limit, ex[i], s[i], &c[i])) {
                on[i] = 0;
                live--;
                it[i].count = plan_end(&it[i], f16, d, s[i], tmp[i]);
            }
        for (size_t i = 0; i < np; i++)
            if (on[i]) ibeam_expand(it[i].g, it[i].K, f16, d, tmp[i] + d, ef[i], it[i].limit, s[i], c[i]);
    }
    if (np && s[0]->prof) s[0]->t_ibeam += mono_s() - t0;
}

void kst_kvg_link(kst_kvg *g, const void *K, int f16, size_t d, uint32_t x, const uint32_t *sel,
                  const float *seld, size_t n, float *tmp) {
    apply_links(g, x, sel, seld, n, 1);
    if (g->codes) code_row(g, K, f16, x, d, tmp);
    if (x >= g->n) g->n = (size_t)x + 1;
    if (!g->hub_entries && g->n_entry < g->max_entry) spread_entries(g);
}

int kst_kvg_build_keys(kst_kvg *g, const void *K, int f16, size_t n, size_t d, kst_error *err) {
    if (g->n != 0) return kst_fail(err, KST_ERR_MISUSE, "kv graph: build on a non-empty graph");
    int rc = reserve(g, n ? n : 1, err);
    float *tmp = rc == KST_OK ? kst_malloc(d, sizeof(float), "kv build", err) : NULL;
    if (rc == KST_OK && !tmp) rc = KST_ERR_NOMEM;
    if (rc == KST_OK) {
        for (size_t i = 0; i < n; i++) {
            g->norm2[i] = sqnorm(g, K, f16, i, d, tmp);
            g->deg[i] = 0;
            g->indeg[i] = 0;
        }
        g->n = n;
        /* entries: the first node while the graph grows from nothing */
        g->n_entry = 1;
        g->entry[0] = 0;
        rc = link_range(g, K, f16, d, 0, n, 0, err);
        if (rc == KST_OK) rc = codes_make(g, K, f16, n, d, err);
    }
    kst_free(tmp);
    if (rc == KST_OK) spread_entries(g);
    if (rc != KST_OK) {
        size_t M = g->M, me = g->max_entry, efc = g->efc;
        kst_kvg_free(g);
        kst_kvg_init(g, M, me, efc, NULL);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* exact top-k (the attention-aware build's ground truth) */

int kst_kvg_exact_topk(const void *K, int f16, size_t n, size_t d, const float *Q, size_t nq,
                       size_t k, uint32_t *ids, float *scores, kst_error *err) {
    if (k == 0 || k > n)
        return kst_fail(err, KST_ERR_INVALID, "exact top-k: k = %zu with %zu keys", k, n);
#ifdef KST_CUDA
    /* On a GPU: cuBLAS scores and a block-per-query selection (index/kv_cuda.cu). */
    if (k <= 64 && kst_kv_cuda_devices() > 0) {
        float *kf32 = NULL;
        const float *Kf = K;
        if (f16) {
            kf32 = kst_malloc(n, d * sizeof(float), "top-k keys as float32", err);
            if (!kf32) return KST_ERR_NOMEM;
            kst_kv_rows_f32(kf32, K, 1, 0, n, d);
            Kf = kf32;
        }
        int r = kst_kv_cuda_topk(Kf, n, d, Q, nq, k, ids, err);
        if (r == KST_OK && scores)
            for (size_t i = 0; i < nq * k; i++)
                scores[i] = kst_kv_dot(Q + (i / k) * d, krow(K, f16, ids[i], d), f16, d);
        kst_free(kf32);
        return r;
    }
#endif
    const size_t QB = 256, KB = 8192;
    size_t kb = KB < n ? KB : n;
    float *S = kst_malloc(QB * kb, sizeof(float), "top-k score block", err);
    float *kf = f16 ? kst_malloc(kb * d, sizeof(float), "top-k key block", err) : NULL;
    float *hs = kst_malloc(QB * k, sizeof(float), "top-k heaps", err);
    uint32_t *hi = kst_malloc(QB * k, sizeof(uint32_t), "top-k heaps", err);
    size_t *hn = kst_malloc(QB, sizeof(size_t), "top-k heaps", err);
    int rc = KST_OK;
    if (!S || (f16 && !kf) || !hs || !hi || !hn) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t q0 = 0; q0 < nq; q0 += QB) {
        size_t qb = nq - q0 < QB ? nq - q0 : QB;
        memset(hn, 0, qb * sizeof *hn);
        for (size_t k0 = 0; k0 < n; k0 += kb) {
            size_t m = n - k0 < kb ? n - k0 : kb;
            const float *Kb;
            if (f16) {
                kst_kv_rows_f32(kf, K, 1, k0, m, d);
                Kb = kf;
            } else {
                Kb = (const float *)K + k0 * d;
            }
            /* S (qb, m) = Q (qb, d) @ Kb (m, d)^T */
            kst_sgemm(0, 1, (int)qb, (int)m, (int)d, 1.0f, Q + q0 * d, (int)d, Kb, (int)d, 0.0f, S,
                      (int)m);
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < qb; i++) {
                float *s = hs + i * k;
                uint32_t *x = hi + i * k;
                const float *row = S + i * m;
                for (size_t j = 0; j < m; j++) {
                    if (hn[i] < k) heap_push(s, x, &hn[i], row[j], (uint32_t)(k0 + j), 0);
                    else if (row[j] > s[0]) {
                        heap_pop(s, x, &hn[i], 0);
                        heap_push(s, x, &hn[i], row[j], (uint32_t)(k0 + j), 0);
                    }
                }
            }
        }
        for (size_t i = 0; i < qb; i++) {
            float *s = hs + i * k;
            uint32_t *x = hi + i * k;
            for (size_t j = k; j-- > 0;) {
                ids[(q0 + i) * k + j] = x[0];
                if (scores) scores[(q0 + i) * k + j] = s[0];
                heap_pop(s, x, &hn[i], 0);
            }
        }
    }
done:
    kst_free(S);
    kst_free(kf);
    kst_free(hs);
    kst_free(hi);
    kst_free(hn);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* attention-aware build */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct cand { uint32_t id, count; float dist; } cand;

static int cmp_cand(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return x->dist < y->dist ? -1 : x->dist > y->dist;
}

/* The share of the queries pk names whose best key holds at least half of the softmax mass of
 * their top T (sc: their exact scores, best first). */
static float peaked_share(const float *sc, size_t nq, size_t T, const kst_kvg_peaks *pk) {
    size_t step = pk->step ? pk->step : 1, m = 0, hit = 0;
    for (size_t q = pk->from; q < nq; q += step, m++) {
        const float *s = sc + q * T;
        double z = 0; /* sum of exp(scale (s_j - s_0)): the best key's share is 1 / z */
        for (size_t j = 0; j < T; j++) z += exp((double)pk->scale * ((double)s[j] - (double)s[0]));
        hit += 1.0 / z >= 0.5;
    }
    return m ? (float)((double)hit / (double)m) : -1.0f;
}

int kst_kvg_build_attn(kst_kvg *g, const void *K, int f16, size_t n, size_t d, const float *Q,
                       size_t nq, size_t T, const kst_kvg_peaks *pk, kst_error *err) {
    if (g->n != 0) return kst_fail(err, KST_ERR_MISUSE, "kv graph: build on a non-empty graph");
    if (n == 0) return KST_OK;
    if (T > n) T = n;
    if (T < 2) T = n < 2 ? n : 2;
    int rc = reserve(g, n, err);
    if (rc != KST_OK) return rc;
    uint32_t *top = NULL, *hits = NULL;
    uint64_t *edges = NULL;
    cand *cs = NULL;
    float *tmp = NULL, *tsc = NULL;
    kst_kvg_scratch s = {0};
    top = kst_malloc(nq ? nq * T : 1, sizeof *top, "prefill queries' top keys", err);
    if (pk && nq && !(tsc = kst_malloc(nq * T, sizeof *tsc, "prefill queries' top scores", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    hits = kst_calloc(n, sizeof *hits, "key retrieval counts", err);
    size_t ne_max = nq * (T - 1) * 4;
    edges = kst_malloc(ne_max ? ne_max : 1, sizeof *edges, "co-retrieval edges", err);
    tmp = kst_malloc(d, sizeof *tmp, "kv build", err);
    if (!top || !hits || !edges || !tmp) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) g->norm2[i] = sqnorm(g, K, f16, i, d, tmp);
    if (nq) KST_TRY(kst_kvg_exact_topk(K, f16, n, d, Q, nq, T, top, tsc, err));
    if (tsc) {
        g->peaked = peaked_share(tsc, nq, T, pk);
        kst_free(tsc);
        tsc = NULL;
    }
    /* Keys retrieved by one query are linked: the best to each other and back (a star), and
     * each to the next in the list (a chain), so a search that reaches any of them reaches all. */
    size_t ne = 0;
    for (size_t q = 0; q < nq; q++) {
        const uint32_t *l = top + q * T;
        for (size_t j = 0; j < T; j++) hits[l[j]]++;
        for (size_t j = 1; j < T; j++) {
            edges[ne++] = (uint64_t)l[0] << 32 | l[j];
            edges[ne++] = (uint64_t)l[j] << 32 | l[0];
            edges[ne++] = (uint64_t)l[j - 1] << 32 | l[j];
            edges[ne++] = (uint64_t)l[j] << 32 | l[j - 1];
        }
    }
    qsort(edges, ne, sizeof *edges, cmp_u64);
    size_t ccap = 0;
    for (size_t i = 0; i < ne;) {
        uint32_t src = (uint32_t)(edges[i] >> 32);
        size_t j = i, nc = 0;
        while (j < ne && (uint32_t)(edges[j] >> 32) == src) j++;
        if (j - i > ccap) {
            ccap = j - i;
            cand *c2 = cs;
            if (kst_realloc((void **)&c2, ccap, sizeof *cs, "kv build candidates", err) != KST_OK) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            cs = c2;
        }
        kst_kv_rows_f32(tmp, K, f16, src, 1, d);
        for (size_t e = i; e < j;) {
            uint32_t dst = (uint32_t)edges[e];
            size_t f = e;
            while (f < j && (uint32_t)edges[f] == dst) f++;
            if (dst != src) {
                cs[nc].id = dst;
                cs[nc].count = (uint32_t)(f - e);
                cs[nc].dist = dist2(g, K, f16, d, tmp, src, dst);
                nc++;
            }
            e = f;
        }
        qsort(cs, nc, sizeof *cs, cmp_cand);
        /* A quarter of the slots stay free for key-key edges (below). */
        size_t M1 = g->M - g->M / 4;
        size_t dg = nc < M1 ? nc : M1;
        for (size_t e = 0; e < dg; e++) {
            g->adj[(size_t)src * g->M + e] = cs[e].id;
            g->adist[(size_t)src * g->M + e] = -1.0f; /* co-retrieval: kept */
            g->indeg[cs[e].id]++;
        }
        g->deg[src] = (uint16_t)dg;
        i = j;
    }
    /* Entry points: the keys most queries retrieved (ties: lower position). */
    size_t nent = 0;
    for (size_t i = 0; i < n; i++) {
        if (!hits[i]) continue;
        if (nent < g->max_entry) {
            g->entry[nent++] = (uint32_t)i;
        } else {
            size_t lo = 0;
            for (size_t e = 1; e < nent; e++)
                if (hits[g->entry[e]] < hits[g->entry[lo]]) lo = e;
            if (hits[i] > hits[g->entry[lo]]) g->entry[lo] = (uint32_t)i;
        }
    }
    g->n_entry = nent;
    g->n = n;
    g->hub_entries = nent > 0;
    if (nent == 0) spread_entries(g);
    /* Connectivity (RoarGraph's enhancement step): every key's free slots get diverse near keys
     * by key-key search, in order; keys no query retrieved get all their edges this way. Without
     * it recall stalled near 0.98 on real heads (co-retrieval clusters left unreachable). */
    KST_TRY(link_range(g, K, f16, d, 0, n, n, err));
    if (g->repair) KST_TRY(repair_reach(g, K, f16, d, err));
    KST_TRY(codes_make(g, K, f16, n, d, err));
done:
    kst_free(top);
    kst_free(hits);
    kst_free(edges);
    kst_free(cs);
    kst_free(tmp);
    kst_free(tsc);
    kst_kvg_scratch_free(&s);
    if (rc != KST_OK) {
        size_t M = g->M, me = g->max_entry, efc = g->efc;
        kst_kvg_free(g);
        kst_kvg_init(g, M, me, efc, NULL);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* node order (kv_graph.h) */

int kst_kvg_order(kst_kvg *g, const void *K, int f16, size_t d, size_t C, kst_error *err) {
    size_t n = g->n, M = g->M, cap = g->cap, cb = g->codes ? g->cd / 2 : 0;
    if (g->nperm) return kst_fail(err, KST_ERR_MISUSE, "kv graph: its nodes were ordered already");
    if (n < 2 || C < 2) return KST_OK;
    kst_kvtc T = {0};
    int rc = kst_kvtc_build(&T, K, f16, n, d, C, 0x6f72646572ull, err);
    if (rc != KST_OK) return rc;
    uint32_t *bfs = kst_malloc(n, sizeof(uint32_t), "kv graph order", err);
    uint32_t *old_of = kst_malloc(n, sizeof(uint32_t), "kv graph order", err);
    uint32_t *new_of = kst_malloc(n, sizeof(uint32_t), "kv graph order", err);
    size_t *start = kst_calloc(T.C + 1, sizeof(size_t), "kv graph order", err);
    /* the clusters kept for the probe (kst_kvg.pc_*: with codes; not past KST_KVG_PROBE_MAX) */
    int keep_pc = cb && g->cd == d && T.C <= KST_KVG_PROBE_MAX;
    uint32_t *pc_at = keep_pc ? kst_malloc(T.C + 1, sizeof(uint32_t), "kv graph order", err) : NULL;
    uint8_t *pc_codes = keep_pc ? kst_malloc(T.C, cb, "kv graph order", err) : NULL;
    const size_t pc_nb = (T.C + 15) / 16;
    uint8_t *pc_tab = keep_pc ? kst_malloc_aligned(1, pc_nb * (d / 8) * 64, 64, "kv graph order", err) : NULL;
    uint32_t *pc_tid = keep_pc ? kst_malloc(pc_nb * 16, sizeof(uint32_t), "kv graph order", err) : NULL;
    uint32_t *adj = NULL;
    uint16_t *deg = NULL;
    uint32_t *indeg = NULL;
    float *adist = NULL, *norm2 = NULL;
    uint8_t *codes = NULL;
    if (!bfs || !old_of || !new_of || !start || (keep_pc && (!pc_at || !pc_codes || !pc_tab || !pc_tid))) goto nomem;
    /* breadth-first from the entries (new_of: visited), then from each node not reached */
    memset(new_of, 0xff, n * sizeof(uint32_t));
    size_t head = 0, tail = 0;
    for (size_t e = 0; e < g->n_entry + n; e++) {
        uint32_t r = e < g->n_entry ? g->entry[e] : (uint32_t)(e - g->n_entry);
        if (r >= n || new_of[r] != UINT32_MAX) continue;
        new_of[r] = 0;
        bfs[tail++] = r;
        while (head < tail) {
            uint32_t x = bfs[head++];
            for (size_t j = 0; j < g->deg[x]; j++) {
                uint32_t y = g->adj[(size_t)x * M + j];
                if (y < n && new_of[y] == UINT32_MAX) new_of[y] = 0, bfs[tail++] = y;
            }
        }
    }
    /* by cluster, breadth-first within (a counting sort) */
    for (size_t i = 0; i < n; i++) start[T.of[i] + 1]++;
    for (size_t c = 0; c < T.C; c++) start[c + 1] += start[c];
    for (size_t i = 0; i < n; i++) {
        uint32_t x = bfs[i];
        old_of[start[T.of[x]]++] = x;
    }
    for (size_t i = 0; i < n; i++) new_of[old_of[i]] = (uint32_t)i;
    if (kst_kvg_grow_big((void **)&adj, 0, cap * M * sizeof(uint32_t), "kv graph order", err) ||
        kst_kvg_grow_big((void **)&deg, 0, cap * sizeof(uint16_t), "kv graph order", err) ||
        (cb && kst_kvg_grow_big((void **)&codes, 0, cap * cb, "kv graph order", err)))
        goto nomem;
    adist = kst_malloc(cap, M * sizeof(float), "kv graph order", err);
    norm2 = kst_malloc(cap, sizeof(float), "kv graph order", err);
    indeg = kst_calloc(cap, sizeof(uint32_t), "kv graph order", err);
    if (!adist || !norm2 || !indeg) goto nomem;
    for (size_t i = 0; i < n; i++) {
        size_t o = old_of[i];
        deg[i] = g->deg[o];
        norm2[i] = g->norm2[o];
        indeg[i] = g->indeg[o];
        for (size_t j = 0; j < M; j++) {
            uint32_t y = g->adj[o * M + j];
            adj[i * M + j] = j < g->deg[o] && y < n ? new_of[y] : y;
        }
        memcpy(adist + i * M, g->adist + o * M, M * sizeof(float));
        if (cb) memcpy(codes + i * cb, g->codes + o * cb, cb);
    }
    for (size_t e = 0; e < g->n_entry; e++) g->entry[e] = new_of[g->entry[e]];
    kst_free(g->adj);
    kst_free(g->deg);
    kst_free(g->adist);
    kst_free(g->norm2);
    kst_free(g->indeg);
    g->adj = adj;
    g->deg = deg;
    g->adist = adist;
    g->norm2 = norm2;
    g->indeg = indeg;
    if (cb) {
        kst_free(g->codes);
        g->codes = codes;
    }
    g->row_of = old_of;
    g->nperm = n;
    if (keep_pc) { /* (start[c]: now cluster c's end) */
        pc_at[0] = 0;
        memset(pc_tab, 0, pc_nb * (d / 8) * 64);
        for (size_t c = 0; c < pc_nb * 16; c++) {
            pc_tid[c] = (uint32_t)(c < T.C ? c : T.C - 1); /* (padding: masked out) */
            if (c >= T.C) continue;
            pc_at[c + 1] = (uint32_t)start[c];
            code_vec(g, T.cent + c * d, pc_codes + c * cb);
            table_put(pc_tab, c, pc_codes + c * cb, d);
        }
        g->pc_at = pc_at;
        g->pc_codes = pc_codes;
        g->pc_tab = pc_tab;
        g->pc_tid = pc_tid;
        g->pc_n = T.C;
    }
    if (g->et_n && kst_kvg_entry_table(g, g->et_n, NULL) != KST_OK) kst_kvg_entry_table(g, 0, NULL);
    kst_free(bfs);
    kst_free(new_of);
    kst_free(start);
    kst_kvtc_free(&T);
    return KST_OK;
nomem:
    kst_free(bfs);
    kst_free(old_of);
    kst_free(new_of);
    kst_free(start);
    kst_free(pc_at);
    kst_free(pc_codes);
    kst_free(pc_tab);
    kst_free(pc_tid);
    kst_free(adj);
    kst_free(deg);
    kst_free(adist);
    kst_free(norm2);
    kst_free(indeg);
    kst_free(codes);
    kst_kvtc_free(&T);
    return kst_fail(err, KST_ERR_NOMEM, "kv graph: out of memory ordering %zu nodes", n);
}

/* ------------------------------------------------------------------------------------------ */
/* 4-bit codes and the group search */

size_t kst_kvg_code_bytes(const kst_kvg *g) {
    size_t et = (g->et_n + 15) / 16 * 16;
    return (g->codes ? g->cap * g->cd / 2 + 2 * g->cd * sizeof(float) : 0) + et * (g->cd / 2 + sizeof(uint32_t));
}

/* Code (0..15) of dimension x in a key's code bytes (layout: kst_kvg). */
static inline unsigned code_nibble(const uint8_t *c, size_t x) {
    return (unsigned)(c[x / 32 * 16 + x % 16] >> (x % 32 >= 16 ? 4 : 0)) & 15u;
}

/* Puts the codes c (a key's layout, d / 2 bytes) as item e of a scoring table (kst_kvg.et_codes'
 * layout: 16 items to a 64-byte line per 8 dimensions). */
static void table_put(uint8_t *tc, size_t e, const uint8_t *c, size_t d) {
    const size_t L = d / 8;
    uint8_t *blk = tc + e / 16 * L * 64 + 4 * (e % 16);
    for (size_t j = 0; j < L; j++)
        for (size_t t = 0; t < 4; t++)
            blk[j * 64 + t] = (uint8_t)(code_nibble(c, 8 * j + t) | code_nibble(c, 8 * j + 4 + t) << 4);
}

int kst_kvg_entry_table(kst_kvg *g, size_t n, kst_error *err) {
    kst_free(g->et_id);
    kst_free(g->et_codes);
    g->et_id = NULL;
    g->et_codes = NULL;
    g->et_n = g->et_at = 0;
    if (n > g->n) n = g->n;
    if (n == 0 || !g->codes || g->cd == 0 || g->cd % 32 != 0) return KST_OK;
    size_t d = g->cd, nb = (n + 15) / 16, L = d / 8;
    uint32_t *id = kst_malloc(nb * 16, sizeof(uint32_t), "kv entry table", err);
    uint8_t *tc = kst_malloc_aligned(1, nb * L * 64, 64, "kv entry table", err);
    if (!id || !tc) {
        kst_free(id);
        kst_free(tc);
        return KST_ERR_NOMEM;
    }
    memset(tc, 0, nb * L * 64);
    for (size_t e = 0; e < nb * 16; e++) {
        if (e >= n) {
            id[e] = id[n - 1]; /* padding, never kept (masked out) */
            continue;
        }
        uint32_t x = (uint32_t)((uint64_t)e * g->n / n);
        id[e] = x;
        table_put(tc, e, g->codes + (size_t)x * (d / 2), d);
    }
    g->et_id = id;
    g->et_codes = tc;
    g->et_n = n;
    g->et_at = g->n;
    return KST_OK;
}

static uint8_t code_of(float x, float lo, float step) {
    if (!(step > 0)) return 0;
    float c = floorf((x - lo) / step);
    return (uint8_t)(c < 0 ? 0 : c > 15 ? 15 : c);
}

/* The codes (d / 2 bytes at c) of the d-vector x, by the graph's ranges (d = g->cd). */
static void code_vec(const kst_kvg *g, const float *x, uint8_t *c) {
    for (size_t b = 0; b < g->cd; b += 32)
        for (size_t j = 0; j < 16; j++)
            c[b / 2 + j] = (uint8_t)(code_of(x[b + j], g->clo[b + j], g->cstep[b + j]) |
                                     code_of(x[b + 16 + j], g->clo[b + 16 + j], g->cstep[b + 16 + j]) << 4);
}

/* Codes of key row i (tmp: d floats). */
static void code_row(kst_kvg *g, const void *K, int f16, size_t i, size_t d, float *tmp) {
    key_f32(g, tmp, K, f16, i, d);
    code_vec(g, tmp, g->codes + i * (d / 2));
}

/* After a build of n keys: the per-dimension ranges, then every key's codes. A no-op unless
 * codes_on, d a multiple of 32 and n > 0. */
static int codes_make(kst_kvg *g, const void *K, int f16, size_t n, size_t d, kst_error *err) {
    if (!g->codes_on || d % 32 != 0 || n == 0) return KST_OK;
    g->cd = d;
    g->clo = kst_malloc(d, 2 * sizeof(float), "kv graph code ranges", err);
    if (kst_kvg_grow_big((void **)&g->codes, 0, g->cap * (d / 2), "kv graph codes", err)) g->codes = NULL;
    float *tmp = kst_malloc(d, sizeof(float), "kv graph codes", err);
    if (!g->clo || !g->codes || !tmp) {
        kst_free(tmp);
        return KST_ERR_NOMEM;
    }
    g->cstep = g->clo + d;
    float *hi = g->cstep;
    for (size_t j = 0; j < d; j++) {
        g->clo[j] = INFINITY;
        hi[j] = -INFINITY;
    }
    for (size_t i = 0; i < n; i++) {
        kst_kv_rows_f32(tmp, K, f16, i, 1, d);
        for (size_t j = 0; j < d; j++) {
            if (tmp[j] < g->clo[j]) g->clo[j] = tmp[j];
            if (tmp[j] > hi[j]) hi[j] = tmp[j];
        }
    }
    for (size_t j = 0; j < d; j++) g->cstep[j] = (hi[j] - g->clo[j]) / 16.0f;
    for (size_t i = 0; i < n; i++) code_row(g, K, f16, i, d, tmp);
    kst_free(tmp);
    return KST_OK;
}

int kst_kvg_make_codes(kst_kvg *g, const void *K, int f16, size_t d, kst_error *err) {
    kst_free(g->codes);
    kst_free(g->clo);
    g->codes = NULL;
    g->clo = g->cstep = NULL;
    g->cd = 0;
    int rc = codes_make(g, K, f16, g->n, d, err);
    if (rc != KST_OK) {
        kst_free(g->codes);
        kst_free(g->clo);
        g->codes = NULL;
        g->clo = g->cstep = NULL;
        g->cd = 0;
    }
    return rc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx2"))) static void decode_avx2(float *x, const uint8_t *c, size_t d) {
    const __m128i m = _mm_set1_epi8(0x0F);
    for (size_t b = 0; b < d; b += 32) {
        __m128i v = _mm_loadu_si128((const __m128i *)(c + b / 2));
        __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_storeu_ps(x + b, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)));
        _mm256_storeu_ps(x + b + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))));
        _mm256_storeu_ps(x + b + 16, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)));
        _mm256_storeu_ps(x + b + 24, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
    }
}

/* <co, code values> for one key, decoded in registers (two FMA chains). */
__attribute__((target("avx2,fma"))) static float code_dot_avx2(const float *co, const uint8_t *c, size_t d) {
    const __m128i m = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (size_t b = 0; b < d; b += 32) {
        __m128i v = _mm_loadu_si128((const __m128i *)(c + b / 2));
        __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(co + b), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(co + b + 8),
                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), a1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(co + b + 16), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(co + b + 24),
                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static void row_f32_avx2(float *x, const void *row, size_t d) {
    const uint16_t *r = row;
    size_t i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))));
    for (; i < d; i++) x[i] = kst_f16_to_f32(r[i]);
}
#endif

/* What this CPU runs of the kernels below, probed once (a race only stores the same value). */
enum { CPU_AVX2_FMA = 1, CPU_VNNI = 2 };
static int cpu_features(void) {
    static int v = -1;
    if (v < 0) {
        int f = 0;
#if defined(__x86_64__) && defined(__GNUC__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= CPU_AVX2_FMA;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            f |= CPU_VNNI;
#endif
        v = f;
    }
    return v;
}
static int cpu_avx2_fma(void) { return (cpu_features() & CPU_AVX2_FMA) != 0; }
static int cpu_vnni(void) { return (cpu_features() & CPU_VNNI) != 0; }

/* A float16 row as float32. */
static void row_f32(float *x, const void *row, size_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_avx2_fma()) {
        row_f32_avx2(x, row, d);
        return;
    }
#endif
    kst_kv_rows_f32(x, row, 1, 0, 1, d);
}

/* Code values (0..15, as floats) of one key. */
static void decode_row(float *x, const uint8_t *c, size_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_avx2_fma()) {
        decode_avx2(x, c, d);
        return;
    }
#endif
    for (size_t b = 0; b < d; b += 32)
        for (size_t j = 0; j < 16; j++) {
            x[b + j] = (float)(c[b / 2 + j] & 15);
            x[b + 16 + j] = (float)(c[b / 2 + j] >> 4);
        }
}

static float code_dot(const float *co, const uint8_t *c, size_t d) {
#if defined(__x86_64__) && defined(__GNUC__)
    return code_dot_avx2(co, c, d);
#else
    (void)co; (void)c; (void)d;
    return 0; /* not reached: fused only where cpu_avx2_fma() */
#endif
}

/* Integer code scores (AVX-512 VNNI): the query's code coefficients rounded to int8 (qlo: the
 * low nibbles' dimensions in the codes' byte order, qhi: the high ones'), so that one vpdpbusd
 * multiplies 64 codes by their coefficients and adds them in fours: <qi, codes> in int32.
 * The rounding (a step of max|coefficient| / 127) is ~10x below the codes' own. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static inline int32_t
code_dot_vnni(const int8_t *qlo, const int8_t *qhi, const uint8_t *c, size_t d) {
    size_t nb = d / 2, i = 0;
    int32_t s = 0;
    if (nb >= 64) {
        const __m512i m = _mm512_set1_epi8(0x0F);
        __m512i acc = _mm512_setzero_si512();
        for (; i + 64 <= nb; i += 64) {
            __m512i v = _mm512_loadu_si512((const void *)(c + i));
            __m512i lo = _mm512_and_si512(v, m), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
            acc = _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512((const void *)(qlo + i)));
            acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512((const void *)(qhi + i)));
        }
        s = _mm512_reduce_add_epi32(acc);
    }
    if (i < nb) { /* the remaining 32-dimension blocks, 16 bytes each */
        const __m128i m = _mm_set1_epi8(0x0F);
        __m128i acc = _mm_setzero_si128();
        for (; i < nb; i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(c + i));
            __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
            acc = _mm_dpbusd_epi32(acc, lo, _mm_loadu_si128((const __m128i *)(qlo + i)));
            acc = _mm_dpbusd_epi32(acc, hi, _mm_loadu_si128((const __m128i *)(qhi + i)));
        }
        acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4E));
        acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xB1));
        s += _mm_cvtsi128_si32(acc);
    }
    return s;
}
#endif

/* The query's coefficients co (d) as int8 in the codes' nibble order (qlo, qhi: d / 2 each);
 * returns the scale. */
static float quantize_coefs(const float *co, size_t d, int8_t *qlo, int8_t *qhi) {
    float mx = 0;
    for (size_t j = 0; j < d; j++) mx = fabsf(co[j]) > mx ? fabsf(co[j]) : mx;
    float sc = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / sc;
    for (size_t b = 0; b < d; b += 32)
        for (size_t j = 0; j < 16; j++) {
            qlo[b / 2 + j] = (int8_t)lrintf(co[b + j] * inv);
            qhi[b / 2 + j] = (int8_t)lrintf(co[b + 16 + j] * inv);
        }
    return sc;
}

static int ins_prepare(const kst_kvg *g, const float *q, size_t d, kst_kvg_scratch *s) {
    s->ic_on = 0;
    if (!g->ins_codes || !g->codes || g->cd != d || d % 32 != 0 || !cpu_avx2_fma()) return 0;
    size_t need = d + d / 4; /* the coefficients, then d int8 (qlo, qhi) */
    if (s->iccap < need) {
        if (kst_realloc((void **)&s->ic, need, sizeof(float), "kv insert codes", NULL) != KST_OK) return 0;
        s->iccap = need;
    }
    double c0 = 0;
    for (size_t j = 0; j < d; j++) {
        s->ic[j] = q[j] * g->cstep[j];
        c0 += (double)q[j] * (g->clo[j] + 0.5 * g->cstep[j]);
    }
    s->ic_c0 = (float)c0;
    s->ic_vnni = cpu_vnni() && !s->no_vnni;
    if (s->ic_vnni) {
        int8_t *q8 = (int8_t *)(s->ic + d);
        s->ic_sc = quantize_coefs(s->ic, d, q8, q8 + d / 2);
    }
    s->ic_on = 1;
    return 1;
}

static float ins_code_dot(const kst_kvg *g, const kst_kvg_scratch *s, uint32_t x, size_t d) {
    const uint8_t *c = g->codes + (size_t)x * (d / 2);
#if defined(__x86_64__) && defined(__GNUC__)
    if (s->ic_vnni) {
        const int8_t *q8 = (const int8_t *)(s->ic + d);
        return s->ic_c0 + s->ic_sc * (float)code_dot_vnni(q8, q8 + d / 2, c, d);
    }
#endif
    return s->ic_c0 + code_dot(s->ic, c, d);
}

/* Keeps (v, x) among the best `keep` of (tv, tx) (sorted descending, *nt of them). */
static inline void top_insert(float *tv, uint32_t *tx, size_t *nt, size_t keep, float v, uint32_t x) {
    if (*nt == keep && !(v > tv[keep - 1])) return;
    size_t j = *nt < keep ? (*nt)++ : keep - 1;
    while (j > 0 && tv[j - 1] < v) {
        tv[j] = tv[j - 1];
        tx[j] = tx[j - 1];
        j--;
    }
    tv[j] = v;
    tx[j] = x;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The entry table's nodes scored for one query by AVX-512 VNNI, 16 at a time (one int32 lane
 * per node; w8: the query's int8 code coefficients in dimension order, so that one 32-bit
 * broadcast holds the 4 of the dimensions a table byte lane carries), each score
 * c0 + qsc * <w8, codes> as kst_kvg_search_multi scores a code; the best `keep` join (tv, tx). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void
table_best(const uint8_t *tab, const uint32_t *tid, size_t tn, size_t cd, const int8_t *w8, float c0, float qsc,
           size_t keep, float *tv, uint32_t *tx, size_t *nt) {
    const size_t L = cd / 8, nb = (tn + 15) / 16;
    const __m512i m = _mm512_set1_epi8(0x0F);
    const __m512 vc0 = _mm512_set1_ps(c0), vsc = _mm512_set1_ps(qsc);
    int32_t w[128]; /* d <= 512: L * 2 <= 128 broadcast words */
    memcpy(w, w8, 2 * L * sizeof(int32_t));
    float thr = *nt == keep ? tv[keep - 1] : -INFINITY;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = tab + b * L * 64;
        if (b + 4 < nb) /* the lines of the block four ahead (the table streams from L3) */
            for (size_t o = 0; o < L * 64; o += 64) _mm_prefetch((const char *)(blk + 4 * L * 64 + o), _MM_HINT_T0);
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512(),
                a3 = _mm512_setzero_si512();
        size_t j = 0;
        for (; j + 2 <= L; j += 2) {
            __m512i v0 = _mm512_load_si512((const void *)(blk + j * 64));
            __m512i v1 = _mm512_load_si512((const void *)(blk + j * 64 + 64));
            a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v0, m), _mm512_set1_epi32(w[2 * j]));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m), _mm512_set1_epi32(w[2 * j + 1]));
            a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(v1, m), _mm512_set1_epi32(w[2 * j + 2]));
            a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m), _mm512_set1_epi32(w[2 * j + 3]));
        }
        for (; j < L; j++) {
            __m512i v0 = _mm512_load_si512((const void *)(blk + j * 64));
            a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v0, m), _mm512_set1_epi32(w[2 * j]));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m), _mm512_set1_epi32(w[2 * j + 1]));
        }
        __m512i acc = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        __m512 f = _mm512_add_ps(vc0, _mm512_mul_ps(vsc, _mm512_cvtepi32_ps(acc)));
        __mmask16 mk = _mm512_cmp_ps_mask(f, _mm512_set1_ps(thr), _CMP_GT_OQ);
        if (b == nb - 1 && tn % 16) mk &= (__mmask16)((1u << (tn % 16)) - 1);
        if (!mk) continue;
        float fs[16];
        _mm512_storeu_ps(fs, f);
        while (mk) {
            unsigned i = (unsigned)__builtin_ctz(mk);
            mk &= (__mmask16)(mk - 1);
            if (fs[i] > thr) {
                top_insert(tv, tx, nt, keep, fs[i], tid[b * 16 + i]);
                if (*nt == keep) thr = tv[keep - 1];
            }
        }
    }
}
#endif

typedef struct gpair { float s; uint32_t x; } gpair;
static int cmp_gpair(const void *a, const void *b) {
    float x = ((const gpair *)a)->s, y = ((const gpair *)b)->s;
    return x > y ? -1 : x < y;
}

static int group_reserve(kst_kvg_scratch *s, size_t G, size_t ef, size_t d) {
    int rc = KST_OK;
    kst_error *err = NULL;
    if (s->gcap < s->ccap * G) {
        KST_TRY(kst_realloc((void **)&s->gv, s->ccap * G, sizeof(float), "kv group search", err));
        s->gcap = s->ccap * G;
    }
    if (s->gxcap < s->ccap) {
        KST_TRY(kst_realloc((void **)&s->gx, s->ccap, sizeof(uint32_t), "kv group search", err));
        s->gxcap = s->ccap;
    }
    if (s->grcap < G * (ef + 1)) {
        KST_TRY(kst_realloc((void **)&s->grs, G * (ef + 1), sizeof(float), "kv group search", err));
        KST_TRY(kst_realloc((void **)&s->gri, G * (ef + 1), sizeof(uint32_t), "kv group search", err));
        s->grcap = G * (ef + 1);
    }
    if (s->grncap < G) {
        KST_TRY(kst_realloc((void **)&s->grn, G, sizeof(size_t), "kv group search", err));
        s->grncap = G;
    }
    if (s->gqcap < G * (d + 2) + d) {
        KST_TRY(kst_realloc((void **)&s->gq, G * (d + 2) + d, sizeof(float), "kv group search", err));
        s->gqcap = G * (d + 2) + d;
    }
    if (s->rrcap < ef) {
        KST_TRY(kst_realloc((void **)&s->rr, ef, sizeof(gpair), "kv group search", err));
        s->rrcap = ef;
    }
done:
    return rc;
}

int kst_kvg_search_group(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q,
                         size_t G, size_t k, size_t ef, int use_codes, kst_kvg_scratch *s,
                         uint32_t *ids, float *scores, size_t *found) {
    s->scanned = 0;
    if (G == 0 || G > 64) return KST_ERR_INVALID;
    for (size_t q = 0; q < G; q++) found[q] = 0;
    if (g->n == 0 || k == 0) return KST_OK;
    if (ef < k) ef = k;
    int rc = scratch_reserve(s, g->cap, ef, g->M, NULL);
    if (rc == KST_OK) rc = group_reserve(s, G, ef, d);
    if (rc != KST_OK) return rc;
    int codes = use_codes && g->codes && g->cd == d;
    uint8_t ep = s->epoch;
    /* per query: coefficients (d), constant, 1/|q|; then a row buffer */
    float *co = s->gq, *c0 = s->gq + G * d, *inv = c0 + G, *buf = inv + G;
    for (size_t q = 0; q < G; q++) {
        const float *qq = Q + q * d;
        double n2 = 0, cst = 0;
        for (size_t j = 0; j < d; j++) {
            n2 += (double)qq[j] * qq[j];
            if (codes) {
                co[q * d + j] = qq[j] * g->cstep[j];
                cst += (double)qq[j] * (g->clo[j] + 0.5 * g->cstep[j]);
            }
        }
        c0[q] = (float)cst;
        inv[q] = n2 > 0 ? (float)(1.0 / sqrt(n2)) : 1.0f;
        s->grn[q] = 0;
    }
    size_t cb = d / 2, rowb = d * (f16 ? 2 : 4), sn = 0, cn = 0, E = ef + 1;
    int fused = G == 1 && cpu_avx2_fma();
    float v[64];
#define GSCORE(x)                                                                          \
    do {                                                                                   \
        if (codes && fused) {                                                              \
            v[0] = c0[0] + code_dot(co, g->codes + (size_t)(x) * cb, d);                   \
        } else if (codes) {                                                                \
            decode_row(buf, g->codes + (size_t)(x) * cb, d);                               \
            for (size_t q_ = 0; q_ < G; q_++) v[q_] = c0[q_] + kst_kv_dot(co + q_ * d, buf, 0, d); \
        } else if (G == 1 || !f16) {                                                       \
            const void *r_ = nrow(g, K, f16, (x), d);                                         \
            for (size_t q_ = 0; q_ < G; q_++) v[q_] = kst_kv_dot(Q + q_ * d, r_, f16, d);   \
        } else { /* float16 row converted once for the G queries */                        \
            row_f32(buf, nrow(g, K, f16, (x), d), d);                                         \
            for (size_t q_ = 0; q_ < G; q_++) v[q_] = kst_kv_dot(Q + q_ * d, buf, 0, d);    \
        }                                                                                  \
        s->scanned++;                                                                      \
    } while (0)
    /* v -> each query's results; a candidate when it made some query's ef best */
#define GCONSIDER(x)                                                                       \
    do {                                                                                   \
        int use_ = 0;                                                                      \
        float pr_ = -INFINITY;                                                             \
        for (size_t q_ = 0; q_ < G; q_++) {                                                \
            float *rs_ = s->grs + q_ * E;                                                  \
            uint32_t *ri_ = s->gri + q_ * E;                                               \
            if (s->grn[q_] < ef) {                                                         \
                heap_push(rs_, ri_, &s->grn[q_], v[q_], (x), 0);                           \
                use_ = 1;                                                                  \
            } else if (v[q_] > rs_[0]) {                                                   \
                heap_replace_top(rs_, ri_, ef, v[q_], (x), 0);                             \
                use_ = 1;                                                                  \
            }                                                                              \
            if (v[q_] * inv[q_] > pr_) pr_ = v[q_] * inv[q_];                              \
        }                                                                                  \
        if (use_ && sn < s->ccap && cn < s->ccap) {                                        \
            s->gx[sn] = (x);                                                               \
            memcpy(s->gv + sn * G, v, G * sizeof(float));                                  \
            heap_push(s->cs, s->ci, &cn, pr_, (uint32_t)sn, 1);                            \
            sn++;                                                                          \
        }                                                                                  \
    } while (0)
    size_t ne = g->n_entry;
    for (size_t e = 0; e < (ne ? ne : 1); e++) {
        uint32_t x = ne ? g->entry[e] : 0;
        if (x >= g->n || s->mark[x] == ep) continue;
        s->mark[x] = ep;
        GSCORE(x);
        GCONSIDER(x);
    }
    /* Expands up to B candidates at a time (s->expand): their neighbours' reads are issued
     * together, so the memory latencies of B expansions overlap. B = 1 is plain best-first. */
    size_t B = s->expand > 1 ? (s->expand < 16 ? s->expand : 16) : 1;
    uint32_t batch[16];
    int stop = 0;
    s->hops = 0;
    while (cn > 0 && !stop) {
        size_t nbt = 0;
        while (cn > 0 && nbt < B) {
            uint32_t slot = s->ci[0];
            heap_pop(s->cs, s->ci, &cn, 1);
            int still = 0;
            for (size_t q = 0; q < G && !still; q++)
                still = s->grn[q] < ef || s->gv[(size_t)slot * G + q] >= s->grs[q * E];
            if (!still) {
                if (G == 1) { /* ordered by the one score: nothing left can help */
                    stop = 1;
                    break;
                }
                continue;
            }
            batch[nbt++] = s->gx[slot];
        }
        s->hops += nbt;
        for (size_t b = 0; b < nbt; b++) {
            const uint32_t *nb = g->adj + (size_t)batch[b] * g->M;
            size_t dg = g->deg[batch[b]];
            for (size_t j = 0; j < dg; j++) {
                uint32_t x = nb[j];
                if (x >= g->n || s->mark[x] == ep) continue;
                if (codes) {
                    const char *r = (const char *)(g->codes + (size_t)x * cb);
                    __builtin_prefetch(r);
                    __builtin_prefetch(r + cb - 1);
                } else {
                    const char *r = (const char *)nrow(g, K, f16, x, d);
                    for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
                }
                __builtin_prefetch(g->adj + (size_t)x * g->M);
            }
        }
        for (size_t b = 0; b < nbt; b++) {
            const uint32_t *nb = g->adj + (size_t)batch[b] * g->M;
            size_t dg = g->deg[batch[b]];
            for (size_t j = 0; j < dg; j++) {
                uint32_t x = nb[j];
                if (x >= g->n || s->mark[x] == ep) continue;
                s->mark[x] = ep;
                GSCORE(x);
                GCONSIDER(x);
            }
        }
    }
#undef GSCORE
#undef GCONSIDER
    /* each query's ef best, best first; with codes re-scored exactly, then the k best */
    double tr0 = s->prof ? mono_s() : 0;
    gpair *pool = (gpair *)s->rr;
    for (size_t q = 0; q < G; q++) {
        float *rs = s->grs + q * E;
        uint32_t *ri = s->gri + q * E;
        size_t n = s->grn[q];
        for (size_t i = n; i-- > 0;) {
            pool[i].s = rs[0];
            pool[i].x = ri[0];
            heap_pop(rs, ri, &s->grn[q], 0);
        }
        if (codes) {
            for (size_t i = 0; i < n; i++) {
                const char *r = (const char *)nrow(g, K, f16, pool[i].x, d);
                for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
            }
            for (size_t i = 0; i < n; i++) pool[i].s = kst_kv_dot(Q + q * d, nrow(g, K, f16, pool[i].x, d), f16, d);
            qsort(pool, n, sizeof *pool, cmp_gpair);
        }
        size_t m = n < k ? n : k;
        for (size_t i = 0; i < m; i++) {
            ids[q * k + i] = (uint32_t)node_row(g, pool[i].x);
            if (scores) scores[q * k + i] = pool[i].s;
        }
        found[q] = m;
    }
    if (s->prof) s->t_rerank += mono_s() - tr0;
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* interleaved independent searches (kst_kvg_search_multi) */

#define KVG_MULTI_MAX 8
/* rows the exact re-scoring asks for ahead of the one it scores (-DKST_KVG_RERANK_PF=n at build
 * time for experiments; a number past ef asks for them all first, as before round 30) */
#ifndef KST_KVG_RERANK_PF
#define KST_KVG_RERANK_PF 8
#endif

/* Issues the reads of node x's edges (and its degree). */
static inline void prefetch_edges(const kst_kvg *g, uint32_t x) {
    const char *a = (const char *)(g->adj + (size_t)x * g->M);
    size_t ab = g->M * sizeof(uint32_t);
    for (size_t o = 0; o < ab; o += 64) __builtin_prefetch(a + o);
    __builtin_prefetch(a + ab - 1);
    __builtin_prefetch(g->deg + x);
}

/* Issues the reads of node x's code (or key row), and its edges unless `edges` is 0. */
static inline void prefetch_node(const kst_kvg *g, const void *K, int f16, size_t d, int codes,
                                 uint32_t x, int edges) {
    if (codes) {
        const char *r = (const char *)(g->codes + (size_t)x * (d / 2));
        __builtin_prefetch(r);
        __builtin_prefetch(r + d / 2 - 1);
    } else {
        const char *r = (const char *)nrow(g, K, f16, x, d);
        size_t rowb = d * (f16 ? 2 : 4);
        for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch(r + o);
        __builtin_prefetch(r + rowb - 1);
    }
    if (edges) prefetch_edges(g, x);
}

/* Inserts (v, x) into a search's pool: the best `L` (score, node) pairs, sorted by score
 * descending, with a flag per entry once expanded (NSG's candidate pool: one sorted array in
 * place of a candidate heap and a result heap; the search expands the best unexpanded entry).
 * *cur, the first entry that may be unexpanded, moves back when x lands before it. Returns 1
 * when x joined the pool. */
static inline int pool_insert(gpair *pool, uint8_t *fl, size_t *n, size_t L, size_t *cur, float v,
                              uint32_t x) {
    size_t m = *n;
    if (m == L && !(v > pool[L - 1].s)) return 0;
    /* the first entry with a smaller score, by a binary search without branches (a select per
     * halving: the comparisons are unpredictable, and mispredicted branches were a third of
     * the search's time): the answer stays in [lo, lo + w] */
    size_t lo = 0, w = m;
    while (w > 1) {
        size_t h = w / 2;
        lo = pool[lo + h - 1].s >= v ? lo + h : lo;
        w -= h;
    }
    lo += w == 1 && pool[lo].s >= v;
    size_t keep = m < L ? m : L - 1;
    if (keep > lo) {
        memmove(pool + lo + 1, pool + lo, (keep - lo) * sizeof *pool);
        memmove(fl + lo + 1, fl + lo, keep - lo);
    }
    pool[lo].s = v;
    pool[lo].x = x;
    fl[lo] = 0;
    if (m < L) *n = m + 1;
    if (lo < *cur) *cur = lo;
    return 1;
}

/* The second tier (kst_kvg_scratch.tier): the pairs a search scored that its pool rejected or
 * evicted, logged in S->vl (*tn of them; grown as needed, and where that fails no more are
 * logged: a smaller tier, never an error). An append per pair: keeping the best `tier` sorted
 * during the search (an insertion per pair) was a third of a 32K step's time. */
static inline void tier_log(kst_kvg_scratch *S, size_t *tn, float v, uint32_t x) {
    if (*tn == S->vlcap) {
        void *p = S->vl;
        size_t cap = 2 * S->vlcap + 256;
        if (kst_realloc(&p, cap, sizeof(gpair), "kv search tier", NULL) != KST_OK) return;
        S->vl = p;
        S->vlcap = cap;
    }
    gpair *t = (gpair *)S->vl + (*tn)++;
    t->s = v;
    t->x = x;
}
/* pool_insert, the pair it rejects or evicts logged for the second tier (tier > 0). */
static inline int pool_insert_t(gpair *pool, uint8_t *fl, size_t *n, size_t L, size_t *cur, float v,
                                uint32_t x, kst_kvg_scratch *S, size_t *tn, size_t tier) {
    if (tier && *n == L) {
        if (!(v > pool[L - 1].s)) {
            tier_log(S, tn, v, x);
            return 0;
        }
        tier_log(S, tn, pool[L - 1].s, pool[L - 1].x);
    }
    return pool_insert(pool, fl, n, L, cur, v, x);
}
/* Moves the m best pairs of t[0..n) by score to its front, in no order (quickselect, three-way
 * partitions). */
static void tier_select(gpair *t, size_t n, size_t m) {
    size_t lo = 0, hi = n;
    while (hi - lo > 1) {
        float p = t[lo + (hi - lo) / 2].s;
        size_t i = lo, lt = lo, gt = hi; /* [lo, lt) > p, [lt, gt) == p, [gt, hi) < p */
        while (i < gt) {
            gpair a = t[i];
            if (a.s > p) {
                t[i++] = t[lt];
                t[lt++] = a;
            } else if (a.s < p) {
                t[i] = t[--gt];
                t[gt] = a;
            } else {
                i++;
            }
        }
        if (m <= lt) hi = lt;
        else if (m <= gt) return;
        else lo = gt;
    }
}

/* The search itself; instantiated twice below: compiled for AVX-512 VNNI (vnni 1, the code
 * scores inlined) and generically (vnni 0). */
static inline __attribute__((always_inline)) int
multi_impl(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q, size_t nq, size_t k,
           size_t ef, size_t rerank, int codes, int vnni, kst_kvg_scratch **s, uint32_t *ids,
           float *scores, size_t *found) {
    size_t tier = codes ? s[0]->tier : 0;
    for (size_t q = 0; q < nq; q++) {
        int rc = scratch_reserve(s[q], g->cap, ef, g->M, NULL);
        if (rc == KST_OK) rc = group_reserve(s[q], 1, ef + tier, d);
        if (rc == KST_OK && tier && s[q]->vlcap < 4 * tier) {
            void *v = s[q]->vl;
            rc = kst_realloc(&v, 4 * tier, sizeof(gpair), "kv search tier", NULL);
            if (rc == KST_OK) {
                s[q]->vl = v;
                s[q]->vlcap = 4 * tier;
            }
        }
        if (rc == KST_OK && s[q]->flcap < ef) {
            uint8_t *f = s[q]->fl;
            rc = kst_realloc((void **)&f, ef, 1, "kv search pool", NULL);
            if (rc == KST_OK) {
                s[q]->fl = f;
                s[q]->flcap = ef;
            }
        }
        if (rc != KST_OK) return rc;
    }
    /* per search: code coefficients (d) and constant, or the query itself; its pool */
    const float *qv[KVG_MULTI_MAX];
    float c0[KVG_MULTI_MAX], qsc[KVG_MULTI_MAX];
    const int8_t *qlo[KVG_MULTI_MAX], *qhi[KVG_MULTI_MAX];
    gpair *pool[KVG_MULTI_MAX];
    size_t tn[KVG_MULTI_MAX], nsort[KVG_MULTI_MAX];
    uint8_t *fl[KVG_MULTI_MAX];
    size_t pn[KVG_MULTI_MAX], cur[KVG_MULTI_MAX];
    uint32_t pend[KVG_MULTI_MAX][1024];
    size_t np[KVG_MULTI_MAX];
    int live[KVG_MULTI_MAX];
    size_t scanned = 0, hops = 0, M = g->M < 1024 ? g->M : 1024, cb = d / 2;
    int push_pf = s[0]->pf_push;
    size_t width = s[0]->expand > 1 ? (s[0]->expand < 8 ? s[0]->expand : 8) : 1;
    if (width * M > 1024) width = 1024 / M; /* pend holds 1024 */
    for (size_t q = 0; q < nq; q++) {
        const float *qq = Q + q * d;
        kst_kvg_scratch *S = s[q];
        c0[q] = 0;
        if (codes) {
            double cst = 0;
            for (size_t j = 0; j < d; j++) {
                S->gq[j] = qq[j] * g->cstep[j];
                cst += (double)qq[j] * (g->clo[j] + 0.5 * g->cstep[j]);
            }
            c0[q] = (float)cst;
            qv[q] = S->gq;
            if (vnni) { /* int8 coefficients in the bytes after them (gq holds 2d + 2 floats) */
                int8_t *lo8 = (int8_t *)(S->gq + d), *hi8 = lo8 + d / 2;
                qsc[q] = quantize_coefs(S->gq, d, lo8, hi8);
                qlo[q] = lo8;
                qhi[q] = hi8;
                table_coefs(lo8, hi8, d, hi8 + d / 2); /* (the tables' order, after them: gq holds 2d + 2 floats) */
            }
        } else {
            qv[q] = qq;
        }
        pool[q] = (gpair *)S->rr;
        tn[q] = 0;
        fl[q] = S->fl;
        pn[q] = cur[q] = 0;
        live[q] = 1;
        np[q] = 0;
    }
#if defined(__x86_64__) && defined(__GNUC__)
#define MSCORE(q, x) (vnni ? c0[q] + qsc[q] * (float)code_dot_vnni(qlo[q], qhi[q], g->codes + (size_t)(x) * cb, d) \
                      : codes ? c0[q] + code_dot(qv[q], g->codes + (size_t)(x) * cb, d)                        \
                              : kst_kv_dot(qv[q], nrow(g, K, f16, (x), d), f16, d))
#else
#define MSCORE(q, x) (codes ? c0[q] + code_dot(qv[q], g->codes + (size_t)(x) * cb, d) \
                            : kst_kv_dot(qv[q], nrow(g, K, f16, (x), d), f16, d))
#endif
/* a query's score of the codes at p (with codes: a centroid's, kst_kvg.pc_codes) */
#if defined(__x86_64__) && defined(__GNUC__)
#define PSCORE(q, p) (vnni ? c0[q] + qsc[q] * (float)code_dot_vnni(qlo[q], qhi[q], (p), d) : c0[q] + code_dot(qv[q], (p), d))
#else
#define PSCORE(q, p) (c0[q] + code_dot(qv[q], (p), d))
#endif
    /* entry points */
    double te0 = s[0]->prof ? mono_s() : 0;
    size_t ne = g->n_entry ? g->n_entry : 1;
    size_t nsp = s[0]->spread < g->n ? s[0]->spread : g->n;
    for (size_t e = 0; e < ne; e++) prefetch_node(g, K, f16, d, codes, g->n_entry ? g->entry[e] : 0, !nsp);
    if (nsp) { /* chosen per query: the best `keep` of the hubs and nsp evenly spaced keys */
        size_t keep = s[0]->spread_keep ? s[0]->spread_keep : 8;
        if (keep > 64) keep = 64;
        /* with the graph's entry table (scored 16 nodes at a time), its nodes are the spaced
         * keys; else the spaced keys' own codes (or rows), their reads asked for 16 ahead of
         * their scoring (thousands asked at once would overflow the line fill buffers) */
        int tab = vnni && g->et_n > 0 && g->et_n <= g->n;
        const size_t ahead = 16;
        if (tab) nsp = g->et_n;
        else
            for (size_t e = 0; e < nsp && e < ahead; e++) prefetch_node(g, K, f16, d, codes, (uint32_t)(e * g->n / nsp), 0);
        for (size_t q = 0; q < nq; q++) {
            float tv[64];
            uint32_t tx[64];
            size_t nt = 0;
            for (size_t e = 0; e < ne; e++) {
                uint32_t x = g->n_entry ? g->entry[e] : 0;
                if (x >= g->n) continue;
                top_insert(tv, tx, &nt, keep, MSCORE(q, x), x);
                scanned++;
            }
#if defined(__x86_64__) && defined(__GNUC__)
            if (tab) {
                table_best(g->et_codes, g->et_id, g->et_n, g->cd, qhi[q] + d / 2, c0[q], qsc[q], keep, tv, tx, &nt);
                scanned += nsp;
            }
#endif
            for (size_t e = 0; e < nsp && !tab; e++) {
                if (q == 0 && e + ahead < nsp) prefetch_node(g, K, f16, d, codes, (uint32_t)((e + ahead) * g->n / nsp), 0);
                uint32_t x = (uint32_t)(e * g->n / nsp);
                top_insert(tv, tx, &nt, keep, MSCORE(q, x), x);
                scanned++;
            }
            kst_kvg_scratch *S = s[q];
            for (size_t j = 0; j < nt; j++) {
                if (S->mark[tx[j]] == S->epoch) continue; /* a hub among the spaced keys */
                S->mark[tx[j]] = S->epoch;
                prefetch_edges(g, tx[j]);
                pool_insert_t(pool[q], fl[q], &pn[q], ef, &cur[q], tv[j], tx[j], s[q], &tn[q], tier);
            }
        }
        ne = 0;
    }
    for (size_t q = 0; q < nq; q++) {
        kst_kvg_scratch *S = s[q];
        uint8_t ep = S->epoch;
        for (size_t e = 0; e < ne; e++) {
            uint32_t x = g->n_entry ? g->entry[e] : 0;
            if (x >= g->n || S->mark[x] == ep) continue;
            S->mark[x] = ep;
            float v = MSCORE(q, x);
            scanned++;
            pool_insert_t(pool[q], fl[q], &pn[q], ef, &cur[q], v, x, s[q], &tn[q], tier);
        }
    }
    /* the cluster probe (kst_kvg_scratch.probe): the clusters whose centroids' codes score best,
     * probe of them not counting the best entry's (the search starts in that region anyway; on
     * Gemma 3's heads at 128K it often held the best centroid, and the needles lay in the second:
     * bench README, round 40), then their nodes by their codes; the best probe_keep join the pool */
    size_t npr = codes && g->pc_n > 1 ? (s[0]->probe < g->pc_n - 1 ? s[0]->probe : g->pc_n - 1) : 0;
    if (npr > 8) npr = 8;
    for (size_t qi = 0; npr && qi < nq; qi++) {
        const size_t keep = s[0]->probe_keep ? (s[0]->probe_keep < 64 ? s[0]->probe_keep : 64) : 8;
        float bv[9], tv[64];
        uint32_t bx[9], tx[64];
        size_t nb = 0, nt = 0, skip = g->pc_n; /* (none) */
        if (pn[qi] > 0 && pool[qi][0].x < g->pc_at[g->pc_n]) { /* the best entry's cluster */
            const uint32_t x = pool[qi][0].x;
            size_t lo = 0, w = g->pc_n;
            while (w > 1) {
                const size_t h = w / 2;
                lo = g->pc_at[lo + h] <= x ? lo + h : lo;
                w -= h;
            }
            skip = lo;
        }
#if defined(__x86_64__) && defined(__GNUC__)
        if (vnni) /* 16 centroids at a time, the same scores */
            table_best(g->pc_tab, g->pc_tid, g->pc_n, d, qhi[qi] + d / 2, c0[qi], qsc[qi], npr + 1, bv, bx, &nb);
        else
#endif
            for (size_t c = 0; c < g->pc_n; c++) top_insert(bv, bx, &nb, npr + 1, PSCORE(qi, g->pc_codes + c * cb), (uint32_t)c);
        size_t took = 0; /* (clusters probed but the best entry's) */
        for (size_t b = 0; b < nb && took < npr; b++) {
            took += bx[b] != skip;
            const size_t x1 = g->pc_at[bx[b] + 1] < g->n ? g->pc_at[bx[b] + 1] : g->n;
            for (size_t x = g->pc_at[bx[b]]; x < x1; x++) top_insert(tv, tx, &nt, keep, MSCORE(qi, x), (uint32_t)x);
            scanned += x1 > g->pc_at[bx[b]] ? x1 - g->pc_at[bx[b]] : 0;
        }
        kst_kvg_scratch *S = s[qi];
        for (size_t t = 0; t < nt; t++) {
            if (S->mark[tx[t]] == S->epoch) continue;
            S->mark[tx[t]] = S->epoch;
            prefetch_edges(g, tx[t]);
            pool_insert_t(pool[qi], fl[qi], &pn[qi], ef, &cur[qi], tv[t], tx[t], s[qi], &tn[qi], tier);
        }
    }
    if (s[0]->prof) s[0]->t_entry += mono_s() - te0;
    size_t nlive = nq;
    while (nlive) {
        /* issue: every live search takes its best unexpanded entry; the reads of that node's
         * unvisited neighbours go out before any search scores one */
        for (size_t q = 0; q < nq; q++) {
            np[q] = 0;
            if (!live[q]) continue;
            kst_kvg_scratch *S = s[q];
            size_t c0i = cur[q];
            while (c0i < pn[q] && fl[q][c0i]) c0i++;
            cur[q] = c0i;
            if (c0i >= pn[q]) {
                live[q] = 0;
                nlive--;
                continue;
            }
            uint8_t ep = S->epoch, *mk = S->mark;
            uint32_t *pd = pend[q];
            size_t m = 0;
            /* the best unexpanded entry, and with width > 1 the next ones too (their reads then
             * overlap; an entry expanded early may later have dropped out of the pool) */
            for (size_t w = 0; w < width && c0i < pn[q]; w++) {
                fl[q][c0i] = 1;
                uint32_t c = pool[q][c0i].x;
                hops++;
                const uint32_t *nb = g->adj + (size_t)c * g->M;
                size_t dg = g->deg[c] < M ? g->deg[c] : M;
                for (size_t j = 0; j < dg; j++) {
                    uint32_t x = nb[j];
                    if (x >= g->n) continue;
                    pd[m] = x; /* kept when not yet visited (no branch on the mark) */
                    m += mk[x] != ep;
                    mk[x] = ep;
                }
                while (++c0i < pn[q] && fl[q][c0i]) {
                }
            }
            for (size_t j = 0; j < m; j++) prefetch_node(g, K, f16, d, codes, pd[j], !push_pf);
            np[q] = m;
        }
        /* score: by now the first search's reads have had the others' issue time to arrive */
        for (size_t q = 0; q < nq; q++) {
            for (size_t j = 0; j < np[q]; j++) {
                uint32_t x = pend[q][j];
                float v = MSCORE(q, x);
                scanned++;
                if (pool_insert_t(pool[q], fl[q], &pn[q], ef, &cur[q], v, x, s[q], &tn[q], tier) && push_pf) prefetch_edges(g, x);
            }
        }
    }
#undef MSCORE
#undef PSCORE
    double tr0 = s[0]->prof ? mono_s() : 0;
    size_t npool[KVG_MULTI_MAX];
    for (size_t q = 0; q < nq; q++) {
        size_t n = pn[q];
        if (codes && rerank && rerank < n && !tier) n = rerank < k ? k : rerank;
        nsort[q] = n;
        if (tier && tn[q]) { /* the second tier after the pool: its best `tier` by code score */
            size_t t = tn[q] < tier ? tn[q] : tier;
            if (tn[q] > tier) tier_select((gpair *)s[q]->vl, tn[q], tier);
            memcpy(pool[q] + n, s[q]->vl, t * sizeof(gpair));
            n += t;
        }
        npool[q] = n;
    }
    if (codes) { /* exact re-scoring: each row asked for RPF rows ahead of its scoring (all at once,
                  * as before round 30, asked for more lines than the core can have in flight) */
        const size_t rowb = d * (f16 ? 2 : 4);
        size_t pq = 0, pi = 0; /* the next row to ask for: search pq's pool entry pi */
#define RERANK_ASK()                                                                              \
    do {                                                                                          \
        while (pq < nq && pi >= npool[pq]) pq++, pi = 0;                                          \
        if (pq < nq) {                                                                            \
            const char *r_ = (const char *)nrow(g, K, f16, pool[pq][pi++].x, d);                  \
            for (size_t o_ = 0; o_ < rowb; o_ += 64) __builtin_prefetch(r_ + o_);                 \
        }                                                                                         \
    } while (0)
        for (size_t a = 0; a < KST_KVG_RERANK_PF; a++) RERANK_ASK();
        for (size_t q = 0; q < nq; q++) {
            gpair *P = pool[q];
            for (size_t i = 0; i < npool[q]; i++) {
                RERANK_ASK();
                P[i].s = kst_kv_dot(Q + q * d, nrow(g, K, f16, P[i].x, d), f16, d);
            }
            /* insertion sort, best first: the code order is nearly the exact one, so few moves */
            size_t ns = nsort[q];
            for (size_t i = 1; i < ns; i++) {
                gpair t = P[i];
                size_t j = i;
                while (j > 0 && P[j - 1].s < t.s) {
                    P[j] = P[j - 1];
                    j--;
                }
                P[j] = t;
            }
            /* the tier's keys (in no order) that beat the pool's last join the sorted pool, its
             * last taking their place: the first ns are the best ns of all, best first */
            for (size_t i = ns; ns && i < npool[q]; i++) {
                if (!(P[i].s > P[ns - 1].s)) continue;
                gpair t = P[i];
                P[i] = P[ns - 1];
                size_t j = ns - 1;
                while (j > 0 && P[j - 1].s < t.s) {
                    P[j] = P[j - 1];
                    j--;
                }
                P[j] = t;
            }
        }
    }
#undef RERANK_ASK
    for (size_t q = 0; q < nq; q++) {
        size_t m = npool[q] < k ? npool[q] : k;
        for (size_t i = 0; i < m; i++) {
            ids[q * k + i] = (uint32_t)node_row(g, pool[q][i].x);
            if (scores) scores[q * k + i] = pool[q][i].s;
        }
        found[q] = m;
    }
    if (s[0]->prof) s[0]->t_rerank += mono_s() - tr0;
    s[0]->scanned = scanned;
    s[0]->hops = hops;
    return KST_OK;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) static int
multi_vnni(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q, size_t nq, size_t k,
           size_t ef, size_t rerank, kst_kvg_scratch **s, uint32_t *ids, float *scores, size_t *found) {
    return multi_impl(g, K, f16, d, Q, nq, k, ef, rerank, 1, 1, s, ids, scores, found);
}
#endif

int kst_kvg_search_multi(const kst_kvg *g, const void *K, int f16, size_t d, const float *Q,
                         size_t nq, size_t k, size_t ef, size_t rerank, int use_codes,
                         kst_kvg_scratch **s, uint32_t *ids, float *scores, size_t *found) {
    if (nq == 0 || nq > KVG_MULTI_MAX) return KST_ERR_INVALID;
    s[0]->scanned = s[0]->hops = 0;
    for (size_t q = 0; q < nq; q++) found[q] = 0;
    if (g->n == 0 || k == 0) return KST_OK;
    int codes = use_codes && g->codes && g->cd == d && cpu_avx2_fma();
    size_t tier = codes ? s[0]->tier : 0;
    if (ef + tier < k) ef = k - tier;
#if defined(__x86_64__) && defined(__GNUC__)
    if (codes && !s[0]->no_vnni && cpu_vnni())
        return multi_vnni(g, K, f16, d, Q, nq, k, ef, rerank, s, ids, scores, found);
#endif
    return multi_impl(g, K, f16, d, Q, nq, k, ef, rerank, codes, 0, s, ids, scores, found);
}
