/* bench_kv_loop.c - decode steps inside a decoder loop (CUDA machine): per step and layer the
 * GPU runs a Llama-3-8B layer's GEMVs (cuBLAS, random bfloat16 weights: QKV 4096 -> 6144 before
 * the attention; O 4096 -> 4096, MLP gate and up 4096 -> 14336, down 14336 -> 4096 after it),
 * and the attention of that layer is Kestrel's decode step (kst_kvc_attend, each layer its own
 * cache of N tokens: 8 KV x 32 query heads, d 128, float16, the bench_kv_gpu layer generator),
 * with one token appended per layer and step. The engine's CPU is idle while the GPU runs the
 * O projection, the MLP and the next layer's QKV: in the "idle" rows that time is lent to the
 * cache (kst_kvc_work until the GPU's event is done), in the "inline" rows the append that
 * completes a batch plans it (the library's default).
 *
 *   bench_kv_loop N     N cached tokens per layer (e.g. 131072)
 *
 * Per layer and step: wait for the QKV GEMV and the copy of its output to the host (the
 * query), append + attend (timed: "step"), the output (4096 values, bfloat16) copied to the
 * GPU, then the O / MLP GEMVs and the next layer's QKV launched (a CUDA graph per layer:
 * KV_LOOP_GRAPH=0 launches them one by one) and an event recorded after them. "layer" is the
 * wall time from one layer's query ready to the next's (the decoder loop's time per layer).
 * GEMVs only: no norms, activations or residual kernels (the PyTorch loop, kv_loop_torch.py,
 * runs the same GEMVs beside SDPA).
 * Environment: KV_LAYERS (4), KV_LOOP_STEPS (320 steps per row), KV_WINDOW (1024),
 * KV_GQA_CORR (0.7), KV_QTIME (0: each step's query drawn anew; r: its varying part correlated about
 * r with the step before's, as a real decoder's are, bench_kv_gen.h; the queries cycle every 50
 * steps, the 50th to the 1st a new draw), KV_LOOP_ROWS (default "gemv,plain,inline,idle,inline,idle"; plain and inline
 * rows may add "+cpu" or "+nogap", see below; any row but those "+nots": kst_kvc_set_tail_topsum 0, the
 * CPU summing the tail chunks' best rows itself), KV_SPREAD
 * (1015; 4096 at 1M as in the layer rows). Budget: the default (head+codes, spread 1015 / best
 * 8, 2 expansions, ef 128, top_k 100 (KV_TOP_K=n: n; 0: the library's default, ef), tail 2,048;
 * KV_TAIL=n: n tail samples, and with KESTREL_KV_TCLUST=n in the environment the clustered tail
 * estimate, round 18). Per row it also prints kst_kvc_attend's
 * phases (kst_kvc_prof, us a step) and the GPU partial's life (launched, seen in, first needed: us
 * from the call's start; the tail phase as wait + CPU estimate). Round 16 row flags: "+old" (the
 * GPU partial and the links as in round 15), "+early", "+sN", "+b3", "+whole" (see below); round 17:
 * "+arm" (or "+arm2", as round 17 measured it: the GPU partial queued in advance by
 * kst_kvc_work, kst_kvc_set_gpu_arm; in plain rows nothing queues it); KV_LINK_PIECE
 * (8) tokens a link piece; KESTREL_KV_GPU_TIME=1 times the partial's parts by CUDA events. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/half.h"
#include "index/kv.h"
#include "index/kv_cuda.h"
#include "index/kv_cuda.h"
#include "index/kv_graph.h"
#define KVB_PROG "bench_kv_loop"
#include "tests/bench/bench_kv_util.h"
#include "tests/bench/bench_kv_gen.h"

#define CK(x)                                                                                             \
    do {                                                                                                  \
        cudaError_t e_ = (x);                                                                             \
        if (e_ != cudaSuccess) {                                                                          \
            fprintf(stderr, KVB_PROG ": %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(2);                                                                                      \
        }                                                                                                 \
    } while (0)
#define CB(x)                                                                             \
    do {                                                                                  \
        cublasStatus_t s_ = (x);                                                          \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                \
            fprintf(stderr, KVB_PROG ": %s:%d %s: cuBLAS %d\n", __FILE__, __LINE__, #x, (int)s_); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

enum { HID = 4096, NQKV = 6144, FF = 14336 };

/* ------------------------------------------------------------------------------------------ */
/* the synthetic layer (bench_kv_gen.h: bench_kv_gpu layer's generator, KV_GEN=real) */

enum { D = KVB_D, KVH = KVB_KVH, QH = KVB_QH, G = KVB_G, SINKS = KVB_SINKS, TOPK = 100, NT = KVB_NT, NPRE = KVB_NPRE };
static int perm[KVH][D];
static float sgn[KVH][D];
static uint16_t *K0, *V0;
static float *Qpre, *Qd;

/* head 0's keys and values (N, D) float16, prefill queries in head 0's frame, decode queries in
 * each KV head's frame (as bench_kv_gpu layer makes them); returns the data's sum */
static uint64_t gen(size_t N, float corr, float qtime) {
    kvb_perms(perm, sgn);
    kvb_data g;
    kvb_gen(N, corr, qtime, 0, 384, 20.8f, 3.5f, perm, sgn, &g);
    uint64_t sum = kvb_sum(&g, N);
    printf("(decode queries: KV_QTIME %.2f, their varying part's correlation with the step before's %.3f)\n", qtime,
           kvb_qlag1(g.Qd0));
    K0 = g.K0;
    V0 = g.V0;
    Qpre = g.Qpre;
    Qd = g.Qd;
    free(g.Qd0);
    return sum;
}

/* ------------------------------------------------------------------------------------------ */
/* the GPU side of the loop */

typedef struct gpu_layer {
    void *wqkv, *wo, *wg, *wu, *wd;
} gpu_layer;

static cublasHandle_t hb;
static cudaStream_t st;
static gpu_layer *W;
static void *x_d, *qkv_d, *attn_d, *o_d, *g_d, *u_d; /* bfloat16 activations */
static uint16_t *qkv_h, *attn_h;                      /* pinned */
static cudaGraphExec_t *seg;                          /* per layer l: post(l) + pre(l + 1) */
static int use_graph;

/* y (m) = W (m x k, row-major) x (k), bfloat16, float32 accumulation */
static void gemv(const void *Wt, const void *x, void *y, int m, int k) {
    const float one = 1, zero = 0;
    CB(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, m, 1, k, &one, Wt, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y,
                    CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
/* before the attention of layer l: its QKV, the query (and new key, value) to the host */
static void pre(int l) {
    gemv(W[l].wqkv, x_d, qkv_d, NQKV, HID);
    CK(cudaMemcpyAsync(qkv_h, qkv_d, NQKV * 2, cudaMemcpyDeviceToHost, st));
}
/* after it: the attention output to the GPU, O, MLP */
static void post(int l) {
    CK(cudaMemcpyAsync(attn_d, attn_h, HID * 2, cudaMemcpyHostToDevice, st));
    gemv(W[l].wo, attn_d, o_d, HID, HID);
    gemv(W[l].wg, o_d, g_d, FF, HID);
    gemv(W[l].wu, o_d, u_d, FF, HID);
    gemv(W[l].wd, g_d, x_d, HID, FF);
}
static void launch_seg(int l, int L) {
    if (use_graph) CK(cudaGraphLaunch(seg[l], st));
    else {
        post(l);
        pre((l + 1) % L);
    }
}

static void gpu_init(int L) {
    CB(cublasCreate(&hb));
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CB(cublasSetStream(hb, st));
    void *ws;
    CK(cudaMalloc(&ws, 32u << 20));
    CB(cublasSetWorkspace(hb, ws, 32u << 20)); /* (graph capture: no allocation inside) */
    W = calloc((size_t)L, sizeof *W);
    /* random bfloat16 weights (uniform +-1/64): a 64 MB block of draws copied over each matrix */
    size_t blk = 32u << 20;
    uint16_t *r = malloc(blk * 2);
    for (size_t i = 0; i < blk; i++) {
        float f = (float)((urand() * 2 - 1) / 64);
        uint32_t b;
        memcpy(&b, &f, 4);
        r[i] = (uint16_t)(b >> 16);
    }
    void *rd;
    CK(cudaMalloc(&rd, blk * 2));
    CK(cudaMemcpy(rd, r, blk * 2, cudaMemcpyHostToDevice));
    free(r);
    size_t sz[5] = {(size_t)NQKV * HID, (size_t)HID * HID, (size_t)FF * HID, (size_t)FF * HID, (size_t)HID * FF};
    for (int l = 0; l < L; l++) {
        void **p[5] = {&W[l].wqkv, &W[l].wo, &W[l].wg, &W[l].wu, &W[l].wd};
        for (int m = 0; m < 5; m++) {
            CK(cudaMalloc(p[m], sz[m] * 2));
            for (size_t o = 0; o < sz[m]; o += blk)
                CK(cudaMemcpy((char *)*p[m] + o * 2, rd, (sz[m] - o < blk ? sz[m] - o : blk) * 2, cudaMemcpyDeviceToDevice));
        }
    }
    CK(cudaFree(rd));
    void **acts[6] = {&x_d, &qkv_d, &attn_d, &o_d, &g_d, &u_d};
    size_t an[6] = {HID, NQKV, HID, HID, FF, FF};
    for (int i = 0; i < 6; i++) {
        CK(cudaMalloc(acts[i], an[i] * 2));
        CK(cudaMemset(*acts[i], 0x3c, an[i] * 2)); /* 0x3c3c: 0.0115 */
    }
    CK(cudaMallocHost((void **)&qkv_h, NQKV * 2));
    CK(cudaMallocHost((void **)&attn_h, HID * 2));
    memset(attn_h, 0x3c, HID * 2);
    seg = calloc((size_t)L, sizeof *seg);
    use_graph = !getenv("KV_LOOP_GRAPH") || atoi(getenv("KV_LOOP_GRAPH")) != 0;
    for (int l = 0; l < L && use_graph; l++) {
        cudaGraph_t g;
        if (cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) { use_graph = 0; break; }
        post(l);
        pre((l + 1) % L);
        if (cudaStreamEndCapture(st, &g) != cudaSuccess || cudaGraphInstantiate(&seg[l], g, 0) != cudaSuccess) {
            (void)cudaGetLastError();
            use_graph = 0;
            break;
        }
        CK(cudaGraphDestroy(g));
    }
    CK(cudaStreamSynchronize(st));
}

/* KV_LOOP_WATCHDOG=s: a thread that, s seconds after the last step ended, prints where the loop
 * is (row, step, layer, phase) and exits 3 (a stuck GPU wait shows up as such, not as a timeout) */
static volatile int wd_phase, wd_layer;
static volatile size_t wd_step;
static volatile double wd_last;
static const char *volatile wd_row = "";
#include <pthread.h>
#include <unistd.h>
static void *watchdog(void *arg) {
    double lim = *(double *)arg;
    static const char *ph[] = {"setup", "waiting for the query (cudaEventSynchronize)", "append", "attend",
                               "launching the GEMVs", "kst_kvc_work", "row end"};
    for (;;) {
        sleep(1);
        if (wd_last > 0 && now_s() - wd_last > lim) {
            fprintf(stderr, KVB_PROG ": watchdog: row %s, step %zu, layer %d stuck in %s for %.0f s\n", wd_row, wd_step,
                    wd_layer, ph[wd_phase], now_s() - wd_last);
            fflush(stderr);
            _exit(3);
        }
    }
    return NULL;
}

static cudaEvent_t ev;
static int gpu_busy(void *arg) {
    (void)arg;
    return cudaEventQuery(ev) == cudaErrorNotReady;
}

/* ------------------------------------------------------------------------------------------ */

typedef struct row_stats {
    double mean, med, p90, max;
} row_stats;
static row_stats stats_of(double *a, size_t n) {
    row_stats r = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) r.mean += a[i] / n;
    qsort(a, n, sizeof *a, cmp_d);
    r.med = a[n / 2];
    r.p90 = a[n * 9 / 10];
    r.max = a[n - 1];
    return r;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_kv_loop N (cached tokens per layer)\n");
        return 2;
    }
    if (kst_kv_cuda_devices() == 0) {
        printf(KVB_PROG ": no CUDA device visible; nothing to do\n");
        return 0;
    }
    size_t N = (size_t)atol(argv[1]);
    int L = getenv("KV_LAYERS") ? atoi(getenv("KV_LAYERS")) : 4;
    size_t steps = getenv("KV_LOOP_STEPS") ? (size_t)atol(getenv("KV_LOOP_STEPS")) : 320;
    size_t window = getenv("KV_WINDOW") ? (size_t)atol(getenv("KV_WINDOW")) : 1024;
    float corr = getenv("KV_GQA_CORR") ? (float)atof(getenv("KV_GQA_CORR")) : 0.7f;
    float qtime = getenv("KV_QTIME") ? (float)atof(getenv("KV_QTIME")) : 0.0f;
    const char *rows = getenv("KV_LOOP_ROWS") ? getenv("KV_LOOP_ROWS") : "gemv,plain,inline,idle,inline,idle";
    if (L < 1 || steps < 10 || N < 4 * window || !(qtime >= 0 && qtime < 1)) {
        fprintf(stderr, KVB_PROG ": KV_LAYERS >= 1, KV_LOOP_STEPS >= 10, N >= 4 x window, 0 <= KV_QTIME < 1\n");
        return 2;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("loop: %s; %d layers of %zu tokens each (8 KV x 32 query heads, d 128, float16, window %zu, GQA corr %.2f);"
           " %zu steps per row; %d CPU threads\n", prop.name, L, N, window, corr, steps, omp_get_max_threads());
    double t0 = now_s();
    uint64_t sum = gen(N, corr, qtime);
    printf("(data %.1f s, sum %016llx)\n", now_s() - t0, (unsigned long long)sum);
    size_t tail = getenv("KV_TAIL") ? (size_t)atol(getenv("KV_TAIL")) : 2048;
    size_t topk = getenv("KV_TOP_K") ? (size_t)atol(getenv("KV_TOP_K")) : TOPK;
    kst_kvc_opts o = {(size_t)L, KVH, QH, D, 1, 0, SINKS, window, topk, 256, 32, 32, 0, 32, 64, KST_KVC_INDEX_ATTN, 1, tail, 0, 1, 64, 0, 0};
    kst_kvc *c;
    kst_error e;
    if (kst_kvc_create(&o, &c, &e)) die("create", &e);
    double tb = 0, tr = 0;
    for (int l = 0; l < L; l++) {
        if (kvb_append(c, (size_t)l, N, K0, V0, perm, sgn, &e)) die("append", &e);
        double a = now_s();
        if (kst_kvc_build_copied(c, (size_t)l, Qpre, NPRE, &e)) die("build", &e);
        tb += now_s() - a;
        a = now_s();
        if (kst_kvc_reserve(c, (size_t)l, N + 8 * steps + 4096, &e)) die("reserve", &e);
        tr += now_s() - a;
    }
    { /* the process's resident and huge-page memory (THP "madvise": kst_kvg_advise_huge) */
        FILE *f = fopen("/proc/self/smaps_rollup", "r");
        char line[256];
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "Rss:", 4) || !strncmp(line, "AnonHugePages:", 14)) printf("(%s", line);
        if (f) fclose(f);
    }
    printf("(build %.1f s for %d layers, reserve %.3f s (the rows moved, and pinned again where the GPU reads them in place);"
           " cache %.0f MB per layer in CPU memory + index %.0f MB; GPU holds %.2f MB for all)\n", tb, L, tr,
           2.0 * KVH * N * D * 2 / 1048576.0, kst_kvc_index_bytes(c, 0) / 1048576.0, kst_kvc_gpu_bytes(c) / 1048576.0);
    /* the default budget's search (bench_kv_gpu layer "head+codes/sp1015/sk8/x2", ef 128) */
    kst_kvc_set_search(c, 0, 1);
    kst_kvc_set_expand(c, 2);
    kst_kvc_set_spread(c, getenv("KV_SPREAD") ? (size_t)atol(getenv("KV_SPREAD")) : 1015, 8); /* 1M: 4096, as layer's */
    kst_kvc_set_insert(c, KST_KVG_INS_SK, (3 * 64 + 3) / 4);
    gpu_init(L);
    CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    printf("(GEMVs: cuBLAS GemmEx bfloat16, n = 1, %s; weights %.0f MB per layer)\n",
           use_graph ? "one CUDA graph per layer (O, MLP, next QKV)" : "launched one by one",
           2.0 * ((double)NQKV * HID + (double)HID * HID + 3.0 * FF * HID) / 1048576.0);
    printf("%-8s %9s %9s %9s %9s %9s | %9s %9s %9s | %9s %9s %9s %9s\n", "row", "step_mean", "step_med", "step_p90",
           "step_max", "", "layer_mean", "layer_med", "layer_p90", "idle_ms", "idle_plans", "batches", "pending");
    float *out = malloc(QH * D * 4);
    uint16_t kc1[KVH * D], vc1[KVH * D];
    double *ts = malloc(steps * L * sizeof *ts), *tl = malloc(steps * L * sizeof *tl);
    size_t app_i = 0;
    static double wd_s;
    wd_s = getenv("KV_LOOP_WATCHDOG") ? atof(getenv("KV_LOOP_WATCHDOG")) : 0;
    if (wd_s > 0) {
        pthread_t wt;
        pthread_create(&wt, NULL, watchdog, &wd_s);
        pthread_detach(wt);
    }
    double gemv_s = 1e-6 * (getenv("KV_LOOP_GEMV_US") ? atof(getenv("KV_LOOP_GEMV_US")) : 170);
    for (const char *rp = rows; *rp;) {
        size_t rl = strcspn(rp, ",");
        char row[32];
        snprintf(row, sizeof row, "%.*s", (int)(rl < 31 ? rl : 31), rp);
        rp += rl + (rp[rl] == ',');
        /* a row: gemv | plain | inline | idle, then "+cpu" (no GEMVs: the thread waits, spinning,
         * as long as the last gemv row's median layer, else KV_LOOP_GEMV_US, default 170) or
         * "+nogap" (no GEMVs, no wait: the steps back to back, as bench_kv_gpu layer times them) */
        size_t bl = strcspn(row, "+");
        int nogpu = strstr(row + bl, "+cpu") != NULL, nogap = strstr(row + bl, "+nogap") != NULL;
        int nots = strstr(row + bl, "+nots") != NULL;
        /* round 16: "+old" the GPU partial and the links as in round 15 (one block a query head,
         * launched inside the parallel part; a batch linked whole); "+early" launched before the
         * parallel part ("+late": inside it, the default); "+sN" the partial split over N blocks
         * a head, "+b3" its kernel built for 3 blocks an SM (else 2); "+whole" a batch
         * linked whole (kst_kvc_set_link_piece 0) */
        int old = strstr(row + bl, "+old") != NULL, late = old || !strstr(row + bl, "+early");
        int whole = old || strstr(row + bl, "+whole") != NULL;
        const char *sp = strstr(row + bl, "+s");
        int split = old ? 1 : sp && sp[2] >= '1' && sp[2] <= '9' ? atoi(sp + 2) : KST_KVGPU_SPLIT;
        int gemv_only = !strncmp(row, "gemv", bl) && bl == 4, plain = !strncmp(row, "plain", bl) && bl == 5;
        int idle = !strncmp(row, "idle", bl) && bl == 4, app = idle || (!strncmp(row, "inline", bl) && bl == 6);
        if ((!gemv_only && !app && !plain) || ((nogpu || nogap) && idle) || (nots && (nogpu || nogap))) {
            fprintf(stderr, KVB_PROG ": unknown row %s\n", row);
            return 2;
        }
        kst_kvc_set_append_idle(c, idle);
        kst_kvc_set_tail_topsum(c, !nots);
        kst_kvc_set_gpu_early(c, !late);
        kst_kvc_set_gpu_split(c, split, strstr(row + bl, "+b3") ? 3 : 2);
        /* round 17: "+arm" ("+arm2") the GPU partial queued in advance by kst_kvc_work
         * (kst_kvc_set_gpu_arm); else launched as before */
        kst_kvc_set_gpu_arm(c, strstr(row + bl, "+arm") != NULL);
        kst_kvc_set_link_piece(c, whole ? 0 : (getenv("KV_LINK_PIECE") ? (size_t)atol(getenv("KV_LINK_PIECE")) : 8));
        for (int l = 0; l < L; l++) /* each row starts with nothing queued: the last row's batches linked */
            if (kst_kvc_flush(c, (size_t)l, &e)) die("flush", &e);
        kst_kvc_prof pf;
        memset(&pf, 0, sizeof pf);
        kst_kvc_set_prof(c, &pf);
        /* warm-up: a few steps of every layer, then the timed ones */
        size_t warm = 8;
        pre(0);
        CK(cudaEventRecord(ev, st));
        double prev = 0, idle_s = 0;
        size_t k = 0;
        for (size_t s = 0; s < warm + steps; s++)
            for (int l = 0; l < L; l++) {
                wd_row = row;
                wd_step = s;
                wd_layer = l;
                wd_last = now_s();
                wd_phase = 1;
                CK(cudaEventSynchronize(ev)); /* the query of layer l is on the host */
                double a = now_s();
                wd_phase = 2;
                if (!gemv_only) {
                    if (app) {
                        size_t t = (app_i++ * 7919 + 13) % N;
                        for (size_t h = 0; h < KVH; h++) head_row(kc1 + h * D, vc1 + h * D, K0, V0, t, perm[h], sgn[h], D);
                        if (kst_kvc_append(c, (size_t)l, kc1, vc1, 1, &e)) die("append", &e);
                    }
                    wd_phase = 3;
                    if (kst_kvc_attend(c, (size_t)l, Qd + (s % NT) * QH * D, topk, 128, out, NULL, &e)) die("attend", &e);
                    for (size_t i = 0; i < HID; i++) attn_h[i] = (uint16_t)(((union { float f; uint32_t u; }){out[i]}.u) >> 16);
                }
                double b = now_s();
                wd_phase = 4;
                if (nogpu)
                    while (now_s() < b + gemv_s) {
                    }
                else if (!nogap) {
                    launch_seg(l, L);
                    CK(cudaEventRecord(ev, st));
                }
                if (idle) {
                    wd_phase = 5;
                    double w0 = now_s();
                    if (kst_kvc_work(c, gpu_busy, NULL, NULL, &e)) die("work", &e);
                    if (s >= warm) idle_s += now_s() - w0;
                }
                if (s >= warm) {
                    ts[k] = b - a;
                    tl[k] = a - prev; /* from the last layer's query ready to this one's */
                    k++;
                }
                prev = a;
            }
        wd_phase = 6;
        CK(cudaStreamSynchronize(st));
        wd_last = 0;
        kst_kvc_set_prof(c, NULL);
        size_t n = k;
        /* tl[0] spans the warm-up's end: dropped */
        row_stats S = stats_of(ts, n), T = stats_of(tl + 1, n - 1);
        size_t pend = 0;
        for (int l = 0; l < L; l++) pend += kst_kvc_pending(c, (size_t)l);
        printf("%-8s %9.3f %9.3f %9.3f %9.3f %9s | %9.3f %9.3f %9.3f | %9.3f %9zu %9zu %9zu\n", row, 1e3 * S.mean,
               1e3 * S.med, 1e3 * S.p90, 1e3 * S.max, "", 1e3 * T.mean, 1e3 * T.med, 1e3 * T.p90,
               1e3 * idle_s / (double)n, pf.idle_plans, pf.idle_batches + pf.app_wbatches + pf.app_batches, pend);
        if (gemv_only) gemv_s = T.med;
        if (!gemv_only && pf.steps) { /* kst_kvc_attend's phases (kst_kvc_prof), us per step */
            double u = 1e6 / (double)pf.steps, nt = omp_get_max_threads();
            printf("  (%s: attend us/step: total %.1f = gpu_start %.1f + region %.1f + gpu_wait %.1f + merge %.1f;"
                   " region: enter %.1f (max %.1f), busy max %.1f mean %.1f; per thread: entry %.1f search %.1f"
                   " rerank %.1f attn %.1f tail %.1f; %.0f scanned a search)\n",
                   row, pf.total * u, pf.gpu_start * u, pf.region * u, pf.gpu_wait * u, pf.merge * u, pf.enter * u,
                   pf.enter_max * u, pf.busy_max * u, pf.busy_mean * u, pf.entry * u / nt, pf.search * u / nt,
                   pf.rerank * u / nt, pf.attn * u / nt, pf.tail * u / nt, pf.tasks ? (double)pf.scanned / pf.tasks : 0.0);
            if (pf.sc_steps) /* the sample cache's plans after the steps (kst_kvc_set_tail_cache) */
                printf("  (%s: sample cache, us a step: plans made after the step %.1f (%.1f of the KV heads' by its threads),"
                       " held %.1f (KV heads summed), %.1f rows sent in %.1f (gathered in %.1f, queued in %.1f);"
                       " next plans made ahead %.1f (KV heads summed %.1f); the step before its parallel part %.1f, of it"
                       " the cache's upkeep at its start %.1f (copies sent from there in %zu of %zu steps))\n",
                       row, 1e6 * pf.sc_make / pf.sc_steps,
                       (double)pf.sc_made_in / pf.sc_steps, 1e6 * pf.sc_apply / pf.sc_steps, (double)pf.sc_rows / pf.sc_steps,
                       1e6 * pf.sc_up / pf.sc_steps, 1e6 * pf.sc_gather / pf.sc_steps, 1e6 * pf.sc_send / pf.sc_steps,
                       1e6 * pf.sc_ahead / pf.sc_steps, 1e6 * pf.sc_ahead_cpu / pf.sc_steps, 1e6 * pf.pre / pf.sc_steps,
                       1e6 * pf.sc_begin / pf.sc_steps, pf.sc_begin_up, pf.sc_steps);
            if (pf.sc_steps) /* where the GPU reads the rows in place: their pinning, in the row's steps */
                printf("  (%s: sample cache: the longest upkeep at a step's start %.2f ms; the cache's rows registered for the"
                       " GPU in %zu calls, %.1f ms)\n", row, 1e3 * pf.sc_begin_max, pf.sc_regs, 1e3 * pf.sc_reg);
            if (pf.gpu_steps) /* the GPU's partial's life: us from the call's start, means over steps */
                printf("  (%s: GPU partial: launched at %.1f, seen in at %.1f, tail items first needed at %.1f (%zu of %zu"
                       " steps before seen); per thread: tail %.1f = wait %.1f + CPU estimate %.1f + rest; %.1f chunks"
                       " a step with the best rows summed on the GPU, %.1f re-scored whole on the CPU)\n", row,
                       1e6 * pf.gpu_launched / pf.gpu_steps, 1e6 * pf.gpu_seen / pf.gpu_steps,
                       pf.gpu_wanted_steps ? 1e6 * pf.gpu_wanted / pf.gpu_wanted_steps : 0.0, pf.gpu_late,
                       pf.gpu_wanted_steps, pf.tail * u / nt, pf.tail_wait * u / nt, pf.tail_cpu * u / nt,
                       (double)pf.tail_topsum / pf.steps, (double)pf.tail_table / pf.steps);
            if (pf.gpu_armed || pf.gpu_arm_idle_s > 0)
                printf("  (%s: GPU partial launched through a queued chain in %zu of %zu steps; queueing %.1f us a step"
                       " in kst_kvc_work)\n", row, pf.gpu_armed, pf.gpu_steps, 1e6 * pf.gpu_arm_idle_s / pf.steps);
            if (pf.gpu_timed) /* KESTREL_KV_GPU_TIME=1: CUDA events around the partial's parts */
                printf("  (%s: GPU partial by CUDA events (no graph), us a step: query up %.1f, kernel %.1f (split %d),"
                       " downloads %.1f)\n", row, 1e6 * pf.gpu_h2d / pf.gpu_timed, 1e6 * pf.gpu_kernel / pf.gpu_timed,
                       split, 1e6 * pf.gpu_d2h / pf.gpu_timed);
        }
        if (app)
            printf("  (%s: batches linked in idle time %zu (%zu pieces), linked by an append %zu, planned by an append %zu (%.2f ms"
                   " each); kst_kvc_work %.1f us a call, linking %.2f ms a batch)\n", row, pf.idle_batches, pf.idle_pieces,
                   pf.app_wbatches, pf.app_batches, pf.app_batches ? 1e3 * pf.app_bplan / pf.app_batches : 0.0,
                   pf.idle_calls ? 1e6 * pf.idle_s / pf.idle_calls : 0.0,
                   pf.idle_batches ? 1e3 * pf.idle_link / pf.idle_batches : 0.0);
    }
    printf("(step: append (rows inline, idle) + kst_kvc_attend of one layer, ms; layer: the loop's wall time per layer"
           " (query ready to the next query ready: the attention step, the GEMVs, the waits); idle_ms: per layer"
           " in kst_kvc_work)\n");
    kst_kvc_free(c);
    return 0;
}
