/* bench_kv.c - RetrievalAttention benchmark (tests/bench/kv.sh): recall@100 of the exact top-100
 * attention keys against the fraction of keys scanned, for the attention-aware graph, the
 * key-only graph and FAISS IVF over the keys; attention output error against full attention.
 *
 *   bench_kv real DIR L H [ctx] [nq]   real all-MiniLM-L6-v2 vectors from kv_dump.py (DIR/LlHh_*.npy)
 *   bench_kv synth N D [nq]            synthetic keys/queries (scaling only)
 *
 * Exact references (top-100 by inner product, full attention in float64) are computed here by
 * brute force over the same vectors. Prints one table per index; nothing is asserted. Where the
 * dump has DIR/L<l>_inv_freq.npy (kv_dump_llm.py) the attention-aware index is built with the
 * layer's RoPE (kst_kv_set_rope); KV_ROPE=0: not. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <faiss/c_api/Index_c.h>

#include "api/kestrel.h"
#include "core/npy.h"
#include "index/ann.h"
#include "index/faiss_ext.h"
#include "index/kv_graph.h"
#include "core/kv_attn.h"

#define TOPK 100
#define KVB_PROG "bench_kv"
#include "tests/bench/bench_kv_util.h"

/* Synthetic attention-like vectors: keys share a large common offset (as keys of real LLMs
 * do) plus one of 1024 cluster centres; queries come from another offset and scaled centres,
 * so the query and key distributions differ (the out-of-distribution case). */
static void synth(float *K, float *V, float *Q, size_t n, size_t nq, size_t d) {
    size_t C = 1024;
    float *cen = malloc(C * d * sizeof *cen), *mk = malloc(d * 4), *mq = malloc(d * 4);
    for (size_t i = 0; i < C * d; i++) cen[i] = nrand();
    for (size_t i = 0; i < d; i++) { mk[i] = 1.5f * nrand(); mq[i] = 0.5f * nrand(); }
    for (size_t t = 0; t < n; t++) {
        size_t c = (size_t)(urand() * C) % C;
        for (size_t i = 0; i < d; i++) {
            K[t * d + i] = mk[i] + cen[c * d + i] + 0.7f * nrand();
            V[t * d + i] = nrand();
        }
    }
    for (size_t t = 0; t < nq; t++) {
        size_t c = (size_t)(urand() * C) % C;
        for (size_t i = 0; i < d; i++) Q[t * d + i] = mq[i] + 1.5f * cen[c * d + i] + 0.7f * nrand();
    }
    free(cen); free(mk); free(mq);
}

/* KV_SECTIONS (default "attn,keys,ivf,err") picks the parts to run. */
static int section(const char *name) {
    const char *s = getenv("KV_SECTIONS");
    return !s || strstr(s, name) != NULL;
}

static double recall_of(const int64_t *got, size_t ng, const uint32_t *want, size_t off) {
    size_t hit = 0;
    for (size_t i = 0; i < TOPK; i++)
        for (size_t j = 0; j < ng; j++)
            if ((uint64_t)got[j] == (uint64_t)want[i] + off) { hit++; break; }
    return (double)hit / TOPK;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_kv real DIR L H [ctx] [nq] | bench_kv synth N D [nq]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    kst_error e;
    size_t n, d, nt, nprefill;
    float *K, *V, *Qtest, *Qpre, *rope = NULL;
    size_t nrope = 0;
    const char *label;
    char lab[128];
    if (strcmp(argv[1], "real") == 0 && argc >= 5) {
        size_t rows, dd, r2;
        int L = atoi(argv[3]), H = atoi(argv[4]);
        K = load(argv[2], L, H, "k", &rows, &d);
        V = load(argv[2], L, H, "v", &r2, &dd);
        float *Qall = load(argv[2], L, H, "q", &r2, &dd);
        n = argc > 5 ? (size_t)atol(argv[5]) : 131072;
        nt = argc > 6 ? (size_t)atol(argv[6]) : 200;
        if (n + nt > rows) die("ctx + nq exceed the dumped tokens", NULL);
        nprefill = n;
        Qpre = Qall;
        /* decode queries: evenly spaced tokens after the context */
        Qtest = malloc(nt * d * sizeof *Qtest);
        for (size_t i = 0; i < nt; i++)
            memcpy(Qtest + i * d, Qall + (n + i * (rows - n) / nt) * d, d * sizeof(float));
        const char *base = strrchr(argv[2], '/') ? strrchr(argv[2], '/') + 1 : argv[2];
        rope = load_rope(argv[2], L, &nrope);
        snprintf(lab, sizeof lab, "%s: L%d H%d, %zu keys, d %zu%s", base, L, H, n, d,
                 rope ? "; RoPE: prefill queries also moved to the decode position" : "");
        label = lab;
    } else if (strcmp(argv[1], "synth") == 0) {
        n = (size_t)atol(argv[2]);
        d = (size_t)atol(argv[3]);
        nt = argc > 4 ? (size_t)atol(argv[4]) : 200;
        nprefill = n / 8 < 65536 ? n / 8 : 65536;
        K = malloc(n * d * 4); V = malloc(n * d * 4);
        Qpre = malloc((nprefill + nt) * d * 4);
        synth(K, V, Qpre, n, nprefill + nt, d);
        Qtest = Qpre + nprefill * d;
        snprintf(lab, sizeof lab, "synthetic, %zu keys, d %zu", n, d);
        label = lab;
    } else {
        fprintf(stderr, "bench_kv: unknown mode %s\n", argv[1]);
        return 2;
    }
    size_t sinks = getenv("KV_SINKS") ? (size_t)atol(getenv("KV_SINKS")) : 4;
    size_t window = getenv("KV_WINDOW") ? (size_t)atol(getenv("KV_WINDOW")) : 512, nidx = n - sinks - window;
    size_t maxq = getenv("KV_BUILD_QUERIES") ? (size_t)atol(getenv("KV_BUILD_QUERIES")) : 32768;
    printf("== %s; %zu decode queries; sinks %zu, window %zu, indexed %zu; %d threads\n", label, nt,
           sinks, window, nidx, omp_get_max_threads());

    /* exact top-100 over the indexed keys */
    uint32_t *want = malloc(nt * TOPK * sizeof *want);
    double t0 = now_s();
    if (kst_kvg_exact_topk(K + sinks * d, 0, nidx, d, Qtest, nt, TOPK, want, NULL, &e) != KST_OK)
        die("exact top-k", &e);
    printf("exact top-100 of %zu queries: %.2f s\n", nt, now_s() - t0);

    const char *names[2] = {"attention-aware graph", "key-only graph (HNSW layer 0)"};
    kst_kv *kvs[2] = {NULL, NULL};
    for (int which = 0; which < 2; which++) {
        if (!section(which == 0 ? "attn" : "keys")) continue;
        kst_kv_opts o = kst_kv_opts_default();
        o.layers = o.kv_heads = o.q_heads = 1;
        o.head_dim = d;
        o.sinks = sinks;
        o.window = window;
        o.max_build_queries = maxq;
        if (getenv("KV_BUILD_TOP")) o.build_top = (size_t)atol(getenv("KV_BUILD_TOP"));
        if (getenv("KV_DEGREE")) o.degree = (size_t)atol(getenv("KV_DEGREE"));
        o.index = which == 0 ? KST_KV_INDEX_ATTN : KST_KV_INDEX_KEYS;
        if (kst_kv_create(&o, &kvs[which], &e) != KST_OK) die("create", &e);
        if (kst_kv_append(kvs[which], 0, K, V, n, &e) != KST_OK) die("append", &e);
        if (which == 0 && rope && kst_kv_set_rope(kvs[which], 0, rope, nrope, 0, &e) != KST_OK) die("rope", &e);
        t0 = now_s();
        if (kst_kv_build(kvs[which], 0, which == 0 ? Qpre : NULL, which == 0 ? nprefill : 0, &e) != KST_OK)
            die("build", &e);
        printf("\n-- %s: built in %.1f s (%s)\n", names[which], now_s() - t0,
               which == 0 ? "prefill queries used" : "keys only");
        printf("%6s %10s %10s\n", "ef", "recall@100", "scanned");
        static const size_t efs[] = {100, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096};
        int64_t *pos = malloc(4096 * sizeof *pos);
        for (size_t x = 0; x < sizeof efs / sizeof efs[0]; x++) {
            double rec = 0, scan = 0;
            for (size_t i = 0; i < nt; i++) {
                size_t found, scanned;
                if (kst_kv_search(kvs[which], 0, 0, Qtest + i * d, TOPK, efs[x], pos, &found, &scanned, &e) != KST_OK)
                    die("search", &e);
                rec += recall_of(pos, found, want + i * TOPK, sinks);
                scan += (double)scanned / nidx;
            }
            printf("%6zu %10.3f %9.2f%%\n", efs[x], rec / nt, 100 * scan / nt);
        }
        free(pos);
    }

    /* FAISS IVF over the keys (inner product): scanned = keys in the probed lists. */
    if (section("ivf")) {
        char fac[64];
        size_t nlist = (size_t)(4 * sqrt((double)nidx));
        snprintf(fac, sizeof fac, "IVF%zu,Flat", nlist);
        kst_ann *a;
        if (kst_ann_create(fac, (int)d, &a, &e) != KST_OK) die("ivf create", &e);
        t0 = now_s();
        const float *Kx = K + sinks * d;
        if (kst_ann_train(a, (int64_t)nidx, (int)d, Kx, &e) != KST_OK) die("ivf train", &e);
        int64_t *ids = malloc(nidx * sizeof *ids);
        for (size_t i = 0; i < nidx; i++) ids[i] = (int64_t)(i + sinks);
        if (kst_ann_add(a, (int64_t)nidx, (int)d, Kx, ids, &e) != KST_OK) die("ivf add", &e);
        free(ids);
        kst_faiss_layout lay;
        kst_faiss_layout_get(kst_ann_faiss(a), &lay);
        nlist = lay.nlist;
        printf("\n-- FAISS IVF%zu,Flat over the keys (inner product): built in %.1f s\n", nlist, now_s() - t0);
        float *cen = malloc(nlist * d * sizeof *cen);
        size_t *sizes = malloc(nlist * sizeof *sizes);
        kst_faiss_ivf_centroids_get(kst_ann_faiss(a), cen);
        kst_faiss_ivf_list_sizes(kst_ann_faiss(a), sizes);
        printf("%6s %10s %10s\n", "nprobe", "recall@100", "scanned");
        static const int nps[] = {1, 4, 16, 32, 64, 128, 256};
        float *sc = malloc(TOPK * sizeof *sc), *cs = malloc(nlist * sizeof *cs);
        int64_t *lab2 = malloc(TOPK * sizeof *lab2);
        for (size_t x = 0; x < sizeof nps / sizeof nps[0]; x++) {
            if ((size_t)nps[x] > nlist) break;
            double rec = 0, scan = 0;
            kst_ann_search_opts so = {nps[x], 0};
            for (size_t i = 0; i < nt; i++) {
                const float *q = Qtest + i * d;
                if (kst_ann_search(a, 1, (int)d, q, TOPK, &so, sc, lab2, &e) != KST_OK) die("ivf search", &e);
                rec += recall_of(lab2, TOPK, want + i * TOPK, sinks);
                /* the lists FAISS probes: the nprobe centroids of largest inner product */
                for (size_t l = 0; l < nlist; l++) {
                    float s = 0;
                    for (size_t j = 0; j < d; j++) s += q[j] * cen[l * d + j];
                    cs[l] = s;
                }
                size_t tot = 0;
                for (int p = 0; p < nps[x]; p++) {
                    size_t b = 0;
                    for (size_t l = 1; l < nlist; l++) if (cs[l] > cs[b]) b = l;
                    tot += sizes[b];
                    cs[b] = -INFINITY;
                }
                scan += (double)(tot + nlist) / nidx; /* + the centroids scored */
            }
            printf("%6d %10.3f %9.2f%%\n", nps[x], rec / nt, 100 * scan / nt);
        }
        free(cen); free(sizes); free(sc); free(cs); free(lab2);
        kst_ann_free(a);
    }

    /* Attention output error of the decode step against full attention (float64). */
    if (kvs[0] && section("err")) {
        size_t ne = nt < 100 ? nt : 100;
        double *ref = malloc(ne * d * sizeof *ref);
        double scale = 1.0 / sqrt((double)d);
        for (size_t i = 0; i < ne; i++) full_attn(ref + i * d, Qtest + i * d, K, V, 0, n, d, scale, NULL);
        float *out = malloc(d * sizeof *out);
        printf("\n-- decode-step output vs full attention over %zu keys (mean relative L2 over %zu queries)\n", n, ne);
        /* oracle: static tokens + the exact top_k indexed keys (what a perfect index gives) */
        size_t kmax = 2000 < nidx ? 2000 : nidx;
        uint32_t *ex = malloc(ne * kmax * sizeof *ex);
        if (kst_kvg_exact_topk(K + sinks * d, 0, nidx, d, Qtest, ne, kmax, ex, NULL, &e) != KST_OK)
            die("exact top-k (oracle)", &e);
        int64_t *rows = malloc((kmax + sinks + window) * sizeof *rows);
        float *sc2 = malloc((kmax + sinks + window) * sizeof *sc2);
        /* {top_k, ef, tail samples}: the last rows add the tail estimate (kst_kv opts.tail_samples) */
        static const size_t ks[][3] = {{100, 256, 0}, {100, 512, 0}, {256, 512, 0}, {500, 1024, 0}, {1000, 2048, 0},
                                       {2000, 4096, 0}, {100, 256, 256}, {100, 256, 1024}, {100, 256, 4096}};
        printf("%6s %6s %6s %10s %10s %10s %12s\n", "top_k", "ef", "tail", "rel.err", "scanned", "attended", "oracle.err");
        for (size_t x = 0; x < sizeof ks / sizeof ks[0]; x++) {
            double err2 = 0, scan = 0, att = 0;
            if (kst_kv_set_tail_samples(kvs[0], ks[x][2], &e) != KST_OK) die("tail", &e);
            for (size_t i = 0; i < ne; i++) {
                kst_kv_stats st;
                if (kst_kv_attend(kvs[0], 0, Qtest + i * d, ks[x][0], ks[x][1], out, &st, &e) != KST_OK)
                    die("attend", &e);
                err2 += rel_l2(out, ref + i * d, d);
                scan += (double)st.scanned / st.indexed;
                att += (double)(st.exact + st.retrieved + st.sampled) / n;
            }
            double oerr = 0;
            size_t kk = ks[x][0] < kmax ? ks[x][0] : kmax;
            for (size_t i = 0; i < ne; i++) {
                size_t m = 0;
                for (size_t j = 0; j < sinks; j++) rows[m++] = (int64_t)j;
                for (size_t j = n - window; j < n; j++) rows[m++] = (int64_t)j;
                for (size_t j = 0; j < kk; j++) rows[m++] = (int64_t)(ex[i * kmax + j] + sinks);
                float lse;
                kst_attn_partial(out, &lse, sc2, Qtest + i * d, K, V, 0, rows, 0, m, d, (float)scale);
                oerr += rel_l2(out, ref + i * d, d);
            }
            char ostr[32] = "-"; /* the oracle has no tail estimate */
            if (!ks[x][2]) snprintf(ostr, sizeof ostr, "%.2e", oerr / ne);
            printf("%6zu %6zu %6zu %10.2e %9.2f%% %9.2f%% %12s\n", ks[x][0], ks[x][1], ks[x][2], err2 / ne,
                   100 * scan / ne, 100 * att / ne, ostr);
        }
        free(ref); free(out); free(ex); free(rows); free(sc2);
    }
    kst_kv_free(kvs[0]);
    kst_kv_free(kvs[1]);
    return 0;
}
