/* bench_kv_heads.c - per query head figures of the public KV cache (kst_kv_*, library defaults)
 * on one GQA group of real decoder heads (kv_dump_llm.py's dumps; tests/bench/kv.sh): for each
 * budget, each head's recall@100 of its exact top-100 indexed keys, keys scanned, attention
 * output error against float64 full attention (mean and max over the decode queries) and the
 * fraction of the cache attended. kv_heads_report.py sums the lines over groups (mean and max
 * over heads). Nothing is asserted.
 *
 *   bench_kv_heads DIR L H0,H1,... [ctx] [nq]
 *
 * The cache is kst_kv_opts_default() (window, sinks, top_k, ef, tail, codes, entries, all the
 * prefill queries) except where set: KV_WINDOW, KV_SINKS, KV_BUILD_QUERIES (max_build_queries);
 * KV_BUDGETS "top_k:ef:tail;..." (0: the default's; default "0:0:2048;0:0:0", the default
 * budget with and without the tail estimate); KESTREL_KV_WIDEN (the adaptive budget's threshold,
 * opts.widen; 0: off) and KESTREL_KV_WIDEN_TOP_K (opts.widen_top_k) are read by the library. The
 * "widened" column: widened searches per query head and step (the group's mean); "cpu_us": the
 * mean CPU time of one kst_kv_attend over the group's query heads (all its threads; with
 * OMP_NUM_THREADS=1 a one-thread step, the tail sample scored on the CPU too). KV_TAIL_STRATA, KV_TIER: opts.tail_strata, opts.tier
 * (round 17; KESTREL_KV_STRAT / KESTREL_KV_TIER override them in the library). KV_DEGREE,
 * KV_BUILD_TOP, KV_CODES: opts.degree, opts.build_top, opts.codes (the graph's build). Where
 * the dump has DIR/L<l>_inv_freq.npy (kv_dump_llm.py) the layer's RoPE is set
 * (kst_kv_set_rope); KV_ROPE=0: not.
 * KV_ORACLE "k1,k2,...": first, each head's error when the exact top k indexed keys alone are
 * attended with the sinks and the window (no search, no tail): what retrieval of k keys can
 * reach at best, the anchor for the rows' errors. The first ctx tokens are the cache (appended,
 * then built from their queries of every listed head: the prefill); nq decode queries evenly
 * spaced over the tokens after it (errors over the first min(nq, 100)). The rows of KV_BUDGETS
 * share one cache: with the sample cache (KESTREL_KV_TCACHE=1) a later row would start from the
 * table the earlier rows' plans filled from the same decode queries (round 26 found its error
 * 13% lower that way at 32K), so there one budget a run is allowed. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/kestrel.h"
#include "index/kv_graph.h"

#define TOPK 100
#define KVB_PROG "bench_kv_heads"
#include "tests/bench/bench_kv_util.h"

/* CPU seconds of the whole process (all threads): with OMP_NUM_THREADS=1 one thread's CPU time,
 * which the box's other jobs do not inflate as they do wall time. */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static size_t env_size(const char *name, size_t dflt) {
    const char *s = getenv(name);
    return s && *s ? (size_t)atol(s) : dflt;
}

/* The retrieval's floor (KV_ORACLE): attention over the sinks, the window and the exact top k of
 * the indexed keys (by score, no search, no tail), float64; out (d). s: the n scores (scale
 * applied), tmp: n doubles of scratch. */
static void exact_topk_attn(double *out, const double *s, const float *V, size_t n, size_t d, size_t sinks,
                            size_t window, size_t k, double *tmp) {
    size_t lo = sinks, hi = n - window, m = hi - lo;
    double thr = -INFINITY, mx = -INFINITY, sum = 0;
    if (k < m) {
        memcpy(tmp, s + lo, m * sizeof *tmp);
        qsort(tmp, m, sizeof *tmp, cmp_d);
        thr = tmp[m - k];
    }
    for (size_t j = 0; j < n; j++)
        if (s[j] > mx) mx = s[j];
    memset(out, 0, d * sizeof *out);
    size_t taken = 0;
    for (size_t j = 0; j < n; j++) {
        if (j >= lo && j < hi) {
            if (s[j] < thr || taken == k) continue; /* (ties at the threshold: the first ones) */
            taken++;
        }
        double w = exp(s[j] - mx);
        sum += w;
        for (size_t i = 0; i < d; i++) out[i] += w * V[j * d + i];
    }
    for (size_t i = 0; i < d; i++) out[i] /= sum;
}

int main(int argc, char **argv) {
    kv_group_args a;
    group_args(argc, argv, "bench_kv_heads", 0, &a);
    kst_error e;
    const int L = a.L, *hs = a.hs;
    const size_t G = a.G, rows = a.rows, d = a.d, n = a.n, nt = a.nt;
    float *K = a.K, *V = a.V, **Qa = a.Qa;
    kst_kv_opts o = kst_kv_opts_default();
    o.layers = o.kv_heads = 1;
    o.q_heads = G;
    o.head_dim = d;
    o.sinks = env_size("KV_SINKS", o.sinks);
    o.window = env_size("KV_WINDOW", o.window);
    o.max_build_queries = env_size("KV_BUILD_QUERIES", o.max_build_queries);
    if (getenv("KV_TAIL_STRATA")) o.tail_strata = (float)atof(getenv("KV_TAIL_STRATA"));
    o.tier = env_size("KV_TIER", o.tier);
    o.degree = env_size("KV_DEGREE", o.degree);
    o.build_top = env_size("KV_BUILD_TOP", o.build_top);
    if (getenv("KV_CODES")) o.codes = atoi(getenv("KV_CODES"));
    if (o.sinks + o.window >= n) die("sinks + window leave nothing to index", NULL);
    size_t sinks = o.sinks, nidx = n - o.sinks - o.window;
    /* prefill queries (n, G, d); decode queries (nt, G, d) evenly spaced after the cache */
    float *Qp = malloc(n * G * d * sizeof *Qp), *Qt = malloc(nt * G * d * sizeof *Qt);
    for (size_t t = 0; t < n; t++)
        for (size_t g = 0; g < G; g++) memcpy(Qp + (t * G + g) * d, Qa[g] + t * d, d * sizeof(float));
    for (size_t i = 0; i < nt; i++)
        for (size_t g = 0; g < G; g++)
            memcpy(Qt + (i * G + g) * d, Qa[g] + (n + i * (rows - n) / nt) * d, d * sizeof(float));
    printf("== L%d heads %s, %zu cached keys, d %zu, %zu decode queries; sinks %zu, window %zu, indexed %zu;"
           " default top_k %zu ef %zu tail %zu; build queries %zu, degree %zu, build_top %zu, codes %d; %d threads\n",
           L, argv[3], n, d, nt, sinks, o.window, nidx, o.top_k, o.ef, o.tail_samples,
           o.max_build_queries ? o.max_build_queries : n * G, o.degree, o.build_top, o.codes, omp_get_max_threads());
    uint32_t *want = malloc(nt * G * TOPK * sizeof *want);
    if (kst_kvg_exact_topk(K + sinks * d, 0, nidx, d, Qt, nt * G, TOPK, want, NULL, &e)) die("exact top-k", &e);
    size_t ne = nt < 100 ? nt : 100;
    double *ref = malloc(ne * G * d * sizeof *ref), scale = 1.0 / sqrt((double)d);
#pragma omp parallel
    {
        double *s = malloc(n * sizeof *s);
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < ne * G; i++) full_attn(ref + i * d, Qt + i * d, K, V, 0, n, d, scale, s);
        free(s);
    }
    /* KV_ORACLE "k1,k2,...": each head's error with the exact top k keys alone (the floor of any
     * search at that k without a tail estimate; the first min(nq, 100) decode queries) */
    if (getenv("KV_ORACLE") && *getenv("KV_ORACLE")) {
        size_t ks[16], nk = 0;
        for (const char *kp = getenv("KV_ORACLE"); *kp && nk < 16;) {
            char *end;
            ks[nk] = strtoul(kp, &end, 10);
            if (end == kp || ks[nk] == 0 || ks[nk] > nidx) die("KV_ORACLE: expected k1,k2,... (1..indexed keys, at most 16)", NULL);
            nk++;
            kp = end + (*end == ',');
        }
        double *em = calloc(nk * G, sizeof *em), *ex = calloc(nk * G, sizeof *ex);
#pragma omp parallel
        {
            double *s = malloc(n * sizeof *s), *tmp = malloc(n * sizeof *tmp), *oo = malloc(d * sizeof *oo);
#pragma omp for schedule(dynamic)
            for (size_t gi = 0; gi < G * ne; gi++) {
                size_t g = gi / ne, i = gi % ne;
                const float *qq = Qt + (i * G + g) * d;
                const double *rr = ref + (i * G + g) * d;
                for (size_t j = 0; j < n; j++) {
                    double a = 0;
                    for (size_t c = 0; c < d; c++) a += (double)qq[c] * K[j * d + c];
                    s[j] = a * scale;
                }
                for (size_t x = 0; x < nk; x++) {
                    exact_topk_attn(oo, s, V, n, d, sinks, o.window, ks[x], tmp);
                    double num = 0, den = 0;
                    for (size_t c = 0; c < d; c++) num += (oo[c] - rr[c]) * (oo[c] - rr[c]), den += rr[c] * rr[c];
                    double err1 = sqrt(num / den);
#pragma omp critical(oracle)
                    {
                        em[x * G + g] += err1 / ne;
                        if (err1 > ex[x * G + g]) ex[x * G + g] = err1;
                    }
                }
            }
            free(s), free(tmp), free(oo);
        }
        for (size_t x = 0; x < nk; x++)
            for (size_t g = 0; g < G; g++)
                printf("oracle L%d head %d: exact top %zu of the indexed keys, no tail (%.2f%% of them): err_mean %.3e err_max %.3e\n",
                       L, hs[g], ks[x], 100.0 * ks[x] / nidx, em[x * G + g], ex[x * G + g]);
        free(em), free(ex);
        fflush(stdout);
    }
    kst_kv *kv;
    if (kst_kv_create(&o, &kv, &e)) die("create", &e);
    if (kst_kv_append(kv, 0, K, V, n, &e)) die("append", &e);
    size_t nrope;
    float *rope = load_rope(argv[1], L, &nrope);
    if (rope && kst_kv_set_rope(kv, 0, rope, nrope, 0, &e)) die("rope", &e);
    double t0 = now_s();
    if (kst_kv_build(kv, 0, Qp, n, &e)) die("build", &e);
    printf("built in %.1f s%s\n", now_s() - t0, rope ? " (RoPE: the prefill queries also moved to the decode position)" : "");
    free(rope);
    const char *budgets = getenv("KV_BUDGETS") ? getenv("KV_BUDGETS") : "0:0:2048;0:0:0";
    if (strchr(budgets, ';') && budgets[strcspn(budgets, ";") + 1] && getenv("KESTREL_KV_TCACHE") &&
        atoi(getenv("KESTREL_KV_TCACHE")) != 0)
        die("KV_BUDGETS: one budget a run with the sample cache (KESTREL_KV_TCACHE=1): a later row would start from "
            "the table the earlier rows filled from the same decode queries",
            NULL);
    printf("%-5s %4s %6s %6s %6s %10s %9s %10s %10s %9s %8s %9s\n", "layer", "head", "top_k", "ef", "tail",
           "recall@100", "scanned", "err_mean", "err_max", "attended", "widened", "cpu_us");
    float *out = malloc(G * d * sizeof *out);
    int64_t *pos = malloc(8192 * sizeof *pos);
    double *rec = malloc(G * sizeof *rec), *err = malloc(G * sizeof *err), *emax = malloc(G * sizeof *emax);
    for (const char *bp = budgets; *bp;) {
        char *end;
        size_t k = strtoul(bp, &end, 10);
        if (*end != ':') die("KV_BUDGETS: expected top_k:ef:tail;...", NULL);
        size_t ef = strtoul(end + 1, &end, 10);
        if (*end != ':') die("KV_BUDGETS: expected top_k:ef:tail;...", NULL);
        size_t tail = strtoul(end + 1, &end, 10);
        bp = end + (*end == ';');
        size_t kk = k ? k : o.top_k, eff = ef ? ef : o.ef;
        if (eff > 8192) die("ef over 8192", NULL);
        if (kst_kv_set_tail_samples(kv, tail, &e)) die("tail", &e);
        double scanned = 0, att = 0, wid = 0, tstep = 0;
        size_t probed = 0, searches = 0;
        for (size_t g = 0; g < G; g++) rec[g] = err[g] = emax[g] = 0;
        for (size_t i = 0; i < nt; i++) {
            for (size_t g = 0; g < G; g++) {
                size_t found, sc, hit = 0;
                if (kst_kv_search(kv, 0, g, Qt + (i * G + g) * d, TOPK, eff, pos, &found, &sc, &e)) die("search", &e);
                for (size_t a = 0; a < TOPK; a++)
                    for (size_t b = 0; b < found; b++)
                        if ((uint64_t)pos[b] == want[(i * G + g) * TOPK + a] + sinks) { hit++; break; }
                rec[g] += (double)hit / TOPK / nt;
            }
            if (i >= ne) continue;
            kst_kv_stats st;
            double ta = cpu_s();
            if (kst_kv_attend(kv, 0, Qt + i * G * d, kk, eff, out, &st, &e)) die("attend", &e);
            tstep += (cpu_s() - ta) / ne;
            scanned += (double)st.scanned / G / st.indexed / ne;
            att += (double)(st.exact + (st.retrieved + st.sampled) / G) / n / ne;
            wid += (double)st.widened / G / ne; /* widened searches per query head and step */
            probed += st.probed, searches += st.searches;
            for (size_t g = 0; g < G; g++) {
                double x = rel_l2(out + g * d, ref + (i * G + g) * d, d);
                err[g] += x / ne;
                if (x > emax[g]) emax[g] = x;
            }
        }
        for (size_t g = 0; g < G; g++)
            printf("L%-4d %4d %6zu %6zu %6zu %10.3f %8.2f%% %10.3e %10.3e %8.1f%% %7.1f%% %9.1f\n", L, hs[g], kk, eff, tail,
                   rec[g], 100 * scanned, err[g], emax[g], 100 * att, 100 * wid, 1e6 * tstep);
        printf("(the cluster probe ran in %zu of the steps' %zu searches)\n", probed, searches);
    }
    kst_kv_free(kv);
    free(rec), free(err), free(emax), free(out), free(pos), free(ref), free(want), free(Qp), free(Qt);
    for (size_t g = 0; g < G; g++) free(Qa[g]);
    free(Qa), free(K), free(V);
    return 0;
}
