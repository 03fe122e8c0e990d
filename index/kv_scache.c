/* kv_scache.c - the clustered tail's sample cache (kv_scache.h). */
#include "kv_scache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/kv_attn.h"
#include "core/mem.h"

void kst_kvsc_free(kst_kvsc *S) {
    if (!S) return;
    kst_free(S->m);
    kst_free(S->lw);
    kst_free(S->iw);
    kst_free(S->key);
    kst_free(S->cid);
    kst_free(S->slot);
    kst_free(S->fr);
    kst_free(S->dirty);
    kst_free(S->dmark);
    kst_free(S->hist);
    kst_free(S->al);
    kst_free(S->chg);
    kst_free(S->xs);
    kst_kvtc_group_free(&S->A);
    kst_kvtc_group_free(&S->An);
    memset(S, 0, sizeof *S);
}

size_t kst_kvsc_bytes(const kst_kvsc *S) {
    return S->C * (3 * sizeof(uint32_t) + 2 * sizeof(float) + 2 * S->G * sizeof(float)) +
           S->cap * (5 * sizeof(uint32_t) + sizeof(int32_t) + 1) + S->ncap * sizeof(int32_t);
}

static int sc_nodes(kst_kvsc *S, size_t n, kst_error *err) {
    if (S->ncap >= n) return KST_OK;
    size_t cap = n + n / 4 + 1024;
    int rc = kst_realloc((void **)&S->slot, cap, sizeof(int32_t), "tail sample cache slots", err);
    if (rc != KST_OK) return rc;
    for (size_t i = S->ncap; i < cap; i++) S->slot[i] = -1;
    S->ncap = cap;
    return KST_OK;
}

int kst_kvsc_setup(kst_kvsc *S, const kst_kvtc *T, size_t G, size_t cap, kst_error *err) {
    kst_kvsc_free(S);
    if (!T->C || !G || !cap)
        return kst_fail(err, KST_ERR_INVALID, "tail sample cache: %zu clusters, %zu heads, %zu slots (none may be 0)",
                        T->C, G, cap);
    size_t nc = (cap + KST_KVSC_CH - 1) / KST_KVSC_CH;
    if (nc > KST_KVSC_NC)
        return kst_fail(err, KST_ERR_INVALID, "tail sample cache: %zu slots, at most %d", cap, KST_KVSC_NC * KST_KVSC_CH);
    size_t ch = (cap + nc - 1) / nc, C = T->C;
    cap = ch * nc;
    int rc = KST_OK;
    if (!(S->m = kst_calloc(C, sizeof(uint32_t), "tail sample cache", err)) ||
        !(S->lw = kst_malloc(C, sizeof(float), "tail sample cache", err)) ||
        !(S->iw = kst_malloc(C, sizeof(float), "tail sample cache", err)) ||
        !(S->key = kst_malloc(cap, sizeof(uint32_t), "tail sample cache", err)) ||
        !(S->cid = kst_malloc(cap, sizeof(int32_t), "tail sample cache", err)) ||
        !(S->fr = kst_malloc(cap, sizeof(uint32_t), "tail sample cache", err)) ||
        !(S->dirty = kst_malloc(cap, sizeof(uint32_t), "tail sample cache", err)) ||
        !(S->dmark = kst_calloc(cap, 1, "tail sample cache", err)) ||
        !(S->hist = kst_calloc(2 * G * C, sizeof(float), "tail sample cache", err)) ||
        !(S->al = kst_malloc(2 * C, sizeof(float), "tail sample cache", err)) ||
        !(S->chg = kst_malloc(2 * C, sizeof(uint32_t), "tail sample cache", err)) ||
        !(S->xs = kst_malloc(2 * cap, sizeof(uint32_t), "tail sample cache", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t c = 0; c < C; c++) {
        S->lw[c] = -INFINITY;
        S->iw[c] = 0;
    }
    S->ana[0] = S->ana[1] = SIZE_MAX;
    for (size_t s = 0; s < cap; s++) {
        S->key[s] = KST_KVSC_FREE;
        S->cid[s] = -1;
        S->fr[s] = (uint32_t)(cap - 1 - s); /* popped from slot 0 up */
    }
    S->nfr = cap;
    KST_TRY(sc_nodes(S, T->na, err));
    S->C = C;
    S->cap = cap;
    S->ch = ch;
    S->nc = nc;
    S->G = G;
    S->na = T->na;
done:
    if (rc != KST_OK) kst_kvsc_free(S);
    return rc;
}

static void sc_mark(kst_kvsc *S, uint32_t s) {
    if (S->dmark[s]) return;
    S->dmark[s] = 1;
    S->dirty[S->nd++] = s;
}
static void sc_drop(kst_kvsc *S, uint32_t x) {
    int32_t s = S->slot[x];
    S->slot[x] = -1;
    S->key[s] = KST_KVSC_FREE;
    S->cid[s] = -1;
    S->fr[S->nfr++] = (uint32_t)s;
    sc_mark(S, (uint32_t)s);
}
static void sc_hold(kst_kvsc *S, uint32_t x, uint32_t c) {
    uint32_t s = S->fr[--S->nfr];
    S->slot[x] = (int32_t)s;
    S->key[s] = x;
    S->cid[s] = (int32_t)c;
    sc_mark(S, s);
}
static void sc_weight(kst_kvsc *S, const kst_kvtc *T, uint32_t c) {
    S->lw[c] = S->m[c] ? logf((float)T->len[c] / (float)S->m[c]) : -INFINITY;
    S->iw[c] = S->m[c] ? (float)S->m[c] / (float)T->len[c] : 0;
}
int kst_kvsc_joined(kst_kvsc *S, const kst_kvtc *T, kst_error *err) {
    if (!S->C || T->na == S->na) return KST_OK;
    int rc = sc_nodes(S, T->na, err);
    if (rc != KST_OK) return rc;
    for (size_t x = S->na; x < T->na; x++) {
        uint32_t c = T->of[x], mc = S->m[c];
        sc_weight(S, T, c); /* (its size grew) */
        if (T->pos[x] >= mc) continue;
        /* x joined inside c's prefix: members pushed out give their slots to those pushed in */
        for (uint32_t p = mc; p < T->len[c]; p++)
            if (S->slot[T->mem[c][p]] >= 0) sc_drop(S, T->mem[c][p]);
        for (uint32_t p = 0; p < mc; p++)
            if (S->slot[T->mem[c][p]] < 0) sc_hold(S, T->mem[c][p], c);
    }
    S->na = T->na;
    return KST_OK;
}

void kst_kvsc_push(kst_kvsc *S, const float *cs) {
    if (!S->C) return;
    size_t G = S->G, C = S->C;
    if (S->nh) {
        memcpy(S->hist + G * C, S->hist, G * C * sizeof(float));
        memcpy(S->al + C, S->al, C * sizeof(float));
        S->ana[1] = S->ana[0];
        S->atemp[1] = S->atemp[0];
    }
    memcpy(S->hist, cs, G * C * sizeof(float));
    S->ana[0] = SIZE_MAX;
    S->nh = S->nh < 2 ? S->nh + 1 : 2;
}

/* The plan of the heads pushed into A (S->A, or S->An for the next one). */
static int plan_into(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, kst_kvtc_group *A, kst_error *err) {
    size_t G = S->G, C = S->C;
    if (budget > S->cap) budget = S->cap;
    /* the rows' normalized allocations averaged, each row's in the frame of its best centroid
     * score (one exponential pass a row; a cluster ~87 below every row's best gets none) */
    int rc = KST_OK;
    if (A->C < C) {
        KST_TRY(kst_realloc((void **)&A->ns, C, sizeof(uint32_t), "tail sample cache plan", err));
        KST_TRY(kst_realloc((void **)&A->x, 3 * C, sizeof(float), "tail sample cache plan", err));
        A->C = C;
    }
    float *x = A->x, *e = x + C, *lf = e + C; /* (lf, the clusters' sizes, then the fill's scratch) */
#pragma omp simd
    for (size_t c = 0; c < C; c++) lf[c] = (float)(int32_t)T->len[c]; /* (a cluster's keys < 2^31) */
    for (size_t k = 0; k < S->nh; k++) { /* each step's rows summed once for the two plans it is in */
        float *a = S->al + k * C;
        if (S->ana[k] == T->na && S->atemp[k] == temp) continue;
        for (size_t c = 0; c < C; c++) a[c] = 0;
        for (size_t g = k * G; g < (k + 1) * G; g++) kst_kv_alloc_add(a, S->hist + g * C, lf, C, temp, e);
        S->ana[k] = T->na;
        S->atemp[k] = temp;
    }
    if (S->nh > 1) {
#pragma omp simd
        for (size_t c = 0; c < C; c++) x[c] = S->al[C + c] + S->al[c];
    } else
        memcpy(x, S->al, C * sizeof *x);
    A->tot = kst_kvtc_fill(C, T->len, x, lf, budget, A->ns);
done:
    return rc;
}

/* The plan made into S->A (next 0) or S->An (next 1), its flag set once made. */
static int plan_make(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, int next, kst_error *err) {
    if (!S->C) return KST_OK;
    int *made = next ? &S->made_n : &S->made, rc = KST_OK;
    *made = 0;
    if (S->nh) rc = plan_into(S, T, temp, budget, next ? &S->An : &S->A, err);
    *made = S->nh && rc == KST_OK;
    return rc;
}

int kst_kvsc_plan_make(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, kst_error *err) {
    return plan_make(S, T, temp, budget, 0, err);
}

int kst_kvsc_plan_make_next(kst_kvsc *S, const kst_kvtc *T, float temp, size_t budget, kst_error *err) {
    return plan_make(S, T, temp, budget, 1, err);
}

void kst_kvsc_plan_take_next(kst_kvsc *S) {
    if (!S->made_n) return;
    kst_kvtc_group t = S->A;
    S->A = S->An;
    S->An = t;
    S->made = 1;
    S->made_n = 0;
}

void kst_kvsc_plan_apply(kst_kvsc *S, const kst_kvtc *T, size_t upmax) {
    if (!S->C || !S->made) return;
    size_t C = S->C;
    const uint32_t *ns = S->A.ns;
    size_t need = 0;
    for (size_t c = 0; c < C; c++) need += ns[c] > S->m[c] ? ns[c] - S->m[c] : 0;
    /* rows added at most upmax: each cluster short of its plan gets that share of its shortfall
     * (rounded by cumulative sums) */
    if (S->used < S->A.tot && S->A.tot - S->used > upmax) upmax = S->A.tot - S->used; /* (a table still filling) */
    size_t grow = need < upmax ? need : upmax;
    /* The changes decided first, each cluster's new prefix (a cluster is cut back or grown, not
     * both), then their nodes read and those nodes' slots asked for, then made in that order: the
     * slots are those of one change at a time, with the cache misses of a step's few hundred rows
     * (the nodes' slots: all over a KV head's cache) overlapped. */
    uint32_t *chg = S->chg, *xs = S->xs;
    size_t nch = 0;
    /* over the table: clusters holding more than this plan wants cut back, round a clock (one
     * round frees enough: sum n_c <= budget <= cap) */
    size_t over = S->used + grow > S->cap ? S->used + grow - S->cap : 0;
    for (size_t k = 0; over > 0 && k < C; k++) {
        uint32_t c = (uint32_t)S->hand;
        S->hand = S->hand + 1 < C ? S->hand + 1 : 0;
        if (S->m[c] <= ns[c]) continue;
        size_t cut = S->m[c] - ns[c] < over ? S->m[c] - ns[c] : over;
        chg[2 * nch] = c;
        chg[2 * nch++ + 1] = (uint32_t)(S->m[c] - cut);
        over -= cut;
    }
    /* to = floor(cum grow / need + 1/2) after each short cluster, in integers: the quotient and
     * remainder of (2 cum grow + need) / (2 need), carried from one cluster to the next (a
     * division only where the remainder passes 2 need: at most grow times) */
    size_t cum = 0, done = 0, to = 0;
    uint64_t rem = need, den = 2 * (uint64_t)need;
    for (size_t c = 0; c < C && done < grow; c++)
        if (ns[c] > S->m[c]) {
            cum += ns[c] - S->m[c];
            if (grow == need) to = cum;
            else if ((rem += 2 * (uint64_t)(ns[c] - S->m[c]) * grow) >= den) {
                to += (size_t)(rem / den);
                rem %= den;
            }
            size_t g = to - done;
            if (g > ns[c] - S->m[c]) g = ns[c] - S->m[c];
            if (!g) continue;
            S->added += g;
            done += g;
            chg[2 * nch] = (uint32_t)c;
            chg[2 * nch++ + 1] = (uint32_t)(S->m[c] + g);
        }
    size_t nx = 0; /* (at most used + grow <= 2 cap) */
    for (size_t i = 0; i < nch; i++) {
        uint32_t c = chg[2 * i], L = chg[2 * i + 1], mc = S->m[c], lo = L < mc ? L : mc, hi = L < mc ? mc : L;
        const uint32_t *mem = T->mem[c];
        for (uint32_t p = lo; p < hi; p++) xs[nx++] = mem[p];
    }
    for (size_t i = 0; i < nx; i++) __builtin_prefetch(&S->slot[xs[i]], 1);
    nx = 0;
    for (size_t i = 0; i < nch; i++) {
        uint32_t c = chg[2 * i], L = chg[2 * i + 1], mc = S->m[c];
        for (uint32_t p = L; p < mc; p++) sc_drop(S, xs[nx++]);
        for (uint32_t p = mc; p < L; p++) sc_hold(S, xs[nx++], c);
        S->m[c] = L;
        S->used = S->used - mc + L;
        sc_weight(S, T, c);
    }
    S->made = 0;
    S->ready = 1;
}

int kst_kvsc_plan(kst_kvsc *S, const kst_kvtc *T, const float *cs, float temp, size_t budget, kst_error *err) {
    kst_kvsc_push(S, cs);
    int rc = kst_kvsc_plan_make(S, T, temp, budget, err);
    if (rc == KST_OK) kst_kvsc_plan_apply(S, T, SIZE_MAX);
    return rc;
}

size_t kst_kvsc_take_dirty(kst_kvsc *S, uint32_t *out) {
    size_t n = S->nd;
    for (size_t i = 0; i < n; i++) {
        if (out) out[i] = S->dirty[i];
        S->dmark[S->dirty[i]] = 0;
    }
    S->nd = 0;
    return n;
}

static const void *sc_row(const void *base, size_t row, int f16, size_t d) {
    return (const char *)base + row * d * (f16 ? 2 : 4);
}

/* Slot sl's row as the table holds it: its node's row as stored, or (S->q8) that row in 8 bits
 * (kst_kv_q8, as the GPU's table quantizes it). */
static float sc_dot(const kst_kvsc *S, const float *q, const void *K, size_t row0, size_t sl, int f16, size_t d) {
    const void *r = sc_row(K, row0 + S->key[sl], f16, d);
    if (!S->q8) return kst_kv_dot(q, r, f16, d);
    int8_t b[KST_KVSC_DMAX];
    float sk = kst_kv_q8(r, f16, d, b);
    return kst_kv_dot_q8(q, b, d) * sk;
}
static void sc_axpy(const kst_kvsc *S, float *o, float w, const void *V, size_t row0, size_t sl, int f16, size_t d) {
    const void *r = sc_row(V, row0 + S->key[sl], f16, d);
    if (!S->q8) {
        kst_kv_axpy(o, w, r, f16, d);
        return;
    }
    int8_t b[KST_KVSC_DMAX];
    float sv = kst_kv_q8(r, f16, d, b);
    kst_kv_axpy_q8(o, w * sv, b, d);
}
/* A best row above tau into the cap parts (kst_kvsc_finish's cap; kv.h): the rest of its ratio
 * len_c / m_c at tau's weight. */
static void sc_cap(const kst_kvsc *S, kst_kv_cap *cp, const void *V, size_t row0, size_t sl, int f16, size_t d) {
    float r1 = expm1f(S->lw[S->cid[sl]]);
    if (kst_kv_cap_take(cp, r1)) sc_axpy(S, cp->o, r1, V, row0, sl, f16, d);
}

void kst_kvsc_item(const kst_kvsc *S, size_t cc, const float *Q, size_t G, const void *K, const void *V, int f16,
                   size_t d, float scale, size_t row0, float *it, size_t gst, float *sc) {
    size_t j0 = cc * S->ch, nr = S->cap - j0 < S->ch ? S->cap - j0 : S->ch, nt = nr < KST_KVSC_TOP ? nr : KST_KVSC_TOP;
    for (size_t j = 0; j < nr; j++) {
        uint32_t x = S->key[j0 + j];
        if (x == KST_KVSC_FREE) {
            for (size_t g = 0; g < G; g++) sc[g * nr + j] = -INFINITY;
            continue;
        }
        const void *kr = sc_row(K, row0 + x, f16, d);
        float l = S->lw[S->cid[j0 + j]];
        if (S->q8) {
            int8_t b[KST_KVSC_DMAX];
            float sk = kst_kv_q8(kr, f16, d, b);
            for (size_t g = 0; g < G; g++) sc[g * nr + j] = kst_kv_dot_q8(Q + g * d, b, d) * sk * scale + l;
            continue;
        }
        for (size_t g = 0; g < G; g++) sc[g * nr + j] = kst_kv_dot(Q + g * d, kr, f16, d) * scale + l;
    }
    for (size_t g = 0; g < G; g++) {
        float *w = sc + g * nr, *ig = it + g * gst, *tw = ig + 2 + d + KST_KVSC_TOP, *ot = tw + KST_KVSC_TOP;
        uint32_t tp[KST_KVSC_TOP];
        kst_kv_top(w, nr, nt, tw, tp); /* the nt best, best first */
        float mx = nt ? tw[0] : -INFINITY;
        memset(ig + 2, 0, d * sizeof(float));
        memset(ot, 0, d * sizeof(float));
        ig[0] = mx;
        ig[1] = 0;
        memcpy(ig + 2 + d, tp, nt * sizeof(int32_t));
        if (!(mx > -INFINITY)) {
            for (size_t i = 0; i < nt; i++) tw[i] = 0;
            continue;
        }
        kst_kv_exp_shift(w, nr, mx);
        for (size_t i = 0; i < nt; i++) {
            tw[i] = w[tp[i]];
            w[tp[i]] = 0;
            if (tw[i] > 0) sc_axpy(S, ot, tw[i], V, row0, j0 + tp[i], f16, d);
        }
        double sum = 0;
        for (size_t j = 0; j < nr; j++)
            if (w[j] > 0) sum += w[j];
        ig[1] = (float)sum;
    }
    /* the rest's value sums: each row read (and, q8, quantized) once for the G heads, each head's
     * terms added in row order as before */
    for (size_t j = 0; j < nr; j++) {
        size_t g0 = 0;
        while (g0 < G && !(sc[g0 * nr + j] > 0)) g0++;
        if (g0 == G) continue;
        const void *r = sc_row(V, row0 + S->key[j0 + j], f16, d);
        int8_t b[KST_KVSC_DMAX];
        float sv = S->q8 ? kst_kv_q8(r, f16, d, b) : 0;
        for (size_t g = g0; g < G; g++) {
            float wg = sc[g * nr + j];
            if (!(wg > 0)) continue;
            if (S->q8) kst_kv_axpy_q8(it + g * gst + 2, wg * sv, b, d);
            else kst_kv_axpy(it + g * gst + 2, wg, r, f16, d);
        }
    }
}


size_t kst_kvsc_finish(const kst_kvsc *S, const float *it, size_t st, const float *q, const void *K, const void *V,
                       int f16, size_t d, float scale, size_t row0, const uint32_t *rid, const float *rs, size_t m,
                       float tau, int cap, uint32_t *sl, float *sc, float *o, float *lse) {
    memset(o, 0, d * sizeof(float));
    *lse = -INFINITY;
    /* the retrieved rows held, listed by chunk: entry e (slot sl[2e], index in rid sl[2e + 1]),
     * the chunk's list from head[cc] on through nx = sl + 2m */
    uint32_t head[KST_KVSC_NC], *nx = sl + 2 * m, nex = 0;
    for (size_t cc = 0; cc < S->nc; cc++) head[cc] = UINT32_MAX;
    for (size_t i = 0; i < m; i++)
        if (rid[i] < S->ncap && S->slot[rid[i]] >= 0) {
            uint32_t slt = (uint32_t)S->slot[rid[i]], cc = (uint32_t)(slt / S->ch);
            sl[2 * nex] = slt;
            sl[2 * nex + 1] = (uint32_t)i;
            nx[nex] = head[cc];
            head[cc] = nex++;
        }
    size_t kept = S->used - nex;
    if (kept == 0) return 0;
    float oc[512];
    kst_kv_cap cp; /* (the best rows above tau: the rest of their ratio at tau's weight) */
    kst_kv_cap_init(&cp, d);
    for (size_t cc = 0; cc < S->nc; cc++) {
        size_t j0 = cc * S->ch, nr = S->cap - j0 < S->ch ? S->cap - j0 : S->ch;
        size_t nt = nr < KST_KVSC_TOP ? nr : KST_KVSC_TOP;
        const float *ic = it + cc * st, *tw = ic + 2 + d + KST_KVSC_TOP, *ot = tw + KST_KVSC_TOP;
        float mx = ic[0];
        if (!(mx > -INFINITY)) continue; /* no row held */
        int32_t tp[KST_KVSC_TOP];
        memcpy(tp, ic + 2 + d, nt * sizeof(int32_t));
        uint64_t tb[KST_KVSC_CH / 64] = {0}, rb[KST_KVSC_CH / 64] = {0}; /* the chunk's best rows, its retrieved */
        for (size_t a = 0; a < nt; a++)
            if (tp[a] >= 0 && (size_t)tp[a] < nr) tb[tp[a] >> 6] |= (uint64_t)1 << (tp[a] & 63);
        double sum = ic[1], sub = 0, ttot = 0, trm = 0;
        uint64_t topx = 0; /* the best rows retrieved (bit a: tp[a]) */
        memcpy(oc, ic + 2, d * sizeof(float));
        for (uint32_t e = head[cc]; e != UINT32_MAX; e = nx[e]) { /* (which retrieved rows are held, which best) */
            size_t j = sl[2 * e] - j0;
            rb[j >> 6] |= (uint64_t)1 << (j & 63);
            if (tb[j >> 6] >> (j & 63) & 1)
                for (size_t a = 0; a < nt; a++)
                    if ((size_t)tp[a] == j) topx |= (uint64_t)1 << a;
        }
        /* a best row outside R that scores above tau (s > tau: s + lw > tau + lw) is a key the
         * search missed: it stands for itself only, its weight exp(s + lw - mx) taken down by
         * exp(-lw) to exp(s - mx); dw[a]: what that takes off (trm counts it as taken out) */
        float dw[KST_KVSC_TOP], thr = tau < INFINITY ? expf(tau - mx) : INFINITY;
        for (size_t a = 0; a < nt; a++) {
            ttot += tw[a];
            dw[a] = 0;
            if (topx >> a & 1) {
                trm += tw[a];
            } else if (tw[a] > thr) { /* (s + lw > tau: then s > tau where exp(s - mx) = tw iw > thr) */
                float iw = S->iw[S->cid[j0 + tp[a]]];
                if (iw < 1 && tw[a] * iw > thr) {
                    dw[a] = tw[a] - tw[a] * iw;
                    trm += dw[a];
                }
            }
        }
        int topadd = !(trm <= ttot * 0.875); /* (the best rows not retrieved added one by one, below) */
        if (topadd) /* their value rows (cold: read from memory) asked for while the retrieved ones are taken out */
            for (size_t a = 0; a < nt; a++)
                if (!(topx >> a & 1) && tw[a] > 0) {
                    const char *r = sc_row(V, row0 + S->key[j0 + tp[a]], f16, d);
                    for (size_t b = 0; b < d * (f16 ? 2 : 4); b += 64) __builtin_prefetch(r + b);
                }
        for (uint32_t e = head[cc]; e != UINT32_MAX; e = nx[e]) {
            uint32_t slt = sl[2 * e];
            size_t j = slt - j0;
            if (tb[j >> 6] >> (j & 63) & 1) continue; /* (a best row: its term is the items' own) */
            /* its weight as the items': from the search's score (rs) or its key (as held: in 8
             * bits, the search's exact score is not the one the items summed) */
            float s0 = rs && !S->q8 ? rs[sl[2 * e + 1]] : sc_dot(S, q, K, row0, slt, f16, d);
            float w = expf(s0 * scale + S->lw[S->cid[slt]] - mx);
            sub += w;
            sc_axpy(S, oc, -w, V, row0, slt, f16, d);
        }
        double rest = sum - sub + ttot - trm;
        if ((sub > 0 && !(sub <= sum * (1.0 - KST_KVSC_KEEP))) || !(rest > 0) || !isfinite(rest)) {
            /* the chunk's rows outside R scored and summed anew */
            float mk = -INFINITY;
            for (size_t j = 0; j < nr; j++) {
                uint32_t x = S->key[j0 + j];
                sc[j] = -INFINITY;
                if (x == KST_KVSC_FREE || (rb[j >> 6] >> (j & 63) & 1)) continue;
                sc[j] = sc_dot(S, q, K, row0, j0 + j, f16, d) * scale;
                if (!(sc[j] > tau) || !(tb[j >> 6] >> (j & 63) & 1)) sc[j] += S->lw[S->cid[j0 + j]];
                else if (cap) /* (a best row above tau: itself once, and the cap partial) */
                    sc_cap(S, &cp, V, row0, j0 + j, f16, d);
                if (sc[j] > mk) mk = sc[j];
            }
            if (!(mk > -INFINITY)) continue;
            kst_kv_exp_shift(sc, nr, mk);
            double s2 = 0;
            memset(oc, 0, d * sizeof(float));
            for (size_t j = 0; j < nr; j++)
                if (sc[j] > 0) {
                    s2 += sc[j];
                    sc_axpy(S, oc, sc[j], V, row0, j0 + j, f16, d);
                }
            kst_attn_merge_sum(o, lse, oc, s2, mk, d);
            continue;
        }
        for (size_t a = 0; cap && a < nt; a++)
            if (dw[a] > 0) sc_cap(S, &cp, V, row0, j0 + tp[a], f16, d);
        if (!topadd) { /* the best rows' sums, less the retrieved ones and the missed ones' dw */
            for (size_t i = 0; i < d; i++) oc[i] += ot[i];
            for (size_t a = 0; a < nt; a++)
                if (topx >> a & 1) sc_axpy(S, oc, -tw[a], V, row0, j0 + tp[a], f16, d);
                else if (dw[a] > 0) sc_axpy(S, oc, -dw[a], V, row0, j0 + tp[a], f16, d);
        } else {
            for (size_t a = 0; a < nt; a++)
                if (!(topx >> a & 1) && tw[a] > 0)
                    sc_axpy(S, oc, tw[a] - dw[a], V, row0, j0 + tp[a], f16, d);
        }
        kst_attn_merge_sum(o, lse, oc, rest, mx, d);
    }
    kst_kv_cap_merge(&cp, o, lse, tau, d);
    return kept;
}

size_t kst_kvsc_best(const kst_kvsc *S, const float *it, size_t st, size_t d, const uint32_t *rid, size_t m, float *x,
                     float *lk) {
    uint64_t rb[KST_KVSC_NC * KST_KVSC_CH / 64] = {0}; /* the retrieved rows held, by slot */
    for (size_t i = 0; i < m; i++)
        if (rid[i] < S->ncap && S->slot[rid[i]] >= 0) {
            uint32_t sl = (uint32_t)S->slot[rid[i]];
            rb[sl >> 6] |= (uint64_t)1 << (sl & 63);
        }
    size_t n = 0;
    for (size_t cc = 0; cc < S->nc; cc++) {
        size_t j0 = cc * S->ch, nr = S->cap - j0 < S->ch ? S->cap - j0 : S->ch;
        size_t nt = nr < KST_KVSC_TOP ? nr : KST_KVSC_TOP;
        const float *ic = it + cc * st, *tw = ic + 2 + d + KST_KVSC_TOP;
        float mx = ic[0];
        if (!(mx > -INFINITY)) continue; /* no row held */
        for (size_t a = 0; a < nt; a++) {
            int32_t j;
            memcpy(&j, ic + 2 + d + a, sizeof j);
            if (j < 0 || (size_t)j >= nr || !(tw[a] > 0)) continue;
            size_t sl = j0 + (size_t)j;
            if ((rb[sl >> 6] >> (sl & 63) & 1) || S->cid[sl] < 0) continue;
            x[n] = logf(tw[a]) + mx;
            lk[n++] = S->lw[S->cid[sl]];
        }
    }
    return n;
}
