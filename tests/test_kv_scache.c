/* test_kv_scache.c - the clustered tail's sample cache (index/kv_scache.h: kst_kvsc_*, and its
 * use by kst_kvc_attend under kst_kvc_set_tail_cache) against float64 references written here
 * from kv_scache.h's definition, never against the code's own earlier output:
 * 1 the plans: cluster c holds exactly its first m_c members (slot[x] >= 0 iff pos[x] < m_c),
 *   key / cid / slot / the free stack consistent, used = sum m_c = cap - nfr <= cap, lw_c =
 *   log(len_c / m_c) (-inf at 0); each plan's n_c within 1 of the float64 water-filling over the
 *   last two steps' 2G query rows, m_c raised to max(m_c, n_c), cut back (never under n_c) only
 *   where the table overflows, then to exactly cap; the dirty list every slot changed since the
 *   last take (snapshots compared); a cap of the budget (evictions asserted reached); a step
 *   adding fewer rows than its plan wants (upmax): each short cluster's share of them by the
 *   float64 cumulative rounding;
 * 2 joins (kst_kvtc_add, kst_kvsc_joined): the same invariants, nodes joining inside a prefix and
 *   members pushed out asserted reached, the node arrays grown past their first size;
 * 3 items + finish: (o, lse) and the rows counted equal the float64 Horvitz-Thompson estimate
 *   over the held rows outside R (each weighted len_c / m_c), float32 and float16 rows, 3 chunks
 *   and a one-chunk table smaller than KST_KVSC_TOP; R empty, random, a chunk's best rows (some /
 *   nearly all of the best 32), nearly all of a chunk's weight outside its best 32 (recomputed),
 *   a whole chunk, every held row; each of finish's branches counted from float64 and asserted;
 * 4 unbiasedness over 400 cluster orders with R and m_c fixed (two plans, a table that evicts);
 *   wrong weights (len_c / n_c of the last plan, 1) shown far off;
 * 5 the decode step (CPU twin): the first step the shared sample's float64 estimator and the
 *   output of a twin cache without the sample cache; later steps the float64 estimator from the
 *   cache's prefixes as they were before the step (m snapshotted, the orders after the step's
 *   joins), stats.sampled their rows outside R; float32 / float16, G 2 / 4, both indexes, the
 *   group search, appends between steps, 1 and 3 OpenMP threads; KESTREL_KV_TCACHE=0 off, on
 *   again, a rebuild, a larger budget and another table size (each first step the shared plan's,
 *   the next from the prefixes held; tables asked past 16,384 rows held at 16,384; the cache off
 *   while keys join, then on); two layers, steps alternating;
 * 6 the same with the static tokens (and the table) on the GPU, and switches between the cache
 *   and the evenly spaced sample there against a twin scoring its tail on the CPU (both skipped
 *   without a device), and the update after a step left to the engine's idle time against an
 *   inline twin (test_gpu_idle_update; skipped without a device);
 * 7 the GPU's items of the table against float64 (test_gpu_items; skipped without a device), also
 *   with the table in 8 bits (tail_cache_q8; refused where it cannot be grouped);
 * 8 a plan row (kst_kv_alloc_add) against float64; the 8-bit rows (kst_kv_q8) against their
 *   definition (q8_row); tests 5 and 6 also run the cache with its table in 8 bits (float16 G 4
 *   and float32 G 2 with the group search), the float64 estimator then reading the held rows'
 *   8-bit values.
 * Tolerances: outputs 2e-5 absolute + 1e-4 relative, lse 1e-4 (as the clustered tail suites:
 * float32 sums of at most a few thousand terms). */
#include <omp.h>
#include <time.h>

#include "harness.h"
#include "kv_ref.h"

#include "core/half.h"
#include "core/kv_attn.h"
#include "index/kv.h"
#include "index/kv_scache.h"
#include "index/kv_tclust.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

#include "kv_tc_ref.h"

#define TOL_LSE 1e-4

/* ---------------------------------------------------------------------------------------------
 * data */

/* One KV head's rows: node i at row row0 + i of K, V ((row0 + n, d) float32; when f16 rounded to
 * float16, whose bits K16, V16 the code reads); the rows before row0 noise (never read). */
typedef struct {
    size_t n, d, row0;
    int f16;
    float *K, *V;
    uint16_t *K16, *V16;
} sc_rows;

static void rows_make(sc_rows *R, float *cen, size_t n, size_t d, size_t row0, int f16, size_t ncent) {
    size_t N = (row0 + n) * d;
    R->n = n;
    R->d = d;
    R->row0 = row0;
    R->f16 = f16;
    R->K = malloc(N * sizeof *R->K);
    R->V = malloc(N * sizeof *R->V);
    R->K16 = f16 ? malloc(N * sizeof *R->K16) : NULL;
    R->V16 = f16 ? malloc(N * sizeof *R->V16) : NULL;
    for (size_t i = 0; i < row0 * d; i++) {
        R->K[i] = (float)(100 * kv_gauss());
        R->V[i] = (float)(100 * kv_gauss());
    }
    mix_data(R->K + row0 * d, R->V + row0 * d, cen, n, 1, d, ncent, 1.0, 0.5);
    if (f16) {
        round_f16(R->K16, R->K, N);
        round_f16(R->V16, R->V, N);
    }
}
static const void *rows_K(const sc_rows *R) { return R->f16 ? (const void *)R->K16 : (const void *)R->K; }
static const void *rows_V(const sc_rows *R) { return R->f16 ? (const void *)R->V16 : (const void *)R->V; }
static const void *rows_K0(const sc_rows *R) {
    return R->f16 ? (const void *)(R->K16 + R->row0 * R->d) : (const void *)(R->K + R->row0 * R->d);
}
static void rows_free(sc_rows *R) {
    free(R->K);
    free(R->V);
    free(R->K16);
    free(R->V16);
}

/* scale * <q, node x's key> in float64. */
static double score64(const sc_rows *R, const float *q, size_t x, double scale) {
    return dot64(q, R->K + (R->row0 + x) * R->d, R->d) * scale;
}

/* ---------------------------------------------------------------------------------------------
 * the cache's state against its definition */

/* The state's invariants (kv_scache.h): cluster c holds exactly its first m_c members, each in a
 * slot whose key and cid name it; a slot is free (key KST_KVSC_FREE, cid -1) or held by such a
 * member; the free stack the free slots; used = sum m_c = cap - nfr <= cap; lw_c = log(len_c /
 * m_c) (float; -inf at m_c 0); every node of T seen (na). */
static void sc_check(const kst_kvsc *S, const kst_kvtc *T, const char *what) {
    if (S->C != T->C) fail_msg("%s: the cache has %zu clusters, T %zu", what, S->C, T->C);
    if (S->na != T->na) fail_msg("%s: the cache has seen %zu nodes, T assigned %zu", what, S->na, T->na);
    if (S->ncap < T->na) fail_msg("%s: slot[] holds %zu nodes of %zu", what, S->ncap, T->na);
    if (S->cap != S->nc * S->ch || S->ch > KST_KVSC_CH || S->nc > KST_KVSC_NC)
        fail_msg("%s: %zu slots in %zu chunks of %zu", what, S->cap, S->nc, S->ch);
    size_t sum = 0;
    for (size_t c = 0; c < T->C; c++) {
        uint32_t m = S->m[c];
        if (m > T->len[c]) fail_msg("%s: cluster %zu holds %u of its %u members", what, c, m, T->len[c]);
        sum += m;
        for (uint32_t p = 0; p < T->len[c]; p++) {
            uint32_t x = T->mem[c][p];
            int32_t s = S->slot[x];
            if (p < m) {
                if (s < 0 || (size_t)s >= S->cap)
                    fail_msg("%s: cluster %zu's member %u at place %u < m_c %u holds slot %d", what, c, x, p, m, s);
                if (S->key[s] != x || S->cid[s] != (int32_t)c)
                    fail_msg("%s: slot %d of cluster %zu's member %u holds node %u of cluster %d", what, s, c, x, S->key[s],
                             S->cid[s]);
            } else if (s != -1) {
                fail_msg("%s: cluster %zu's member %u at place %u >= m_c %u holds slot %d", what, c, x, p, m, s);
            }
        }
        double want = m ? log((double)T->len[c] / (double)m) : -INFINITY;
        if (m ? !(fabs(S->lw[c] - want) <= 1e-6 + 1e-6 * fabs(want)) : S->lw[c] != -INFINITY)
            fail_msg("%s: cluster %zu (%u of %u held): lw %.9g, log(len / m) %.9g", what, c, m, T->len[c], S->lw[c], want);
    }
    size_t held = 0;
    uint8_t *fr = calloc(S->cap, 1);
    for (size_t i = 0; i < S->nfr; i++) {
        uint32_t s = S->fr[i];
        if (s >= S->cap || fr[s]) fail_msg("%s: free stack entry %zu: slot %u (of %zu, or twice)", what, i, s, S->cap);
        fr[s] = 1;
    }
    for (size_t s = 0; s < S->cap; s++) {
        uint32_t x = S->key[s];
        if (x == KST_KVSC_FREE) {
            if (S->cid[s] != -1) fail_msg("%s: free slot %zu has cluster %d", what, s, S->cid[s]);
            if (!fr[s]) fail_msg("%s: free slot %zu not on the free stack", what, s);
            continue;
        }
        held++;
        if (fr[s]) fail_msg("%s: slot %zu holds node %u and is on the free stack", what, s, x);
        if (x >= T->na || S->slot[x] != (int32_t)s || T->of[x] != (uint32_t)S->cid[s] || T->pos[x] >= S->m[T->of[x]])
            fail_msg("%s: slot %zu holds node %u (cluster %d), not a held member there", what, s, x, S->cid[s]);
    }
    free(fr);
    if (held != sum || S->used != sum || S->cap - S->nfr != sum || sum > S->cap)
        fail_msg("%s: %zu slots held, sum m_c %zu, used %zu, cap - nfr %zu (cap %zu)", what, held, sum, S->used,
                 S->cap - S->nfr, S->cap);
}

/* The table as of the last take: the dirty list since must hold every slot whose (key, cid) has
 * changed (and only slots, each once). */
typedef struct {
    uint32_t *key, *buf;
    int32_t *cid;
    size_t cap;
} sc_snap;

static void snap_init(sc_snap *P, kst_kvsc *S) {
    P->cap = S->cap;
    P->key = malloc(S->cap * sizeof *P->key);
    P->cid = malloc(S->cap * sizeof *P->cid);
    P->buf = malloc(S->cap * sizeof *P->buf);
    kst_kvsc_take_dirty(S, P->buf);
    memcpy(P->key, S->key, S->cap * sizeof *P->key);
    memcpy(P->cid, S->cid, S->cap * sizeof *P->cid);
}
/* Takes the dirty list and checks it against the snapshot (then moved on); returns the slots
 * changed. */
static size_t snap_check(sc_snap *P, kst_kvsc *S, const char *what) {
    size_t nd = kst_kvsc_take_dirty(S, P->buf), changed = 0;
    uint8_t *in = calloc(P->cap, 1);
    for (size_t i = 0; i < nd; i++) {
        if (P->buf[i] >= P->cap || in[P->buf[i]]) fail_msg("%s: dirty entry %zu: slot %u (of %zu, or twice)", what, i, P->buf[i], P->cap);
        in[P->buf[i]] = 1;
    }
    for (size_t s = 0; s < P->cap; s++)
        if (P->key[s] != S->key[s] || P->cid[s] != S->cid[s]) {
            changed++;
            if (!in[s])
                fail_msg("%s: slot %zu changed (node %u cluster %d -> node %u cluster %d) but is not in the dirty list", what,
                         s, P->key[s], P->cid[s], S->key[s], S->cid[s]);
        }
    free(in);
    if (kst_kvsc_take_dirty(S, P->buf) != 0) fail_msg("%s: a second take found slots", what);
    memcpy(P->key, S->key, P->cap * sizeof *P->key);
    memcpy(P->cid, S->cid, P->cap * sizeof *P->cid);
    return changed;
}
static void snap_free(sc_snap *P) {
    free(P->key);
    free(P->cid);
    free(P->buf);
}

/* The shared plan against float64 (kv_tc_ref.h, tc_plan64); g_maxoff: the largest |n_c - share|. */
static double g_maxoff;
static void check_plan64(const kst_kvtc *T, const uint32_t *ns, size_t tot, const float *Q, size_t nr, double scale,
                         double temp, size_t B, const char *what) {
    double off = tc_plan64(T, ns, tot, Q, nr, scale, temp, B, what);
    g_maxoff = off > g_maxoff ? off : g_maxoff;
}

/* One plan (kst_kvsc_plan from the centroid scores of the G queries Q) checked against the
 * definition: its n_c the float64 plan of Q and the queries before (Qprev, NULL on the first);
 * every m_c raised to n_c; where used + the rows to add fit the table, m_c = max(m_c, n_c);
 * else clusters only cut (to no less than n_c) where they held more than n_c, the table then
 * exactly full. Returns 1 when the plan evicted. */
static int plan_checked(kst_kvsc *S, const kst_kvtc *T, const float *Q, const float *Qprev, size_t G, float scale,
                        float temp, size_t B, const char *what) {
    size_t C = T->C, d = T->d, need = 0, used0 = S->used;
    uint32_t *m0 = malloc(C * sizeof *m0);
    float *cs = malloc(G * C * sizeof *cs), *Q2 = malloc(2 * G * d * sizeof *Q2);
    memcpy(m0, S->m, C * sizeof *m0);
    kst_kvtc_scores(T, Q, G, scale, cs);
    kst_error err;
    assert_ok(kst_kvsc_plan(S, T, cs, temp, B, &err), &err);
    memcpy(Q2, Q, G * d * sizeof *Q2);
    if (Qprev) memcpy(Q2 + G * d, Qprev, G * d * sizeof *Q2);
    check_plan64(T, S->A.ns, S->A.tot, Q2, Qprev ? 2 * G : G, scale, temp, B < S->cap ? B : S->cap, what);
    const uint32_t *ns = S->A.ns;
    for (size_t c = 0; c < C; c++) need += ns[c] > m0[c] ? ns[c] - m0[c] : 0;
    int evict = used0 + need > S->cap;
    for (size_t c = 0; c < C; c++) {
        uint32_t hi = m0[c] > ns[c] ? m0[c] : ns[c];
        if (S->m[c] < ns[c] || S->m[c] > hi || (!evict && S->m[c] != hi))
            fail_msg("%s: cluster %zu held %u, planned %u, now holds %u (%s)", what, c, m0[c], ns[c], S->m[c],
                     evict ? "the table overflowing" : "no eviction");
    }
    if (evict && S->used != S->cap)
        fail_msg("%s: %zu held + %zu to add over %zu slots, but %zu held after the cut", what, used0, need, S->cap, S->used);
    if (!S->ready) fail_msg("%s: not ready after a plan", what);
    free(m0);
    free(cs);
    free(Q2);
    return evict;
}

/* ---------------------------------------------------------------------------------------------
 * 1. plans */

/* 3,000 keys (d 32) around 24 centres in 48 clusters, G = 3, temp 0.7; tables of 2,500 slots (3
 * chunks), 512 (twice the budget) and 256 (the budget: it evicts); budget 256; 12 plans each from
 * mix_queries (x0.5 .. x2; every fourth step the queries x4, sharp; steps 6, 7 the same queries
 * as steps 4, 5). After the setup and every plan: the invariants (sc_check), the plan
 * (plan_checked), the dirty list (snap_check). */
static void test_plans(void **state) {
    (void)state;
    tc_seed(1);
    const size_t n = 3000, d = 32, C = 48, G = 3, ncent = 24, B = 256, steps = 12;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), *Q = malloc(steps * G * d * sizeof *Q);
    sc_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent);
    mix_queries(Q, cen, steps, G, 1, d, ncent);
    for (size_t s = 0; s < steps; s++)
        if (s % 4 == 3)
            for (size_t i = 0; i < G * d; i++) Q[s * G * d + i] *= 4;
    memcpy(Q + 6 * G * d, Q + 4 * G * d, 2 * G * d * sizeof *Q);
    kst_kvtc T = {0};
    kst_error err;
    assert_ok(kst_kvtc_build(&T, rows_K0(&R), 0, n, d, C, 11, &err), &err);
    assert_int_equal(T.C, C);
    static const size_t caps[3] = {2500, 512, 256};
    size_t evictions[3] = {0, 0, 0}, changed = 0;
    for (size_t ci = 0; ci < 3; ci++) {
        kst_kvsc S = {0};
        assert_ok(kst_kvsc_setup(&S, &T, G, caps[ci], &err), &err);
        size_t nc = (caps[ci] + KST_KVSC_CH - 1) / KST_KVSC_CH;
        assert_int_equal(S.nc, nc);
        assert_int_equal(S.ch, (caps[ci] + nc - 1) / nc);
        if (S.cap < caps[ci]) fail_msg("table of %zu slots asked, %zu made", caps[ci], S.cap);
        assert_int_equal(S.used, 0);
        assert_int_equal(S.ready, 0);
        sc_check(&S, &T, "after the setup");
        sc_snap P;
        snap_init(&P, &S);
        for (size_t s = 0; s < steps; s++) {
            char what[96];
            snprintf(what, sizeof what, "table of %zu, plan %zu", S.cap, s);
            evictions[ci] += plan_checked(&S, &T, Q + s * G * d, s ? Q + (s - 1) * G * d : NULL, G, scale, temp, B, what);
            sc_check(&S, &T, what);
            changed += snap_check(&P, &S, what);
        }
        snap_free(&P);
        kst_kvsc_free(&S);
        kst_kvsc_free(&S); /* twice: freed state */
    }
    print_message("plans: 3 tables x %zu plans, n_c within %.3f of float64; evictions: %zu, %zu, %zu; %zu slot changes "
                  "all in the dirty lists\n", steps, g_maxoff, evictions[0], evictions[1], evictions[2], changed);
    if (!evictions[2]) fail_msg("the table of the budget never evicted");
    if (evictions[0]) fail_msg("the table of 2,500 slots evicted (the plans' union is under it)");
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(Q);
}

/* A step that may add fewer rows than its plan wants (kst_kvsc_plan_apply's upmax, as
 * kst_kvc_attend bounds a step's copies): 3,000 keys (d 32) in 48 clusters, G = 3, budget 256, a
 * table of 512; the first plan held whole, then 10 plans each made (kst_kvsc_plan_make) from new
 * queries and held with upmax a third of the rows it wants (or 1). Against the definition in
 * float64: the rows added are min(need, upmax) (need = sum over short clusters of n_c - m_c), in
 * cluster order the short ones' shortfalls summed, F_c = that sum x upmax / need, cluster c gets
 * floor(F_c + 1/2) - floor(F_(c-1) + 1/2), at most its shortfall; the others keep m_c or are cut
 * back towards n_c only where the table overflows (then exactly full). Steps where a cluster got
 * part of its shortfall (the rounding's middle) asserted reached. On odd steps the plan is also
 * made as a next plan (kst_kvsc_plan_make_next, then taken): the same n_c and total, bit for bit. */
static void test_apply_bounded(void **state) {
    (void)state;
    tc_seed(3);
    const size_t n = 3000, d = 32, C = 48, G = 3, ncent = 24, B = 256, steps = 11;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), *Q = malloc(steps * G * d * sizeof *Q), *cs = malloc(G * C * sizeof *cs);
    uint32_t *m0 = malloc(C * sizeof *m0);
    sc_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent);
    mix_queries(Q, cen, steps, G, 1, d, ncent);
    kst_kvtc T = {0};
    kst_kvsc S = {0};
    kst_error err;
    assert_ok(kst_kvtc_build(&T, rows_K0(&R), 0, n, d, C, 11, &err), &err);
    assert_ok(kst_kvsc_setup(&S, &T, G, 512, &err), &err);
    kst_kvtc_scores(&T, Q, G, scale, cs);
    assert_ok(kst_kvsc_plan(&S, &T, cs, temp, B, &err), &err);
    size_t partial = 0, bounded = 0;
    for (size_t s = 1; s < steps; s++) {
        char what[64];
        snprintf(what, sizeof what, "bounded step %zu", s);
        kst_kvtc_scores(&T, Q + s * G * d, G, scale, cs);
        kst_kvsc_push(&S, cs);
        assert_ok(kst_kvsc_plan_make(&S, &T, temp, B, &err), &err);
        if (s % 2) {
            uint32_t *ns1 = malloc(C * sizeof *ns1);
            size_t tot1 = S.A.tot;
            memcpy(ns1, S.A.ns, C * sizeof *ns1);
            assert_ok(kst_kvsc_plan_make_next(&S, &T, temp, B, &err), &err);
            if (!S.made_n) fail_msg("%s: no next plan made", what);
            kst_kvsc_plan_take_next(&S);
            if (!S.made || S.made_n || S.A.tot != tot1 || memcmp(S.A.ns, ns1, C * sizeof *ns1))
                fail_msg("%s: the next plan (total %zu) is not the plan made (%zu)", what, S.A.tot, tot1);
            free(ns1);
        }
        memcpy(m0, S.m, C * sizeof *m0);
        const uint32_t *ns = S.A.ns;
        size_t need = 0, used0 = S.used;
        for (size_t c = 0; c < C; c++) need += ns[c] > m0[c] ? ns[c] - m0[c] : 0;
        size_t upmax = need / 3 ? need / 3 : 1, grow = need < upmax ? need : upmax, cum = 0, prev = 0, added = 0;
        if (used0 < S.A.tot) fail_msg("%s: %zu held under the plan's %zu after the first plan", what, used0, S.A.tot);
        kst_kvsc_plan_apply(&S, &T, upmax);
        bounded += grow < need;
        int evict = used0 + grow > S.cap;
        for (size_t c = 0; c < C; c++) {
            if (ns[c] > m0[c]) {
                cum += ns[c] - m0[c];
                size_t to = (size_t)floor((double)cum * (double)grow / (double)need + 0.5), want = to - prev;
                prev = to;
                if (want > ns[c] - m0[c]) want = ns[c] - m0[c];
                if (S.m[c] != m0[c] + want)
                    fail_msg("%s: cluster %zu held %u of its plan's %u: %zu rows of %zu wanted (%zu of %zu added), now %u",
                             what, c, m0[c], ns[c], want, (size_t)(ns[c] - m0[c]), grow, need, S.m[c]);
                partial += want > 0 && want < ns[c] - m0[c];
                added += want;
            } else if (S.m[c] > m0[c] || S.m[c] < ns[c] || (!evict && S.m[c] != m0[c]))
                fail_msg("%s: cluster %zu held %u, planned %u, now %u (%s)", what, c, m0[c], ns[c], S.m[c],
                         evict ? "the table overflowing" : "no eviction");
        }
        if (added != grow) fail_msg("%s: %zu rows added, %zu wanted", what, added, grow);
        if (evict && S.used != S.cap) fail_msg("%s: the table overflowing, %zu of %zu held", what, S.used, S.cap);
        sc_check(&S, &T, what);
    }
    print_message("bounded steps: %zu of %zu added fewer rows than planned; %zu clusters got part of their shortfall\n",
                  bounded, steps - 1, partial);
    if (bounded < 5 || !partial) fail_msg("the bounded rounding barely reached (%zu steps, %zu partial)", bounded, partial);
    kst_kvsc_free(&S);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(Q);
    free(cs);
    free(m0);
}

/* ---------------------------------------------------------------------------------------------
 * 2. joins */

/* 1,000 keys (d 32) in 32 clusters built, G = 2, budget 192, tables of 384 and 192; 3 plans, then
 * keys added (kst_kvtc_add) 60 one at a time (kst_kvsc_joined after each), then 700 and 1,240 at
 * once (past the cache's first node array, 2,274), a plan between: after each the invariants,
 * the dirty list, the weights (len grew; sc_check) and, counted and asserted reached, nodes that
 * joined inside a prefix and held members pushed out of it (still in their cluster). */
static void test_joins(void **state) {
    (void)state;
    tc_seed(2);
    const size_t n0 = 1000, n = 3000, d = 32, C = 32, G = 2, ncent = 16, B = 192;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), *Q = malloc(8 * G * d * sizeof *Q);
    sc_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent);
    mix_queries(Q, cen, 8, G, 1, d, ncent);
    size_t inside = 0, pushed = 0, changed = 0, grown = 0;
    kst_error err;
    for (size_t ci = 0; ci < 2; ci++) {
        kst_kvtc T = {0};
        assert_ok(kst_kvtc_build(&T, rows_K0(&R), 0, n0, d, C, 21 + ci, &err), &err);
        kst_kvsc S = {0};
        assert_ok(kst_kvsc_setup(&S, &T, G, ci ? B : 2 * B, &err), &err);
        size_t ncap0 = S.ncap, qi = 0;
        sc_snap P;
        snap_init(&P, &S);
        for (; qi < 3; qi++) plan_checked(&S, &T, Q + qi * G * d, qi ? Q + (qi - 1) * G * d : NULL, G, scale, temp, B, "joins: plan");
        sc_check(&S, &T, "joins: after the plans");
        snap_check(&P, &S, "joins: after the plans");
        int32_t *was = malloc(n * sizeof *was);
        size_t na = n0;
        static const size_t adds[3] = {60, 700, 1240};
        for (size_t ph = 0; ph < 3; ph++) {
            size_t reps = ph ? 1 : adds[0];
            for (size_t r = 0; r < reps; r++) {
                size_t to = na + (ph ? adds[ph] : 1);
                for (size_t x = 0; x < na; x++) was[x] = S.slot[x];
                assert_ok(kst_kvtc_add(&T, rows_K0(&R), 0, to, &err), &err);
                assert_ok(kst_kvsc_joined(&S, &T, &err), &err);
                char what[96];
                snprintf(what, sizeof what, "table of %zu, %zu nodes joined (to %zu)", S.cap, to - na, to);
                sc_check(&S, &T, what);
                changed += snap_check(&P, &S, what);
                for (size_t x = na; x < to; x++) inside += T.pos[x] < S.m[T.of[x]];
                for (size_t x = 0; x < na; x++) pushed += was[x] >= 0 && S.slot[x] < 0;
                na = to;
            }
            char what[96];
            snprintf(what, sizeof what, "table of %zu, plan after joins (phase %zu)", S.cap, ph);
            plan_checked(&S, &T, Q + qi * G * d, Q + (qi - 1) * G * d, G, scale, temp, B, what);
            qi++;
            sc_check(&S, &T, what);
            changed += snap_check(&P, &S, what);
        }
        assert_int_equal(T.na, n);
        grown += S.ncap > ncap0;
        free(was);
        snap_free(&P);
        kst_kvsc_free(&S);
        kst_kvtc_free(&T);
    }
    print_message("joins: %zu new nodes inside a prefix, %zu held members pushed out, %zu slot changes in the dirty "
                  "lists, node arrays grown in %zu of 2\n", inside, pushed, changed, grown);
    if (!inside || !pushed) fail_msg("no node joined inside a prefix (%zu) or none pushed out (%zu)", inside, pushed);
    if (grown != 2) fail_msg("the cache's node arrays did not grow past their first size");
    rows_free(&R);
    free(cen);
    free(Q);
}

/* ---------------------------------------------------------------------------------------------
 * 3. items + finish */

/* The items of every chunk for the G queries Q, laid out as the GPU's (head g's at it + g nc st),
 * st a little over KST_KVSC_STRIDE(d); the items' floats NaN before, the scratch exactly G ch
 * floats, stale, its own allocation; the chunks made last first. */
static float *make_items(const kst_kvsc *S, const float *Q, size_t G, const sc_rows *R, float scale, size_t *st_out) {
    size_t st = KST_KVSC_STRIDE(R->d) + 3, nit = G * S->nc * st;
    float *it = malloc(nit * sizeof *it), *sc = malloc(G * S->ch * sizeof *sc);
    for (size_t i = 0; i < nit; i++) it[i] = NAN;
    memset(sc, 0x7f, G * S->ch * sizeof *sc);
    for (size_t cc = S->nc; cc-- > 0;)
        kst_kvsc_item(S, cc, Q, G, rows_K(R), rows_V(R), R->f16, R->d, scale, R->row0, it + cc * st, S->nc * st, sc);
    free(sc);
    *st_out = st;
    return it;
}

/* Head g's finish with scratch of exactly 3 m uint32 and ch floats (stale, their own allocations);
 * rs: the retrieved keys' unscaled scores (float64 dots rounded), or NULL; cap: kst_kvsc_finish's. */
static size_t finish(const kst_kvsc *S, const float *it, size_t st, size_t g, const float *q, const sc_rows *R, float scale,
                     const uint32_t *rid, const float *rs, size_t m, float tau, int cap, float *o, float *lse) {
    uint32_t *sl = malloc((m ? 3 * m : 1) * sizeof *sl);
    float *sc = malloc(S->ch * sizeof *sc);
    memset(sl, 0x7f, (m ? 3 * m : 1) * sizeof *sl);
    memset(sc, 0x7f, S->ch * sizeof *sc);
    for (size_t i = 0; i < R->d; i++) o[i] = NAN;
    size_t got = kst_kvsc_finish(S, it + g * S->nc * st, st, q, rows_K(R), rows_V(R), R->f16, R->d, scale, R->row0, rid, rs,
                                 m, tau, cap, sl, sc, o, lse);
    free(sl);
    free(sc);
    return got;
}

/* The estimate's float64 reference (kv_scache.h): every member at a place < pre[c] of a cluster c
 * (pre: the prefixes held) that is outside R (mark) weighted len_c / pre[c]; lse = log sum w
 * exp(s), o = sum w exp(s) v / sum w exp(s); o 0 and lse -inf where no such member. wt (may be
 * NULL): the weight replaced by wt[c] (test 4's wrong weights; 0 drops the cluster); one (may be
 * NULL): members x with one[x] (keys above tau, kst_kvsc_finish) weighted 1 (cap 0), or weighing
 * exp(s) + lambda (len_c / pre[c] - 1) exp(tau) (cap 1: itself once, the rest of its ratio at
 * tau's weight, lambda = cap_shrink64(the such members with len_c > pre[c])). Returns the members
 * summed. */
static size_t est_ref64(double *o, double *lse, const kst_kvtc *T, const uint32_t *pre, const double *wt,
                        const sc_rows *R, const float *q, double scale, const uint8_t *mark, const uint8_t *one,
                        double tau, int cap) {
    size_t d = R->d, used = 0;
    double mx = -INFINITY, sum = 0, *lw = malloc(T->C * sizeof *lw);
    size_t nac = 0; /* (members above tau given a part at tau's weight) */
    for (size_t i = 0; i < d; i++) o[i] = 0;
    for (size_t c = 0; c < T->C; c++) {
        if (pre[c] > T->len[c]) fail_msg("estimate reference: cluster %zu holds %u of %u", c, pre[c], T->len[c]);
        double w = wt ? wt[c] : pre[c] ? (double)T->len[c] / (double)pre[c] : 0;
        lw[c] = w > 0 ? log(w) : -INFINITY;
        for (uint32_t j = 0; j < pre[c] && lw[c] > -INFINITY; j++)
            if (!mark[T->mem[c][j]]) {
                mx = fmax(mx, score64(R, q, T->mem[c][j], scale) + (one && one[T->mem[c][j]] ? 0 : lw[c]));
                nac += one && one[T->mem[c][j]] && lw[c] > 0;
            }
    }
    for (size_t c = 0; c < T->C; c++)
        for (uint32_t j = 0; j < pre[c] && lw[c] > -INFINITY; j++) {
            uint32_t x = T->mem[c][j];
            if (mark[x]) continue;
            double e = exp(score64(R, q, x, scale) + (one && one[x] ? 0 : lw[c]) - mx);
            if (one && one[x] && cap) e += cap_shrink64(nac) * expm1(lw[c]) * exp(tau - mx);
            used++;
            sum += e;
            const float *v = R->V + (R->row0 + x) * d;
            for (size_t i = 0; i < d; i++) o[i] += e * v[i];
        }
    free(lw);
    if (!(sum > 0)) {
        for (size_t i = 0; i < d; i++) o[i] = 0;
        *lse = -INFINITY;
        return used;
    }
    for (size_t i = 0; i < d; i++) o[i] /= sum;
    *lse = mx + log(sum);
    return used;
}

/* (o, lse, count) against the float64 reference; returns the largest |o - ref| / tolerance. */
static double check_out(const char *what, const float *o, float lse, size_t got, const double *ro, double rlse,
                        size_t rgot, size_t d) {
    if (got != rgot) fail_msg("%s: %zu rows stood for the rest, the reference's %zu", what, got, rgot);
    if (rlse == -INFINITY) {
        if (lse != -INFINITY) fail_msg("%s: lse %.7g where nothing is left (-inf)", what, lse);
        for (size_t i = 0; i < d; i++)
            if (o[i] != 0) fail_msg("%s: o[%zu] = %.7g where nothing is left (0)", what, i, o[i]);
        return 0;
    }
    double dev = 0;
    for (size_t i = 0; i < d; i++) {
        double e = fabs(o[i] - ro[i]) / (TOL_A + TOL_R * fabs(ro[i]));
        if (!(e <= 1)) fail_msg("%s: o[%zu] = %.7g, float64 %.7g", what, i, o[i], ro[i]);
        dev = e > dev ? e : dev;
    }
    if (!(fabs(lse - rlse) <= TOL_LSE)) fail_msg("%s: lse %.9g, float64 %.9g", what, lse, rlse);
    return dev;
}

/* Finish's cases a (head, chunk) meets, read from the definition in float64 (kv_scache.h): the
 * chunk's held rows by weighted score s + log(len_c / m_c), its best min(32, held) the best rows;
 * sub / sum: the retrieved rows' share of the weights outside the best; trm / ttot the same of
 * the best. */
enum { K_PLAIN, K_SUB, K_TOPSUB, K_TOPADD, K_ANEW, K_ALL, K_N };
static const char *k_names[K_N] = {"nothing retrieved", "retrieved outside the best only", "best rows retrieved (subtracted)",
                                   "nearly all the best retrieved (added anew)", "over 7/8 outside the best (recomputed)",
                                   "every row retrieved"};
static size_t g_kind[K_N];

/* A chunk's held rows (slots j0 ..) sorted best first by head q's weighted score (w64). */
static size_t chunk_rows(const kst_kvsc *S, const kst_kvtc *T, size_t cc, const sc_rows *R, const float *q, double scale,
                         uint32_t *x, double *w) {
    size_t j0 = cc * S->ch, nh = 0;
    for (size_t j = j0; j < j0 + S->ch; j++) {
        uint32_t y = S->key[j];
        if (y == KST_KVSC_FREE) continue;
        uint32_t c = T->of[y];
        double v = score64(R, q, y, scale) + log((double)T->len[c] / (double)S->m[c]);
        size_t i = nh++;
        for (; i > 0 && w[i - 1] < v; i--) {
            w[i] = w[i - 1];
            x[i] = x[i - 1];
        }
        w[i] = v;
        x[i] = y;
    }
    return nh;
}

static void classify(const kst_kvsc *S, const kst_kvtc *T, const sc_rows *R, const float *q, double scale,
                     const uint8_t *mark, uint32_t *x, double *w) {
    for (size_t cc = 0; cc < S->nc; cc++) {
        size_t nh = chunk_rows(S, T, cc, R, q, scale, x, w), nt = nh < KST_KVSC_TOP ? nh : KST_KVSC_TOP, inr = 0;
        if (!nh) continue;
        double sum = 0, sub = 0, ttot = 0, trm = 0;
        for (size_t i = 0; i < nh; i++) {
            double e = exp(w[i] - w[0]);
            inr += mark[x[i]];
            if (i < nt) ttot += e, trm += mark[x[i]] ? e : 0;
            else sum += e, sub += mark[x[i]] ? e : 0;
        }
        int k = inr == nh                ? K_ALL
                : sub > 0.875 * sum && sub > 0 ? K_ANEW
                : trm > 0.875 * ttot     ? K_TOPADD
                : trm > 0                ? K_TOPSUB
                : sub > 0                ? K_SUB
                                         : K_PLAIN;
        g_kind[k]++;
    }
}

/* 3. 4,000 keys (d 64, from row 7 on) around 40 centres in 64 clusters, G = 3, temp 0.7, float32
 * and float16 rows; (a) a table of 2,500 slots (3 chunks of 834), budget 600, three plans; (b)
 * one of 20 (one chunk, under KST_KVSC_TOP), budget 20, two plans. The items of a fourth step's
 * queries, then for each head R (the best chunk: the one holding the head's best weighted row):
 * empty; 200 random ids; the best chunk's 32nd best row and 100 random; its best 31 rows; its
 * rows but its best 32 and its 3 lightest; all its rows; every held row (and 50 others); every
 * held row but the best chunk's 3 lightest (the estimate theirs alone: a difference of the
 * chunk's float sums would keep little of it). Each head's (o, lse, count) the float64 estimate;
 * the cases finish meets counted (classify) and each asserted reached. */
static void test_items_finish(void **state) {
    (void)state;
    const size_t n = 4000, d = 64, C = 64, G = 3, ncent = 40, row0 = 7;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), Q[4 * 3 * 64], o[64], lse;
    uint32_t *rid = malloc((n + 8) * sizeof *rid), *xs = malloc(KST_KVSC_CH * sizeof *xs);
    uint8_t *mark = calloc(n, 1);
    double *ws = malloc(KST_KVSC_CH * sizeof *ws), ro[64], rlse, worst = 0;
    size_t checks = 0, tau_rows = 0, tau_moved = 0;
    uint8_t *one = calloc(n, 1);
    memset(g_kind, 0, sizeof g_kind);
    kst_error err;
    for (int f16 = 0; f16 < 2; f16++) {
        tc_seed(3);
        sc_rows R;
        rows_make(&R, cen, n, d, row0, f16, ncent);
        mix_queries(Q, cen, 4, G, 1, d, ncent);
        kst_kvtc T = {0};
        assert_ok(kst_kvtc_build(&T, rows_K0(&R), f16, n, d, C, 31, &err), &err);
        for (int tb = 0; tb < 2; tb++) {
            size_t cap = tb ? 20 : 2500, B = tb ? 20 : 600, np = tb ? 2 : 3;
            kst_kvsc S = {0};
            assert_ok(kst_kvsc_setup(&S, &T, G, cap, &err), &err);
            for (size_t s = 0; s < np; s++)
                plan_checked(&S, &T, Q + s * G * d, s ? Q + (s - 1) * G * d : NULL, G, scale, temp, B, "items: plan");
            sc_check(&S, &T, "items");
            const float *Qs = Q + 3 * G * d;
            size_t st, held = 0;
            float *it = make_items(&S, Qs, G, &R, scale, &st);
            for (size_t s = 0; s < S.cap; s++) held += S.key[s] != KST_KVSC_FREE;
            for (size_t g = 0; g < G; g++) {
                const float *q = Qs + g * d;
                /* the chunk holding head g's best weighted row */
                size_t cb = 0;
                double best = -INFINITY;
                for (size_t cc = 0; cc < S.nc; cc++) {
                    size_t nh = chunk_rows(&S, &T, cc, &R, q, scale, xs, ws);
                    if (nh && ws[0] > best) best = ws[0], cb = cc;
                }
                size_t nh = chunk_rows(&S, &T, cb, &R, q, scale, xs, ws);
                for (int rc = 0; rc < 8; rc++) {
                    size_t m = 0;
                    memset(mark, 0, n);
#define ADD(y)                                          \
    do {                                                \
        uint32_t y_ = (uint32_t)(y);                    \
        if (!mark[y_]) mark[y_] = 1, rid[m++] = y_;     \
    } while (0)
                    if (rc == 1 || rc == 2)
                        for (size_t i = 0; i < (rc == 1 ? 200u : 100u); i++) ADD(tc_below(n));
                    if (rc == 2 && nh >= KST_KVSC_TOP) ADD(xs[KST_KVSC_TOP - 1]);
                    if (rc == 2 && nh < KST_KVSC_TOP && nh > 1) ADD(xs[nh - 1]);
                    if (rc == 3)
                        for (size_t i = 0; i + 1 < nh && i < KST_KVSC_TOP - 1; i++) ADD(xs[i]);
                    if (rc == 4)
                        for (size_t i = KST_KVSC_TOP; i + 3 < nh; i++) ADD(xs[i]);
                    if (rc == 5)
                        for (size_t i = 0; i < nh; i++) ADD(xs[i]);
                    if (rc == 7) { /* every held row but the best chunk's 3 lightest: the estimate is theirs */
                        for (size_t i = 0; i + 3 < nh; i++) ADD(xs[i]);
                        for (size_t s = 0; s < S.cap; s++)
                            if (S.key[s] != KST_KVSC_FREE && s / S.ch != cb) ADD(S.key[s]);
                    }
                    if (rc == 6) {
                        for (size_t s = 0; s < S.cap; s++)
                            if (S.key[s] != KST_KVSC_FREE) ADD(S.key[s]);
                        for (size_t i = 0; i < 50; i++) ADD(tc_below(n));
                    }
#undef ADD
                    for (size_t i = m; i > 1; i--) { /* any order */
                        size_t j = tc_below(i);
                        uint32_t t = rid[i - 1];
                        rid[i - 1] = rid[j];
                        rid[j] = t;
                    }
                    char what[128];
                    snprintf(what, sizeof what, "%s, table of %zu, head %zu, R case %d (%zu ids)", f16 ? "float16" : "float32",
                             S.cap, g, rc, m);
                    size_t rgot = est_ref64(ro, &rlse, &T, S.m, NULL, &R, q, scale, mark, NULL, INFINITY, 0);
                    /* every other case with the retrieved keys' scores given (as the search's: float64
                     * dots rounded to float), the others made from the keys */
                    float *rs = NULL;
                    if (rc & 1) {
                        rs = malloc((m ? m : 1) * sizeof *rs);
                        for (size_t i = 0; i < m; i++) rs[i] = (float)(score64(&R, q, rid[i], 1.0));
                    }
                    size_t got = finish(&S, it, st, g, q, &R, scale, rid, rs, m, INFINITY, 1, o, &lse);
                    free(rs);
                    double dev = check_out(what, o, lse, got, ro, rlse, rgot, d);
                    worst = dev > worst ? dev : worst;
                    if (rc == 6 && (got != 0 || lse != -INFINITY)) fail_msg("%s: every held row retrieved, %zu kept", what, got);
                    if (rc == 0 && got != held) fail_msg("%s: %zu rows held, %zu kept", what, held, got);
                    classify(&S, &T, &R, q, scale, mark, xs, ws);
                    checks++;
                    /* tau: between two of the best chunk's best scores outside R (1 to 4 above it);
                     * the best rows of every chunk outside R above it (one) weighted 1 (cap 0) or
                     * capped (cap 1, the library's default). A tau is
                     * taken where no row above it lies within 2 places of the best rows' edge and
                     * none within 1e-3 of it (float ranks and scores then decide as float64's) */
                    if (rc != 5 && rc != 6) {
                        double top[8];
                        size_t ntop = 0;
                        nh = chunk_rows(&S, &T, cb, &R, q, scale, xs, ws);
                        for (size_t i = 0; i < nh && ntop < 8; i++)
                            if (!mark[xs[i]]) top[ntop++] = score64(&R, q, xs[i], scale);
                        for (size_t i = 0; i + 1 < ntop; i++) /* (descending) */
                            for (size_t j = i + 1; j < ntop; j++)
                                if (top[j] > top[i]) {
                                    double t = top[i];
                                    top[i] = top[j];
                                    top[j] = t;
                                }
                        for (size_t k = 0; k + 1 < ntop && k < 4; k++) {
                            double tau = 0.5 * (top[k] + top[k + 1]);
                            int ok = top[k] - top[k + 1] > 2e-3;
                            size_t n1 = 0;
                            memset(one, 0, n);
                            for (size_t cc = 0; cc < S.nc && ok; cc++) {
                                size_t nc = chunk_rows(&S, &T, cc, &R, q, scale, xs, ws);
                                for (size_t i = 0; i < nc; i++) {
                                    if (mark[xs[i]]) continue;
                                    double sx = score64(&R, q, xs[i], scale);
                                    if (fabs(sx - tau) < 1e-3) ok = 0;
                                    if (!(sx > tau)) continue;
                                    if (nc > KST_KVSC_TOP && i + 2 >= KST_KVSC_TOP && i < KST_KVSC_TOP + 2) ok = 0;
                                    if (i < KST_KVSC_TOP && S.lw[S.cid[S.slot[xs[i]]]] > 0) one[xs[i]] = 1, n1++;
                                }
                            }
                            if (!ok || !n1) continue;
                            double r0[64], r0lse;
                            est_ref64(r0, &r0lse, &T, S.m, NULL, &R, q, scale, mark, NULL, INFINITY, 0);
                            for (int capd = 0; capd < 2; capd++) { /* (attended once; the library's capped estimate) */
                                rgot = est_ref64(ro, &rlse, &T, S.m, NULL, &R, q, scale, mark, one, tau, capd);
                                got = finish(&S, it, st, g, q, &R, scale, rid, NULL, m, (float)tau, capd, o, &lse);
                                snprintf(what, sizeof what, "%s, table of %zu, head %zu, R case %d, tau with %zu rows above, cap %d",
                                         f16 ? "float16" : "float32", S.cap, g, rc, n1, capd);
                                dev = check_out(what, o, lse, got, ro, rlse, rgot, d);
                                worst = dev > worst ? dev : worst;
                                for (size_t i = 0; i < d; i++) /* (the rows above tau moved the estimate) */
                                    if (fabs(r0[i] - ro[i]) > 4 * (TOL_A + TOL_R * fabs(ro[i]))) {
                                        tau_moved++;
                                        break;
                                    }
                                tau_rows += n1;
                                checks++;
                            }
                            break;
                        }
                    }
                    nh = chunk_rows(&S, &T, cb, &R, q, scale, xs, ws);
                }
            }
            free(it);
            kst_kvsc_free(&S);
        }
        kst_kvtc_free(&T);
        rows_free(&R);
    }
    print_message("items + finish: %zu estimates the float64 estimator (up to %.3f tolerances); (head, chunk) cases:", checks,
                  worst);
    for (int k = 0; k < K_N; k++) print_message(" %s %zu;", k_names[k], g_kind[k]);
    print_message("\n");
    for (int k = 0; k < K_N; k++)
        if (!g_kind[k]) fail_msg("finish's case '%s' never reached", k_names[k]);
    print_message("items + finish with tau (cap 0 and 1): %zu best rows above it, the estimate moved past 4 tolerances in %zu "
                  "cases\n", tau_rows, tau_moved);
    if (tau_moved < 8) fail_msg("tau moved the estimate in %zu cases only", tau_moved);
    free(one);
    free(cen);
    free(rid);
    free(xs);
    free(mark);
    free(ws);
}

/* ---------------------------------------------------------------------------------------------
 * 4. unbiasedness */

/* 4. 1,200 keys (d 16) around 8 centres in 16 clusters, G = 2, 400 cluster orders: 8 k-means
 * builds, each then reassigned 49 times with other shuffle seeds (na and the lengths reset,
 * kst_kvtc_add: the same clusters, new orders). Each order a fresh cache (a table of 128 slots)
 * planned twice, budget 96, temp 0.7: first from queries Q1 (head 0 near centre 0, head 1 near
 * centre 2), then Q2 (near centres 4 and 6): m_c = the first plan's n_c where the second plans
 * fewer, the table then over its slots (cut back): m_c depends on the clusters' sizes alone,
 * asserted the same over a build's orders. The estimate for Q1 again, R every other key of
 * centres 0 and 1 and 20 random ids, made by kst_kvsc_item + kst_kvsc_finish and checked against
 * the float64 estimator each trial; for each head the mean of exp(lse) over the exact sum of
 * exp(s) over the keys outside R of the clusters held (m_c > 0) is 1 within 5 standard errors
 * (a member lies in its cluster's first m_c places with probability m_c / len_c, whatever R is).
 * Wrong weights on the same rows (float64): len_c / n_c of the last plan and 1 must each be 5
 * standard errors off on some head. */
static void test_unbiased(void **state) {
    (void)state;
    tc_seed(4);
    const size_t n = 1200, d = 16, C = 16, G = 2, ncent = 8, trials = 400, B = 96, cap = 128;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), Q1[2 * 16], Q2[2 * 16], o[16], lse;
    uint32_t *rid = malloc(n * sizeof *rid), m0[16];
    uint8_t *mark = calloc(n, 1);
    sc_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent);
    /* each key's centre (mix_data does not keep it): the nearest */
    uint32_t *lab = malloc(n * sizeof *lab);
    for (size_t x = 0; x < n; x++) {
        double bd = INFINITY;
        for (size_t k = 0; k < ncent; k++) {
            double dd = 0;
            for (size_t i = 0; i < d; i++) dd += (R.K[x * d + i] - cen[k * d + i]) * (R.K[x * d + i] - cen[k * d + i]);
            if (dd < bd) bd = dd, lab[x] = (uint32_t)k;
        }
    }
    for (size_t g = 0; g < G; g++)
        for (size_t i = 0; i < d; i++) {
            Q1[g * d + i] = (float)(1.2 * cen[(2 * g) * d + i] + 0.2 * kv_gauss());
            Q2[g * d + i] = (float)(1.2 * cen[(4 + 2 * g) * d + i] + 0.2 * kv_gauss());
        }
    size_t m = 0, half = 0;
    for (size_t x = 0; x < n; x++)
        if (lab[x] <= 1 && half++ % 2 == 0) mark[x] = 1, rid[m++] = (uint32_t)x;
    for (size_t i = 0; i < 20; i++) {
        uint32_t x = (uint32_t)tc_below(n);
        if (!mark[x]) mark[x] = 1, rid[m++] = x;
    }
    enum { NW = 4 };
    static const char *names[NW] = {"the code (len_c / m_c)", "float64 len_c / m_c", "len_c / n_c of the last plan",
                                    "weight 1"};
    double sum[2][NW] = {{0}}, sum2[2][NW] = {{0}}, share[2] = {0, 0}, ro[16], rlse, wt[16], worst = 0, *s = malloc(n * sizeof *s);
    size_t differ = 0, evicted = 0;
    kst_kvtc T = {0};
    kst_error err;
    for (size_t t = 0; t < trials; t++) {
        if (t % 50 == 0) {
            assert_ok(kst_kvtc_build(&T, R.K, 0, n, d, C, 1000 + 7 * t, &err), &err);
            assert_int_equal(T.C, C);
        } else { /* the same clusters in new orders */
            T.na = 0;
            memset(T.len, 0, C * sizeof *T.len);
            T.rng = 0x5851f42d4c957f2dull * (t + 1);
            assert_ok(kst_kvtc_add(&T, R.K, 0, n, &err), &err);
        }
        kst_kvsc S = {0};
        assert_ok(kst_kvsc_setup(&S, &T, G, cap, &err), &err);
        evicted += plan_checked(&S, &T, Q1, NULL, G, scale, temp, B, "unbiasedness: plan 1");
        evicted += plan_checked(&S, &T, Q2, Q1, G, scale, temp, B, "unbiasedness: plan 2");
        if (t % 50 < 2) sc_check(&S, &T, "unbiasedness");
        if (t % 50 == 0) memcpy(m0, S.m, C * sizeof *m0);
        else if (memcmp(m0, S.m, C * sizeof *m0) != 0) fail_msg("trial %zu: m_c differs from the build's first order's", t);
        for (size_t c = 0; c < C; c++) differ += S.m[c] != S.A.ns[c];
        size_t st;
        float *it = make_items(&S, Q1, G, &R, scale, &st);
        for (size_t g = 0; g < G; g++) {
            const float *q = Q1 + g * d;
            double mx = -INFINITY, ex = 0, rt = 0, est[NW];
            for (size_t x = 0; x < n; x++) s[x] = score64(&R, q, x, scale), mx = fmax(mx, s[x]);
            for (size_t x = 0; x < n; x++)
                if (!mark[x]) {
                    rt += exp(s[x] - mx);
                    if (S.m[T.of[x]]) ex += exp(s[x] - mx);
                }
            size_t got = finish(&S, it, st, g, q, &R, scale, rid, NULL, m, INFINITY, 1, o, &lse);
            size_t rgot = est_ref64(ro, &rlse, &T, S.m, NULL, &R, q, scale, mark, NULL, INFINITY, 0);
            char what[64];
            snprintf(what, sizeof what, "unbiasedness, trial %zu, head %zu", t, g);
            double dev = check_out(what, o, lse, got, ro, rlse, rgot, d);
            worst = dev > worst ? dev : worst;
            est[0] = exp((double)lse - mx);
            est[1] = exp(rlse - mx);
            for (size_t c = 0; c < C; c++) wt[c] = S.A.ns[c] ? (double)T.len[c] / (double)S.A.ns[c] : 0;
            est_ref64(ro, &rlse, &T, S.m, wt, &R, q, scale, mark, NULL, INFINITY, 0);
            est[2] = exp(rlse - mx);
            for (size_t c = 0; c < C; c++) wt[c] = S.m[c] ? 1 : 0;
            est_ref64(ro, &rlse, &T, S.m, wt, &R, q, scale, mark, NULL, INFINITY, 0);
            est[3] = exp(rlse - mx);
            for (size_t w = 0; w < NW; w++) {
                sum[g][w] += est[w] / ex;
                sum2[g][w] += est[w] / ex * est[w] / ex;
            }
            share[g] += ex / rt / (double)trials;
        }
        free(it);
        kst_kvsc_free(&S);
    }
    print_message("unbiasedness: %zu trials (each the float64 estimator, up to %.3f tolerances), %zu plans evicted, %zu "
                  "clusters where m_c != the last plan's n_c\n", trials, worst, evicted, differ);
    if (!evicted || !differ) fail_msg("the plans never evicted (%zu) or m_c always the last n_c (%zu)", evicted, differ);
    int caught[NW] = {0};
    for (size_t g = 0; g < G; g++) {
        print_message("head %zu (the clusters held hold %.3f of the sum outside R):\n", g, share[g]);
        for (size_t w = 0; w < NW; w++) {
            double mean = sum[g][w] / (double)trials, var = (sum2[g][w] - trials * mean * mean) / (double)(trials - 1),
                   se = sqrt(var / (double)trials);
            print_message("  %-32s mean estimate / exact %.4f, standard error %.4f (%+.1f SE)\n", names[w], mean, se,
                          (mean - 1) / se);
            int off = !(fabs(mean - 1) <= 5 * se);
            caught[w] |= off;
            if (w < 2 && off)
                fail_msg("head %zu, %s: mean ratio %.4f is %.1f standard errors from 1", g, names[w], mean, (mean - 1) / se);
            if (w < 2 && !(se < 0.03)) fail_msg("head %zu: standard error %.4f too wide to catch a wrong weight", g, se);
        }
    }
    for (size_t w = 2; w < NW; w++)
        if (!caught[w]) fail_msg("the wrong weight %s is within 5 standard errors on both heads: no power", names[w]);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(rid);
    free(mark);
    free(lab);
    free(s);
}

/* ---------------------------------------------------------------------------------------------
 * 5, 6. the decode step */

/* The float64 reference of one query head's step: exact as tc_ref64 (sinks, the exact tail, the
 * retrieved positions pos); then every member at a place < pre[c] of cluster c of T not
 * retrieved, weighted len_c / pre[c] (pre: the cache's m snapshotted before the step, or the
 * step's shared plan; NULL: no estimate), or, where one[x] (may be NULL: cache_above_tau),
 * weighing exp(s) + lambda (len_c / pre[c] - 1) exp(tau), tau the least retrieved score, lambda =
 * cap_shrink64(the such rows of clusters not held whole) (the library's capped estimate). Returns
 * those members. */
/* The table's 8-bit rows (tail_cache_q8) as kst_kv_q8 defines them: q = round(x * (127 / max |x|))
 * in float32, to nearest even, x ~ q * (max |x| / 127); out gets those values. */
static float q8_row(const float *x, size_t d, int8_t *q, float *out) {
    float m = 0;
    for (size_t i = 0; i < d; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    float inv = m > 0 ? 127.0f / m : 0, sc = m / 127.0f;
    for (size_t i = 0; i < d; i++) {
        long r = m > 0 ? (long)rintf(x[i] * inv) : 0;
        q[i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
        if (out) out[i] = (float)q[i] * sc;
    }
    return sc;
}

/* Ks, Vs (may be NULL: K, V): the rows the sample is read from (the 8-bit table's values). */
static size_t step_ref64(double *out, const float *q, const float *K, const float *V, size_t n, size_t d, double scale,
                         size_t sinks, size_t nidx, const int64_t *pos, size_t m, const kst_kvtc *T, const uint32_t *pre,
                         size_t *insample, const float *Ks, const float *Vs, const uint8_t *one) {
    double *l = malloc(n * sizeof *l), *w = calloc(n, sizeof *w), mx;
    uint8_t *ret = calloc(nidx + 1, 1);
    float *Vm = NULL;
    size_t used = 0;
    mx = tc_exact64(l, w, ret, q, K, n, d, scale, sinks, nidx, pos, m);
    double tau = INFINITY; /* (the least retrieved score) */
    for (size_t i = 0; i < m; i++) tau = l[pos[i]] < tau ? l[pos[i]] : tau;
    size_t nac = 0; /* (rows above tau given a part at tau's weight) */
    for (size_t c = 0; pre && one && c < T->C; c++)
        for (uint32_t i = 0; i < pre[c] && pre[c] < T->len[c]; i++)
            nac += T->mem[c][i] < nidx && !ret[T->mem[c][i]] && one[T->mem[c][i]];
    if (Ks) {
        Vm = malloc(n * d * sizeof *Vm);
        memcpy(Vm, V, n * d * sizeof *Vm);
    }
    for (size_t c = 0; pre && c < T->C; c++) {
        if (!pre[c]) continue;
        if (pre[c] > T->len[c]) fail_msg("cluster %zu: %u held of %u members", c, pre[c], T->len[c]);
        double wc = (double)T->len[c] / (double)pre[c];
        for (uint32_t i = 0; i < pre[c]; i++) {
            uint32_t x = T->mem[c][i];
            if (x >= nidx) fail_msg("cluster %zu holds node %u of %zu indexed", c, x, nidx);
            if (ret[x]) {
                ++*insample;
                continue;
            }
            double ls = l[sinks + x];
            if (Ks) { /* (its score and value as the table holds them) */
                ls = dot64(q, Ks + (sinks + x) * d, d) * scale;
                memcpy(Vm + (sinks + x) * d, Vs + (sinks + x) * d, d * sizeof *Vm);
            }
            w[sinks + x] = one && one[x] ? exp(ls - mx) + cap_shrink64(nac) * (wc - 1) * exp(tau - mx) : wc * exp(ls - mx);
            used++;
        }
    }
    wsum_rows64(out, w, Vm ? Vm : V, n, d);
    free(l);
    free(w);
    free(ret);
    free(Vm);
    return used;
}

/* One step of layer g_layer of c checked against step_ref64 for every query head: pre[kh] (C of KV head
 * kh) the prefixes the cache held before the step, or NULL: the step's shared plan
 * (kst_kvtc_group_plan of the G heads' kst_kvtc_scores, checked by check_plan64); T read after
 * the step (its joins in); the retrieved keys reproduced by kst_kvc_search_group /
 * kst_kvc_search as the step runs them; stats.sampled those members summed. out_keep (may be
 * NULL) gets the output. Returns stats.sampled. */
static size_t g_insample;
static size_t g_tau_ones, g_tau_amb, g_tau_heads; /* rows check_step_sc's references capped (above tau); heads not compared */
static size_t g_layer; /* the layer check_step_sc and snap_m read (0 but in test 7) */
static int g_q8;       /* the caches made with tail_cache_q8: the estimator reads the 8-bit rows */
/* The prefixes every KV head's cache holds now (pre[kh], C each), asserted planned, and its
 * table's slots (g_snap: which node each holds, for cache_above_tau). */
static struct {
    uint32_t *key;
    size_t cap, ch, nc;
} g_snap[16];
static void gsnap_free(void) {
    for (size_t kh = 0; kh < 16; kh++) {
        free(g_snap[kh].key);
        g_snap[kh].key = NULL;
        g_snap[kh].cap = 0;
    }
}
static void snap_m(kst_kvc *c, uint32_t *const *pre, size_t C, const char *what) {
    assert_true(kst_kvc_opts_of(c)->kv_heads <= 16);
    for (size_t kh = 0; kh < kst_kvc_opts_of(c)->kv_heads; kh++) {
        const kst_kvsc *S = kst_kvc_sample_cache(c, g_layer, kh);
        if (!S || !S->ready) fail_msg("%s: KV head %zu has no planned sample cache", what, kh);
        assert_int_equal(S->C, C);
        memcpy(pre[kh], S->m, C * sizeof(uint32_t));
        free(g_snap[kh].key);
        g_snap[kh].key = malloc(S->cap * sizeof(uint32_t));
        memcpy(g_snap[kh].key, S->key, S->cap * sizeof(uint32_t));
        g_snap[kh].cap = S->cap;
        g_snap[kh].ch = S->ch;
        g_snap[kh].nc = S->nc;
    }
}

/* The held rows kst_kvsc_finish counts above tau for query head q (kv_scache.h, tau): in each chunk of
 * the table snapshotted (g_snap[kh]), its KST_KVSC_TOP best rows by s + log(len_c / pre[c]) (s:
 * the score as the table holds the row, Ks, or K), those outside R (ret) of a cluster not held
 * whole that score above tau (the least retrieved score) get one[x] = 1. A row above tau within
 * a place of the best rows' edge, or a score within 1e-4 of tau, would let float and float64
 * disagree: *amb counts those (the head is then not compared). Returns the rows set. */
static size_t cache_above_tau(uint8_t *one, size_t kh, const float *q, const float *K, const float *Ks, size_t n, size_t d,
                              double scale, size_t sinks, size_t nidx, const int64_t *pos, size_t m, const kst_kvtc *T,
                              const uint32_t *pre, size_t *amb) {
    double tau = INFINITY, *ws = malloc((KST_KVSC_CH + nidx + 1) * sizeof *ws), *ss = malloc((KST_KVSC_CH + nidx + 1) * sizeof *ss);
    uint32_t *xs = malloc((KST_KVSC_CH + nidx + 1) * sizeof *xs);
    uint8_t *ret = calloc(nidx + 1, 1);
    size_t set = 0;
    memset(one, 0, nidx + 1);
    for (size_t i = 0; i < m; i++) {
        double a = dot64(q, K + (size_t)pos[i] * d, d);
        tau = a * scale < tau ? a * scale : tau;
        ret[pos[i] - (int64_t)sinks] = 1;
    }
    const float *Kr = Ks ? Ks : K;
    /* Keys appended since the snapshot that joined a prefix took the slots of members of their
     * cluster pushed out (kst_kvsc_joined), which the snapshot does not show: a joined key is
     * placed in the chunk its cluster's pushed-out members were in where that is one chunk; else
     * (unplaced) a head where it scores above tau, or where the unplaced could push a row above
     * tau out of its chunk's best, is not compared. */
    size_t C = T->C, J = 0;
    uint8_t *inb = calloc(nidx + 1, 1), *held = calloc(nidx + 1, 1);
    int64_t *pc = malloc(C * sizeof *pc); /* (cluster: the chunk of its pushed-out members, -1 none, -2 several) */
    uint32_t *jx = malloc((nidx + 1) * sizeof *jx);
    size_t nj = 0;
    for (size_t c = 0; c < C; c++) pc[c] = -1;
    for (size_t j = 0; j < g_snap[kh].cap; j++)
        if (g_snap[kh].key[j] != KST_KVSC_FREE && g_snap[kh].key[j] < nidx) inb[g_snap[kh].key[j]] = 1;
    for (size_t c = 0; c < C; c++)
        for (uint32_t i = 0; i < pre[c]; i++) held[T->mem[c][i]] = 1;
    for (size_t j = 0; j < g_snap[kh].cap; j++) {
        uint32_t x = g_snap[kh].key[j];
        if (x == KST_KVSC_FREE || x >= nidx || held[x]) continue;
        uint32_t c = T->of[x];
        int64_t cc = (int64_t)(j / g_snap[kh].ch);
        pc[c] = pc[c] == -1 || pc[c] == cc ? cc : -2;
    }
    for (size_t c = 0; c < C; c++)
        for (uint32_t i = 0; i < pre[c]; i++) {
            uint32_t x = T->mem[c][i];
            if (inb[x]) continue;
            if (pc[c] >= 0) {
                jx[nj++] = x;
                continue;
            }
            J++;
            double a = dot64(q, Kr + (sinks + x) * d, d);
            if (!ret[x] && pre[c] < T->len[c] && a * scale > tau - 1e-4) ++*amb;
        }
    for (size_t cc = 0; cc < g_snap[kh].nc && tau < INFINITY; cc++) {
        size_t j0 = cc * g_snap[kh].ch, j1 = j0 + g_snap[kh].ch < g_snap[kh].cap ? j0 + g_snap[kh].ch : g_snap[kh].cap, nh = 0;
        for (size_t j = j0; j < j1 + nj; j++) {
            uint32_t x;
            if (j < j1) {
                x = g_snap[kh].key[j];
                if (x == KST_KVSC_FREE) continue;
                if (x >= nidx || sinks + x >= n) fail_msg("slot %zu holds node %u of %zu indexed", j, x, nidx);
                if (!held[x]) continue; /* (pushed out by a join) */
            } else { /* the joined keys placed in this chunk */
                x = jx[j - j1];
                if (pc[T->of[x]] != (int64_t)cc) continue;
            }
            uint32_t c = T->of[x];
            double sx = dot64(q, Kr + (sinks + x) * d, d) * scale, v = sx + log((double)T->len[c] / (double)pre[c]);
            size_t i = nh++;
            for (; i > 0 && ws[i - 1] < v; i--) {
                ws[i] = ws[i - 1];
                ss[i] = ss[i - 1];
                xs[i] = xs[i - 1];
            }
            ws[i] = v;
            ss[i] = sx;
            xs[i] = x;
        }
        for (size_t i = 0; i < nh; i++) {
            uint32_t x = xs[i], c = T->of[x];
            if (ret[x] || pre[c] >= T->len[c]) continue;
            if (fabs(ss[i] - tau) < 1e-4) ++*amb;
            if (!(ss[i] > tau)) continue;
            if (nh + J > KST_KVSC_TOP && i + 1 + J >= KST_KVSC_TOP && i <= KST_KVSC_TOP) ++*amb; /* (the best rows' edge) */
            if (i < KST_KVSC_TOP) one[x] = 1, set++;
        }
    }
    free(pc);
    free(jx);
    free(inb);
    free(held);
    free(ws);
    free(ss);
    free(xs);
    free(ret);
    return set;
}

static size_t check_step_sc(kst_kvc *c, const float *K, const float *V, size_t n, const float *q, size_t top_k, size_t ef,
                            float temp, uint32_t *const *pre, float *out_keep, const char *what) {
    const kst_kvc_opts *o = kst_kvc_opts_of(c);
    size_t H = o->kv_heads, QH = o->q_heads, G = QH / H, d = o->head_dim, sinks = o->sinks, B = o->tail_samples;
    float *out = malloc(QH * d * sizeof *out), *Kh = malloc(n * d * sizeof *Kh), *Vh = malloc(n * d * sizeof *Vh),
          *Kq = g_q8 && pre ? malloc(n * d * sizeof *Kq) : NULL, *Vq = g_q8 && pre ? malloc(n * d * sizeof *Vq) : NULL;
    int8_t q8b[512];
    double ref[512];
    kst_kvc_stats st;
    kst_error err;
    assert_ok(kst_kvc_attend(c, g_layer, q, top_k, ef, out, &st, &err), &err);
    size_t nidx = kst_kvc_indexed(c, g_layer), k = top_k < nidx ? top_k : nidx, tot = 0;
    assert_int_equal(st.tokens, n);
    assert_int_equal(st.indexed, nidx);
    int64_t *pos = malloc((k + 1) * sizeof *pos), *posg = malloc((G * k + 1) * sizeof *posg);
    uint8_t *one = malloc(nidx + 1);
    assert_true(G <= 16);
    for (size_t kh = 0; kh < H; kh++) {
        const kst_kvtc *T = kst_kvc_tail_clusters(c, g_layer, kh);
        if (!T) fail_msg("%s: KV head %zu has no clusters", what, kh);
        assert_int_equal(T->na, nidx);
        kst_kvtc_group A = {0};
        const uint32_t *ns = pre ? pre[kh] : NULL;
        head_rows(Kh, K, n, H, kh, d);
        head_rows(Vh, V, n, H, kh, d);
        for (size_t t = 0; Kq && t < n; t++) {
            q8_row(Kh + t * d, d, q8b, Kq + t * d);
            q8_row(Vh + t * d, d, q8b, Vq + t * d);
        }
        if (!pre) {
            float *cs = malloc(G * T->C * sizeof *cs);
            kst_kvtc_scores(T, q + kh * G * d, G, o->scale, cs);
            assert_ok(kst_kvtc_group_plan(T, &A, cs, G, temp, B, &err), &err);
            check_plan64(T, A.ns, A.tot, q + kh * G * d, G, o->scale, temp, B, what);
            ns = A.ns;
            free(cs);
        }
        size_t fg[16] = {0};
        if (k && o->group_search)
            assert_ok(kst_kvc_search_group(c, g_layer, kh, q + kh * G * d, k, ef, posg, fg, NULL, &err), &err);
        for (size_t g = 0; g < G; g++) {
            size_t h = kh * G + g, found = 0;
            const float *qh = q + h * d;
            if (k && o->group_search) {
                found = fg[g];
                memcpy(pos, posg + g * k, found * sizeof *pos);
            } else if (k) {
                assert_ok(kst_kvc_search(c, g_layer, h, qh, k, ef, pos, &found, NULL, &err), &err);
            }
            size_t amb = 0;
            if (pre && found < nidx) g_tau_ones += cache_above_tau(one, kh, qh, Kh, Kq, n, d, o->scale, sinks, nidx, pos, found, T, ns, &amb);
            tot += step_ref64(ref, qh, Kh, Vh, n, d, o->scale, sinks, nidx, pos, found, T, found < nidx ? ns : NULL,
                              &g_insample, Kq, Vq, pre ? one : NULL);
            g_tau_heads += pre && found < nidx;
            if (amb) {
                g_tau_amb++;
                continue;
            }
            for (size_t j = 0; j < d; j++)
                if (!(fabs(out[h * d + j] - ref[j]) <= TOL_A + TOL_R * fabs(ref[j])))
                    fail_msg("%s: head %zu, dim %zu: %.7g, float64 estimator %.7g (%zu indexed, %zu retrieved, %d OpenMP "
                             "threads)", what, h, j, out[h * d + j], ref[j], nidx, found, omp_get_max_threads());
        }
        kst_kvtc_group_free(&A);
    }
    if (st.sampled != tot) fail_msg("%s: stats.sampled %zu, the estimator's %zu", what, st.sampled, tot);
    if (out_keep) memcpy(out_keep, out, QH * d * sizeof *out);
    free(out);
    free(Kh);
    free(Vh);
    free(Kq);
    free(Vq);
    free(pos);
    free(posg);
    free(one);
    return st.sampled;
}


/* A cache of the first n tokens of K, V ((n, H, d); float16 when o->f16, rounded in place),
 * built with nq prefill queries Qp or none, C clusters at temp, the shared sample on, the
 * sample cache on or off (its default table). */
static kst_kvc *make_cache(const kst_kvc_opts *o, float *K, float *V, size_t n, const float *Qp, size_t nq, size_t C,
                           float temp, int cache) {
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(o, &c, &err), &err);
    kst_kvc_set_tail_clusters(c, C, temp);
    kst_kvc_set_tail_share(c, 1);
    kst_kvc_set_tail_cache(c, cache, 0);
    kst_kvc_set_tail_cache_q8(c, cache && g_q8);
    append_rows(c, K, V, n);
    assert_ok(kst_kvc_build(c, 0, Qp, nq, &err), &err);
    return c;
}

/* 5 (and 6). 2 KV heads, 1,500 indexed keys in 32 clusters each, budget 128 (the table 256):
 * (a) float32 d 32, G 2, the key-only index, 1 thread; (b) float16 d 64, G 4, the attention-aware
 * index (48 prefill queries), 3 threads; (c) as (a) with opts.group_search and 3 threads. 7 steps
 * each (top_k 16, 4, 64 in turn), 40 tokens appended one at a time before step 3 and 500 at once
 * before step 5 (the rows grow past 2,048 and move). Step 0: the shared plan's estimator (the cache only plans), and the output of a
 * twin cache without the sample cache (same data and options) within the tolerance. Steps 1..6:
 * m snapshotted from kst_kvc_sample_cache before the step, the estimator from those prefixes
 * (orders after the step's joins); after each step every KV head's cache meets the invariants
 * (sc_check) and its plan the float64 plan of the query rows of the two steps before it (of the
 * first step after steps 0 and 1). In (c) the GPU's uploads go in pieces of at most 64 rows
 * (KESTREL_KV_SC_PIECE; 2,048 by default): the first plans' 512 rows in 8. Runs 3 and 4 repeat
 * (b) and (c) with the table in 8 bits. On the GPU the scatter kernel reads the new rows where
 * the cache holds them (KESTREL_KV_SC_MAPPED=2: registered; again after step 5's move; each KV
 * head's changes named in its own region of the staging, in run 4 of 64 entries, so that a KV
 * head with more goes through the pieces), but in run 2 from their staging in pinned memory
 * (=1, the default) and in run 3 from a copy of it (=0). */
static void run_steps(int gpu) {
    const size_t H = 2, ncent = 24, nq = 48, C = 32, B = 128, steps = 7, n0 = 1500 + 4 + 64, nmax = n0 + 540;
    static const size_t tk[3] = {16, 4, 64}, efs[3] = {48, 16, 128};
    size_t nsteps = 0, sampled = 0, twin = 0, joined = 0;
    double maxoff0 = g_maxoff;
    g_maxoff = 0;
    g_insample = g_tau_ones = g_tau_amb = g_tau_heads = 0;
    int was = omp_get_max_threads();
    for (int run = 0; run < 5; run++) {
        tc_seed(50 + (uint64_t)run);
        int f16 = run == 1 || run == 3, attn = f16;
        size_t G = f16 ? 4 : 2, QH = H * G, d = f16 ? 64 : 32;
        g_q8 = run >= 3;
        omp_set_num_threads(run == 0 ? 1 : 3);
        float *K = malloc(nmax * H * d * sizeof *K), *V = malloc(nmax * H * d * sizeof *V),
              *cen = malloc(H * ncent * d * sizeof *cen), *Qp = malloc(nq * QH * d * sizeof *Qp),
              *Q = malloc(steps * QH * d * sizeof *Q), *o1 = malloc(QH * d * sizeof *o1), *o2 = malloc(QH * d * sizeof *o2);
        mix_data(K, V, cen, nmax, H, d, ncent, 1.0, 0.5);
        mix_queries(Qp, cen, nq, QH, H, d, ncent);
        mix_queries(Q, cen, steps, QH, H, d, ncent);
        kst_kvc_opts o = tc_base_opts(d, f16, attn ? KST_KVC_INDEX_ATTN : KST_KVC_INDEX_KEYS, B, H, QH);
        o.gpu = gpu;
        o.group_search = run == 2 || run == 4;
        if (o.group_search) setenv("KESTREL_KV_SC_PIECE", "64", 1); /* (the GPU's uploads in pieces of 64 rows) */
        /* (the rows read where they are, registered; run 2: staged, read in place, the default; 3: staged, copied) */
        setenv("KESTREL_KV_SC_MAPPED", run == 2 ? "1" : run == 3 ? "0" : "2", 1);
        kst_kvc *c = make_cache(&o, K, V, n0, attn ? Qp : NULL, attn ? nq : 0, C, 0.5f, 1);
        unsetenv("KESTREL_KV_SC_PIECE");
        unsetenv("KESTREL_KV_SC_MAPPED");
        kst_kvc *c2 = make_cache(&o, K, V, n0, attn ? Qp : NULL, attn ? nq : 0, C, 0.5f, 0);
        size_t at = n0;
        uint32_t *pre[2] = {malloc(C * sizeof(uint32_t)), malloc(C * sizeof(uint32_t))};
        for (size_t s = 0; s < steps; s++) {
            if (s == 3) {
                for (size_t i = 0; i < 40; i++) append_rows(c, K + (at + i) * H * d, V + (at + i) * H * d, 1);
                at += 40;
            } else if (s == 5) { /* (past the 2,048 rows held: the rows move) */
                append_rows(c, K + at * H * d, V + at * H * d, 500);
                at += 500;
            }
            char what[160];
            snprintf(what, sizeof what, "%s%s, G %zu, %s index%s, %s, %d threads, step %zu (top_k %zu)",
                     f16 ? "float16" : "float32", g_q8 ? ", table in 8 bits" : "", G, attn ? "attention-aware" : "key-only",
                     o.group_search ? ", group search" : "",
                     gpu ? "gpu" : "cpu", omp_get_max_threads(), s, tk[s % 3]);
            const float *q = Q + s * QH * d;
            if (s == 0) {
                for (size_t kh = 0; kh < H; kh++)
                    if (kst_kvc_sample_cache(c, 0, kh)) fail_msg("%s: a sample cache before the first step", what);
                check_step_sc(c, K, V, at, q, tk[0], efs[0], 0.5f, NULL, o1, what);
                check_step_sc(c2, K, V, at, q, tk[0], efs[0], 0.5f, NULL, o2, what);
                for (size_t i = 0; i < QH * d; i++)
                    if (!(fabs(o1[i] - o2[i]) <= TOL_A + TOL_R * fabs(o2[i])))
                        fail_msg("%s: value %zu: %.7g, the twin without the sample cache %.7g", what, i, o1[i], o2[i]);
                twin++;
            } else {
                size_t na0[2];
                snap_m(c, pre, C, what);
                for (size_t kh = 0; kh < H; kh++) na0[kh] = kst_kvc_tail_clusters(c, 0, kh)->na;
                sampled += check_step_sc(c, K, V, at, q, tk[s % 3], efs[s % 3], 0.5f, pre, NULL, what);
                for (size_t kh = 0; kh < H; kh++) { /* the keys the step's clusters took, inside a prefix */
                    const kst_kvtc *T = kst_kvc_tail_clusters(c, 0, kh);
                    for (size_t x = na0[kh]; x < T->na; x++) joined += T->pos[x] < pre[kh][T->of[x]];
                }
            }
            for (size_t kh = 0; kh < H; kh++) {
                const kst_kvsc *S = kst_kvc_sample_cache(c, 0, kh);
                const kst_kvtc *T = kst_kvc_tail_clusters(c, 0, kh);
                if (!S) fail_msg("%s: no sample cache after the step", what);
                sc_check(S, T, what);
                /* the plan held after step s: step 0's after steps 0 and 1 (the first plans from its
                 * own step), then steps s - 1 and s - 2's (made while step s runs) */
                float *Q2 = malloc(2 * G * d * sizeof *Q2);
                size_t s1 = s < 2 ? 0 : s - 1;
                memcpy(Q2, Q + (s1 * QH + kh * G) * d, G * d * sizeof *Q2);
                if (s >= 2) memcpy(Q2 + G * d, Q + ((s - 2) * QH + kh * G) * d, G * d * sizeof *Q2);
                check_plan64(T, S->A.ns, S->A.tot, Q2, s >= 2 ? 2 * G : G, kst_kvc_opts_of(c)->scale, 0.5, B, what);
                free(Q2);
            }
            nsteps++;
        }
        kst_kvc_free(c);
        kst_kvc_free(c2);
        free(pre[0]);
        free(pre[1]);
        free(K);
        free(V);
        free(cen);
        free(Qp);
        free(Q);
        free(o1);
        free(o2);
    }
    g_q8 = 0;
    omp_set_num_threads(was);
    print_message("sample cache steps (%s): %zu steps the float64 estimator (%zu first steps also the twin without the "
                  "cache), %zu rows stood for the rest, %zu retrieved keys held, %zu appended keys joined inside a prefix; plans "
                  "within %.3f of float64\n", gpu ? "gpu" : "cpu", nsteps, twin, sampled, g_insample, joined, g_maxoff);
    if (!joined) fail_msg("no appended key joined a cluster inside its held prefix");
    if (g_insample < 50) fail_msg("only %zu retrieved keys among the held rows (their terms taken out)", g_insample);
    print_message("held rows above tau capped by the references: %zu; heads not compared (a row above tau at the "
                  "best rows' edge or in a slot a join took): %zu of %zu\n", g_tau_ones, g_tau_amb, g_tau_heads);
    if (!g_tau_ones) fail_msg("no held row scored above tau: the missed keys' rule is not reached");
    if (g_tau_amb * 10 > g_tau_heads) fail_msg("%zu heads not compared of %zu", g_tau_amb, g_tau_heads);
    g_maxoff = g_maxoff > maxoff0 ? g_maxoff : maxoff0;
}

static void test_steps(void **state) {
    (void)state;
    run_steps(0);
}

/* 5b'. A plan row (kst_kv_alloc_add, kst_kvsc_plan_make's inner pass) against float64: a +=
 * lf exp(temp (cs - max cs)) / Z, widths 1, 5, 8, 13 and 2,053 (the 8-wide steps and tails), scores
 * spread over +-60 so that some terms underflow; a NaN score counts 0 (the rest normalized without
 * it); every score -inf, or every lf 0: returns 0 and a is untouched. */
static void test_alloc_row(void **state) {
    (void)state;
    tc_seed(41);
    static const size_t ns[5] = {1, 5, 8, 13, 2053};
    const float temp = 0.7f;
    double worst = 0;
    for (size_t k = 0; k < 5; k++)
        for (int nan = 0; nan < 2; nan++) {
            size_t n = ns[k];
            float *cs = malloc(n * sizeof *cs), *lf = malloc(n * sizeof *lf), *a = malloc(n * sizeof *a),
                  *a0 = malloc(n * sizeof *a0), *e = malloc(n * sizeof *e);
            for (size_t j = 0; j < n; j++) {
                cs[j] = (float)(20 * kv_gauss());
                lf[j] = (float)(1 + tc_below(300));
                a0[j] = a[j] = (float)tc_below(1000) / 1000.0f;
            }
            if (nan) cs[n / 2] = NAN;
            double m = -INFINITY, Z = 0;
            for (size_t j = 0; j < n; j++)
                if (cs[j] == cs[j] && cs[j] > m) m = cs[j];
            for (size_t j = 0; j < n; j++)
                if (cs[j] == cs[j]) Z += lf[j] * exp((double)temp * cs[j] - (double)temp * m);
            int r = kst_kv_alloc_add(a, cs, lf, n, temp, e);
            int want = Z > 0;
            if (r != want) fail_msg("width %zu%s: returned %d, %d expected", n, nan ? " with a NaN" : "", r, want);
            for (size_t j = 0; j < n; j++) {
                double p = cs[j] == cs[j] && want ? lf[j] * exp((double)temp * cs[j] - (double)temp * m) / Z : 0;
                double ref = a0[j] + p, dv = fabs(a[j] - ref);
                if (!(dv <= 1e-6 + 1e-5 * fabs(ref)))
                    fail_msg("width %zu%s, entry %zu (score %g): %.9g, float64 %.9g", n, nan ? " with a NaN" : "", j, cs[j],
                             a[j], ref);
                worst = dv > worst ? dv : worst;
            }
            for (size_t j = 0; j < n; j++) cs[j] = -INFINITY;
            memcpy(a, a0, n * sizeof *a);
            if (kst_kv_alloc_add(a, cs, lf, n, temp, e) != 0 || memcmp(a, a0, n * sizeof *a))
                fail_msg("width %zu: every score -inf, yet the row added", n);
            for (size_t j = 0; j < n; j++) cs[j] = (float)j, lf[j] = 0;
            if (kst_kv_alloc_add(a, cs, lf, n, temp, e) != 0 || memcmp(a, a0, n * sizeof *a))
                fail_msg("width %zu: every cluster empty, yet the row added", n);
            free(cs), free(lf), free(a), free(a0), free(e);
        }
    print_message("plan rows: 10 against float64, worst |d| %.2e\n", worst);
}

/* 5c. The 8-bit rows (kst_kv_q8) against q8_row's definition, float32 and float16 rows (bits and
 * scale exactly), rows with an outlier, of zeros, of one value, with a NaN (a non-finite scale),
 * of ties (to even), widths with and without the 16-wide steps;
 * kst_kv_dot_q8 and kst_kv_axpy_q8 against float64. */
static void test_q8_rows(void **state) {
    (void)state;
    tc_seed(57);
    size_t checked = 0;
    for (int f16 = 0; f16 < 2; f16++)
        for (int kind = 0; kind < 7; kind++)
            for (size_t di = 0; di < 6; di++) {
                static const size_t ds[6] = {16, 32, 64, 128, 24, 36}; /* (the last two: no 16-wide steps) */
                size_t d = ds[di];
                float x[128], ref[128], q[128], o[128];
                uint16_t xb[128];
                int8_t a[128], b[128];
                for (size_t i = 0; i < d; i++) {
                    x[i] = kind == 2 ? 0.0f : kind == 3 ? -0.75f : (float)kv_gauss() * (kind == 1 && i == 3 ? 60.0f : 1.0f);
                    if (kind == 4) x[i] *= 1e-3f;
                    xb[i] = kst_f32_to_f16(x[i]);
                    if (f16) x[i] = kst_f16_to_f32(xb[i]);
                    q[i] = (float)kv_gauss();
                    o[i] = 0;
                }
                if (kind == 5) x[d / 2] = NAN, xb[d / 2] = kst_f32_to_f16(NAN);
                if (kind == 6) /* (ties: max 127, so x * 127 / max = x, halves rounded to even) */
                    for (size_t i = 0; i < d; i++) {
                        x[i] = i == 0 ? 127.0f : (float)((int)(i % 9) - 4) + 0.5f;
                        xb[i] = kst_f32_to_f16(x[i]);
                    }
                float sr = q8_row(x, d, a, ref), sg = kst_kv_q8(f16 ? (const void *)xb : (const void *)x, f16, d, b);
                if (kind == 5) {
                    if (isfinite(sg)) fail_msg("f16 %d d %zu: a row with a NaN got the finite scale %g", f16, d, sg);
                    checked++;
                    continue;
                }
                if (sg != sr) fail_msg("f16 %d kind %d d %zu: scale %.9g, the definition's %.9g", f16, kind, d, sg, sr);
                if (memcmp(a, b, d)) fail_msg("f16 %d kind %d d %zu: the 8-bit values differ from the definition's", f16, kind, d);
                double dot = 0, err = 0, mx = 0;
                for (size_t i = 0; i < d; i++) {
                    dot += (double)q[i] * b[i];
                    double e = fabs((double)ref[i] - x[i]);
                    err = e > err ? e : err;
                    mx = fabs(x[i]) > mx ? fabs(x[i]) : mx;
                }
                if (err > 0.5 * mx / 127 * (1 + 1e-6)) fail_msg("f16 %d kind %d d %zu: a value %g off (max |x| %g)", f16, kind, d, err, mx);
                if (fabs(kst_kv_dot_q8(q, b, d) - dot) > 1e-4 * (1 + fabs(dot)))
                    fail_msg("f16 %d kind %d d %zu: dot %.7g, float64 %.7g", f16, kind, d, kst_kv_dot_q8(q, b, d), dot);
                kst_kv_axpy_q8(o, 0.5f, b, d);
                for (size_t i = 0; i < d; i++)
                    if (o[i] != 0.5f * (float)b[i]) fail_msg("f16 %d kind %d d %zu: axpy %g at %zu", f16, kind, d, o[i], i);
                checked++;
            }
    print_message("%zu rows in 8 bits as defined\n", checked);
}

/* 5b. The switches and restarts (2 KV heads x 2, d 32, 1,500 indexed keys, 32 clusters, budget
 * 128): (a) KESTREL_KV_TCACHE=0 (set before kst_kvc_set_tail_cache(c, 1, 0)) turns the cache
 * off: no sample cache is set up and every step is the shared plan's estimator; (b)
 * kst_kvc_set_tail_cache(c, 1, 0) without the environment: on again, its first step the shared
 * plan's (it only plans), the next from the prefixes held; (c) a rebuild (kst_kvc_build; the
 * cache set up anew): the same two steps; (d) the budget raised to 200 (the table of 256 too
 * small: set up anew): the same; (e) the cache's own table size (slots 1,000); (f) 20,000 slots
 * asked, and (g) budget 9,000 with the default table (2 x 9,000): both past the 16,384 a table
 * holds (kv.h: at most 16,384), the table 16,384 (before the fix every step failed with
 * "tail sample cache: 18000 slots, at most 16384"); (g) keeps (f)'s table, so its first step
 * estimates from the prefixes held, and its second from budget 9,000's (every key: exact); (h)
 * budget 128 again (one step plans), the cache off for two steps while 100 tokens are appended
 * (the shared plan's), then on: its step from the prefixes held before, brought in line with the
 * keys the clusters took. */
static void test_switches(void **state) {
    (void)state;
    tc_seed(55);
    const size_t H = 2, G = 2, QH = H * G, d = 32, ncent = 16, n = 1500 + 4 + 64, C = 32, nsteps = 20, nx = 100;
    float *K = malloc((n + nx) * H * d * sizeof *K), *V = malloc((n + nx) * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Q = malloc(nsteps * QH * d * sizeof *Q);
    uint32_t *pre[2] = {malloc(C * sizeof(uint32_t)), malloc(C * sizeof(uint32_t))};
    mix_data(K, V, cen, n + nx, H, d, ncent, 1.0, 0.5);
    mix_queries(Q, cen, nsteps, QH, H, d, ncent);
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
    kst_error err;
    setenv("KESTREL_KV_TCACHE", "0", 1);
    kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, C, 0.5f, 1);
    unsetenv("KESTREL_KV_TCACHE");
    size_t s = 0;
    for (; s < 3; s++) {
        check_step_sc(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, NULL, NULL, "KESTREL_KV_TCACHE=0");
        for (size_t kh = 0; kh < H; kh++)
            if (kst_kvc_sample_cache(c, 0, kh)) fail_msg("KESTREL_KV_TCACHE=0, step %zu: a sample cache set up", s);
    }
    static const char *names[6] = {"on again", "after a rebuild", "budget 200", "a table of 1,000",
                                   "a table of 20,000 asked", "budget 9,000 (a table of 18,000)"};
    for (int ph = 0; ph < 6; ph++) {
        char what[96];
        if (ph == 0) kst_kvc_set_tail_cache(c, 1, 0);
        if (ph == 1) assert_ok(kst_kvc_build(c, 0, NULL, 0, &err), &err);
        if (ph == 2) kst_kvc_set_tail_samples(c, 200);
        if (ph == 3) kst_kvc_set_tail_cache(c, 1, 1000);
        if (ph == 4) kst_kvc_set_tail_cache(c, 1, 20000);
        if (ph == 5) {
            kst_kvc_set_tail_cache(c, 1, 0);
            kst_kvc_set_tail_samples(c, 9000);
        }
        if (ph < 5) { /* a table set up anew: its first step only plans */
            snprintf(what, sizeof what, "%s: its first step (the shared plan's)", names[ph]);
            check_step_sc(c, K, V, n, Q + s++ * QH * d, 16, 48, 0.5f, NULL, NULL, what);
        } else { /* the table kept (16,384 already): the prefixes of the last budget's plans */
            snprintf(what, sizeof what, "%s: its first step (the table kept)", names[ph]);
            snap_m(c, pre, C, what);
            check_step_sc(c, K, V, n, Q + s++ * QH * d, 16, 48, 0.5f, pre, NULL, what);
        }
        const kst_kvsc *S = kst_kvc_sample_cache(c, 0, 0);
        size_t want = ph == 3 ? 1000 : ph >= 4 ? KST_KVSC_NC * KST_KVSC_CH : 2 * kst_kvc_opts_of(c)->tail_samples;
        if (!S || S->cap < want || S->cap >= want + S->nc)
            fail_msg("%s: a table of %zu slots, %zu wanted", what, S ? S->cap : 0, want);
        snap_m(c, pre, C, what);
        snprintf(what, sizeof what, "%s: from the prefixes held", names[ph]);
        check_step_sc(c, K, V, n, Q + s++ * QH * d, 16, 48, 0.5f, pre, NULL, what);
    }
    /* (h) budget 128 again (a table of 256, set up anew: a step plans it), then off for two steps
     * (the shared plan's) while 100 tokens are appended, then on: the prefixes held before,
     * brought in line with the keys the clusters took meanwhile */
    kst_kvc_set_tail_samples(c, 128);
    kst_kvc_set_tail_cache(c, 1, 0);
    check_step_sc(c, K, V, n, Q + s++ * QH * d, 16, 48, 0.5f, NULL, NULL, "budget 128 again (the table set up anew)");
    kst_kvc_set_tail_cache(c, 0, 0);
    for (size_t i = 0; i < 2; i++) {
        append_rows(c, K + (n + 50 * i) * H * d, V + (n + 50 * i) * H * d, 50);
        check_step_sc(c, K, V, n + 50 * (i + 1), Q + s++ * QH * d, 16, 48, 0.5f, NULL, NULL, "the cache off a while");
    }
    kst_kvc_set_tail_cache(c, 1, 0);
    snap_m(c, pre, C, "the cache on after appends");
    size_t lag = kst_kvc_tail_clusters(c, 0, 0)->na - kst_kvc_sample_cache(c, 0, 0)->na;
    if (lag != nx) fail_msg("the cache off: it saw %zu fewer nodes than its clusters, %zu appended", lag, nx);
    check_step_sc(c, K, V, n + nx, Q + s++ * QH * d, 16, 48, 0.5f, pre, NULL, "the cache on after appends");
    sc_check(kst_kvc_sample_cache(c, 0, 0), kst_kvc_tail_clusters(c, 0, 0), "the cache on after appends");
    kst_kvc_free(c);
    free(pre[0]);
    free(pre[1]);
    free(K);
    free(V);
    free(cen);
    free(Q);
}

/* 5c. Two layers of different sizes (2 KV heads x 2, d 32): layer 0 2,000 indexed keys in 32
 * clusters, layer 1 400 (25 clusters); steps alternate between them (each layer's cache plans
 * on its own steps only: its first step the shared plan's, later ones from its prefixes held). */
static void test_two_layers(void **state) {
    (void)state;
    tc_seed(57);
    const size_t d = 32, ncent = 16, H = 2, QH = 4, n0 = 2000 + 4 + 64, n1 = 400 + 4 + 64, nsteps = 8;
    float *K0 = malloc(n0 * H * d * sizeof *K0), *V0 = malloc(n0 * H * d * sizeof *V0),
          *K1 = malloc(n1 * H * d * sizeof *K1), *V1 = malloc(n1 * H * d * sizeof *V1),
          *cen = malloc(H * ncent * d * sizeof *cen), *Q = malloc(nsteps * QH * d * sizeof *Q);
    uint32_t *pre[2] = {malloc(32 * sizeof(uint32_t)), malloc(32 * sizeof(uint32_t))};
    mix_data(K0, V0, cen, n0, H, d, ncent, 1.0, 0.5);
    mix_data(K1, V1, cen, n1, H, d, ncent, 1.0, 0.5); /* (new centres: Q near layer 1's) */
    mix_queries(Q, cen, nsteps, QH, H, d, ncent);
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
    o.layers = 2;
    kst_error err;
    kst_kvc *c;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    kst_kvc_set_tail_clusters(c, 32, 0.5f);
    kst_kvc_set_tail_share(c, 1);
    kst_kvc_set_tail_cache(c, 1, 0);
    assert_ok(kst_kvc_append(c, 0, K0, V0, n0, &err), &err);
    assert_ok(kst_kvc_append(c, 1, K1, V1, n1, &err), &err);
    assert_ok(kst_kvc_build(c, 0, NULL, 0, &err), &err);
    assert_ok(kst_kvc_build(c, 1, NULL, 0, &err), &err);
    assert_int_equal(kst_kvc_tail_clusters(c, 1, 0)->C, 25);
    static const size_t order[8] = {1, 0, 1, 0, 0, 1, 1, 0};
    int seen[2] = {0, 0};
    for (size_t s = 0; s < nsteps; s++) {
        char what[64];
        g_layer = order[s];
        snprintf(what, sizeof what, "two layers: layer %zu, step %zu", g_layer, s);
        size_t C = kst_kvc_tail_clusters(c, g_layer, 0)->C;
        if (seen[g_layer]) snap_m(c, pre, C, what);
        if (g_layer) check_step_sc(c, K1, V1, n1, Q + s * QH * d, 16, 48, 0.5f, seen[1] ? pre : NULL, NULL, what);
        else check_step_sc(c, K0, V0, n0, Q + s * QH * d, 16, 48, 0.5f, seen[0] ? pre : NULL, NULL, what);
        seen[g_layer] = 1;
    }
    g_layer = 0;
    kst_kvc_free(c);
    free(pre[0]);
    free(pre[1]);
    free(K0);
    free(V0);
    free(K1);
    free(V1);
    free(cen);
    free(Q);
}

/* 7. The GPU's tail items of the sample cache's table (kst_kvgpu_sc_*; kv_cuda.h) against float64
 * from the items' definition (kv_scache.h), skipped without a device. Every slot staged with
 * random rows (1 in 8 free, one cluster's weight -inf); per (query head, chunk): mx the best
 * weighted score; the best rows a set of min(rows, 32) distinct rows of the chunk whose scores
 * are its best (up to 1e-5 at the boundary); their weights exp(s - mx); the rest's weight sum,
 * its value sum and the best rows' value sum from the rows outside / inside that set. Shapes:
 * the grouped kernel's (a KV head's chunk a block: chunks of 1,000 (four lists of 256 merged),
 * 750, 700, 400, 200 and 100 (a row's pieces over threads), float16 and float32, G 1..8, d 32..128,
 * d 96 and 36 leaving lanes idle) and two shapes that keep a block a query head (G P > 4,096;
 * d 136); each again with KESTREL_KV_GPU_TGRP=0 (every shape a block a query head). Each shape's
 * rows staged in one pass and, in the other, read where they are (kst_kvgpu_sc_store: per KV head
 * page-aligned key and value arrays, registered in segments (a page, then 4 times as many bytes
 * each time), slot j's rows at row 2 (cap - 1 - j) + 1, the header naming them, half the free
 * slots' entries skipped (KV head -1); the weights written into the staging's own room). */
static void test_gpu_items(void **state) {
    (void)state;
    if (!tc_have_gpu()) skip_because("no CUDA device (or not a CUDA build): the GPU's sample cache items not checked");
#ifdef KST_CUDA
    const struct { int f16; size_t G, kvh, d, cap; } cf[] = {
        {1, 4, 2, 128, 3000}, {0, 3, 2, 64, 700}, {1, 8, 2, 128, 400}, {0, 5, 1, 36, 200}, {1, 1, 3, 32, 100},
        {1, 2, 2, 96, 1500},  {1, 8, 1, 96, 900}, {1, 2, 2, 136, 600}};
    const size_t C = 16, TOP = KST_KVGPU_TT_TOP;
    size_t checked = 0, tie_edges = 0, q8_refused = 0;
    for (int pass = 0; pass < 3; pass++) { /* pass 1: a block a query head; 2: the table in 8 bits */
        int q8 = pass == 2;
        if (pass == 1) setenv("KESTREL_KV_GPU_TGRP", "0", 1);
        else unsetenv("KESTREL_KV_GPU_TGRP");
        for (size_t ci = 0; ci < sizeof cf / sizeof cf[0]; ci++) {
            size_t G = cf[ci].G, kvh = cf[ci].kvh, d = cf[ci].d, qh = G * kvh;
            size_t nc = (cf[ci].cap + KST_KVSC_CH - 1) / KST_KVSC_CH, ch = (cf[ci].cap + nc - 1) / nc, cap = ch * nc;
            float scale = 1.0f / sqrtf((float)d);
            kst_error err;
            kst_kvgpu *g = NULL;
            setenv("KESTREL_KV_SC_MAPPED", "2", 1); /* (the cache's rows may be registered: kst_kvgpu_sc_store) */
            assert_ok(kst_kvgpu_create(qh, kvh, d, 4, 64, cf[ci].f16, scale, &g, &err), &err);
            unsetenv("KESTREL_KV_SC_MAPPED");
            size_t P = 32;
            while (P < ch) P <<= 1;
            if (q8 && !(G <= 8 && d <= 128 && d % 16 == 0 && G * P <= 4096)) { /* (kv_cuda.h: the 8-bit table only grouped) */
                float *c0 = calloc(kvh * d * 16, sizeof(float));
                if (kst_kvgpu_sc_reserve(g, cap, ch, nc, 16, c0, 1, &err) != KST_ERR_INVALID || !strstr(err.msg, "tail_cache_q8"))
                    fail_msg("shape %zu (G %zu d %zu chunk %zu): the 8-bit table reserved where it cannot be grouped (%s)", ci,
                             G, d, ch, err.msg);
                q8_refused++;
                free(c0);
                kst_kvgpu_free(g);
                continue;
            }
            float *cent = malloc(kvh * d * C * sizeof(float)), *K = malloc(kvh * cap * d * sizeof(float)),
                  *V = malloc(kvh * cap * d * sizeof(float)), *lw = malloc(kvh * C * sizeof(float)),
                  *Q = malloc(qh * d * sizeof(float)), *o = malloc(qh * d * sizeof(float)), *lse = malloc(qh * sizeof(float));
            int *cid = malloc(kvh * cap * sizeof(int));
            double *s = malloc(cap * sizeof(double)), *want = malloc(2 * d * sizeof(double));
            assert_non_null(cent && K && V && lw && Q && o && lse && cid && s && want);
            for (size_t i = 0; i < kvh * d * C; i++) cent[i] = (float)kv_gauss();
            assert_ok(kst_kvgpu_sc_reserve(g, cap, ch, nc, C, cent, q8, &err), &err);
            int dir = (int)((ci + (size_t)pass) % 2), *hdr, hs = dir ? 4 : 3;
            size_t es = cf[ci].f16 ? 2 : 4, sb = (2 * cap * d * es + 4095) / 4096 * 4096;
            void *rows, *sto[16] = {0};
            float *plw = NULL;
            assert_true(2 * kvh <= 16);
            if (dir) {
                for (size_t i = 0; i < 2 * kvh; i++) assert_int_equal(posix_memalign(&sto[i], 4096, sb), 0);
                for (size_t part = 4096; part < sb; part *= 4) /* (registered in segments: the first page, then 4x) */
                    assert_ok(kst_kvgpu_sc_store(g, (const void *const *)sto, (const void *const *)sto + kvh, part, &err), &err);
                assert_ok(kst_kvgpu_sc_store(g, (const void *const *)sto, (const void *const *)sto + kvh, sb, &err), &err);
                if (!kst_kvgpu_sc_stored(g)) fail_msg("shape %zu: the rows' registration refused", ci);
            }
            assert_ok(kst_kvgpu_sc_staging(g, kvh * cap, &hdr, &rows, dir ? &plw : NULL, &err), &err);
            if (dir ? rows || !plw : !rows) fail_msg("shape %zu: staging rows %p, weights %p (rows registered: %d)", ci, rows, (void *)plw, dir);
            for (size_t kh = 0; kh < kvh; kh++)
                for (size_t j = 0; j < cap; j++) {
                    size_t e = kh * cap + j, row = 2 * (cap - 1 - j) + 1;
                    kv_rng = kv_rng * 6364136223846793005ull + 1442695040888963407ull;
                    cid[e] = (kv_rng >> 33) % 8 == 0 ? -1 : (int)((kv_rng >> 40) % C);
                    /* (half the free slots' entries named, half skipped: KV head -1; the slot starts free) */
                    hdr[hs * e] = dir && cid[e] < 0 && j % 2 ? -1 : (int)kh, hdr[hs * e + 1] = (int)j, hdr[hs * e + 2] = cid[e];
                    if (dir) hdr[hs * e + 3] = (int)row;
                    for (size_t i = 0; i < 2 * d; i++) {
                        float x = (float)kv_gauss() * (q8 && i % 17 == 5 ? 4.0f : 1.0f); /* (8 bits: some larger dims) */
                        char *at = dir ? (char *)sto[(i < d ? 0 : kvh) + kh] + (row * d + i % d) * es
                                       : (char *)rows + (e * 2 * d + i) * es;
                        if (cf[ci].f16) {
                            uint16_t b = kst_f32_to_f16(x);
                            x = kst_f16_to_f32(b);
                            memcpy(at, &b, 2);
                        } else
                            memcpy(at, &x, 4);
                        (i < d ? K : V)[e * d + i % d] = x;
                    }
                    if (q8) { /* (the GPU quantizes the staged rows: float64 reads their 8-bit values) */
                        int8_t b[256];
                        q8_row(K + e * d, d, b, K + e * d);
                        q8_row(V + e * d, d, b, V + e * d);
                    }
                }
            for (size_t i = 0; i < kvh * C; i++) lw[i] = i % C == 3 ? -INFINITY : logf(1.0f + (float)(i * 7 % 19));
            if (plw) memcpy(plw, lw, kvh * C * sizeof(float));
            assert_ok(kst_kvgpu_sc_send(g, kvh * cap, plw ? plw : lw, &err), &err);
            for (size_t i = 0; i < qh * d; i++) Q[i] = 1.5f * (float)kv_gauss();
            assert_ok(kst_kvgpu_partial_start(g, Q, 0, 0, 0, &err), &err);
            assert_ok(kst_kvgpu_partial_wait(g, o, lse, &err), &err);
            const float *its = kst_kvgpu_tail_out(g);
            size_t st = kst_kvgpu_tail_stride(g);
            assert_true(st == 2 * d + 2 + 2 * TOP);
            for (size_t h = 0; h < qh; h++)
                for (size_t cc = 0; cc < nc; cc++) {
                    const float *it = its + (h * nc + cc) * st, *q = Q + h * d;
                    size_t kh = h / G, j0 = cc * ch, nr = ch, nt = nr < TOP ? nr : TOP, base = kh * cap + j0;
                    double mx = -INFINITY;
                    for (size_t j = 0; j < nr; j++) {
                        s[j] = -INFINITY;
                        if (cid[base + j] < 0 || !(lw[kh * C + cid[base + j]] > -INFINITY)) continue;
                        s[j] = dot64(q, K + (base + j) * d, d) * scale + lw[kh * C + cid[base + j]];
                        if (s[j] > mx) mx = s[j];
                    }
                    char what[160];
                    snprintf(what, sizeof what, "pass %d shape %zu (f16 %d%s G %zu d %zu chunk %zu) head %zu chunk %zu", pass,
                             ci, cf[ci].f16, q8 ? ", 8 bits" : "", G, d, ch, h, cc);
                    if (fabs(it[0] - mx) > 1e-4) fail_msg("%s: mx %.7g, float64 %.7g", what, it[0], mx);
                    /* the best rows: distinct rows of the chunk, none below the nt-th best score */
                    unsigned char *in = calloc(nr, 1);
                    assert_non_null(in);
                    double kth = INFINITY;
                    for (size_t a = 0; a < nt; a++) {
                        int32_t r;
                        memcpy(&r, &it[2 + d + a], sizeof r);
                        if (r < 0 || (size_t)r >= nr || in[r]) fail_msg("%s: best row %zu is %d (of %zu, or twice)", what, a, r, nr);
                        in[r] = 1;
                        if (s[r] < kth) kth = s[r];
                        double w = s[r] > -INFINITY ? exp(s[r] - mx) : 0;
                        if (fabs(it[2 + d + TOP + a] - w) > 1e-5) fail_msg("%s: best row %d's weight %.7g, float64 %.7g", what, r, it[2 + d + TOP + a], w);
                    }
                    double rs = 0, above = 0;
                    for (size_t i = 0; i < 2 * d; i++) want[i] = 0;
                    for (size_t j = 0; j < nr; j++) {
                        if (!in[j] && s[j] > kth + 1e-5) fail_msg("%s: row %zu (%.7g) left out of the best, which take %.7g", what, j, s[j], kth);
                        if (!in[j] && s[j] > kth) above++;
                        if (!(s[j] > -INFINITY)) continue;
                        double w = exp(s[j] - mx);
                        if (!in[j]) rs += w;
                        for (size_t i = 0; i < d; i++) want[(in[j] ? d : 0) + i] += w * V[(base + j) * d + i];
                    }
                    tie_edges += above > 0;
                    if (fabs(it[1] - rs) > 1e-4 * rs + 1e-6) fail_msg("%s: the rest's weight %.7g, float64 %.7g", what, it[1], rs);
                    double e1 = rel_err64(it + 2, want, d), e2 = rel_err64(it + 2 + d + 2 * TOP, want + d, d);
                    if (!(e1 < 1e-4) || !(e2 < 1e-4)) fail_msg("%s: value sums off by %.3g (rest), %.3g (best rows)", what, e1, e2);
                    free(in);
                    checked++;
                }
            kst_kvgpu_free(g); /* (unregisters the rows) */
            for (size_t i = 0; i < 2 * kvh; i++) free(sto[i]);
            free(cent), free(K), free(V), free(lw), free(Q), free(o), free(lse), free(cid), free(s), free(want);
        }
    }
    unsetenv("KESTREL_KV_GPU_TGRP");
    print_message("%zu items checked (%zu with a near-tie at the best rows' edge); the 8-bit table refused for %zu shapes "
                  "it cannot group\n", checked, tie_edges, q8_refused);
    if (!q8_refused) fail_msg("no shape checked the 8-bit table's refusal");
#endif
}

/* 6. Test 5 with the static tokens, and the sample cache's table, on the GPU (CUDA builds with a
 * device; skipped here). */
static void test_steps_gpu(void **state) {
    (void)state;
    if (!tc_have_gpu()) skip_because("no CUDA device (or not a CUDA build): the GPU path of the sample cache not run");
    run_steps(1);
}

/* 6b. Switching between the sample cache and the evenly spaced sample with the static tokens on
 * the GPU (skipped without a device): a cache whose tail items the GPU makes against its twin
 * whose tail is scored on the CPU (KESTREL_KV_TAIL_GPU=0 at its creation; the static tokens on
 * the GPU in both). 2 KV heads x 2, d 32, 1,500 indexed keys, budget 128: steps 0-2 the sample
 * cache (32 clusters); 3-4 tail_clusters 0 without a rebuild (the evenly spaced sample, its table
 * put on the GPU); 5-6 tail_clusters 32 again (the clusters still built: the sample cache, its
 * table reserved on the GPU anew, estimated from the prefixes held); then tail_clusters 0 and a
 * rebuild, steps 7-8 the evenly spaced sample. The GPU cache's uploads go in pieces of at most 48
 * rows (KESTREL_KV_SC_PIECE), so step 5's table, sent whole, and the first plans go in several.
 * Every step the twin's output within the
 * tolerance; the sample cache's steps also the float64 estimator (check_step_sc). Before the
 * fixes in kv.c: step 5's reserve was freed by the step's "GPU tail off" branch (gt_ns still the
 * evenly spaced table's), and after the rebuild the GPU kept the cache's cluster ids, which then
 * weighted the evenly spaced sample's rows. */
static void test_gpu_switches(void **state) {
    (void)state;
    if (!tc_have_gpu()) skip_because("no CUDA device (or not a CUDA build): the GPU's sample cache switches not run");
    tc_seed(66);
    const size_t H = 2, G = 2, QH = H * G, d = 32, ncent = 16, n = 1500 + 4 + 64, C = 32, nsteps = 9;
    float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Q = malloc(nsteps * QH * d * sizeof *Q), *og = malloc(QH * d * sizeof *og), *oc = malloc(QH * d * sizeof *oc);
    uint32_t *pre[2] = {malloc(C * sizeof(uint32_t)), malloc(C * sizeof(uint32_t))};
    mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
    mix_queries(Q, cen, nsteps, QH, H, d, ncent);
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
    o.gpu = 1;
    kst_error err;
    setenv("KESTREL_KV_SC_PIECE", "48", 1); /* (the table reserved anew at step 5 sent whole, in pieces of 48 rows) */
    kst_kvc *cg = make_cache(&o, K, V, n, NULL, 0, C, 0.5f, 1);
    unsetenv("KESTREL_KV_SC_PIECE");
    setenv("KESTREL_KV_TAIL_GPU", "0", 1);
    kst_kvc *cc = make_cache(&o, K, V, n, NULL, 0, C, 0.5f, 1);
    unsetenv("KESTREL_KV_TAIL_GPU");
    kst_kvc *both[2] = {cg, cc};
    for (size_t s = 0; s < nsteps; s++) {
        if (s == 3 || s == 7)
            for (int i = 0; i < 2; i++) kst_kvc_set_tail_clusters(both[i], 0, 0.5f);
        if (s == 5)
            for (int i = 0; i < 2; i++) kst_kvc_set_tail_clusters(both[i], C, 0.5f);
        if (s == 7)
            for (int i = 0; i < 2; i++) assert_ok(kst_kvc_build(both[i], 0, NULL, 0, &err), &err);
        int cache = s < 3 || s == 5 || s == 6;
        char what[96];
        snprintf(what, sizeof what, "GPU switches, step %zu (%s)", s, cache ? "the sample cache" : "the evenly spaced sample");
        const float *q = Q + s * QH * d;
        kst_kvc_stats st;
        if (cache) {
            if (s) snap_m(cg, pre, C, what); /* (step 5: kept from step 2's plan) */
            check_step_sc(cg, K, V, n, q, 16, 48, 0.5f, s ? pre : NULL, og, what);
        } else {
            assert_ok(kst_kvc_attend(cg, 0, q, 16, 48, og, &st, &err), &err);
        }
        assert_ok(kst_kvc_attend(cc, 0, q, 16, 48, oc, &st, &err), &err);
        for (size_t i = 0; i < QH * d; i++)
            if (!(fabs(og[i] - oc[i]) <= TOL_A + TOL_R * fabs(oc[i])))
                fail_msg("%s: value %zu: %.7g, the twin with its tail on the CPU %.7g", what, i, og[i], oc[i]);
    }
    kst_kvc_free(cg);
    kst_kvc_free(cc);
    free(pre[0]);
    free(pre[1]);
    free(K);
    free(V);
    free(cen);
    free(Q);
    free(og);
    free(oc);
}

/* 6c. The sample cache's update after a step left to the engine's idle time (GPU; skipped
 * without a device): cache B with kst_kvc_set_append_idle against cache A (same data, options,
 * queries) updating inline. 2 KV heads x 4, float16 d 64, the attention-aware index, 1,500
 * indexed keys, 32 clusters, budget 128, 3 threads; 9 steps, 40 tokens appended one at a time
 * before step 3 and 150 at once before step 6. kst_kvc_work follows B's steps 0, 2, 4 and 7;
 * after steps 1, 3 and 5 its update waits for the next append or step, after step 6 for
 * kst_kvc_flush, after step 8 for kst_kvc_work. Every step's output equals A's within 1e-6
 * (the same plans, held rows and items, only run later); right after a step B's prefixes are
 * still the step's (A's moved on at least once: the update was left), and once B's update
 * ran (work, flush, or at its next call) every KV head's prefixes and slots equal A's. */
static void test_gpu_idle_update(void **state) {
    (void)state;
    if (!tc_have_gpu()) skip_because("no CUDA device (or not a CUDA build): the sample cache's update in idle time not run");
    const size_t H = 2, G = 4, QH = H * G, d = 64, ncent = 24, nq = 48, C = 32, steps = 9, n0 = 1500 + 4 + 64,
                 nmax = n0 + 190;
    tc_seed(77);
    int was = omp_get_max_threads();
    omp_set_num_threads(3);
    float *K = malloc(nmax * H * d * sizeof *K), *V = malloc(nmax * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Qp = malloc(nq * QH * d * sizeof *Qp), *Q = malloc(steps * QH * d * sizeof *Q), *oa = malloc(QH * d * sizeof *oa),
          *ob = malloc(QH * d * sizeof *ob);
    mix_data(K, V, cen, nmax, H, d, ncent, 1.0, 0.5);
    mix_queries(Qp, cen, nq, QH, H, d, ncent);
    mix_queries(Q, cen, steps, QH, H, d, ncent);
    kst_kvc_opts o = tc_base_opts(d, 1, KST_KVC_INDEX_ATTN, 128, H, QH);
    o.gpu = 1;
    kst_kvc *ca = make_cache(&o, K, V, n0, Qp, nq, C, 0.5f, 1), *cb = make_cache(&o, K, V, n0, Qp, nq, C, 0.5f, 1);
    kst_kvc_set_append_idle(cb, 1);
    kst_error err;
    size_t at = n0, left = 0, moved = 0;
    for (size_t s = 0; s < steps; s++) {
        if (s == 3 || s == 6) {
            size_t m = s == 3 ? 40 : 150;
            for (int w = 0; w < 2; w++) {
                kst_kvc *c = w ? cb : ca;
                if (s == 3)
                    for (size_t i = 0; i < m; i++) append_rows(c, K + (at + i) * H * d, V + (at + i) * H * d, 1);
                else
                    append_rows(c, K + at * H * d, V + at * H * d, m);
            }
            at += m;
        }
        kst_kvc_stats st;
        assert_ok(kst_kvc_attend(ca, 0, Q + s * QH * d, 16, 48, oa, &st, &err), &err);
        assert_ok(kst_kvc_attend(cb, 0, Q + s * QH * d, 16, 48, ob, &st, &err), &err);
        for (size_t i = 0; i < QH * d; i++)
            if (!(fabs(oa[i] - ob[i]) <= 1e-6 + 1e-6 * fabs(oa[i])))
                fail_msg("idle update, step %zu: value %zu: %.9g, inline %.9g", s, i, ob[i], oa[i]);
        int differ = 0; /* B's update not run yet: its prefixes as the step left them */
        for (size_t kh = 0; kh < H; kh++)
            differ |= memcmp(kst_kvc_sample_cache(ca, 0, kh)->m, kst_kvc_sample_cache(cb, 0, kh)->m, C * sizeof(uint32_t)) != 0;
        moved += differ;
        left++;
        if (s == 0 || s == 2 || s == 4 || s == 7 || s == 8)
            assert_ok(kst_kvc_work(cb, NULL, NULL, NULL, &err), &err);
        else if (s == 5)
            assert_ok(kst_kvc_flush(cb, 0, &err), &err);
        else
            continue; /* (at the next append or step) */
        for (size_t kh = 0; kh < H; kh++) {
            const kst_kvsc *A = kst_kvc_sample_cache(ca, 0, kh), *B = kst_kvc_sample_cache(cb, 0, kh);
            if (memcmp(A->m, B->m, C * sizeof(uint32_t)) || A->used != B->used || memcmp(A->key, B->key, A->cap * sizeof *A->key))
                fail_msg("idle update, after step %zu: KV head %zu's sample cache differs from the inline one's", s, kh);
        }
    }
    if (!moved) fail_msg("idle update: no step left a prefix to the idle time (nothing was deferred)");
    print_message("idle update: %zu steps equal to the inline cache's, %zu left the held prefixes to the idle time\n", left,
                  moved);
    kst_kvc_free(ca);
    kst_kvc_free(cb);
    free(K);
    free(V);
    free(cen);
    free(Qp);
    free(Q);
    free(oa);
    free(ob);
    omp_set_num_threads(was);
}

/* Each test's wall time (kv_tc_ref.h: printed, the suite runs under the sanitizers in CI too). */
static int t_begin(void **state) {
    (void)state;
    g_layer = 0;
    tc_clock(0);
    return 0;
}
static int t_end(void **state) {
    (void)state;
    gsnap_free();
    tc_clock(1);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_plans, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_apply_bounded, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_joins, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_items_finish, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_unbiased, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_steps, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_alloc_row, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_q8_rows, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_switches, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_two_layers, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_steps_gpu, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_gpu_switches, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_gpu_items, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_gpu_idle_update, t_begin, t_end),
    };
    return cmocka_run_group_tests_name("kv_scache", tests, NULL, NULL);
}
