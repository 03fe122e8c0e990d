/* bench_kv_gpu.c - the GPU side of the RetrievalAttention KV cache on a CUDA machine
 * (tests/bench/kv_gpu.sh): correctness checks against PyTorch's figures and the CPU path, then
 * decode-step latency over 32K..1M cached tokens. Standalone: built from the kv sources alone
 * (libc, libgomp, cudart, cublas), so it runs where Kestrel's other dependencies are absent.
 *
 *   bench_kv_gpu check FIXDIR         GPU decode vs tests/fixtures/kv SDPA; GPU vs CPU top-k and
 *                                     partial attention on random data. Exit 1 on a mismatch.
 *   bench_kv_gpu latency N[,N...]     synthetic keys (one KV head of 4 query heads, d 128,
 *                                     float16): build, recall, error, latency GPU+CPU vs CPU.
 *   bench_kv_gpu layer N[,N...]       the same for a whole layer (8 KV heads x 32 query heads):
 *                                     KV_EFS (default 128,256), KV_TAIL (tail samples, a 2nd pass),
 *                                     KV_RUNS rows "mode:ef:top_k:tail;..." (mode: head|group[N],
 *                                     +codes, /xN N candidates expanded at a time (group and
 *                                     per-head searches), /il0 the round-2 heap search, /ilN N searches
 *                                     interleaved, /rrR re-score R, /f32 no VNNI, /pf0, /same the
 *                                     same query every step, /spN/skM entries per query: the
 *                                     best M of the hubs and N spaced keys, default AUTO, /sp0
 *                                     the hubs, /app one token appended before each timed
 *                                     step, timed with it: last in KV_RUNS; /wN N planner threads,
 *                                     /wiN at the idle scheduling class, /tN the second timing on N
 *                                     threads, /isN the insertion beam's entries (0: the hubs),
 *                                     /tc1 the clustered tail's sample cache, /idle the engine's
 *                                     idle time lent between steps: opts.append_idle, the GPU
 *                                     partial armed, kst_kvc_work after each step, untimed as a
 *                                     decoder's other kernels; its time printed beside),
 *                                     KV_PROF=1 a per-phase breakdown,
 *                                     KV_SMAPS=1 huge pages per mapping, KV_LAYERS=n n layers
 *                                     of the same keys, stepped through in order (tail_q8 4). */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/kv_attn.h"
#include "core/npy.h"
#include "index/kv.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif
#include "index/kv_graph.h"
#define KVB_PROG "bench_kv_gpu"
#include "tests/bench/bench_kv_util.h"
#include "tests/bench/bench_kv_gen.h"

/* ------------------------------------------------------------------------------------------ */

#ifdef KST_CUDA
static int check(const char *dir) {
    kst_error e;
    kst_npy keys, values, pq, dq, o32, o16;
    char p[4096];
#define LD(a, n) do { snprintf(p, sizeof p, "%s/%s", dir, n); if (kst_npy_read(p, &a, &e)) die(p, &e); } while (0)
    LD(keys, "keys.npy"); LD(values, "values.npy"); LD(pq, "prefill_q.npy"); LD(dq, "decode_q.npy");
    LD(o32, "out_f32.npy"); LD(o16, "out_f16.npy");
    size_t P = pq.shape[0], S = dq.shape[0], QH = pq.shape[1], KVH = keys.shape[1], D = keys.shape[2];
    int bad = 0;
    for (int f16 = 0; f16 < 2; f16++) {
        kst_kvc_opts o = {1, KVH, QH, D, f16, 0, 4, 32, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, 1, 0, 0, 0, 0, 0, 0};
        kst_kvc *c;
        if (kst_kvc_create(&o, &c, &e)) die("create", &e);
        size_t nv = (P + S) * KVH * D, es = f16 ? 2 : 4;
        void *K = malloc(nv * es), *V = malloc(nv * es);
        for (size_t i = 0; i < nv; i++) {
            float k = ((float *)keys.data)[i], v = ((float *)values.data)[i];
            if (f16) { ((uint16_t *)K)[i] = kst_f32_to_f16(k); ((uint16_t *)V)[i] = kst_f32_to_f16(v); }
            else { ((float *)K)[i] = k; ((float *)V)[i] = v; }
        }
        if (kst_kvc_append(c, 0, K, V, P, &e) || kst_kvc_build(c, 0, pq.data, P, &e)) die("prefill", &e);
        double maxd = 0;
        int over = 0;
        float *out = malloc(QH * D * sizeof *out);
        const float *ref = f16 ? o16.data : o32.data;
        for (size_t s = 0; s < S; s++) {
            size_t row = KVH * D * es;
            if (kst_kvc_append(c, 0, (char *)K + (P + s) * row, (char *)V + (P + s) * row, 1, &e)) die("append", &e);
            if (kst_kvc_attend(c, 0, (float *)dq.data + s * QH * D, P, P, out, NULL, &e)) die("attend", &e);
            for (size_t i = 0; i < QH * D; i++) {
                double dd = fabs(out[i] - ref[s * QH * D + i]);
                if (dd > maxd) maxd = dd;
                if (!(dd <= 2e-5 + 1e-4 * fabs(ref[s * QH * D + i]))) over++;
            }
        }
        printf("check: GPU decode (%s, top_k = all) vs PyTorch SDPA: max |diff| %.2e, %d over tolerance (2e-5 + 1e-4 rel) -> %s\n",
               f16 ? "float16" : "float32", maxd, over, over ? "FAIL" : "ok");
        bad |= over != 0;
        /* GPU vs CPU path, small top_k: the same retrieval, so the same output */
        float *o2 = malloc(QH * D * sizeof *o2);
        if (kst_kvc_attend(c, 0, dq.data, 10, 32, out, NULL, &e)) die("attend", &e);
        kst_kvc_use_gpu(c, 0);
        if (kst_kvc_attend(c, 0, dq.data, 10, 32, o2, NULL, &e)) die("attend", &e);
        maxd = 0;
        for (size_t i = 0; i < QH * D; i++) maxd = fmax(maxd, fabs(out[i] - o2[i]));
        printf("check: GPU vs CPU decode (%s, top_k 10): max |diff| %.2e -> %s\n", f16 ? "float16" : "float32",
               maxd, maxd <= 2e-5 ? "ok" : "FAIL");
        bad |= maxd > 2e-5;
        free(o2); free(out); free(K); free(V);
        kst_kvc_free(c);
    }
    /* exact top-k: GPU (cuBLAS + selection) vs float64 brute force, random data */
    {
        size_t n = 70000, d = 128, nq = 300, k = 32;
        float *K = malloc(n * d * 4), *Q = malloc(nq * d * 4);
        for (size_t i = 0; i < n * d; i++) K[i] = nrand();
        for (size_t i = 0; i < nq * d; i++) Q[i] = nrand();
        uint32_t *ids = malloc(nq * k * 4);
        if (kst_kv_cuda_topk(K, n, d, Q, nq, k, ids, &e)) die("gpu top-k", &e);
        size_t miss = 0, order = 0;
        double *sc = malloc(n * sizeof *sc), *srt = malloc(n * sizeof *srt);
        for (size_t q = 0; q < nq; q++) {
            for (size_t j = 0; j < n; j++) {
                double a = 0;
                for (size_t i = 0; i < d; i++) a += (double)Q[q * d + i] * K[j * d + i];
                sc[j] = srt[j] = a;
            }
            qsort(srt, n, sizeof *srt, cmp_d);
            double kth = srt[n - k];
            for (size_t r = 0; r < k; r++) {
                double s = sc[ids[q * k + r]];
                if (s < kth - 1e-3) miss++; /* not in the true top-k (beyond float32 rounding) */
                if (r && s > sc[ids[q * k + r - 1]] + 1e-3) order++;
            }
        }
        printf("check: GPU exact top-%zu of %zu queries over %zu keys vs float64: %zu wrong ids, %zu out of order -> %s\n",
               k, nq, n, miss, order, miss || order ? "FAIL" : "ok");
        bad |= miss || order;
        free(K); free(Q); free(ids); free(sc); free(srt);
    }
    printf("check: %s\n", bad ? "FAILED" : "all ok");
    return bad;
}
#endif

/* ------------------------------------------------------------------------------------------ */

#ifdef KST_CUDA
#define GPU 1
#else
#define GPU 0 /* a CPU-only build of this bench (to try it without a GPU) */
#endif

static int latency(const char *list) {
    const size_t D = 128, QH = 4, SINKS = 4, WINDOW = 512, TOPK = 100, NT = 100, NREF = 16;
    /* KV_EFS: search efforts measured on each build (default "256") */
    const char *efs = getenv("KV_EFS") ? getenv("KV_EFS") : "256";
    size_t EF = (size_t)atol(efs);
    size_t NPRE = 8192; /* prefill positions whose queries build the index (x 4 heads) */
    printf("latency: one KV head with %zu query heads (a Llama-3-8B GQA group), head dim %zu, float16;"
           " sinks %zu + window %zu on the GPU; top_k %zu, ef %s; %d CPU threads\n",
           QH, D, SINKS, WINDOW, TOPK, efs, omp_get_max_threads());
    printf("%8s %5s %9s %10s %10s %9s %9s %10s %10s %10s %10s\n", "tokens", "ef", "build_s", "gpu+cpu_ms",
           "cpu_ms", "recall", "scanned", "rel.err", "err_k1", "gpu_MB", "cache_MB");
    for (const char *p = list; *p;) {
        size_t N = strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
        kst_error e;
        /* synthetic keys: common offset + one of 1024 centres + noise; queries: another offset +
         * scaled centres (out of the keys' distribution); values: noise */
        size_t C = 1024;
        float *cen = malloc(C * D * 4), mk[128], mq[128];
        for (size_t i = 0; i < C * D; i++) cen[i] = nrand();
        for (size_t i = 0; i < D; i++) { mk[i] = 1.5f * nrand(); mq[i] = 0.5f * nrand(); }
        uint16_t *K = malloc(N * D * 2), *V = malloc(N * D * 2);
        size_t nq = NPRE + NT;
        float *Q = malloc(nq * QH * D * 4);
        for (size_t t = 0; t < N; t++) {
            size_t c = (size_t)(urand() * C) % C;
            for (size_t i = 0; i < D; i++) {
                K[t * D + i] = kst_f32_to_f16(mk[i] + cen[c * D + i] + 0.7f * nrand());
                V[t * D + i] = kst_f32_to_f16(nrand());
            }
        }
        for (size_t t = 0; t < nq * QH; t++) {
            size_t c = (size_t)(urand() * C) % C;
            for (size_t i = 0; i < D; i++) Q[t * D + i] = mq[i] + 1.5f * cen[c * D + i] + 0.7f * nrand();
        }
        kst_kvc_opts o = {1, 1, QH, D, 1, 0, SINKS, WINDOW, TOPK, EF, 32, 32, 0, 32, 64, KST_KVC_INDEX_ATTN, GPU, 0, 0, 0, 0, 0, 0};
        kst_kvc *c;
        if (kst_kvc_create(&o, &c, &e)) die("create", &e);
        double t0 = now_s();
        if (kst_kvc_append(c, 0, K, V, N, &e) || kst_kvc_build(c, 0, Q, NPRE, &e)) die("prefill", &e);
        double build = now_s() - t0;
        const float *Qd = Q + NPRE * QH * D;
        float *out = malloc(QH * D * 4);
        /* reference: full attention in float64 over all N tokens, and exact top-100 */
        double *ref = malloc(NREF * QH * D * sizeof *ref), scale = 1.0 / sqrt((double)D);
#pragma omp parallel
        {
            double *s = malloc(N * sizeof *s);
#pragma omp for schedule(dynamic)
            for (size_t i = 0; i < NREF * QH; i++) full_attn(ref + i * D, Qd + i * D, K, V, 1, N, D, scale, s);
            free(s);
        }
        size_t nidx = N - SINKS - WINDOW;
        uint32_t *want = malloc(NREF * QH * TOPK * 4);
        float *kx = malloc(nidx * D * 4);
        kst_kv_rows_f32(kx, K, 1, SINKS, nidx, D);
        if (kst_kvg_exact_topk(kx, 0, nidx, D, Qd, NREF * QH, TOPK, want, NULL, &e)) die("exact", &e);
        free(kx);
        for (const char *ep = efs; *ep;) {
        size_t ef = strtoul(ep, (char **)&ep, 10);
        if (*ep == ',') ep++;
        if (ef == 0) break;
        double rec = 0, scan = 0, err = 0, serr = 0;
        int64_t pos[TOPK];
        for (size_t i = 0; i < NREF; i++) {
            kst_kvc_stats st;
            if (kst_kvc_attend(c, 0, Qd + i * QH * D, 0, ef, out, &st, &e)) die("attend", &e);
            scan += (double)st.scanned / st.indexed / QH;
            for (size_t h = 0; h < QH; h++) {
                err += rel_l2(out + h * D, ref + (i * QH + h) * D, D) / QH;
                size_t found, sc;
                if (kst_kvc_search(c, 0, h, Qd + (i * QH + h) * D, TOPK, ef, pos, &found, &sc, &e)) die("search", &e);
                size_t hit = 0;
                for (size_t a = 0; a < TOPK; a++)
                    for (size_t b = 0; b < found; b++) hit += (uint64_t)pos[b] == want[(i * QH + h) * TOPK + a] + SINKS;
                rec += (double)hit / TOPK / QH;
            }
            /* one retrieved token only, for scale: what retrieval buys */
            if (kst_kvc_attend(c, 0, Qd + i * QH * D, 1, 1, out, &st, &e)) die("attend", &e);
            for (size_t h = 0; h < QH; h++) {
                serr += rel_l2(out + h * D, ref + (i * QH + h) * D, D) / QH;
            }
        }
        /* latency: median of NT decode steps, GPU+CPU then CPU alone */
        double med[2];
        for (int mode = 0; mode < 2; mode++) {
            kst_kvc_use_gpu(c, mode == 0);
            double *ts = malloc(NT * sizeof *ts);
            for (size_t i = 0; i < 5; i++) kst_kvc_attend(c, 0, Qd, 0, ef, out, NULL, &e);
            for (size_t i = 0; i < NT; i++) {
                double a = now_s();
                if (kst_kvc_attend(c, 0, Qd + i * QH * D, 0, ef, out, NULL, &e)) die("attend", &e);
                ts[i] = now_s() - a;
            }
            qsort(ts, NT, sizeof *ts, cmp_d);
            med[mode] = ts[NT / 2] * 1e3;
            free(ts);
        }
        printf("%8zu %5zu %9.1f %10.3f %10.3f %9.3f %8.2f%% %10.2e %10.2e %10.2f %10.1f\n", N, ef, build, med[0], med[1],
               rec / NREF, 100 * scan / NREF, err / NREF, serr / NREF, kst_kvc_gpu_bytes(c) / 1048576.0,
               2.0 * N * D * 2 / 1048576.0);
        fflush(stdout);
        }
        kst_kvc_free(c);
        free(cen); free(K); free(V); free(Q); free(out); free(ref); free(want);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* layer: the decode step of one whole decoder layer */

/* The number after a mode flag ("/w3": 3 for "/w"), only where a digit follows it (so "/w" is not
 * "/wd5" or "/wi3"); dflt where the flag is absent. */
static long mode_num(const char *mode, const char *flag, long dflt) {
    size_t fl = strlen(flag);
    for (const char *p = strstr(mode, flag); p; p = strstr(p + 1, flag))
        if (p[fl] >= '0' && p[fl] <= '9') return atol(p + fl);
    return dflt;
}

/* One layer of a Llama-3-8B-shaped model: 8 KV heads, 32 query heads (GQA 4), head dim 128,
 * float16, sinks 4 + window 512 on the GPU, everything else in CPU memory behind the graphs;
 * kst_kvc_attend searches the 32 query heads on all CPU threads while the GPU attends to the
 * static tokens of all heads in one launch, then merges. KV head h holds head 0's synthetic
 * keys and values under a signed permutation of the dimensions (its own memory; inner products
 * unchanged), so head 0's graph is built once and copied (kst_kvc_build_copied); every query
 * head has its own independent queries. Reference: float64 full attention, exact top-100. */
static int layer(const char *list) {
    const size_t D = 128, KVH = 8, QH = 32, G = QH / KVH, SINKS = 4, TOPK = 100;
    const size_t WINDOW = getenv("KV_WINDOW") ? (size_t)atol(getenv("KV_WINDOW")) : 512;
    const size_t NT = 50, NPRE = 8192;
    /* KV_NREF: decode steps whose outputs are checked against float64 full attention (4; <= 50) */
    size_t NREF = getenv("KV_NREF") ? (size_t)atol(getenv("KV_NREF")) : 4;
    if (NREF < 1) NREF = 1;
    if (NREF > NT) NREF = NT;
    const char *efs = getenv("KV_EFS") ? getenv("KV_EFS") : "128,256";
    size_t tail = getenv("KV_TAIL") ? (size_t)atol(getenv("KV_TAIL")) : 0;
    float corr = getenv("KV_GQA_CORR") ? (float)atof(getenv("KV_GQA_CORR")) : 0.0f;
    const char *modes = getenv("KV_MODES") ? getenv("KV_MODES") : "head,group,head+codes,group+codes";
    /* rows: KV_MODES x KV_EFS (top_k 100; with KV_TAIL a second pass with that many tail
     * samples), then KV_RUNS "mode:ef:top_k:tail;..." */
    struct { char mode[64]; size_t ef, topk, tail; } runs[512];
    size_t nrun = 0;
    for (int pass = 0; pass < (tail ? 2 : 1); pass++)
        for (const char *mp = modes; *mp && nrun < 512;) {
            size_t ml = strcspn(mp, ",");
            for (const char *ep = efs; *ep && nrun < 512;) {
                size_t ef = strtoul(ep, (char **)&ep, 10);
                if (*ep == ',') ep++;
                if (ef == 0) break;
                snprintf(runs[nrun].mode, sizeof runs[nrun].mode, "%.*s", (int)(ml < 63 ? ml : 63), mp);
                runs[nrun].ef = ef;
                runs[nrun].topk = TOPK;
                runs[nrun++].tail = pass ? tail : 0;
            }
            mp += ml + (mp[ml] == ',');
        }
    for (const char *rp = getenv("KV_RUNS") ? getenv("KV_RUNS") : ""; *rp && nrun < 512;) {
        size_t ml = strcspn(rp, ":");
        snprintf(runs[nrun].mode, sizeof runs[nrun].mode, "%.*s", (int)(ml < 63 ? ml : 63), rp);
        rp += ml + (rp[ml] == ':');
        runs[nrun].ef = strtoul(rp, (char **)&rp, 10);
        runs[nrun].topk = strtoul(rp + (*rp == ':'), (char **)&rp, 10);
        runs[nrun].tail = strtoul(rp + (*rp == ':'), (char **)&rp, 10);
        if (*rp == ';') rp++;
        if (runs[nrun].ef && runs[nrun].topk) nrun++;
    }
    int thr2 = getenv("KV_THREADS2") ? atoi(getenv("KV_THREADS2")) : (omp_get_max_threads() + 1) / 2;
    printf("layer: %zu KV heads x %zu query heads (GQA %zu), head dim %zu, float16; sinks %zu + window %zu"
           " on the GPU; top_k %zu, ef %s; %d CPU threads\n",
           KVH, QH, G, D, SINKS, WINDOW, TOPK, efs, omp_get_max_threads());
    printf("KV_GQA_CORR %.2f; modes %s (head: one search per query head; group: one per KV head; codes: steered by 4-bit codes)\n",
           corr, modes);
    printf("%8s %-12s %5s %5s %6s %9s %10s %10s %9s %11s %9s %10s %10s %12s %9s %8s\n", "tokens", "mode", "ef", "top_k", "tail", "build_s",
           "ms", "ms_thr2", "recall", "scan/search", "scan/head", "rel.err", "gpu_MB", "cache_MB", "index_MB", "widened");
    printf("(ms: median decode step on %d threads, ms_thr2 on %d; recall of the top-100 at the row's ef; widened: widened searches per query head and step, /wdN: opts.widen = N%%)\n",
           omp_get_max_threads(), thr2);
    int perm[KVB_KVH][KVB_D];
    float sgn[KVB_KVH][KVB_D];
    kvb_perms(perm, sgn); /* head 0: the identity */
    for (const char *p = list; *p;) {
        size_t N = strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
        kst_error e;
        double t0 = now_s();
        /* head 0: common offset + one of C centres + noise (as latency()); values noise
         * (bench_kv_gen.h, the same draws whatever the size list). KV_GEN=diffuse (the generator
         * of rounds 1-10): C = 1024 whatever N, so a query's cluster holds N / 1024 near-equal keys
         * (128 at 128K, 1,024 at 1M). KV_GEN=real (the default): C = N / KV_KPC (384 keys per
         * cluster whatever N), and the attention sinks and the most recent 1,024 tokens get a
         * logit bonus (KV_SINK_LOGIT 20.8, KV_WIN_LOGIT 3.5) along a direction u that the other
         * keys and the queries' noise lack (projected out; every query has sqrt(D) along u):
         * calibrated so that the float64 attention's shares (sinks, window, top-100, rest; the
         * bench prints them) match SmolLM2-135M's at 32K (tests/bench/kv_attn_stats.py; README,
         * round 11), not tuned on the bench's speed. KV_GQA_CORR = rho in [0, 1): with
         * probability rho a query head takes its group's shared centre and noise mixed sqrt(rho)
         * shared + sqrt(1 - rho) own (0, the default: independent heads, the worst case for the
         * group search). */
        const char *gen = getenv("KV_GEN") ? getenv("KV_GEN") : "real";
        int diffuse = !strcmp(gen, "diffuse");
        size_t kpc = getenv("KV_KPC") ? (size_t)atol(getenv("KV_KPC")) : 384;
        float bsink = getenv("KV_SINK_LOGIT") ? (float)atof(getenv("KV_SINK_LOGIT")) : 20.8f;
        float bwin = getenv("KV_WIN_LOGIT") ? (float)atof(getenv("KV_WIN_LOGIT")) : 3.5f;
        kvb_data gd;
        /* KV_QTIME r (0, the default: each decode query drawn anew): the varying part of a head's
         * decode query correlated about r with the one before (bench_kv_gen.h; "new queries" rows
         * then step through them in order) */
        float qtime = getenv("KV_QTIME") ? (float)atof(getenv("KV_QTIME")) : 0.0f;
        if (!(qtime >= 0 && qtime < 1)) {
            fprintf(stderr, "bench_kv_gpu: KV_QTIME in [0, 1)\n");
            return 2;
        }
        kvb_gen(N, corr, qtime, diffuse, kpc, bsink, bwin, perm, sgn, &gd);
        size_t C = gd.C;
        uint16_t *K0 = gd.K0, *V0 = gd.V0;
        float *Qpre = gd.Qpre, *Qd0 = gd.Qd0, *Qd = gd.Qd;
        printf("(%zu tokens: generator %s: %zu clusters (%.0f keys each)", N, diffuse ? "diffuse" : "real", C, (double)N / C);
        if (!diffuse) printf(", sinks +%.2f, last 1024 tokens +%.2f logits", bsink, bwin);
        printf("; data sum %016llx; KV_QTIME %.2f: decode queries' lag-1 correlation %.3f)\n", (unsigned long long)kvb_sum(&gd, N),
               qtime, kvb_qlag1(Qd0));
        /* KV_LAYERS (default 1): layers holding the same keys, each built (so as long to set up),
         * the timed steps going through them in order, 0, 1, ..., as a decoder's loop does (with
         * tail_q8 staged each step has the next layer's table copied in: 4 layers or more, so that
         * the two slots alternate); the references and recall are layer 0's */
        const size_t NL = getenv("KV_LAYERS") && atol(getenv("KV_LAYERS")) > 1 ? (size_t)atol(getenv("KV_LAYERS")) : 1;
        kst_kvc_opts o = {NL, KVH, QH, D, 1, 0, SINKS, WINDOW, TOPK, 256, 32, 32, 0, 32, 64, KST_KVC_INDEX_ATTN, GPU, 0, 0, 1, 0, 0, 0};
        /* KV_BATCH: append_batch (default 64, the API's; 1: each token linked at its append) */
        o.append_batch = getenv("KV_BATCH") ? (size_t)atol(getenv("KV_BATCH")) : 64;
        kst_kvc *c;
        if (kst_kvc_create(&o, &c, &e)) die("create", &e);
        double tgen = 0, build = 0;
        for (size_t l = 0; l < NL; l++) {
            t0 = now_s();
            if (kvb_append(c, l, N, K0, V0, perm, sgn, &e)) die("append", &e);
            tgen += now_s() - t0;
            t0 = now_s();
            if (kst_kvc_build_copied(c, l, Qpre, NPRE, &e)) die("build", &e);
            build += (now_s() - t0) / NL;
            /* room for the "/app" rows' tokens (KV_RESERVE, default 16384 more), as an engine that
             * knows its context length reserves it: a growth in a timed step would copy the layer */
            if (kst_kvc_reserve(c, l, N + (getenv("KV_RESERVE") ? (size_t)atol(getenv("KV_RESERVE")) : 16384), &e))
                die("reserve", &e);
        }
        if (NL > 1) printf("(%zu tokens: %zu layers of the same keys, each built)\n", N, NL);
        /* references in head 0's frame */
        double *ref = malloc(NREF * QH * D * sizeof *ref), scale = 1.0 / sqrt((double)D);
#pragma omp parallel
        {
            double *s = malloc(N * sizeof *s);
#pragma omp for schedule(dynamic)
            for (size_t i = 0; i < NREF * QH; i++) full_attn(ref + i * D, Qd0 + i * D, K0, V0, 1, N, D, scale, s);
            free(s);
        }
        size_t nidx = N - SINKS - WINDOW;
        uint32_t *want = malloc(NREF * QH * TOPK * 4);
        float *kx = malloc(nidx * D * 4);
        kst_kv_rows_f32(kx, K0, 1, SINKS, nidx, D);
        if (kst_kvg_exact_topk(kx, 0, nidx, D, Qd0, NREF * QH, TOPK, want, NULL, &e)) die("exact", &e);
        free(kx);
        { /* how concentrated the reference queries' attention is (as kv_attn_stats.py prints
           * for real heads): float64 softmax mass on the sinks, the window, the exact top-100
           * indexed keys and the rest, the effective keys, the share of queries whose rest
           * holds more than 2% */
            double sh[6] = {0};
#pragma omp parallel reduction(+ : sh[:6])
            {
                double *sc = malloc(N * sizeof *sc);
#pragma omp for schedule(dynamic)
                for (size_t i = 0; i < NREF * QH; i++) {
                    double mx = -INFINITY, z = 0, ms = 0, mw = 0, mt = 0, ent = 0;
                    for (size_t j = 0; j < N; j++) {
                        double a = 0;
                        for (size_t x = 0; x < D; x++) a += (double)Qd0[i * D + x] * kst_f16_to_f32(K0[j * D + x]);
                        sc[j] = a * scale;
                        mx = sc[j] > mx ? sc[j] : mx;
                    }
                    for (size_t j = 0; j < N; j++) z += exp(sc[j] - mx);
                    for (size_t j = 0; j < N; j++) {
                        double p = exp(sc[j] - mx) / z;
                        if (j < SINKS) ms += p;
                        else if (j >= N - WINDOW) mw += p;
                        if (p > 0) ent -= p * log(p);
                    }
                    for (size_t x = 0; x < TOPK; x++) mt += exp(sc[want[i * TOPK + x] + SINKS] - mx) / z;
                    double rest = 1 - ms - mw - mt;
                    sh[0] += ms; sh[1] += mw; sh[2] += mt; sh[3] += rest; sh[4] += exp(ent); sh[5] += rest > 0.02;
                }
                free(sc);
            }
            double nq = (double)(NREF * QH);
            printf("(%zu tokens: attention of %zu reference queries: sinks %.3f, window %.3f, top-100 %.3f, rest %.3f;"
                   " effective keys %.0f; rest > 2%% in %.0f%% of queries)\n",
                   N, NREF * QH, sh[0] / nq, sh[1] / nq, sh[2] / nq, sh[3] / nq, sh[4] / nq, 100 * sh[5] / nq);
        }
        printf("(%zu tokens: data %.1f s, references %.1f s)\n", N, tgen, now_s() - t0 - build);
        { /* are the big arrays on huge pages? (THP "madvise": kst_kvg_advise_huge) */
            FILE *f = fopen("/proc/self/smaps_rollup", "r");
            char line[256];
            while (f && fgets(line, sizeof line, f))
                if (!strncmp(line, "Rss:", 4) || !strncmp(line, "AnonHugePages:", 14)) printf("(%zu tokens: %s", N, line);
            if (f) fclose(f);
            /* per mapping of 8 MB or more: its size, resident and huge-page kB */
            f = getenv("KV_SMAPS") ? fopen("/proc/self/smaps", "r") : NULL;
            long sz = 0, rss = 0;
            while (f && fgets(line, sizeof line, f)) {
                long v;
                if (sscanf(line, "Size: %ld kB", &v) == 1) sz = v;
                else if (sscanf(line, "Rss: %ld kB", &v) == 1) rss = v;
                else if (sscanf(line, "AnonHugePages: %ld kB", &v) == 1 && sz >= 8192)
                    printf("  (map %ld MB: rss %ld MB, huge %ld MB)\n", sz >> 10, rss >> 10, v >> 10);
            }
            if (f) fclose(f);
        }
        float *out = malloc(QH * D * 4), *un = malloc(D * 4);
        /* pairwise overlap of the exact top-100 of a group's heads */
        {
            double ov = 0;
            size_t np = 0;
            for (size_t i = 0; i < NREF; i++)
                for (size_t g0 = 0; g0 < QH; g0 += G)
                    for (size_t a = g0; a < g0 + G; a++)
                        for (size_t b = a + 1; b < g0 + G; b++, np++) {
                            size_t cnt = 0;
                            for (size_t x = 0; x < TOPK; x++)
                                for (size_t y = 0; y < TOPK; y++) cnt += want[(i * QH + a) * TOPK + x] == want[(i * QH + b) * TOPK + y];
                            ov += (double)cnt / TOPK;
                        }
            printf("(%zu tokens: exact top-100 of a group's heads overlap %.1f%% pairwise)\n", N, 100 * ov / np);
        }
        for (size_t ri = 0; ri < nrun; ri++) {
            const char *mode = runs[ri].mode;
            size_t ef = runs[ri].ef, topk_att = runs[ri].topk;
            /* "group": whole groups; "group2": two query heads per search */
            const char *gp = strstr(mode, "group");
            kst_kvc_set_search(c, gp ? (gp[5] >= '2' && gp[5] <= '9' ? gp[5] - '0' : 1) : 0, strstr(mode, "codes") != NULL);
            /* "/x4": the group-search path expands 4 candidates at a time */
            kst_kvc_set_expand(c, strstr(mode, "/x") ? (size_t)atol(strstr(mode, "/x") + 2) : 1);
            /* "/il2": two query heads per task searched interleaved (/il1, the default: one at a
             * time); "/rr128": re-score the 128 best by code score (default: all ef) */
            kst_kvc_set_interleave(c, strstr(mode, "/il") ? (size_t)atol(strstr(mode, "/il") + 3) : 1);
            kst_kvc_set_rerank(c, strstr(mode, "/rr") ? (size_t)atol(strstr(mode, "/rr") + 3) : 0);
            /* "/pf0": edges read as soon as a node is scored (default: once it joins the beam) */
            kst_kvc_set_prefetch(c, strstr(mode, "/pf0") == NULL);
            /* "/f32": codes scored in float32 (default: int8 x 4-bit by AVX-512 VNNI where there) */
            kst_kvc_set_vnni(c, strstr(mode, "/f32") == NULL);
            /* "/sp256/sk8": per query, start from the 8 best of the hubs and 256 spaced keys
             * ("/sp0": from all the hubs; default: KST_KVC_SPREAD_AUTO) */
            kst_kvc_set_spread(c, strstr(mode, "/sp") ? (size_t)atol(strstr(mode, "/sp") + 3) : KST_KVC_SPREAD_AUTO,
                               strstr(mode, "/sk") ? (size_t)atol(strstr(mode, "/sk") + 3) : 0);
            kst_kvc_set_tail_samples(c, runs[ri].tail);
            /* "/tc1": the clustered tail's sample cache (kst_kvc_set_tail_cache; with
             * KESTREL_KV_TCLUST, and KESTREL_KV_TSHARE for its first step; "/tc0" or none: off,
             * unless KESTREL_KV_TCACHE says otherwise) */
            kst_kvc_set_tail_cache(c, mode_num(mode, "/tc", 0) > 0, 0);
            /* "/idle": the engine's idle time lent between steps (kst_kvc_work, untimed; in a
             * decoder the GPU then runs the rest of the layer): the sample cache's update after a
             * step and the next step's GPU launch move there (opts.append_idle, the GPU arm) */
            int idle = strstr(mode, "/idle") != NULL;
            kst_kvc_set_append_idle(c, idle);
            kst_kvc_set_gpu_arm(c, idle);
            double idle_s = 0;
            size_t idle_n = 0;
#define IDLE_WORK()                                                              \
    do {                                                                         \
        if (idle) {                                                              \
            double w0_ = now_s();                                                \
            if (kst_kvc_work(c, NULL, NULL, NULL, &e)) die("work", &e);          \
            idle_s += now_s() - w0_;                                             \
            idle_n++;                                                            \
        }                                                                        \
    } while (0)
            /* "/wd5": the adaptive budget at widen 0.05 (opts.widen in percent; "/wd0": off;
             * default: KESTREL_KV_WIDEN, else off) */
            kst_kvc_set_widen(c, strstr(mode, "/wd") ? (float)atof(strstr(mode, "/wd") + 3) / 100.0f
                                 : getenv("KESTREL_KV_WIDEN") ? (float)atof(getenv("KESTREL_KV_WIDEN")) : 0.0f);
            /* "/is0": appended keys' insertion beam from the hubs, every pool entry expanded (before
             * round 11; default: entries from the entry table, KST_KVG_INS_SK, 3/4 expanded) */
            if (mode_num(mode, "/is", -1) >= 0) kst_kvc_set_insert(c, (size_t)mode_num(mode, "/is", 0), 0);
            else kst_kvc_set_insert(c, KST_KVG_INS_SK, (3 * 64 + 3) / 4);
            /* "/tN": the second timing (and KV_PROF) on N threads instead of KV_THREADS2 */
            int thr2r = (int)mode_num(mode, "/t", thr2);
            /* "/we0": the adaptive budget decided after the search only (round 10); "/we1": before
             * it too where the GPU's items are in; default (2): before it, waiting for them */
            kst_kvc_set_widen_early(c, strstr(mode, "/we") ? atoi(strstr(mode, "/we") + 3) : 2);
            double rec = 0, scan = 0, shead = 0, err = 0, wid = 0;
            size_t probed = 0, searches = 0;
            int64_t pos[G * TOPK];
            size_t found[G];
            for (size_t i = 0; i < NREF; i++) {
                kst_kvc_stats st;
                if (kst_kvc_attend(c, 0, Qd + i * QH * D, topk_att, ef, out, &st, &e)) die("attend", &e);
                scan += (double)st.scanned / st.indexed / st.searches;
                shead += (double)st.scanned / st.indexed / QH;
                wid += (double)st.widened / QH;
                probed += st.probed, searches += st.searches;
                for (size_t h = 0; h < QH; h++) {
                    /* back to head 0's frame: out[i] = sgn[i] * ref[perm[i]] */
                    for (size_t j = 0; j < D; j++) un[perm[h / G][j]] = sgn[h / G][j] * out[h * D + j];
                    err += rel_l2(un, ref + (i * QH + h) * D, D) / QH;
                }
                for (size_t kh = 0; kh < KVH; kh++) {
                    size_t sc;
                    if (kst_kvc_search_group(c, 0, kh, Qd + (i * QH + kh * G) * D, TOPK, ef, pos, found, &sc, &e)) die("search", &e);
                    for (size_t a = 0; a < G; a++) {
                        size_t h = kh * G + a, hit = 0;
                        for (size_t x = 0; x < TOPK; x++)
                            for (size_t b = 0; b < found[a]; b++) hit += (uint64_t)pos[a * TOPK + b] == want[(i * QH + h) * TOPK + x] + SINKS;
                        rec += (double)hit / TOPK / QH;
                    }
                }
            }
            /* median step time with the GPU, on all threads and on KV_THREADS2 of them */
            double med[2];
            int nth0 = omp_get_max_threads();
            for (int tm = 0; tm < 2; tm++) {
                omp_set_num_threads(tm ? thr2r : nth0);
                double *ts = malloc(NT * sizeof *ts);
                /* "/same": every step the same query (its reads then hit the caches: the compute floor) */
                size_t qstep = strstr(mode, "/same") ? 0 : QH * D;
                for (size_t i = 0; i < 5 * NL; i++) {
                    kst_kvc_attend(c, i % NL, Qd, topk_att, ef, out, NULL, &e);
                    IDLE_WORK();
                }
                /* "/app": each timed step first appends one token (a copy of a cached one), as a
                 * decode step does, so the oldest window token moves into the index (timed with
                 * the step; the cache then holds more tokens than the references: put it last) */
                int app = strstr(mode, "/app") != NULL;
                /* "/wN": batch appends planned by N background worker threads (default: by
                 * the appending call) */
                kst_kvc_set_append_worker(c, (int)(mode_num(mode, "/wi", -1) >= 0 ? mode_num(mode, "/wi", 0) : mode_num(mode, "/w", 0)));
                /* "/wiN": N workers at the idle scheduling class (run with OMP_WAIT_POLICY=passive
                 * so that the steps' threads leave their cores between steps) */
                kst_kvc_set_append_worker_idle(c, mode_num(mode, "/wi", -1) >= 0);
                uint16_t kc1[KVH * D], vc1[KVH * D];
                /* KV_APP_STEPS: steps timed with appends (default 50; more to reach the steady
                 * state of the batches: their median, mean and max are printed) */
                size_t NS = app && getenv("KV_APP_STEPS") ? (size_t)atol(getenv("KV_APP_STEPS")) : NT;
                /* KV_STEPS: steps timed in the rows without appends (default 50; the queries cycle) */
                if (!app && getenv("KV_STEPS")) NS = (size_t)atol(getenv("KV_STEPS"));
                if (NS > NT) {
                    free(ts);
                    ts = malloc(NS * sizeof *ts);
                }
                /* steps whose append linked a batch (the index grew), the step after each, the
                 * others: where the mean goes (the phase of the batches) */
                double ph_t[3] = {0, 0, 0}, ph_max[3] = {0, 0, 0};
                size_t ph_n[3] = {0, 0, 0}, after = 0, nstaged = 0;
                for (size_t i = 0; i < NS; i++) {
                    size_t ly = i % NL;
                    kst_kvc_stats sst;
                    if (app) {
                        size_t t = (i * 7919 + 13) % N;
                        for (size_t h = 0; h < KVH; h++) head_row(kc1 + h * D, vc1 + h * D, K0, V0, t, perm[h], sgn[h], D);
                    }
                    size_t nidx0 = kst_kvc_indexed(c, ly);
                    double a = now_s();
                    if (app && kst_kvc_append(c, ly, kc1, vc1, 1, &e)) die("append", &e);
                    if (kst_kvc_attend(c, ly, Qd + i % NT * qstep, topk_att, ef, out, &sst, &e)) die("attend", &e);
                    ts[i] = now_s() - a;
                    nstaged += sst.staged;
                    IDLE_WORK();
                    int ph = kst_kvc_indexed(c, ly) != nidx0 ? 0 : after ? 1 : 2;
                    after = ph == 0;
                    ph_t[ph] += ts[i];
                    ph_n[ph]++;
                    if (ts[i] > ph_max[ph]) ph_max[ph] = ts[i];
                }
                if (app)
                    printf("  %s ef %zu, %d threads: phases (ms): %zu batch steps mean %.3f max %.3f; the step after each"
                           " mean %.3f max %.3f; %zu others mean %.3f max %.3f\n",
                           mode, ef, omp_get_max_threads(), ph_n[0], ph_n[0] ? 1e3 * ph_t[0] / ph_n[0] : 0.0, 1e3 * ph_max[0],
                           ph_n[1] ? 1e3 * ph_t[1] / ph_n[1] : 0.0, 1e3 * ph_max[1], ph_n[2],
                           ph_n[2] ? 1e3 * ph_t[2] / ph_n[2] : 0.0, 1e3 * ph_max[2]);
                double mean = 0;
                for (size_t i = 0; i < NS; i++) mean += ts[i] / NS;
                qsort(ts, NS, sizeof *ts, cmp_d);
                med[tm] = ts[NS / 2] * 1e3;
                if (app)
                    printf("  %s ef %zu, %d threads: %zu steps with an append: median %.3f mean %.3f p90 %.3f max %.3f ms;"
                           " %zu pending, %zu indexed after\n",
                           mode, ef, omp_get_max_threads(), NS, ts[NS / 2] * 1e3, mean * 1e3, ts[NS * 9 / 10] * 1e3,
                           ts[NS - 1] * 1e3, kst_kvc_pending(c, 0), kst_kvc_indexed(c, 0));
                else /* the step's own spread (new queries every step), beside the appending rows' */
                    printf("  %s ef %zu, %d threads: %zu steps: median %.3f mean %.3f p90 %.3f max %.3f ms\n", mode, ef,
                           omp_get_max_threads(), NS, ts[NS / 2] * 1e3, mean * 1e3, ts[NS * 9 / 10] * 1e3, ts[NS - 1] * 1e3);
                if (nstaged) printf("  %s: %zu of %zu steps found their tail table staged ahead\n", mode, nstaged, NS);
                free(ts);
            }
            omp_set_num_threads(nth0);
            if (getenv("KV_PROF")) { /* where a step's time goes (kst_kvc_prof), all threads */
                kst_kvc_prof pf;
                memset(&pf, 0, sizeof pf);
                kst_kvc_set_prof(c, &pf);
                if (mode_num(mode, "/t", -1) >= 0) omp_set_num_threads(thr2r);
                int pth = omp_get_max_threads();
                size_t qstep = strstr(mode, "/same") ? 0 : QH * D;
                int app = strstr(mode, "/app") != NULL;
                uint16_t kc1[KVH * D], vc1[KVH * D];
                /* with appends, KV_APP_STEPS steps (so that batches land within them) */
                size_t NP = app && getenv("KV_APP_STEPS") ? (size_t)atol(getenv("KV_APP_STEPS")) : NT;
                for (size_t i = 0; i < NP; i++) {
                    if (app) {
                        size_t t = (i * 7919 + 17) % N;
                        for (size_t h = 0; h < KVH; h++) head_row(kc1 + h * D, vc1 + h * D, K0, V0, t, perm[h], sgn[h], D);
                        if (kst_kvc_append(c, i % NL, kc1, vc1, 1, &e)) die("append", &e);
                    }
                    if (kst_kvc_attend(c, i % NL, Qd + i % NT * qstep, topk_att, ef, out, NULL, &e)) die("attend", &e);
                    IDLE_WORK();
                }
                kst_kvc_set_prof(c, NULL);
                if (mode_num(mode, "/t", -1) >= 0) omp_set_num_threads(nth0);
                if (pf.appends) {
                    double ua = 1e6 / (double)pf.appends;
                    printf("  prof %s appends (us/append, mean of %zu): total %.1f = copy %.1f + gpu %.1f + index %.1f"
                           " (of which tables %.1f; insertions summed over KV heads: beam %.1f select %.1f link %.1f)\n",
                           mode, pf.appends, pf.app_total * ua, pf.app_copy * ua, pf.app_gpu * ua, pf.app_index * ua,
                           pf.app_tables * ua, pf.app_ibeam * ua, pf.app_iselect * ua, pf.app_iapply * ua);
                    if (pf.app_batches)
                        printf("  prof %s batches: %zu finished, ms each: planning %.2f (its 'index' share), linking %.2f\n", mode,
                               pf.app_batches, 1e3 * pf.app_bplan / (double)pf.app_batches,
                               1e3 * pf.app_blink / (double)pf.app_batches);
                    if (pf.app_wbatches)
                        printf("  prof %s batches planned by the workers: %zu, linked in %.2f ms each\n", mode, pf.app_wbatches,
                               1e3 * pf.app_wlink / (double)pf.app_wbatches);
                }
                double u = 1e6 / (double)pf.steps, nt = pth;
                printf("  prof %s ef %zu (us/step, mean of %zu): total %.1f = gpu_start %.1f + region %.1f + gpu_wait %.1f + merge %.1f;"
                       " region: enter %.1f (max %.1f), threads %.1f, tasks max %.2f, busy max %.1f mean %.1f; per thread (task sums / %d): entry %.1f search %.1f rerank %.1f attn %.1f tail %.1f;"
                       " per search: %.1f hops %.0f scanned\n",
                       mode, ef, pf.steps, pf.total * u, pf.gpu_start * u, pf.region * u, pf.gpu_wait * u, pf.merge * u,
                       pf.enter * u, pf.enter_max * u, (double)pf.threads_used / pf.steps, (double)pf.tasks_max / pf.steps, pf.busy_max * u, pf.busy_mean * u, (int)nt, pf.entry * u / nt, pf.search * u / nt, pf.rerank * u / nt,
                       pf.attn * u / nt, pf.tail * u / nt, (double)pf.hops / pf.tasks, (double)pf.scanned / pf.tasks);
                if (pf.gpu_steps) /* the GPU's partial's life: us from the call's start, means over steps */
                    printf("  (%s: GPU partial launched at %.1f, seen in at %.1f, tail items first needed at %.1f (%zu of %zu"
                           " steps before seen); per thread: waited for the items %.1f, their estimates %.1f; chunks a step:"
                           " %.1f best rows summed on the GPU, %.1f re-scored whole on the CPU)\n", mode,
                           1e6 * pf.gpu_launched / pf.gpu_steps, 1e6 * pf.gpu_seen / pf.gpu_steps,
                           pf.gpu_wanted_steps ? 1e6 * pf.gpu_wanted / pf.gpu_wanted_steps : 0.0, pf.gpu_late,
                           pf.gpu_wanted_steps, pf.tail_wait * u / nt, pf.tail_cpu * u / nt,
                           (double)pf.tail_topsum / pf.steps, (double)pf.tail_table / pf.steps);
                if (pf.tail_items > 0) /* the tail sample's table on the CPU */
                    printf("  (%s: tail on the CPU, per thread: items %.1f, estimates %.1f, waited for items %.1f;"
                           " chunks a step with the top's sum %.1f)\n", mode, pf.tail_items * u / nt, pf.tail_cpu * u / nt,
                           pf.tail_wait * u / nt, (double)pf.tail_topsum / pf.steps);
                printf("  (%s: the region's last thread, us from the call's start: out of tasks %.1f, of the plans %.1f,"
                       " of the GPU's wait %.1f)\n", mode, pf.out_tasks * u, pf.out_plans * u, pf.out_done * u);
                if (pf.gpu_timed) /* KESTREL_KV_GPU_TIME=1: CUDA events around the partial's parts */
                    printf("  (%s: GPU partial by CUDA events (no graph), us a step: query up %.1f, kernel %.1f, downloads %.1f)\n",
                           mode, 1e6 * pf.gpu_h2d / pf.gpu_timed, 1e6 * pf.gpu_kernel / pf.gpu_timed, 1e6 * pf.gpu_d2h / pf.gpu_timed);
                if (pf.sc_steps) /* the sample cache's plans after the steps (kst_kvc_set_tail_cache) */
                    printf("  (%s: sample cache, us a step: plans made after the step %.1f (%.1f of the KV heads' by its threads),"
                           " held %.1f (KV heads summed), %.1f rows sent in %.1f (gathered in %.1f, queued in %.1f);"
                           " next plans made ahead in idle time %.1f (KV heads summed %.1f))\n", mode,
                           1e6 * pf.sc_make / pf.sc_steps, (double)pf.sc_made_in / pf.sc_steps, 1e6 * pf.sc_apply / pf.sc_steps,
                           (double)pf.sc_rows / pf.sc_steps, 1e6 * pf.sc_up / pf.sc_steps, 1e6 * pf.sc_gather / pf.sc_steps,
                           1e6 * pf.sc_send / pf.sc_steps, 1e6 * pf.sc_ahead / pf.sc_steps, 1e6 * pf.sc_ahead_cpu / pf.sc_steps);
            }
            printf("%8zu %-12s %5zu %5zu %6zu %9.1f %10.3f %10.3f %9.3f %10.2f%% %8.2f%% %10.2e %10.2f %12.1f %9.1f %8.3f\n", N, mode, ef, topk_att,
                   runs[ri].tail, build, med[0], med[1], rec / NREF, 100 * scan / NREF, 100 * shead / NREF, err / NREF,
                   kst_kvc_gpu_bytes(c) / 1048576.0 / NL, 2.0 * KVH * N * D * 2 / 1048576.0, kst_kvc_index_bytes(c, 0) / 1048576.0,
                   wid / NREF);
            printf("  (%s: the cluster probe ran in %zu of the reference steps' %zu searches)\n", mode, probed, searches);
            if (NL > 1) printf("  (%s: GPU memory of the %zu layers %.2f MB; gpu_MB is a layer's share)\n", mode, NL,
                               kst_kvc_gpu_bytes(c) / 1048576.0);
            if (idle) {
                printf("  (%s: idle time lent after each step, untimed: kst_kvc_work %.1f us a call, %zu calls)\n", mode,
                       idle_n ? 1e6 * idle_s / idle_n : 0.0, idle_n);
                kst_kvc_set_gpu_arm(c, 0);
                kst_kvc_set_append_idle(c, 0);
            }
#undef IDLE_WORK
        }
        kst_kvc_free(c);
        free(K0); free(V0); free(Qpre); free(Qd0); free(Qd); free(out); free(un); free(ref); free(want);
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
#ifdef KST_CUDA
    if (kst_kv_cuda_devices() == 0) {
        printf("bench_kv_gpu: no CUDA device visible; nothing to do\n");
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "check") == 0) return check(argv[2]);
#endif
    if (argc >= 3 && strcmp(argv[1], "latency") == 0) return latency(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "layer") == 0) return layer(argv[2]);
    fprintf(stderr, "usage: bench_kv_gpu check FIXDIR | latency N[,N...] | layer N[,N...]\n");
    return 2;
}
