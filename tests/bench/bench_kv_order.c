/* bench_kv_order.c - does the order of a KV graph's nodes in memory change its search's speed?
 *
 *   bench_kv_order N [ROUNDS [ORDERS]]
 *
 * ORDERS: a comma list of gC (the library's kst_kvg_order with C clusters: the key rows stay in
 * position order, the graph maps its nodes to them) and kmC (the same order, the key rows then
 * moved into it too, so that the re-scoring's reads are ordered as well); default g512,km512.
 * KV_COPIES: copies of each layout (8); KV_SPREAD: entry table size (N / 128). A name may end in
 * pP (the cluster probe of P clusters, kst_kvg_scratch.probe) and sS (an entry table of S nodes,
 * 0: the hubs only), e.g. g512p1s0.
 *
 * The decode step's searches are bound by their scattered reads: each key scored is one 64-byte
 * line of 4-bit codes at a random place (tests/bench/README.md, KV rounds 5 and 29). This builds
 * the attention-aware graph of the synthetic layer's KV head 0 (bench_kv_gen.h, N tokens, the
 * default budget's settings: degree 32, codes, an entry table of N / 128 nodes evenly spaced in
 * its order, ef 128, two candidates expanded at a time), then copies whose nodes are renumbered
 * as ORDERS says (a node's neighbours then mostly sit in nearby lines). Eight copies of each (a
 * layer's 8 KV heads' worth of memory, so that the caches hold what they would in a step) are
 * searched by every OpenMP thread with the decode queries of all 32 query heads (in head 0's
 * frame), the layouts alternated ROUNDS times. KV_PROF=1 also times the entry choice. Prints the search time per query (thread-seconds)
 * of each, its ratio to position order's, and recall@100 against the exact top keys (the same
 * searches, so the same recall up to the entry table's nodes). */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "index/kv_graph.h"
#define KVB_PROG "bench_kv_order"
#include "tests/bench/bench_kv_util.h"
#include "tests/bench/bench_kv_gen.h"

enum { MAXC = 8, K_TOP = 100, EF = 128 };
static size_t COPIES = MAXC; /* KV_COPIES */

/* mean over edges of |new(x) - new(y)| < 16 (a node's neighbours within 1 KB of codes) */
static double near_frac(const kst_kvg *g) {
    size_t tot = 0, near = 0;
    for (size_t x = 0; x < g->n; x++)
        for (size_t j = 0; j < g->deg[x]; j++) {
            long dd = (long)g->adj[x * g->M + j] - (long)x;
            tot++;
            near += labs(dd) < 16;
        }
    return tot ? (double)near / tot : 0;
}

typedef struct {
    kst_kvg g[MAXC];
    uint16_t *K[MAXC];
    size_t probe; /* the cluster probe's clusters (a "pP" suffix of the order's name; 0: off) */
    size_t spread; /* the entry table's nodes (an "sS" suffix; else the run's) */
} layout;

/* The search time per query (thread-seconds); *entry: of it, choosing the entry points (the hubs,
 * the entry table, the cluster probe), timed where KV_PROF is set (else 0). */
static double run(const layout *L, const float *Q, size_t nq, size_t reps, size_t spread, uint32_t *ids, double *entry) {
    double t0 = now_s(), te = 0;
    size_t threads = (size_t)omp_get_max_threads();
    int prof = getenv("KV_PROF") && atoi(getenv("KV_PROF"));
#pragma omp parallel reduction(+ : te)
    {
        kst_kvg_scratch s = {0}, *ss[1] = {&s};
        s.prof = prof;
        s.pf_push = 1;
        s.expand = 2;
        s.spread = L->spread != (size_t)-1 ? L->spread : spread;
        s.spread_keep = 8;
        s.probe = L->probe;
        uint32_t id[EF];
        size_t fnd;
#pragma omp for schedule(dynamic, 4)
        for (size_t r = 0; r < reps * nq; r++) {
            size_t qi = r % nq, c = (r / 7 + qi) % COPIES;
            kst_kvg_search_multi(&L->g[c], L->K[c], 1, KVB_D, Q + qi * KVB_D, 1, EF, EF, 0, 1, ss, id, NULL, &fnd);
            if (r < nq && ids) memcpy(ids + qi * EF, id, sizeof id);
        }
        te += s.t_entry;
        kst_kvg_scratch_free(&s);
    }
    if (entry) *entry = te / (double)(reps * nq);
    return (now_s() - t0) * threads / (double)(reps * nq);
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_kv_order N [ROUNDS [ORDERS]]  (ORDERS: comma list of gC (kst_kvg_order), kmC (its order, key rows moved too); default g512,km512)\n");
        return 2;
    }
    size_t N = (size_t)atol(argv[1]), rounds = argc > 2 ? (size_t)atol(argv[2]) : 5;
    const char *orders = argc > 3 ? argv[3] : "g512,km512";
    if (getenv("KV_COPIES")) COPIES = (size_t)atol(getenv("KV_COPIES"));
    if (COPIES < 1 || COPIES > MAXC) die("KV_COPIES: 1..8", NULL);
    const size_t D = KVB_D, W = 1024, n = N - KVB_SINKS - W;
    int perm[KVB_KVH][KVB_D];
    float sgn[KVB_KVH][KVB_D];
    kvb_perms(perm, sgn);
    kvb_data gd;
    double t = now_s();
    kvb_gen(N, 0.7f, 0, 0, 384, 20.8f, 3.5f, perm, sgn, &gd);
    const uint16_t *K = gd.K0 + KVB_SINKS * D;
    /* prefill queries: group 0's 4 heads, all NPRE positions, as kst_kvc_build takes them */
    size_t np = (size_t)KVB_NPRE * KVB_G;
    float *Qp = malloc(np * D * sizeof *Qp);
    for (size_t i = 0; i < np; i++) memcpy(Qp + i * D, gd.Qpre + ((i / KVB_G) * KVB_QH + i % KVB_G) * D, D * 4);
    kst_error e;
    enum { MAXL = 6 };
    layout *L = calloc(MAXL, sizeof *L);
    L[0].spread = (size_t)-1;
    char name[MAXL][16] = {"position"};
    kst_kvg_init(&L[0].g[0], 32, 32, 0, NULL);
    L[0].g[0].codes_on = 1;
    if (kst_kvg_build_attn(&L[0].g[0], K, 1, n, D, Qp, np, 32, NULL, &e)) die("build", &e);
    size_t spread = n / 128 < 4096 ? n / 128 : 4096;
    if (getenv("KV_SPREAD")) spread = (size_t)atol(getenv("KV_SPREAD")); /* entry table size */
    printf("bench_kv_order: %zu keys indexed (N %zu), built in %.1f s; %d threads\n", n, N, now_s() - t,
           omp_get_max_threads());
    uint32_t *old_of[MAXL] = {NULL}; /* kmC: node i's original row (its keys moved to row i) */
    size_t nl = 1;
    for (const char *p = orders; *p && nl < MAXL;) {
        size_t len = strcspn(p, ",");
        int moved = len > 2 && !strncmp(p, "km", 2);
        if (!moved && !(len > 1 && p[0] == 'g')) die("orders: gC or kmC", NULL);
        double t1 = now_s();
        kst_kvg *g = &L[nl].g[0];
        char nm[32];
        snprintf(nm, sizeof nm, "%.*s", (int)len, p);
        const char *pp = strchr(nm, 'p'), *sp = strchr(nm, 's');
        L[nl].probe = pp ? (size_t)atol(pp + 1) : 0;
        L[nl].spread = sp ? (size_t)atol(sp + 1) : (size_t)-1;
        if (kst_kvg_copy(g, &L[0].g[0], &e) || kst_kvg_order(g, K, 1, D, (size_t)atol(p + (moved ? 2 : 1)), &e))
            die("kst_kvg_order", &e);
        printf("(%.*s: kst_kvg_order %.1f s)\n", (int)len, p, now_s() - t1);
        if (moved) { /* the rows follow the nodes: node i is row i again */
            old_of[nl] = g->row_of;
            g->row_of = NULL;
            g->nperm = 0;
        }
        snprintf(name[nl++], sizeof name[0], "%.*s", (int)len, p);
        p += len + (p[len] == ',');
    }
    for (size_t l = 0; l < nl; l++) {
        for (size_t c = 0; c < COPIES; c++) {
            L[l].K[c] = malloc(n * D * 2);
            for (size_t i = 0; i < n; i++) memcpy(L[l].K[c] + i * D, K + (size_t)(old_of[l] ? old_of[l][i] : i) * D, D * 2);
            if (c > 0 && kst_kvg_copy(&L[l].g[c], &L[l].g[0], &e)) die("copy", &e);
            /* (copies have no entry table: each its own, of the nodes evenly spaced in its order) */
            if (kst_kvg_entry_table(&L[l].g[c], L[l].spread != (size_t)-1 ? L[l].spread : spread, &e)) die("entry table", &e);
        }
        printf("%-9s edges within 16 nodes of their source %.3f\n", name[l], near_frac(&L[l].g[0]));
    }
    /* decode queries: all 32 heads' in head 0's frame */
    size_t nq = (size_t)KVB_NT * KVB_QH;
    const float *Q = gd.Qd0;
    uint32_t *exact = malloc(nq * K_TOP * 4), *ids = malloc(nq * EF * 4);
    if (kst_kvg_exact_topk(K, 1, n, D, Q, nq, K_TOP, exact, NULL, &e)) die("exact", &e);
    for (size_t l = 0; l < nl; l++) {
        run(&L[l], Q, nq, 1, spread, ids, NULL);
        size_t hit = 0;
        for (size_t q = 0; q < nq; q++)
            for (size_t j = 0; j < K_TOP; j++)
                for (size_t i = 0; i < K_TOP; i++) /* the top 100 of the 128 re-scored, best first */
                    hit += (old_of[l] ? old_of[l][ids[q * EF + i]] : ids[q * EF + i]) == exact[q * K_TOP + j];
        printf("%-9s recall@100 %.4f (%zu queries)\n", name[l], (double)hit / (nq * K_TOP), nq);
    }
    double *tm = malloc(MAXL * rounds * sizeof *tm), *rr = malloc(MAXL * rounds * sizeof *rr), *te = malloc(MAXL * rounds * sizeof *te);
    for (size_t r = 0; r < rounds; r++) {
        printf("round %zu:", r);
        for (size_t l = 0; l < nl; l++) {
            tm[l * rounds + r] = run(&L[l], Q, nq, 4, spread, NULL, &te[l * rounds + r]);
            printf(" %s %.2f us", name[l], tm[l * rounds + r] * 1e6);
            if (te[l * rounds + r] > 0) printf(" (entry %.2f)", te[l * rounds + r] * 1e6);
        }
        for (size_t l = 1; l < nl; l++) rr[l * rounds + r] = tm[r] / tm[l * rounds + r];
        printf("\n");
    }
    for (size_t l = 0; l < nl; l++) {
        qsort(tm + l * rounds, rounds, sizeof *tm, cmp_dbl);
        qsort(te + l * rounds, rounds, sizeof *te, cmp_dbl);
        if (te[l * rounds + rounds / 2] > 0) printf("median: %s entry choice %.2f us a search\n", name[l], te[l * rounds + rounds / 2] * 1e6);
        if (l) qsort(rr + l * rounds, rounds, sizeof *rr, cmp_dbl);
        if (!l) printf("median: %s order %.2f us a search (anchor)\n", name[l], tm[rounds / 2] * 1e6);
        else printf("median: %s order %.2f us a search: %.3fx the anchor's speed (rounds %.3f-%.3f)\n", name[l],
                    tm[l * rounds + rounds / 2] * 1e6, rr[l * rounds + rounds / 2], rr[l * rounds], rr[l * rounds + rounds - 1]);
    }
    return 0;
}
