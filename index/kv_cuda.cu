// kv_cuda.cu - GPU side of the retrieval-attention KV cache: static-token partial attention and
// the exact top-k for index construction (see kv_cuda.h).
#include "index/kv_cuda.h"

#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

extern "C" {
#include "core/check.h"
#include "core/kv_attn.h"
}

#define CU(call, what)                                                                        \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            rc = kst_fail(err, KST_ERR_INTERNAL, "%s: %s (%s)", what, cudaGetErrorString(e_), \
                          #call);                                                             \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

extern "C" int kst_kv_cuda_devices(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no device" error
        return 0;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// static-token partial attention

struct kst_kvgpu {
    size_t qh, kvh, d, cap, sinks, ring; // cap = sinks + ring slots
    int f16;
    float scale;
    void *KV;           // (cap, 2, kvh, d): slot s's keys, then its values (one copy a token)
    void *hstage;       // pinned host staging of the same layout (the uploads' source)
    size_t staged, staged_start; // ring slots staged since the uploads were last known done;
                                 // staged at the last partial_start
    int got;            // the last step's partials were seen in (its uploads done)
    float *q, *o, *lse; // device (qh, d + KST_KVGPU_PRM), (qh, d), (qh)
    float *hq, *ho;     // pinned host: q (qh, d) then the step's parameters; o (qh, d) then lse (qh)
    cudaStream_t st;
    cudaEvent_t done, ev[2]; // done: the last launched step's event (ev[seq & 1])
    // the step's upload, kernel and download as one CUDA graph (one launch instead of three
    // calls: ~10-20 us less of the host's serial time a step), for n static tokens
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    size_t graph_n, graph_gen;
    // the tail estimate's sample table (kv_cuda.h, kst_kvgpu_tail_reserve): per KV head ns rows
    // in nc chunks of ch rows, keys chunk-transposed as on the CPU (the sample cache's, with sgrp:
    // in tg_kpos's layout); tout (qh * nc items)
    void *tK, *tV;
    size_t tns, tch, tnc, tcap, tocap, gen; // (tcap: bytes of tK and of tV)
    // sq8: the sample cache's table in 8 bits (kst_kvgpu_sc_reserve q8): tK, tV int8 and tsc
    // (kvh * tns * 2: each slot's key and value scales)
    int sq8;
    float *tsc;
    // tq8 (kst_kvgpu_tail_q8): the evenly spaced tail's table in 8 bits as well (then held grouped:
    // tgl), 1 on the GPU, 2 in pinned host memory, mapped (thost: thK, thV, thsc the host side,
    // tK, tV, tsc its device addresses, read by the step's kernel over PCIe in place)
    int tq8, tgl, thost;
    void *thK, *thV;
    float *thsc;
    // tq8 3 (kst_kvgpu_tail_stage): the host table above staged into slot pslot of a pool shared
    // by the layers (each layer's table copied there during the previous layer's step); tabgen:
    // the host table's contents (bumped at each reserve and put), psgen: the slot's buffers the
    // graph was captured with; stage_hit: the last launch found its table in its slot (copied
    // ahead, or there since its last step: no copy of its own)
    kst_kvgpu_pool *pool;
    size_t pslot;
    uint64_t tabgen;
    unsigned psgen;
    int stage_hit;
    float *tout, *htout;
    // the items written by the kernel straight into htout (pinned, mapped: dtout; KESTREL_KV_GPU_DIRECT,
    // default 1), no download: the last tail block of a KV head (tcnt, a counter a KV head on the
    // device) writes the step's number (tstep, in the parameters) into rdy[kv head] (pinned, mapped:
    // drdy) once the KV head's items are in host memory (kst_kvgpu_items_ready)
    int tdirect;
    float *dtout;
    volatile uint32_t *rdy;
    unsigned *drdy, *tcnt;
    uint32_t tstep;
    int topsum; // the items carry their best rows' weighted value sum (kst_kvgpu_tail_topsum)
    // the clustered tail's sample cache (kst_kvgpu_sc_reserve): the table above with a cluster a
    // slot (scid, kvh * tns; -1 free) and a log weight a cluster (sclw, kvh * sC); the centroids
    // (scent, (kvh, d, sC)) scored for each query head into scs (qh, sC), downloaded to hscs;
    // the weights and the slots staged in pinned memory, one block (hsall, sall bytes) laid out as
    // sc_layout says, scattered into the table on the stream by a kernel that reads it there
    // (smap 1: through its device address dsmap, mapped) or from a copy (dsall, its device twin,
    // KESTREL_KV_SC_MAPPED=0); sev: the last such scatter. smap 2 (KESTREL_KV_SC_MAPPED=2): where the cache's
    // own rows are registered (kst_kvgpu_sc_store: hst, the host bases, K then V of each KV head,
    // their first stb bytes, in nseg segments from the offsets segoff; dbase, their device
    // addresses, also on the device in dstore), the staging names each slot's row (header (n, 4))
    // and the kernel reads it there: no rows staged (sdir: so staged)
    int *scid;
    float *sclw, *scs, *hscs;
    void *scent; // (kvh, d, C) the centroids, float16 where the cache is (kst_kvtc rounds them so)
    char *dsall, *hsall, *dsmap;
    int smap, sdir;
    const void **hst;
    void **dstore, **dbase;
    size_t stb, *segoff, nseg, segcap;
    size_t sC, sall, sn; // (sn: the slots of the last staging)
    cudaEvent_t sev, sfev; // (sfev: the scores' download)
    int sev_rec, sf_rec;
    // the static tokens' partial split over `split` blocks a query head (kst_kvgpu_split): their
    // unnormalized partials (qh * split: d floats, then m and l) and a counter a head, the last
    // block of a head merging them (the counter back to 0 for the next launch)
    int split, minb; // (minb: the kernel's blocks an SM must hold, 2 or 3)
    int tgrp;        // KESTREL_KV_GPU_TGRP (default 1): kvgpu_grouped
    int sgrp;        // the sample cache's table in tg_kpos's layout (kvgpu_sc_grouped)
    float *sp;
    unsigned *spc;
    // KESTREL_KV_GPU_TIME=1: no graph; events before the upload, after it, after the kernel,
    // after the downloads; their spans (ms) summed over tn steps (kst_kvgpu_times)
    int timing;
    cudaEvent_t tev[4];
    double tms[3];
    size_t tn;
    // kst_kvgpu_arm: the next step's work queued in advance behind a wait (cuStreamWaitValue32)
    // on *flag (pinned, mapped); partial_start then writes the query and the flag (no CUDA call).
    // Puts while armed only stage the rows (pinned, mapped: hstage) and list the slots, which the
    // step's first kernel copies in (at most KST_KVGPU_DMAX; more: the chain released first).
    int arm_ok;            // the device takes stream waits on host memory (0: never armed)
    int arm_want;          // kst_kvgpu_arm was called: the step's graph has the staged slots' kernel
    int armed;             // a chain waits for *flag >= seq + 1
    uint32_t seq;          // steps launched
    volatile uint32_t *flag;
    unsigned long long dflag; // its device address
    void *dstage;          // hstage's device address
    int ndirty, dirty[KST_KVGPU_DMAX];
    size_t narmed;         // steps launched through an armed chain
    kst_kvgpu *arm_next;   // the process's armed handles (arm_head), under arm_mu
};

// The layers' staging slots (kst_kvgpu_pool_create): each a device copy of one layer's 8-bit tail
// table (its host block's layout: keys, values, then scales; cap bytes), which layer's it is and
// of which contents (owner, ogen: its tabgen; the copy made on the owner's stream, before its
// step), the last step that read it (reader, and the event its stream records after that read:
// rev), the event after its last copy (ready, issued once recorded), sgen: its buffers'
// generation (a growth reallocates them: the readers' graphs captured anew).
struct kst_kvgpu_pool {
    size_t n;
    struct {
        char *buf;
        size_t cap;
        unsigned sgen;
        kst_kvgpu *owner, *reader;
        uint64_t ogen;
        cudaEvent_t ready, rev;
        int issued;
    } s[KST_KVGPU_POOL_MAX];
};

// Every armed handle of the process: a release lets all of them go (flags first, then the
// streams synchronized), since a queued wait may hold up other streams' work (streams share the
// device's hardware queues) and any device-wide synchronization (a cudaFree) waits for them all.
static pthread_mutex_t arm_mu = PTHREAD_MUTEX_INITIALIZER;
static kst_kvgpu *arm_head;
static int kvgpu_release_all(kst_error *err);
static int kvgpu_grouped(const kst_kvgpu *g);
static int kvgpu_sc_grouped(const kst_kvgpu *g, size_t P);
static int kvgpu_grouped_fits(const kst_kvgpu *g, size_t P, size_t es);
static void sc_unstore(kst_kvgpu *g);
static void tail_tables_free(kst_kvgpu *g);

static __device__ __forceinline__ float ld(const float *p) { return *p; }
static __device__ __forceinline__ float ld(const __half *p) { return __half2float(*p); }

// res[t] (t < d) = sum_j w[j] V[j * rs + t] over nr rows: warps take rows (j = warp mod warps),
// lanes dims (coalesced), the warps' sums added in shared memory (red: 16 x 128 floats; at most
// 16 warps). Every thread of the block calls it.
template <typename T> struct RowsLinear { // row j at V + j * rs
    const T *V;
    size_t rs;
    __device__ const T *operator()(int j) const { return V + (size_t)j * rs; }
};
// The static tokens' value rows: token t of the step (t < ns: sink slot t, else the ring's slot
// of position rlo + t - ns) of KV head kh.
template <typename T> struct RowsRing {
    const T *KV;
    int c0, ns, rlo, sinks, ring, kvh, kh, d;
    __device__ const T *operator()(int j) const {
        int t = c0 + j, slot = t < ns ? t : sinks + (rlo + t - ns) % ring;
        return KV + ((size_t)slot * 2 * kvh + kvh + kh) * d;
    }
};

// The chunk's best rows: row j at V + idx[j] * d.
template <typename T> struct RowsIdx {
    const T *V;
    const int *idx;
    int d;
    __device__ const T *operator()(int j) const { return V + (size_t)idx[j] * d; }
};

template <typename T, typename R>
__device__ void wsum_rows(const float *w, R rows, int nr, int d, float *red, float *res) {
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    for (int db = 0; db < d; db += 128) {
        int dn = min(128, d - db);
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
        for (int j = warp; j < nr; j += nw) {
            float wj = w[j];
            if (wj == 0.0f) continue;
            const T *vr = rows(j) + db;
#pragma unroll
            for (int k = 0; k < 4; k++)
                if (lane + 32 * k < dn) a[k] += wj * ld(vr + lane + 32 * k);
        }
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (lane + 32 * k < dn) red[warp * 128 + lane + 32 * k] = a[k];
        __syncthreads();
        for (int t = tid; t < dn; t += blockDim.x) {
            float sm = 0.0f;
            for (int w2 = 0; w2 < nw; w2++) sm += red[w2 * 128 + t];
            res[db + t] = sm;
        }
        __syncthreads();
    }
}

// The shared memory partial_body takes from the step kernel's buffer.
#define PT_SMEM (1024 + 512 + 32 + 16 * 128 + 512)
// One block per query head (bi); 16 warps. Chunks of CH tokens: a warp scores a token (lanes split
// the head dims, so key rows are read coalesced), then online softmax: running max m, sum l and
// output o (threads t < d own o[t]).
template <typename T>
__device__ void partial_body(int bi, const T *KV, const float *q, float *o, float *lse, int sinks,
                             int ring, int qh, int kvh, int G, int d, float scale, int S, float *sp,
                             unsigned *spc, float *sm) {
    const int CH = 1024;
    float *s = sm, *qs = s + CH, *red = qs + 512, *red2 = red + 32, *res = red2 + 16 * 128; // (PT_SMEM)
    int h = bi / S, part = bi % S, kh = h / G, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int nw = blockDim.x >> 5;
    // the step's parameters after the queries: sink slots used, ring offset of the first
    // exact token, exact tokens in the ring
    const int *prm = (const int *)(q + (size_t)qh * d);
    int ns = prm[0], rlo = prm[1], n = ns + prm[2];
    // this block's share of the tokens: [t0, t1) of n
    int t0 = (int)((long long)n * part / S), t1 = (int)((long long)n * (part + 1) / S);
    for (int i = tid; i < d; i += blockDim.x) qs[i] = q[h * d + i];
    __syncthreads();
    float m = -INFINITY, l = 0.0f, acc[2] = {0.0f, 0.0f}; // threads own dims tid, tid + blockDim
    for (int c0 = t0; c0 < t1; c0 += CH) {
        int cn = min(CH, t1 - c0);
        for (int j = warp; j < cn; j += nw) {
            int t = c0 + j, slot = t < ns ? t : sinks + (rlo + t - ns) % ring;
            const T *kr = KV + ((size_t)slot * 2 * kvh + kh) * d;
            float a = 0.0f;
            for (int i = lane; i < d; i += 32) a += qs[i] * ld(kr + i);
            for (int off = 16; off; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            if (lane == 0) s[j] = a * scale;
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int j = tid; j < cn; j += blockDim.x) mx = fmaxf(mx, s[j]);
        for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (lane == 0) red[warp] = mx;
        __syncthreads();
        mx = red[0];
        for (int w = 1; w < nw; w++) mx = fmaxf(mx, red[w]);
        float mn = fmaxf(m, mx), corr = expf(m - mn);
        __syncthreads(); // red is reused below
        float ls = 0.0f;
        for (int j = tid; j < cn; j += blockDim.x) {
            float p = expf(s[j] - mn);
            s[j] = p;
            ls += p;
        }
        for (int off = 16; off; off >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, off);
        if (lane == 0) red[warp] = ls;
        __syncthreads();
        float csum = 0.0f;
        for (int w = 0; w < nw; w++) csum += red[w];
        l = l * corr + csum;
        RowsRing<T> rr = {KV, c0, ns, rlo, sinks, ring, kvh, kh, d};
        wsum_rows<T>(s, rr, cn, d, red2, res);
        for (int r = 0; r < 2; r++) {
            int t = tid + r * blockDim.x;
            if (t < d) acc[r] = acc[r] * corr + res[t];
        }
        m = mn;
        __syncthreads();
    }
    if (S == 1) {
        for (int r = 0; r < 2; r++) {
            int t = tid + r * blockDim.x;
            if (t < d) o[h * d + t] = n > 0 ? acc[r] / l : 0.0f;
        }
        if (tid == 0) lse[h] = n > 0 ? m + logf(l) : -INFINITY;
        return;
    }
    // split: this block's (acc, m, l) out, then the head's last block merges the S of them
    float *mine = sp + (size_t)bi * (d + 2);
    for (int r = 0; r < 2; r++) {
        int t = tid + r * blockDim.x;
        if (t < d) mine[t] = acc[r];
    }
    if (tid == 0) {
        mine[d] = m;
        mine[d + 1] = l;
    }
    __threadfence();
    __syncthreads();
    __shared__ unsigned last;
    if (tid == 0) last = atomicAdd(&spc[h], 1u) == (unsigned)(S - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    const volatile float *hp = sp + (size_t)h * S * (d + 2);
    float M = -INFINITY;
    for (int k = 0; k < S; k++) M = fmaxf(M, hp[k * (d + 2) + d]);
    float Ls = 0.0f;
    for (int k = 0; k < S; k++) {
        float mk = hp[k * (d + 2) + d];
        if (mk > -INFINITY) Ls += hp[k * (d + 2) + d + 1] * expf(mk - M);
    }
    for (int t = tid; t < d; t += blockDim.x) {
        float a = 0.0f;
        for (int k = 0; k < S; k++) {
            float mk = hp[k * (d + 2) + d];
            if (mk > -INFINITY) a += hp[k * (d + 2) + t] * expf(mk - M);
        }
        o[h * d + t] = Ls > 0.0f ? a / Ls : 0.0f;
    }
    if (tid == 0) {
        lse[h] = Ls > 0.0f ? M + logf(Ls) : -INFINITY;
        spc[h] = 0;
    }
}

// The tail sample (kv_cuda.h): one block per (query head, chunk). Scores the chunk's rows (keys
// transposed: threads read consecutive rows of a dim, coalesced), sorts (score, row) pairs
// (bitonic, P = the power of two >= rows) for the chunk's best KST_KVGPU_TT_TOP, then writes the
// item: max, the sum of the other rows' weights exp(s - max), their weighted value sum, the
// best rows and their weights, and (st > d + 2 + 2 * TOP: kst_kvgpu_tail_topsum) the best rows'
// weighted value sum.
#define TT_PMAX 1024
// The tail bodies' shared memory (the step kernel's blocks would hold the sum of every body's
// static arrays: each body carves its own from one buffer, TT_SMEM floats).
#define TT_SMEM_OLD (512 + 16 * 128 + 512 + 3 * TT_PMAX + 32)
template <typename T>
__device__ void tail_body(int bi, const T *K, const T *V, const float *q, float *out, int ns, int ch,
                          int nc, int P, int G, int d, float scale, int st, const int *cid, const float *clw, int C,
                          float *sm) {
    float *qs = sm, *red2 = qs + 512, *res = red2 + 16 * 128, *sv = res + 512, *kv = sv + TT_PMAX;
    int *ki = (int *)(kv + TT_PMAX);
    float *red = (float *)(ki + TT_PMAX);
    const int TOP = KST_KVGPU_TT_TOP;
    int h = bi / nc, cc = bi % nc, kh = h / G, tid = threadIdx.x, nt = blockDim.x;
    int j0 = cc * ch, nr = min(ch, ns - j0), lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const T *Kc = K + ((size_t)kh * ns + j0) * d, *Vc = V + ((size_t)kh * ns + j0) * d;
    float *it = out + (size_t)bi * st;
    for (int i = tid; i < d; i += nt) qs[i] = q[h * d + i];
    __syncthreads();
    // two rows a thread at a time (rows j and j + nt), 8 loads in flight (the loop is bound by
    // the loads' latency, not by their bandwidth)
    for (int jb = tid; jb < P; jb += 2 * nt) {
        int jr[2] = {jb, jb + nt};
        bool in[2] = {jb < nr, jb + nt < nr && jb + nt < P};
        float a4[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        int i = 0;
        for (; i + 4 <= d; i += 4)
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float qv = qs[i + k];
                if (in[0]) a4[0][k] += qv * ld(Kc + (size_t)(i + k) * nr + jr[0]);
                if (in[1]) a4[1][k] += qv * ld(Kc + (size_t)(i + k) * nr + jr[1]);
            }
        for (; i < d; i++) {
            if (in[0]) a4[0][0] += qs[i] * ld(Kc + (size_t)i * nr + jr[0]);
            if (in[1]) a4[1][0] += qs[i] * ld(Kc + (size_t)i * nr + jr[1]);
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int j = jr[r];
            if (j >= P) continue;
            float a = -INFINITY;
            if (in[r]) {
                a = (a4[r][0] + a4[r][1] + a4[r][2] + a4[r][3]) * scale;
                if (cid) { // the sample cache: the row's cluster's log weight; a free slot -inf
                    int c = cid[(size_t)kh * ns + j0 + j];
                    a = c >= 0 ? a + clw[(size_t)kh * C + c] : -INFINITY;
                }
            }
            sv[j] = a;
            kv[j] = a;
            ki[j] = j;
        }
    }
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1)
        for (int jj = k >> 1; jj > 0; jj >>= 1) {
            for (int i = tid; i < P; i += nt) {
                int x = i ^ jj;
                if (x > i) {
                    float a = kv[i], b = kv[x];
                    if ((i & k) == 0 ? a < b : a > b) {
                        kv[i] = b;
                        kv[x] = a;
                        int t = ki[i];
                        ki[i] = ki[x];
                        ki[x] = t;
                    }
                }
            }
            __syncthreads();
        }
    int top = min(nr, TOP);
    float mx = kv[0], sh = mx > -INFINITY ? mx : 0.0f; // (mx -inf: no row held, every weight 0)
    for (int j = tid; j < P; j += nt) sv[j] = j < nr ? expf(sv[j] - sh) : 0.0f;
    __syncthreads();
    if (tid < top) {
        it[2 + d + tid] = __int_as_float(ki[tid]);
        it[2 + d + TOP + tid] = sv[ki[tid]];
        kv[tid] = sv[ki[tid]]; // (every thread read mx before the barrier above)
    }
    __syncthreads();
    if (st > d + 2 + 2 * TOP) { // the best rows' sum of w V
        RowsIdx<T> ri = {Vc, ki, d};
        wsum_rows<T>(kv, ri, top, d, red2, res);
        for (int t = tid; t < d; t += nt) it[2 + d + 2 * TOP + t] = res[t];
    }
    if (tid < top) sv[ki[tid]] = 0.0f;
    __syncthreads();
    float ls = 0.0f;
    for (int j = tid; j < nr; j += nt) ls += sv[j];
    for (int off = 16; off; off >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, off);
    if (lane == 0) red[warp] = ls;
    __syncthreads();
    if (tid == 0) {
        float s = 0.0f;
        for (int w = 0; w < nw; w++) s += red[w];
        it[0] = mx;
        it[1] = s;
    }
    RowsLinear<T> rl = {Vc, (size_t)d};
    wsum_rows<T>(sv, rl, nr, d, red2, res);
    for (int t = tid; t < d; t += nt) it[2 + t] = res[t];
}

// The tail items of a KV head's G query heads at once (kvgpu_grouped bit 0: the sample cache's
// table, G <= TG_GMAX, d <= TG_DMAX, G P <= TG_GP): block bi is (KV head, chunk), so each key and
// value row is read once for its G heads (tail_body reads them once a query head) and in 16-byte
// pieces: the keys are kept in tg_kpos's layout (chunk-transposed by 16 bytes: a warp reads 32
// consecutive rows' same 16 bytes). Steps: the scores (a thread one or two rows, or a share of a
// row's pieces when P < 512); each head's best 32 by a radix select (tg_select) in lists of 256,
// a warp a list, then over the lists' best by one warp a head (ties to the lower row, as
// kst_kvsc_item's top; the best rows in row order, not sorted); the weights and the rest's sum;
// the rest's and the best rows' weighted value sums (a lane 4 dims of a row, 8 rows in flight),
// summed across warps in shared memory. Measured in tests/bench/README.md, round 21.
#define TG_GMAX 8
#define TG_DMAX 128
#define TG_GP 4096 /* G P at most: the scores in shared memory */
#define TG_SMEM (TG_GMAX * TG_DMAX + TG_GP + TG_GP / 4 + 2 * TG_GMAX * TG_DMAX + 2 * TG_GMAX * 32 + 2 * TG_GMAX)
// The position of key (row j, dim i) in a chunk of nr rows: 16-byte pieces of W values, piece i / W
// of every row, then the next piece.
__host__ __device__ static inline size_t tg_kpos(size_t j, size_t i, size_t nr, size_t es) {
    size_t W = 16 / es;
    return ((i / W) * nr + j) * W + i % W;
}
// The k best of a warp's 32 E (score, row) pairs (element lane E + k in v[k], ix[k]; k <= 32 E) to
// os, oi (in element order, not sorted): the k-th best score's order key found bit by bit (a
// radix select, one warp count a bit), then every pair above it and, of those equal to it, the
// first in element order. Returns the best score.
static __device__ __forceinline__ unsigned tg_key(float f) {
    unsigned u = __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}
template <int E>
static __device__ __forceinline__ float tg_select(const float (&v)[E], const int (&ix)[E], int lane, int k, float *os, int *oi) {
    unsigned key[E], mx = 0;
#pragma unroll
    for (int e = 0; e < E; e++) {
        key[e] = tg_key(v[e]);
        mx = max(mx, key[e]);
    }
    mx = __reduce_max_sync(0xffffffffu, mx);
    unsigned pre = 0, mask = 0;
    int need = k;
    for (int bit = 31; bit >= 0 && need > 0; bit--) {
        unsigned m2 = mask | 1u << bit, p2 = pre | 1u << bit;
        int c = 0;
#pragma unroll
        for (int e = 0; e < E; e++) c += (key[e] & m2) == p2;
        c = (int)__reduce_add_sync(0xffffffffu, (unsigned)c);
        if (c >= need) pre = p2;
        else need -= c;
        mask = m2;
    }
    // pairs above pre all taken; `need` of those equal to it (need 0: k = 0)
    int eq = 0, gt = 0;
#pragma unroll
    for (int e = 0; e < E; e++) {
        eq += key[e] == pre;
        gt += key[e] > pre;
    }
    int eqx = eq, gtx = gt; // exclusive prefix sums over lanes
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        int a = __shfl_up_sync(0xffffffffu, eqx, off), b = __shfl_up_sync(0xffffffffu, gtx, off);
        if (lane >= off) eqx += a, gtx += b;
    }
    eqx -= eq, gtx -= gt;
    int pos = gtx + min(eqx, need); // (the taken equal ones before this lane's: min(eqx, need))
#pragma unroll
    for (int e = 0; e < E; e++) {
        bool take = key[e] > pre || (key[e] == pre && eqx < need);
        if (key[e] == pre) eqx++;
        if (take && pos < k) {
            os[pos] = v[e];
            oi[pos] = ix[e];
            pos++;
        }
    }
    return __uint_as_float(mx & 0x80000000u ? mx & 0x7fffffffu : ~mx);
}
// 16 bytes of T as floats (8 float16 or 4 float32).
static __device__ __forceinline__ void tg_cvt(const float *p, float *x) {
#pragma unroll
    for (int k = 0; k < 4; k++) x[k] = p[k];
}
static __device__ __forceinline__ void tg_cvt(const __half *p, float *x) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __half22float2(((const __half2 *)p)[k]);
        x[2 * k] = f.x, x[2 * k + 1] = f.y;
    }
}
// Four int8 (a word) as floats without the conversion unit: each byte, its sign bit flipped, put
// under the exponent of 2^23 (prmt), less 2^23 + 128 (exact).
static __device__ __forceinline__ void q8_cvt4(unsigned u, float *x) {
    u ^= 0x80808080u;
    x[0] = __int_as_float((int)__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.0f;
    x[1] = __int_as_float((int)__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.0f;
    x[2] = __int_as_float((int)__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.0f;
    x[3] = __int_as_float((int)__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.0f;
}
static __device__ __forceinline__ void tg_cvt(const int8_t *p, float *x) { // (the 8-bit table: 16 values)
#pragma unroll
    for (int k = 0; k < 4; k++) q8_cvt4(((const unsigned *)p)[k], x + 4 * k);
}
// Four values of a row as loaded (4 bytes of int8, 8 of float16, 16 of float32) and as floats.
template <typename T> struct TgRaw;
template <> struct TgRaw<int8_t> {
    typedef unsigned R4;
    static __device__ __forceinline__ void cvt(const R4 &u, float *x) { q8_cvt4(u, x); }
};
template <> struct TgRaw<float> {
    typedef float4 R4;
    static __device__ __forceinline__ void cvt(const R4 &u, float *x) { x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w; }
};
template <> struct TgRaw<__half> {
    typedef uint2 R4;
    static __device__ __forceinline__ void cvt(const R4 &u, float *x) {
        float2 a = __half22float2(*(const __half2 *)&u.x), b = __half22float2(*(const __half2 *)&u.y);
        x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y;
    }
};
// Four values of a row at p, as floats.
template <typename T> static __device__ __forceinline__ void ld4(const T *p, float *x) {
    TgRaw<T>::cvt(*(const typename TgRaw<T>::R4 *)p, x);
}

#ifdef KST_TG_PROF // a probe of the step kernel's blocks (bench builds only: NVCCFLAGS=-DKST_TG_PROF)
#include <stdio.h>
__device__ unsigned long long tgp_sum[16], tgp_n[4];
__device__ unsigned tgp_launch;
static __device__ __forceinline__ unsigned long long tgp_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define TGP_MARK(k) if (threadIdx.x == 0) atomicAdd(&tgp_sum[k], tgp_now() - tgp_t0)
#else
#define TGP_MARK(k)
#endif
// T int8_t: the sample cache's table in 8 bits, tsc (kvh * ns * 2) each slot's key and value
// scales (the scores and the value rows scaled by them; tsc NULL for float16 and float32).
template <typename T, int GM>
__device__ void tail_grp_body(int bi, const T *K, const T *V, const float *tsc, const float *q, float *out, int ns,
                              int ch, int nc, int P, int G, int d, float scale, int st, const int *cid,
                              const float *clw, int C, float *sm) {
    const int TOP = KST_KVGPU_TT_TOP;
    constexpr int W = 16 / (int)sizeof(T), WX = W > 8 ? W : 8;
    int kh = bi / nc, cc = bi % nc, tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    int nw = nt >> 5, j0 = cc * ch, nr = min(ch, ns - j0), top = min(nr, TOP);
    const T *Kc = K + ((size_t)kh * ns + j0) * d, *Vc = V + ((size_t)kh * ns + j0) * d;
    float *qs = sm, *sc = qs + TG_GMAX * TG_DMAX;                  // (G, d) queries; (G, P) scores, then weights
    unsigned char *tf = (unsigned char *)(sc + TG_GP);             // (G, P) 1: among the head's best
    float *U = sc + TG_GP + TG_GP / 4;                             // lists' best (score, row); then the sums of w V
    float *tops = U + 2 * TG_GMAX * TG_DMAX;                       // (G, 32) the best scores
    int *topi = (int *)(tops + TG_GMAX * 32);                      // (G, 32) their rows
    float *shs = (float *)(topi + TG_GMAX * 32), *rsum = shs + TG_GMAX; // (G) the shifts; the rest's sums
#ifdef KST_TG_PROF
    unsigned long long tgp_t0 = tgp_now();
#endif
    for (int i = tid; i < G * d; i += nt) qs[i] = q[(size_t)kh * G * d + i];
    for (int i = tid; i < G * P; i += nt) {
        sc[i] = 0.0f;
        tf[i] = 0;
    }
    if (tid < G) rsum[tid] = 0.0f;
    __syncthreads();
    { // scores: a thread rows r0 and r0 + nt (P = 2 nt) or r0 (P = nt), or a share of r0 (nt / P
      // threads a row, every (nt / P)th piece); 4 pieces of each row in flight, the rows'
      // cluster weights loaded first
        int nvb = d / W, np = P >= nt ? 1 : nt / P, part = P >= nt ? 0 : tid / P, nrw = P > nt ? 2 : 1;
        const int RW = 8 / GM, TGU = 8 / RW; // (G > 4: P <= 512, one row a thread); pieces in flight a row
        int rr[RW], cl[RW];
        bool in[RW];
        float lw[RW], a[RW][GM], ks[RW];
#pragma unroll
        for (int x = 0; x < RW; x++) {
            rr[x] = (P >= nt ? tid : tid % P) + x * nt;
            cl[x] = 0;
            lw[x] = 0.0f;
            ks[x] = 1.0f;
            in[x] = x < nrw && rr[x] < nr;
            if (tsc && in[x]) ks[x] = tsc[((size_t)kh * ns + j0 + rr[x]) * 2];
            if (in[x] && cid) cl[x] = cid[(size_t)kh * ns + j0 + rr[x]];
#pragma unroll
            for (int g = 0; g < GM; g++) a[x][g] = 0.0f;
        }
#pragma unroll
        for (int x = 0; x < RW; x++)
            if (in[x] && cid) { // a free slot -inf
                in[x] = cl[x] >= 0;
                if (in[x]) lw[x] = clw[(size_t)kh * C + cl[x]];
            }
        for (int b = part; b < nvb; b += TGU * np) {
            uint4 raw[RW][TGU];
#pragma unroll
            for (int x = 0; x < RW; x++)
#pragma unroll
                for (int u = 0; u < TGU; u++)
                    if (x < nrw && rr[x] < nr && b + u * np < nvb)
                        raw[x][u] = *(const uint4 *)(Kc + ((size_t)(b + u * np) * nr + rr[x]) * W);
#pragma unroll
            for (int u = 0; u < TGU; u++) // each query value read once (4 at a time) for the rows
                if (b + u * np < nvb) {
                    float xv[RW][WX];
#pragma unroll
                    for (int x = 0; x < RW; x++) {
                        if (x < nrw && rr[x] < nr) tg_cvt((const T *)&raw[x][u], xv[x]);
                        else
#pragma unroll
                            for (int w = 0; w < WX; w++) xv[x][w] = 0.0f;
                    }
                    const float *qb = qs + (b + u * np) * W;
#pragma unroll
                    for (int g = 0; g < GM; g++)
                        if (g < G)
#pragma unroll
                            for (int w = 0; w < W; w += 4) {
                                float4 qv = *(const float4 *)(qb + g * d + w);
#pragma unroll
                                for (int x = 0; x < RW; x++)
                                    a[x][g] += qv.x * xv[x][w] + qv.y * xv[x][w + 1] + qv.z * xv[x][w + 2] + qv.w * xv[x][w + 3];
                            }
                }
        }
#pragma unroll
        for (int x = 0; x < RW; x++)
            if (x < nrw && rr[x] < P)
#pragma unroll
                for (int g = 0; g < GM; g++)
                    if (g < G) {
                        if (np == 1) sc[g * P + rr[x]] = in[x] ? a[x][g] * ks[x] * scale + lw[x] : -INFINITY;
                        else atomicAdd(&sc[g * P + rr[x]], a[x][g]);
                    }
        __syncthreads();
        if (np > 1) {
            if (part == 0)
                for (int g = 0; g < G; g++) sc[g * P + rr[0]] = in[0] ? sc[g * P + rr[0]] * ks[0] * scale + lw[0] : -INFINITY;
            __syncthreads();
        }
    }
    TGP_MARK(0);
    int nl = P > 256 ? P / 256 : 1; // lists of 256 a head
    if (warp < G * nl) { // head g's list li: its best 32 to U
        int g = warp / nl, li = warp % nl;
        float v[8];
        int ix[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int r = li * 256 + lane * 8 + k;
            v[k] = r < P ? sc[g * P + r] : -INFINITY;
            ix[k] = r < P ? r : INT_MAX;
        }
        tg_select<8>(v, ix, lane, 32, U + (g * 4 + li) * 32, (int *)U + TG_GMAX * 128 + (g * 4 + li) * 32);
    }
    __syncthreads();
    if (warp < G) { // head g: the lists' best merged
        int g = warp;
        float v[4];
        int ix[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int e = lane * 4 + k;
            v[k] = e < nl * 32 ? U[g * 128 + e] : -INFINITY;
            ix[k] = e < nl * 32 ? ((int *)U)[TG_GMAX * 128 + g * 128 + e] : INT_MAX;
        }
        float mx = tg_select<4>(v, ix, lane, top, tops + g * 32, topi + g * 32);
        __syncwarp();
        for (int e = lane; e < top; e += 32) tf[g * P + topi[g * 32 + e]] = 1;
        if (lane == 0) shs[g] = mx;
    }
    __syncthreads();
    TGP_MARK(1);
    // the weights (the best rows' 0: they are summed apart) and the rest's sums; with tsc each
    // weight kept times its row's value scale (summed unscaled)
    for (int i = tid; i < 2 * G * d; i += nt) U[i] = 0.0f;
    for (int i0 = 0; i0 < G * P; i0 += nt) {
        int i = i0 + tid, g = i / P;
        float w = 0.0f;
        if (i < G * P) {
            float mx = shs[g], sh = mx > -INFINITY ? mx : 0.0f;
            w = sc[i] > -INFINITY && !tf[i] ? expf(sc[i] - sh) : 0.0f;
            sc[i] = tsc && w > 0.0f ? w * tsc[((size_t)kh * ns + j0 + i % P) * 2 + 1] : w;
        }
        for (int off = 16; off; off >>= 1) w += __shfl_xor_sync(0xffffffffu, w, off);
        if (lane == 0 && i < G * P) atomicAdd(&rsum[g], w); // (a warp's 32 entries: one head, P >= 32)
    }
    __syncthreads();
    TGP_MARK(2);
    { // the value sums: lanes 4 dims of a row (lpr lanes a row, rpw rows a warp)
        int lpr = (d + 3) / 4, rpw = 32 / lpr, ro = lane / lpr, dm = 4 * (lane % lpr);
        bool on = ro < rpw;
        for (int g0 = 0; g0 < G; g0 += 4) {
            float a[4][4];
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int k = 0; k < 4; k++) a[u][k] = 0.0f;
            if (on) // 8 rows in flight a lane
                for (int r0 = warp * rpw + ro; r0 < nr; r0 += 8 * nw * rpw) {
                    typename TgRaw<T>::R4 raw[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int r = r0 + u * nw * rpw;
                        if (r < nr) raw[u] = *(const typename TgRaw<T>::R4 *)(Vc + (size_t)r * d + dm);
                    }
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int r = r0 + u * nw * rpw;
                        if (r >= nr) break;
                        float x[4];
                        TgRaw<T>::cvt(raw[u], x);
#pragma unroll
                        for (int v = 0; v < 4; v++)
                            if (g0 + v < G) {
                                float w = sc[(g0 + v) * P + r];
#pragma unroll
                                for (int k = 0; k < 4; k++) a[v][k] += w * x[k];
                            }
                    }
                }
            if (on)
#pragma unroll
                for (int u = 0; u < 4; u++)
                    if (g0 + u < G)
#pragma unroll
                        for (int k = 0; k < 4; k++) atomicAdd(&U[(g0 + u) * d + dm + k], a[u][k]);
        }
        TGP_MARK(3);
        for (int g = 0; g < G; g++) { // the best rows'
            float mx = shs[g], sh = mx > -INFINITY ? mx : 0.0f, a4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            bool any = false;
            if (on)
                for (int e = warp * rpw + ro; e < top; e += nw * rpw) {
                    float s = tops[g * 32 + e], x[4];
                    if (!(s > -INFINITY)) continue;
                    float w = expf(s - sh);
                    if (tsc) w *= tsc[((size_t)kh * ns + j0 + topi[g * 32 + e]) * 2 + 1];
                    ld4(Vc + (size_t)topi[g * 32 + e] * d + dm, x);
#pragma unroll
                    for (int k = 0; k < 4; k++) a4[k] += w * x[k];
                    any = true;
                }
            if (any)
#pragma unroll
                for (int k = 0; k < 4; k++) atomicAdd(&U[(G + g) * d + dm + k], a4[k]);
        }
    }
    __syncthreads();
    for (int i = tid; i < G * d; i += nt) {
        int g = i / d, t = i % d;
        float *it = out + ((size_t)(kh * G + g) * nc + cc) * st;
        it[2 + t] = U[i];
        if (st > d + 2 + 2 * TOP) it[2 + d + 2 * TOP + t] = U[G * d + i];
        if (t < top) {
            float mx = shs[g], sh = mx > -INFINITY ? mx : 0.0f, s = tops[g * 32 + t];
            it[2 + d + t] = __int_as_float(topi[g * 32 + t]);
            it[2 + d + TOP + t] = s > -INFINITY ? expf(s - sh) : 0.0f;
        }
        if (t == 0) {
            it[0] = shs[g];
            it[1] = rsum[g];
        }
    }
    TGP_MARK(4);
#ifdef KST_TG_PROF
    if (tid == 0) {
        atomicAdd(&tgp_n[0], 1ull);
        if (bi == 0 && atomicAdd(&tgp_launch, 1u) % 50 == 49) {
            double n = (double)tgp_n[0];
            printf("TGPROF tail blocks %.0f: scores %.1f sorted %.1f weights %.1f rest sums %.1f end %.1f us (means from block start); partial blocks %.0f: %.1f us; centroid blocks %.0f: %.1f us\n",
                   n, tgp_sum[0] / n / 1e3, tgp_sum[1] / n / 1e3, tgp_sum[2] / n / 1e3, tgp_sum[3] / n / 1e3, tgp_sum[4] / n / 1e3,
                   (double)tgp_n[1], tgp_sum[5] / (double)tgp_n[1] / 1e3, (double)tgp_n[2], tgp_sum[6] / (double)tgp_n[2] / 1e3);
        }
    }
#endif
}

// The centroid scores of a KV head's G query heads at once (G <= TG_GMAX, d <= TG_DMAX): block bi
// is (KV head, 128 centroids); a thread a centroid and every fourth dim, the quarters summed in
// shared memory. The centroids are held as the cache's keys are (float16 or float32).
template <typename T>
__device__ void cent_grp_body(int bi, const float *q, const T *cent, float *cs, int C, int nbc, int G, int d,
                              float scale, float *sm) {
    float *cq = sm, *ca = cq + TG_GMAX * TG_DMAX;
    int kh = bi / nbc, cb = bi % nbc, tid = threadIdx.x, nt = blockDim.x, cl = tid & 127, qd = tid >> 7;
    int c = cb * 128 + cl, nq = nt >> 7;
    for (int i = tid; i < G * d; i += nt) cq[i] = q[(size_t)kh * G * d + i];
    for (int i = tid; i < G * 128; i += nt) ca[i] = 0.0f;
    __syncthreads();
    if (c < C) {
        const T *ct = cent + (size_t)kh * d * C + c;
        float a[TG_GMAX];
#pragma unroll
        for (int g = 0; g < TG_GMAX; g++) a[g] = 0.0f;
        int i = qd;
        for (; i + 3 * nq < d; i += 4 * nq) {
            float x[4];
#pragma unroll
            for (int k = 0; k < 4; k++) x[k] = ld(ct + (size_t)(i + k * nq) * C);
#pragma unroll
            for (int k = 0; k < 4; k++)
#pragma unroll
                for (int g = 0; g < TG_GMAX; g++)
                    if (g < G) a[g] += cq[g * d + i + k * nq] * x[k];
        }
        for (; i < d; i += nq) {
            float x = ld(ct + (size_t)i * C);
#pragma unroll
            for (int g = 0; g < TG_GMAX; g++)
                if (g < G) a[g] += cq[g * d + i] * x;
        }
        for (int g = 0; g < G; g++) atomicAdd(&ca[g * 128 + cl], a[g]);
    }
    __syncthreads();
    for (int i = tid; i < G * 128; i += nt) {
        int g = i >> 7, cc = cb * 128 + (i & 127);
        if (cc < C) cs[(size_t)(kh * G + g) * C + cc] = ca[i] * scale;
    }
}

// The sample cache's centroid scores (kst_kvgpu_sc_reserve): block bi scores centroids cb * 512 ..
// of query head h = bi / nbc: cs[h][c] = scale <q_h, cent_c>, cent (kvh, d, C) (a thread a
// centroid, reading consecutive centroids of a dim).
template <typename T>
__device__ void cent_body(int bi, const float *q, const T *cent, float *cs, int C, int nbc, int G, int d,
                          float scale, float *cq) {
    int h = bi / nbc, cb = bi % nbc, kh = h / G;
    for (int i = threadIdx.x; i < d; i += blockDim.x) cq[i] = q[h * d + i];
    __syncthreads();
    int c = cb * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const T *ct = cent + (size_t)kh * d * C + c;
    float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}; // (8 loads in flight)
    int i = 0;
    for (; i + 8 <= d; i += 8)
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] += cq[i + k] * ld(ct + (size_t)(i + k) * C);
    for (; i < d; i++) a[0] += cq[i] * ld(ct + (size_t)i * C);
    cs[(size_t)h * C + c] = (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) * scale;
}

// The step's kernel: blocks [0, qh * S) the static tokens' partial (S blocks a query head), then
// (with the tail sample) qh * nc blocks of tail items, then (with the sample cache) qh * nbc
// blocks of centroid scores; 16 warps each. MB: blocks an SM must hold
// (2: 56 registers a thread, as ptxas chooses; 3: 40, a few spilled; kst_kvgpu_split).
#define STEP_THREADS 512
#define TT_SMEM_TAIL (TG_SMEM > TT_SMEM_OLD ? TG_SMEM : TT_SMEM_OLD)
#define TT_SMEM (TT_SMEM_TAIL > PT_SMEM ? TT_SMEM_TAIL : PT_SMEM) // (one buffer for every body)
static_assert(STEP_THREADS / 32 * 256 >= TG_GP, "tail_grp_body: a warp a list of 256");
template <typename T, typename TT, int MB>
__global__ void __launch_bounds__(STEP_THREADS, MB) step_kernel(const T *KV, const float *q, float *o, float *lse, int sinks, int ring,
                            int kvh, int G, int d, float scale, int qh, const TT *tK, const TT *tV, const float *tsc,
                            float *tout, int ns, int ch, int nc, int P, int st, int S, float *sp,
                            unsigned *spc, const int *cid, const float *clw, int C, const T *cent,
                            float *cs, int nbc, int grp, unsigned *trdy, unsigned *tcnt) {
    __shared__ __align__(16) float tsm[TT_SMEM];
    if (((const int *)(q + (size_t)qh * d))[3]) return; // skip: a released chain (kst_kvgpu_disarm)
    int nt = ns ? (grp & 1 ? kvh : qh) * nc : 0;
#ifdef KST_TG_PROF
    unsigned long long tgp_t0 = tgp_now();
#endif
    if ((int)blockIdx.x < qh * S) {
        partial_body<T>(blockIdx.x, KV, q, o, lse, sinks, ring, qh, kvh, G, d, scale, S, sp, spc, tsm);
#ifdef KST_TG_PROF
        if (threadIdx.x == 0) atomicAdd(&tgp_n[1], 1ull);
        TGP_MARK(5);
#endif
    }
    else if ((int)blockIdx.x < qh * S + nt) {
        if (grp & 1) {
            if (G <= 4)
                tail_grp_body<TT, 4>(blockIdx.x - qh * S, tK, tV, tsc, q, tout, ns, ch, nc, P, G, d, scale, st, cid, clw, C, tsm);
            else
                tail_grp_body<TT, TG_GMAX>(blockIdx.x - qh * S, tK, tV, tsc, q, tout, ns, ch, nc, P, G, d, scale, st, cid, clw, C,
                                           tsm);
        } else if constexpr (sizeof(TT) > 1) // (the 8-bit table is only held grouped: kst_kvgpu_sc_reserve)
            tail_body<TT>(blockIdx.x - qh * S, tK, tV, q, tout, ns, ch, nc, P, G, d, scale, st, cid, clw, C, tsm);
        if (trdy) { // (items in mapped host memory) the KV head's last block raises its ready word
            int bi = blockIdx.x - qh * S, per = grp & 1 ? nc : G * nc;
            __threadfence_system();
            __syncthreads();
            if (threadIdx.x == 0 && atomicAdd(&tcnt[bi / per], 1u) == (unsigned)per - 1) {
                tcnt[bi / per] = 0; // (for the next launch)
                __threadfence_system();
                *(volatile unsigned *)&trdy[bi / per] = ((const unsigned *)(q + (size_t)qh * d))[5 + KST_KVGPU_DMAX];
            }
        }
    } else if (grp & 2) {
        cent_grp_body<T>(blockIdx.x - qh * S - nt, q, cent, cs, C, nbc, G, d, scale, tsm);
#ifdef KST_TG_PROF
        if (threadIdx.x == 0) atomicAdd(&tgp_n[2], 1ull);
        TGP_MARK(6);
#endif
    }
    else
        cent_body<T>(blockIdx.x - qh * S - nt, q, cent, cs, C, nbc, G, d, scale, tsm);
}

// Where a staged slot's key and value rows are (kst_kvgpu_sc_staging): in the staging after the
// header (store NULL; header entries of 3 ints), or in the cache's own rows, registered
// (kst_kvgpu_sc_store: store[2 kh] and store[2 kh + 1], KV head kh's keys and values; header
// entries of 4 ints, the 4th the row). An entry whose KV head is -1 is skipped.
template <typename T> struct ScSrc {
    const int *hdr;
    const T *rows;
    const T *const *store;
    int d;
    __device__ int hs() const { return store ? 4 : 3; }
    __device__ void at(int e, int kh, const T **k, const T **v) const {
        if (store) {
            size_t r = (unsigned)hdr[4 * e + 3];
            *k = store[2 * kh] + r * d;
            *v = store[2 * kh + 1] + r * d;
        } else {
            *k = rows + (size_t)e * 2 * d;
            *v = *k + d;
        }
    }
};

// The sample cache's n staged slots (kst_kvgpu_sc_staging): entry e (block e) sets its slot's
// cluster and, for a held slot, writes its key (chunk-transposed; kl: in tg_kpos's layout) and
// value rows into the table; blocks n and on copy the clusters' weights lw (nlw floats, where
// sent) into sclw.
template <typename T>
__global__ void sc_scatter_kernel(ScSrc<T> src, int n, const float *lw, float *sclw, int nlw, T *tK, T *tV, int *cid,
                                  int ns, int ch, int d, int kl) {
    int e = blockIdx.x;
    if (e >= n) {
        int i = (e - n) * blockDim.x + threadIdx.x;
        if (lw && i < nlw) sclw[i] = lw[i];
        return;
    }
    const int *hdr = src.hdr;
    int hs = src.hs(), kh = hdr[hs * e], s = hdr[hs * e + 1], c = hdr[hs * e + 2];
    if (kh < 0) return; // (an entry left unused)
    if (threadIdx.x == 0) cid[(size_t)kh * ns + s] = c;
    if (c < 0) return;
    int j0 = s / ch * ch, nr = min(ch, ns - j0), j = s - j0;
    const T *k, *v;
    src.at(e, kh, &k, &v);
    T *Kc = tK + ((size_t)kh * ns + j0) * d, *Vr = tV + ((size_t)kh * ns + s) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        Kc[kl ? tg_kpos(j, i, nr, sizeof(T)) : (size_t)i * nr + j] = k[i];
        Vr[i] = v[i];
    }
}

// The same for the table in 8 bits (sq8): the staged rows (the cache's type) quantized here as
// kst_kv_q8 does on the CPU (a block an entry, d <= 128 = its threads: max |x| over the row, q =
// round(x * (127 / max)) to nearest even; a NaN or an infinity in the row: scale NaN, q 0; max 0, or
// 127 / max past float's range: scale 0, q 0), the keys in tg_kpos's layout (the grouped layout,
// which the 8-bit table needs), the scales in tsc.
template <typename T>
__global__ void sc_scatter_q8_kernel(ScSrc<T> src, int n, const float *lw, float *sclw, int nlw, int8_t *tK,
                                     int8_t *tV, float *tsc, int *cid, int ns, int ch, int d) {
    __shared__ float rm[2][4];
    __shared__ int rn[2][4];
    int e = blockIdx.x, i = threadIdx.x, lane = i & 31, warp = i >> 5;
    if (e >= n) {
        int t = (e - n) * blockDim.x + i;
        if (lw && t < nlw) sclw[t] = lw[t];
        return;
    }
    const int *hdr = src.hdr;
    int hs = src.hs(), kh = hdr[hs * e], s = hdr[hs * e + 1], c = hdr[hs * e + 2];
    if (kh < 0) return; // (an entry left unused)
    if (i == 0) cid[(size_t)kh * ns + s] = c;
    if (c < 0) return;
    int j0 = s / ch * ch, nr = min(ch, ns - j0), j = s - j0;
    const T *k, *v;
    src.at(e, kh, &k, &v);
    float x[2] = {i < d ? ld(k + i) : 0.0f, i < d ? ld(v + i) : 0.0f}, m[2];
    int bad[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        bool nan = x[r] != x[r];
        float a = nan ? 0.0f : fabsf(x[r]);
        for (int off = 16; off; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
        int an = __any_sync(0xffffffffu, nan);
        if (lane == 0) rm[r][warp] = a, rn[r][warp] = an;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; r++) {
        m[r] = 0.0f, bad[r] = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) m[r] = fmaxf(m[r], rm[r][w]), bad[r] |= rn[r][w];
        bad[r] |= isinf(m[r]);
    }
    int8_t *Kc = tK + ((size_t)kh * ns + j0) * d, *Vr = tV + ((size_t)kh * ns + s) * d;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float inv = 127.0f / m[r];
        bool zero = bad[r] || !(m[r] > 0.0f) || isinf(inv);
        if (i < d) {
            int q = zero ? 0 : min(127, max(-127, __float2int_rn(x[r] * inv)));
            if (r == 0) Kc[tg_kpos(j, i, nr, 1)] = (int8_t)q;
            else Vr[i] = (int8_t)q;
        }
        if (i == r) tsc[((size_t)kh * ns + s) * 2 + r] = bad[r] ? __int_as_float(0x7fc00000) : zero ? 0.0f : m[r] / 127.0f;
    }
}

// The step's first kernel: the slots kst_kvgpu_put staged while armed (parameters 4, 5...: count,
// slots) copied from pinned host memory (mapped: stage) into the device's slots, a block a slot.
__global__ void refresh_kernel(const float *q, int qh, int d, const char *stage, char *KV, size_t slotb) {
    const int *prm = (const int *)(q + (size_t)qh * d);
    int nd = prm[4];
    for (int i = blockIdx.x; i < nd; i += gridDim.x) {
        size_t off = (size_t)prm[5 + i] * slotb;
        if (slotb % 16 == 0)
            for (size_t j = threadIdx.x; j < slotb / 16; j += blockDim.x)
                ((uint4 *)(KV + off))[j] = ((const uint4 *)(stage + off))[j];
        else
            for (size_t j = threadIdx.x; j < slotb / 4; j += blockDim.x)
                ((uint32_t *)(KV + off))[j] = ((const uint32_t *)(stage + off))[j];
    }
}

// cuStreamWaitValue32 through the runtime's driver entry point (no -lcuda); NULL where missing.
typedef CUresult (*wait_value_fn)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
static wait_value_fn wait_value(void) {
    static wait_value_fn fn;
    static int tried;
    if (__atomic_load_n(&tried, __ATOMIC_ACQUIRE)) return fn;
    void *p = NULL;
    cudaDriverEntryPointQueryResult qr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &p, 12000, cudaEnableDefault, &qr) != cudaSuccess ||
        qr != cudaDriverEntryPointSuccess)
        p = NULL;
    cudaGetLastError();
    fn = (wait_value_fn)p;
    __atomic_store_n(&tried, 1, __ATOMIC_RELEASE);
    return fn;
}

// Whether a stream wait on the mapped flag page is honoured: a wait on word 16 (not the flag),
// an event behind it, the word written; 1 if the event completes within 200 ms (else the test
// stream stays blocked, and leaks: never armed then).
static int arm_selftest(kst_kvgpu *g) {
    wait_value_fn w = wait_value();
    if (!w || !g->flag) return 0;
    cudaStream_t ts = NULL;
    cudaEvent_t te = NULL;
    int ok = 0;
    if (cudaStreamCreateWithFlags(&ts, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreateWithFlags(&te, cudaEventDisableTiming) != cudaSuccess)
        goto out;
    g->flag[16] = 0;
    if (w((CUstream)ts, (CUdeviceptr)(g->dflag + 16 * sizeof(uint32_t)), 1, CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS) goto out;
    if (cudaEventRecord(te, ts) != cudaSuccess) {
        g->flag[16] = 1;
        goto out;
    }
    if (cudaEventQuery(te) != cudaErrorNotReady) goto out; // the wait did not hold the stream
    __atomic_store_n((uint32_t *)&g->flag[16], 1u, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 200000; i++) {
        cudaError_t e = cudaEventQuery(te);
        if (e == cudaSuccess) {
            ok = 1;
            break;
        }
        if (e != cudaErrorNotReady) break;
        struct timespec ts1 = {0, 1000};
        nanosleep(&ts1, NULL);
    }
    if (!ok) return 0; // (ts, te left as they are: the stream may still be blocked)
out:
    cudaGetLastError();
    if (te) cudaEventDestroy(te);
    if (ts) cudaStreamDestroy(ts);
    return ok;
}

extern "C" int kst_kvgpu_create(size_t q_heads, size_t kv_heads, size_t d, size_t sinks, size_t ring,
                                 int f16, float scale, kst_kvgpu **out, kst_error *err) {
    int rc = KST_OK;
    *out = NULL;
    if ((rc = kvgpu_release_all(err)) != KST_OK) return rc; // (its allocations may wait for the device)
    if (d > 512 || q_heads % kv_heads)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: head_dim %zu > 512 or q_heads %% kv_heads", d);
    kst_kvgpu *g = (kst_kvgpu *)calloc(1, sizeof *g);
    if (!g) return kst_fail(err, KST_ERR_NOMEM, "kv gpu: out of memory");
    g->qh = q_heads;
    g->kvh = kv_heads;
    g->d = d;
    g->sinks = sinks;
    g->ring = ring ? ring : 1;
    g->cap = sinks + g->ring;
    g->f16 = f16;
    g->scale = scale;
    g->topsum = 1;
    g->split = KST_KVGPU_SPLIT;
    if (getenv("KESTREL_KV_GPU_SPLIT")) g->split = atoi(getenv("KESTREL_KV_GPU_SPLIT"));
    if (g->split < 1) g->split = 1;
    if (g->split > KST_KVGPU_SPLIT_MAX) g->split = KST_KVGPU_SPLIT_MAX;
    g->minb = getenv("KESTREL_KV_GPU_MINB") && atoi(getenv("KESTREL_KV_GPU_MINB")) == 3 ? 3 : KST_KVGPU_MINB;
    g->tgrp = !(getenv("KESTREL_KV_GPU_TGRP") && atoi(getenv("KESTREL_KV_GPU_TGRP")) == 0);
    g->timing = getenv("KESTREL_KV_GPU_TIME") && atoi(getenv("KESTREL_KV_GPU_TIME")) == 1;
    g->tdirect = !(getenv("KESTREL_KV_GPU_DIRECT") && atoi(getenv("KESTREL_KV_GPU_DIRECT")) == 0);
    g->smap = getenv("KESTREL_KV_SC_MAPPED") ? atoi(getenv("KESTREL_KV_SC_MAPPED")) : 1;
    g->smap = g->smap < 0 ? 0 : g->smap > 2 ? 2 : g->smap;
    size_t es = f16 ? 2 : 4, bytes = g->cap * 2 * kv_heads * d * es;
    CU(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking), "kv gpu stream");
    for (int i = 0; i < 2; i++) CU(cudaEventCreateWithFlags(&g->ev[i], cudaEventDisableTiming), "kv gpu event");
    g->done = g->ev[0];
    CU(cudaMalloc(&g->KV, bytes), "kv gpu static keys and values");
    CU(cudaMallocHost(&g->hstage, bytes), "kv gpu pinned upload staging");
    CU(cudaMalloc((void **)&g->q, (q_heads * d + KST_KVGPU_PRM) * sizeof(float)), "kv gpu query");
    CU(cudaMalloc((void **)&g->o, (q_heads * d + q_heads) * sizeof(float)), "kv gpu output");
    g->lse = g->o + q_heads * d;
    CU(cudaMalloc((void **)&g->sp, q_heads * KST_KVGPU_SPLIT_MAX * (d + 2) * sizeof(float)), "kv gpu split partials");
    CU(cudaMalloc((void **)&g->spc, q_heads * sizeof(unsigned)), "kv gpu split counters");
    CU(cudaMemset(g->spc, 0, q_heads * sizeof(unsigned)), "kv gpu split counters");
    for (int i = 0; g->timing && i < 4; i++) CU(cudaEventCreate(&g->tev[i]), "kv gpu timing event");
    CU(cudaMallocHost((void **)&g->hq, (q_heads * d + KST_KVGPU_PRM) * sizeof(float)), "kv gpu pinned query");
    CU(cudaMallocHost((void **)&g->ho, (q_heads * d + q_heads) * sizeof(float)), "kv gpu pinned output");
    { // the flag word of kst_kvgpu_arm and the staging's device address (mapped pinned memory)
        void *df = NULL, *ds = NULL;
        if (cudaHostAlloc((void **)&g->flag, 32 * sizeof(uint32_t), cudaHostAllocMapped) != cudaSuccess) g->flag = NULL;
        else {
            memset((void *)g->flag, 0, 32 * sizeof(uint32_t));
            if (cudaHostGetDevicePointer(&df, (void *)g->flag, 0) == cudaSuccess &&
                cudaHostGetDevicePointer(&ds, g->hstage, 0) == cudaSuccess) {
                g->dflag = (unsigned long long)(uintptr_t)df;
                g->dstage = ds;
                g->arm_ok = arm_selftest(g);
            }
        }
        cudaGetLastError();
    }
    if (g->tdirect) { // the tail items' ready words (a KV head each) and the kernel's counters
        void *dr = NULL;
        g->tdirect = 0;
        if (cudaHostAlloc((void **)&g->rdy, kv_heads * sizeof(uint32_t), cudaHostAllocMapped) == cudaSuccess &&
            cudaHostGetDevicePointer(&dr, (void *)g->rdy, 0) == cudaSuccess &&
            cudaMalloc((void **)&g->tcnt, kv_heads * sizeof(unsigned)) == cudaSuccess &&
            cudaMemset(g->tcnt, 0, kv_heads * sizeof(unsigned)) == cudaSuccess) {
            memset((void *)g->rdy, 0, kv_heads * sizeof(uint32_t));
            g->drdy = (unsigned *)dr;
            g->tdirect = 1;
        }
        cudaGetLastError();
    }
    *out = g;
    return KST_OK;
done:
    kst_kvgpu_free(g);
    return rc;
}

extern "C" void kst_kvgpu_free(kst_kvgpu *g) {
    if (!g) return;
    kvgpu_release_all(NULL); // (every queued chain released first: the frees wait for the device)
    if (g->st) cudaStreamSynchronize(g->st);
    kst_kvgpu_tail_stage(g, NULL, 0);
    sc_unstore(g);
    free(g->hst);
    free(g->dbase);
    free(g->segoff);
    cudaFree(g->dstore);
    cudaFree(g->KV);
    cudaFreeHost(g->hstage);
    cudaFree(g->q);
    cudaFree(g->o);
    cudaFree(g->sp);
    cudaFree(g->spc);
    for (int i = 0; i < 4; i++)
        if (g->tev[i]) cudaEventDestroy(g->tev[i]);
    tail_tables_free(g);
    cudaFree(g->tout);
    cudaFreeHost(g->htout);
    cudaFreeHost((void *)g->rdy);
    cudaFree(g->tcnt);
    cudaFree(g->scid);
    cudaFree(g->sclw);
    cudaFree(g->scent);
    cudaFree(g->scs);
    cudaFree(g->dsall);
    cudaFreeHost(g->hscs);
    cudaFreeHost(g->hsall);
    if (g->sev) cudaEventDestroy(g->sev);
    if (g->sfev) cudaEventDestroy(g->sfev);
    cudaFreeHost(g->hq);
    cudaFreeHost(g->ho);
    if (g->exec) cudaGraphExecDestroy(g->exec);
    if (g->graph) cudaGraphDestroy(g->graph);
    for (int i = 0; i < 2; i++)
        if (g->ev[i]) cudaEventDestroy(g->ev[i]);
    if (g->flag) cudaFreeHost((void *)g->flag);
    if (g->st) cudaStreamDestroy(g->st);
    free(g);
}

extern "C" size_t kst_kvgpu_bytes(const kst_kvgpu *g) {
    if (!g) return 0;
    size_t es = g->f16 ? 2 : 4;
    return 2 * g->cap * g->kvh * g->d * es + (2 * g->qh * g->d + g->qh + KST_KVGPU_PRM) * sizeof(float) +
           (g->thost ? 0 : 2 * g->tcap + (g->tsc ? g->kvh * g->tns * 2 * sizeof(float) : 0)) +
           (g->tout ? g->tocap * sizeof(float) : 0) +
           (g->sC ? g->kvh * g->tns * sizeof(int) + g->kvh * g->sC * (sizeof(float) + g->d * es) +
                        g->qh * g->sC * sizeof(float) + (g->dsall ? g->sall : 0)
                  : 0);
}

extern "C" size_t kst_kvgpu_tail_stride(const kst_kvgpu *g) {
    return g->d + 2 + 2 * KST_KVGPU_TT_TOP + (g->topsum ? g->d : 0);
}

extern "C" void kst_kvgpu_tail_topsum(kst_kvgpu *g, int on) {
    if (!!on == g->topsum) return;
    kst_kvgpu_disarm(g, NULL);
    g->topsum = !!on;
    g->tns = g->tch = g->tnc = 0; // the next kst_kvgpu_tail_reserve lays the items out anew
}

// The tail tables let go (device memory, or pinned host memory where thost: one block at thK).
static void tail_tables_free(kst_kvgpu *g) {
    if (g->thost) {
        cudaFreeHost(g->thK);
    } else {
        cudaFree(g->tK);
        cudaFree(g->tV);
        cudaFree(g->tsc);
    }
    g->tK = g->tV = g->thK = g->thV = NULL;
    g->tsc = g->thsc = NULL;
    g->tcap = 0;
    g->thost = 0;
}

// b bytes of a tail table: on the GPU (*dev), or (host) pinned and mapped (*hp, its device address
// in *dev).
static int tail_alloc(void **dev, void **hp, size_t b, int host, const char *what, kst_error *err) {
    int rc = KST_OK;
    if (!host) {
        CU(cudaMalloc(dev, b), what);
    } else {
        CU(cudaHostAlloc(hp, b, cudaHostAllocMapped), what); // (write-combined: no faster, round 34)
        CU(cudaHostGetDevicePointer(dev, *hp, 0), what);
    }
done:
    return rc;
}

// The tail's table for ns samples: q8 (sq8, as set) the rows in 8 bits with their scales, host: in
// pinned host memory (mapped), tgl: the evenly spaced sample held grouped (tq8).
static int tail_reserve(kst_kvgpu *g, size_t ns, size_t ch, size_t nc, int host, int tgl, kst_error *err) {
    int rc = KST_OK;
    if (ns && (ch == 0 || ch > TT_PMAX || nc * ch < ns || (nc - 1) * ch >= ns))
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: tail of %zu samples in %zu chunks of %zu rows (at most %d)",
                        ns, nc, ch, TT_PMAX);
    host = host && ns;
    if (ns == g->tns && ch == g->tch && nc == g->tnc && !g->sq8 == !g->tsc && host == g->thost && tgl == g->tgl)
        return KST_OK;
    if ((rc = kvgpu_release_all(err)) != KST_OK) return rc; // (reallocations below)
    size_t es = g->sq8 ? 1 : g->f16 ? 2 : 4, no = g->qh * nc * kst_kvgpu_tail_stride(g), tb = ns * g->kvh * g->d * es;
    g->tns = 0;
    g->tgl = 0;
    g->gen++;
    g->tabgen++;
    if (g->thost) { // (the table went to the GPU's memory: the kernel may have read it until now)
        if (g->st) CU(cudaStreamSynchronize(g->st), "kv gpu tail sample");
        tail_tables_free(g);
    }
    if (!host) {
        cudaFree(g->tsc);
        g->tsc = NULL;
    }
    if (host || tb > g->tcap || (g->tcap > tb + tb / 2 && g->tcap > ((size_t)1 << 20))) { // (a table in 8 bits: the 16-bit one let go)
        tail_tables_free(g);
        if (tb && host) { // one block: keys, values, then the scales (a staged slot's layout: one copy)
            size_t scb = g->sq8 ? ns * g->kvh * 2 * sizeof(float) : 0;
            char *hb = NULL, *db = NULL;
            KST_TRY(tail_alloc((void **)&db, (void **)&hb, 2 * tb + scb, 1, "kv gpu tail sample in host memory", err));
            g->thost = 1;
            g->thK = hb;
            g->thV = hb + tb;
            g->tK = db;
            g->tV = db + tb;
            if (scb) {
                g->thsc = (float *)(hb + 2 * tb);
                g->tsc = (float *)(db + 2 * tb);
            }
            g->tcap = tb;
        } else if (tb) {
            KST_TRY(tail_alloc(&g->tK, &g->thK, tb, 0, "kv gpu tail sample keys", err));
            KST_TRY(tail_alloc(&g->tV, &g->thV, tb, 0, "kv gpu tail sample values", err));
            g->tcap = tb;
        }
    }
    if (g->sq8 && ns && !host)
        KST_TRY(tail_alloc((void **)&g->tsc, (void **)&g->thsc, ns * g->kvh * 2 * sizeof(float), 0,
                           "kv gpu tail sample scales", err));
    if (no > g->tocap) {
        cudaFree(g->tout);
        cudaFreeHost(g->htout);
        g->tout = g->htout = g->dtout = NULL;
        g->tocap = 0;
        if (g->tdirect) { // (written by the kernel in place)
            void *dt = NULL;
            CU(cudaHostAlloc((void **)&g->htout, no * sizeof(float), cudaHostAllocMapped), "kv gpu mapped tail sums");
            CU(cudaHostGetDevicePointer(&dt, g->htout, 0), "kv gpu mapped tail sums");
            g->dtout = (float *)dt;
        } else {
            CU(cudaMalloc((void **)&g->tout, no * sizeof(float)), "kv gpu tail sums");
            CU(cudaMallocHost((void **)&g->htout, no * sizeof(float)), "kv gpu pinned tail sums");
        }
        g->tocap = no;
    }
    g->tns = ns;
    g->tch = ch;
    g->tnc = nc;
    g->tgl = tgl;
done:
    return rc;
}

// ---- the staging pool (kv_cuda.h, kst_kvgpu_pool_create) ----

extern "C" int kst_kvgpu_pool_create(size_t slots, kst_kvgpu_pool **out, kst_error *err) {
    int rc = KST_OK;
    *out = NULL;
    if (slots < 1 || slots > KST_KVGPU_POOL_MAX)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu pool: %zu slots (expected 1 to %d)", slots, KST_KVGPU_POOL_MAX);
    kst_kvgpu_pool *p = (kst_kvgpu_pool *)calloc(1, sizeof *p);
    if (!p) return kst_fail(err, KST_ERR_NOMEM, "kv gpu pool: out of memory");
    p->n = slots;
    for (size_t i = 0; i < slots; i++)
        CU(cudaEventCreateWithFlags(&p->s[i].ready, cudaEventDisableTiming), "kv gpu pool event");
    *out = p;
    return KST_OK;
done:
    kst_kvgpu_pool_free(p);
    return rc;
}

extern "C" void kst_kvgpu_pool_free(kst_kvgpu_pool *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n; i++) {
        if (p->s[i].issued) cudaEventSynchronize(p->s[i].ready);
        cudaFree(p->s[i].buf);
        if (p->s[i].ready) cudaEventDestroy(p->s[i].ready);
    }
    free(p);
}

extern "C" size_t kst_kvgpu_pool_bytes(const kst_kvgpu_pool *p) {
    size_t b = 0;
    for (size_t i = 0; p && i < p->n; i++) b += p->s[i].cap;
    return b;
}

extern "C" void kst_kvgpu_tail_stage(kst_kvgpu *g, kst_kvgpu_pool *p, size_t slot) {
    if (g->pool == p && g->pslot == slot) return;
    if (g->pool) { // (the slot left, its copies and reads done: nothing waits on g's stream or events)
        kst_kvgpu_pool *o = g->pool;
        if (g->st) cudaStreamSynchronize(g->st);
        if (o->s[g->pslot].owner == g) o->s[g->pslot].owner = NULL;
        if (o->s[g->pslot].reader == g) o->s[g->pslot].reader = NULL;
    }
    if (p && slot >= p->n) p = NULL;
    if (!p && g->tq8 == 3) { // (no pool: the table as the host placement's at the next reserve)
        g->tq8 = 2;
        g->tns = g->tch = g->tnc = 0;
    }
    g->pool = p;
    g->pslot = p ? slot : 0;
    g->psgen = ~0u;
}

extern "C" int kst_kvgpu_stage_hit(const kst_kvgpu *g) { return g && g->stage_hit; }

// The slot's layout for g's table (ns rows of d bytes a KV head): keys, values, then each row's
// two scales.
static size_t stage_bytes(const kst_kvgpu *g) {
    size_t tb = g->tns * g->kvh * g->d;
    return 2 * tb + g->tns * g->kvh * 2 * sizeof(float);
}

// g's slot holds its table's bytes (grown where it does not: the readers' graphs captured anew).
static int stage_fit(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    if (!g->pool || !g->tns) return KST_OK;
    kst_kvgpu_pool *p = g->pool;
    size_t need = stage_bytes(g);
    if (p->s[g->pslot].cap >= need) return KST_OK;
    cudaFree(p->s[g->pslot].buf); // (waits for the device: no step reads it, no copy is in flight)
    p->s[g->pslot].buf = NULL;
    p->s[g->pslot].cap = 0;
    p->s[g->pslot].owner = NULL;
    p->s[g->pslot].issued = 0;
    p->s[g->pslot].sgen++;
    CU(cudaMalloc((void **)&p->s[g->pslot].buf, need), "kv gpu staged tail sample");
    p->s[g->pslot].cap = need;
done:
    return rc;
}

// g's host table copied into its slot on g's stream, once what the slot held is no longer needed:
// after the last copy into it and the last step that read it, unless that was the copy's owner's
// step and its partials are in (got: its kernel is done, the usual case, two host calls saved).
static int stage_copy(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    kst_kvgpu_pool *p = g->pool;
    kst_kvgpu *r = p->s[g->pslot].reader;
    if (!(r && r == p->s[g->pslot].owner && r->got)) {
        if (p->s[g->pslot].issued) CU(cudaStreamWaitEvent(g->st, p->s[g->pslot].ready, 0), "kv gpu staged tail wait");
        if (r && r != g) CU(cudaStreamWaitEvent(g->st, p->s[g->pslot].rev, 0), "kv gpu staged tail wait");
    }
    CU(cudaMemcpyAsync(p->s[g->pslot].buf, g->thK, stage_bytes(g), cudaMemcpyHostToDevice, g->st),
       "kv gpu staged tail sample");
    CU(cudaEventRecord(p->s[g->pslot].ready, g->st), "kv gpu pool event");
    p->s[g->pslot].issued = 1;
    p->s[g->pslot].owner = g;
    p->s[g->pslot].ogen = g->tabgen;
    p->s[g->pslot].reader = NULL; // (until g's step reads it)
done:
    return rc;
}

// Staged where current: g's table is its slot's, as put last.
static int stage_current(const kst_kvgpu *g) {
    return g->pool->s[g->pslot].owner == g && g->pool->s[g->pslot].ogen == g->tabgen;
}

extern "C" int kst_kvgpu_prefetch(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    if (!g || g->tq8 != 3 || !g->pool || !g->tns || !g->thost || g->armed) return KST_OK;
    if (g->pool->s[g->pslot].cap < stage_bytes(g) || stage_current(g)) return KST_OK; // (not fitted yet, or there)
    KST_TRY(stage_copy(g, err));
done:
    return rc;
}

// Before g's launch: its table in its slot, copied ahead on its stream (kst_kvgpu_prefetch; or
// there since its last step) or now.
static int stage_use(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    kst_kvgpu_pool *p = g->pool;
    KST_TRY(stage_fit(g, err));
    if (p->s[g->pslot].sgen != g->psgen) { // (new buffers: the graph captured anew)
        g->psgen = p->s[g->pslot].sgen;
        g->gen++;
    }
    g->stage_hit = stage_current(g);
    if (!g->stage_hit) KST_TRY(stage_copy(g, err));
    p->s[g->pslot].reader = g;
    p->s[g->pslot].rev = g->done; // (recorded after the launch)
done:
    return rc;
}

// The 8-bit table needs the grouped layout (kvgpu_sc_grouped with rows of bytes) for chunks of ch rows.
static int kvgpu_q8_fits(const kst_kvgpu *g, size_t ch) {
    size_t P = 32;
    while (P < ch) P <<= 1;
    return ch <= TT_PMAX && kvgpu_grouped_fits(g, P, 1);
}

extern "C" int kst_kvgpu_tail_q8(kst_kvgpu *g, int where, size_t ch) {
    where = where == 1 || where == 2 || where == 3 ? where : 0;
    if (where && !kvgpu_q8_fits(g, ch)) return 0;
    if (where == 3 && !g->pool) return 0;
    if (where != g->tq8) {
        kst_kvgpu_disarm(g, NULL);
        g->tq8 = where;
        g->tns = g->tch = g->tnc = 0; // (the next kst_kvgpu_tail_reserve lays the table out anew)
    }
    return 1;
}

extern "C" int kst_kvgpu_tail_reserve(kst_kvgpu *g, size_t ns, size_t ch, size_t nc, kst_error *err) {
    int q8 = ns && g->tq8 && !g->sC;
    if (q8 && !kvgpu_q8_fits(g, ch))
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: the tail sample in 8 bits needs %zu query heads a KV head <= %d, "
                        "head dim %zu <= %d and a multiple of 16, %zu x %zu rows a chunk <= %d and KESTREL_KV_GPU_TGRP "
                        "not 0", g->qh / g->kvh, TG_GMAX, g->d, TG_DMAX, g->qh / g->kvh, ch, TG_GP);
    if (!g->sC) g->sq8 = q8;
    int rc = tail_reserve(g, ns, ch, nc, q8 && g->tq8 >= 2, q8, err);
    if (rc == KST_OK && q8 && g->tq8 == 3) rc = stage_fit(g, err);
    return rc;
}

// KV head h's evenly spaced sample (K chunk-transposed, V rows; the cache's type) into the 8-bit
// table's layout at K8, V8, sc (the head's part): each row quantized by kst_kv_q8, the bytes the
// sample cache's scatter kernel writes.
static void tq8_pack(const kst_kvgpu *g, const void *K, const void *V, int8_t *K8, int8_t *V8, float *sc) {
    size_t ns = g->tns, ch = g->tch, d = g->d, es = g->f16 ? 2 : 4;
    float row[TG_DMAX]; // (a key row gathered, in the cache's type)
    int8_t q[TG_DMAX];
    for (size_t s = 0; s < ns; s++) {
        size_t j0 = s / ch * ch, nr = ch < ns - j0 ? ch : ns - j0, j = s - j0;
        const char *Kc = (const char *)K + j0 * d * es;
        for (size_t i = 0; i < d; i++) memcpy((char *)row + i * es, Kc + (i * nr + j) * es, es);
        sc[2 * s] = kst_kv_q8(row, g->f16, d, q);
        for (size_t i = 0; i < d; i++) K8[j0 * d + tg_kpos(j, i, nr, 1)] = q[i];
        sc[2 * s + 1] = kst_kv_q8((const char *)V + s * d * es, g->f16, d, V8 + s * d);
    }
}

extern "C" int kst_kvgpu_tail_put(kst_kvgpu *g, size_t kv_head, const void *K, const void *V, kst_error *err) {
    int rc = KST_OK;
    if (kv_head >= g->kvh || !g->tns || (g->sq8 && !g->tgl))
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: tail of KV head %zu not reserved (or the sample cache's)", kv_head);
    KST_TRY(kst_kvgpu_disarm(g, err));
    g->tabgen++; // (a staged copy of the table is stale: kst_kvgpu_tail_stage)
    if (g->tgl) { // (8 bits: quantized here, written in place where the table is in host memory)
        size_t rb = g->tns * g->d;
        if (g->thost) {
            CU(cudaStreamSynchronize(g->st), "kv gpu tail sample"); // (no step reading it)
            tq8_pack(g, K, V, (int8_t *)g->thK + kv_head * rb, (int8_t *)g->thV + kv_head * rb,
                     g->thsc + kv_head * g->tns * 2);
        } else {
            int8_t *b = (int8_t *)malloc(2 * rb + g->tns * 2 * sizeof(float));
            if (!b) return kst_fail(err, KST_ERR_NOMEM, "kv gpu: tail sample of %zu rows in 8 bits", g->tns);
            tq8_pack(g, K, V, b, b + rb, (float *)(b + 2 * rb));
            cudaError_t e1 = cudaMemcpy((int8_t *)g->tK + kv_head * rb, b, rb, cudaMemcpyHostToDevice);
            cudaError_t e2 = e1 == cudaSuccess ? cudaMemcpy((int8_t *)g->tV + kv_head * rb, b + rb, rb, cudaMemcpyHostToDevice) : e1;
            cudaError_t e3 = e2 == cudaSuccess ? cudaMemcpy(g->tsc + kv_head * g->tns * 2, b + 2 * rb,
                                                            g->tns * 2 * sizeof(float), cudaMemcpyHostToDevice) : e2;
            free(b);
            CU(e3, "kv gpu tail sample upload (8 bits)");
        }
        return KST_OK;
    }
    {
        size_t b = g->tns * g->d * (g->f16 ? 2 : 4);
        CU(cudaMemcpyAsync((char *)g->tK + kv_head * b, K, b, cudaMemcpyHostToDevice, g->st), "kv gpu tail keys upload");
        CU(cudaMemcpyAsync((char *)g->tV + kv_head * b, V, b, cudaMemcpyHostToDevice, g->st), "kv gpu tail values upload");
        CU(cudaStreamSynchronize(g->st), "kv gpu tail upload");
    }
done:
    return rc;
}

extern "C" const float *kst_kvgpu_tail_out(const kst_kvgpu *g) { return g->htout; }

extern "C" int kst_kvgpu_items_ready(const kst_kvgpu *g, size_t kv_head) {
    return g->tdirect && __atomic_load_n(&g->rdy[kv_head], __ATOMIC_ACQUIRE) == g->tstep;
}

// x[0..n) = v (the sample cache's weights start at -inf).
__global__ void fill_kernel(float *x, float v, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = v;
}

// n float32 values as float16 (round to nearest even), for the centroids.
__global__ void to_half_kernel(const float *x, __half *h, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) h[i] = __float2half_rn(x[i]);
}

extern "C" int kst_kvgpu_sc_reserve(kst_kvgpu *g, size_t cap, size_t ch, size_t nc, size_t C, const float *cent,
                                    int q8, kst_error *err) {
    int rc = KST_OK;
    if ((rc = kvgpu_release_all(err)) != KST_OK) return rc; // (reallocations below)
    if (g->st) CU(cudaStreamSynchronize(g->st), "kv gpu sample cache");
    cudaFree(g->scid);
    cudaFree(g->sclw);
    cudaFree(g->scent);
    cudaFree(g->scs);
    cudaFreeHost(g->hscs);
    g->scid = NULL;
    g->sclw = g->scs = g->hscs = NULL;
    g->scent = NULL;
    g->sC = 0;
    g->gen++;
    if (!cap || !!q8 != g->sq8 || g->tgl) {
        g->sq8 = 0;
        KST_TRY(tail_reserve(g, 0, 0, 0, 0, 0, err));
        if (!cap) return KST_OK;
    }
    {
        size_t P = 32;
        while (P < ch) P <<= 1;
        g->sq8 = !!q8;
        g->sgrp = kvgpu_sc_grouped(g, P);
        if (q8 && !g->sgrp) {
            g->sq8 = 0;
            return kst_fail(err, KST_ERR_INVALID, "kv gpu: the sample cache's table in 8 bits (tail_cache_q8) needs %zu query "
                            "heads a KV head <= %d, head dim %zu <= %d and a multiple of 16, %zu x %zu rows a chunk <= %d "
                            "and KESTREL_KV_GPU_TGRP not 0: turn tail_cache_q8 off", g->qh / g->kvh, TG_GMAX, g->d,
                            TG_DMAX, g->qh / g->kvh, P, TG_GP);
        }
    }
    KST_TRY(tail_reserve(g, cap, ch, nc, 0, 0, err));
    if (kst_kvgpu_tail_stride(g) < 2 * g->d + 2 + 2 * KST_KVGPU_TT_TOP)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: the sample cache needs the items' best-row sums (kst_kvgpu_tail_topsum)");
    {
        CU(cudaMalloc((void **)&g->scid, g->kvh * cap * sizeof(int)), "kv gpu sample cache clusters");
        CU(cudaMemset(g->scid, 0xff, g->kvh * cap * sizeof(int)), "kv gpu sample cache clusters"); // -1: free
        CU(cudaMalloc((void **)&g->sclw, g->kvh * C * sizeof(float)), "kv gpu sample cache weights");
        size_t ncent = g->kvh * g->d * C, es = g->f16 ? 2 : 4;
        CU(cudaMalloc(&g->scent, ncent * es), "kv gpu sample cache centroids");
        if (g->f16) { // float16 values already (exact); converted on the GPU (on the host: ~12 ms a layer)
            float *tmp = NULL;
            CU(cudaMalloc((void **)&tmp, ncent * sizeof(float)), "kv gpu sample cache centroids");
            cudaError_t ce = cudaMemcpy(tmp, cent, ncent * sizeof(float), cudaMemcpyHostToDevice);
            if (ce == cudaSuccess) {
                to_half_kernel<<<(unsigned)((ncent + 255) / 256), 256, 0, g->st>>>(tmp, (__half *)g->scent, ncent);
                ce = cudaGetLastError();
            }
            if (ce == cudaSuccess) ce = cudaStreamSynchronize(g->st);
            cudaFree(tmp);
            CU(ce, "kv gpu sample cache centroids upload");
        } else
            CU(cudaMemcpy(g->scent, cent, ncent * es, cudaMemcpyHostToDevice), "kv gpu sample cache centroids upload");
        CU(cudaMalloc((void **)&g->scs, g->qh * C * sizeof(float)), "kv gpu centroid scores");
        CU(cudaMallocHost((void **)&g->hscs, g->qh * C * sizeof(float)), "kv gpu pinned centroid scores");
        if (!g->sev) {
            CU(cudaEventCreateWithFlags(&g->sev, cudaEventDisableTiming), "kv gpu sample cache event");
            CU(cudaEventCreateWithFlags(&g->sfev, cudaEventDisableTiming), "kv gpu sample cache event");
        }
        fill_kernel<<<(unsigned)((g->kvh * C + 255) / 256), 256, 0, g->st>>>(g->sclw, -INFINITY, g->kvh * C);
        CU(cudaGetLastError(), "kv gpu sample cache weights");
        CU(cudaStreamSynchronize(g->st), "kv gpu sample cache weights");
        g->sC = C;
    }
done:
    return rc;
}

// The staging's layout for n slots: the weights (kvh * sC floats), then the header (n * 3 ints),
// then the rows (n * 2 * d values), each part at a 16-byte boundary; returns the bytes. dir (the
// cache's rows registered, kst_kvgpu_sc_store): the header (n * 4 ints) and no rows.
static size_t sc_layout(const kst_kvgpu *g, size_t n, int dir, size_t *hdr_at, size_t *rows_at) {
    size_t es = g->f16 ? 2 : 4, a = (g->kvh * g->sC * sizeof(float) + 15) / 16 * 16;
    *hdr_at = a;
    *rows_at = a + (n * (dir ? 4 : 3) * sizeof(int) + 15) / 16 * 16;
    return *rows_at + (dir ? 0 : n * 2 * g->d * es);
}

static void sc_unstore(kst_kvgpu *g) {
    for (size_t i = 0; g->hst && i < 2 * g->kvh; i++) {
        for (size_t k = 0; g->hst[i] && k < g->nseg; k++) cudaHostUnregister((char *)g->hst[i] + g->segoff[k]);
        g->hst[i] = NULL;
    }
    cudaGetLastError();
    g->stb = g->nseg = 0;
}

extern "C" int kst_kvgpu_sc_store(kst_kvgpu *g, const void *const *K, const void *const *V, size_t bytes,
                                  kst_error *err) {
    int rc = KST_OK;
    size_t H = 2 * g->kvh, k = 0;
    int same = g->stb > 0;
    for (size_t i = 0; same && K && i < H; i++) same = g->hst[i] == (i & 1 ? V[i / 2] : K[i / 2]);
    bytes = (bytes + 4095) / 4096 * 4096; // (whole pages: the caller's buffers are, kv_graph.c)
    if (same && bytes <= g->stb) return KST_OK;
    if (!g->stb && (!K || g->smap < 2 || !bytes)) return KST_OK;
    KST_TRY(kvgpu_release_all(err)); // (a registration may wait for the device, and so for a queued chain)
    if (g->sev_rec) CU(cudaEventSynchronize(g->sev), "kv gpu sample cache upload"); // (the scatter reading the rows)
    g->sev_rec = 0;
    if (!same) sc_unstore(g);
    if (!K || g->smap < 2 || !bytes) return KST_OK;
    for (size_t i = 0; i < H; i++) // (buffers not page-aligned, e.g. small ones, may share pages: staged)
        if ((uintptr_t)(i & 1 ? V[i / 2] : K[i / 2]) % 4096) return KST_OK;
    if (!g->hst && !(g->hst = (const void **)calloc(H, sizeof(void *))))
        return kst_fail(err, KST_ERR_NOMEM, "kv gpu: out of memory for %zu store addresses", H);
    if (!g->dbase && !(g->dbase = (void **)calloc(H, sizeof(void *))))
        return kst_fail(err, KST_ERR_NOMEM, "kv gpu: out of memory for %zu store addresses", H);
    if (g->nseg == g->segcap) {
        size_t nc = g->segcap ? 2 * g->segcap : 8, *p = (size_t *)realloc(g->segoff, nc * sizeof(size_t));
        if (!p) return kst_fail(err, KST_ERR_NOMEM, "kv gpu: out of memory for %zu store segments", nc);
        g->segoff = p, g->segcap = nc;
    }
    if (!g->dstore) CU(cudaMalloc((void **)&g->dstore, H * sizeof(void *)), "kv gpu store addresses");
    // a new segment [stb, bytes) of every buffer: its device address must continue the first's
    for (k = 0; k < H; k++) {
        char *p = (char *)(k & 1 ? V[k / 2] : K[k / 2]) + g->stb;
        void *dp = NULL;
        cudaError_t ce = cudaHostRegister(p, bytes - g->stb, cudaHostRegisterMapped | cudaHostRegisterReadOnly);
        if (ce != cudaSuccess) {
            cudaGetLastError();
            ce = cudaHostRegister(p, bytes - g->stb, cudaHostRegisterMapped);
        }
        if (ce == cudaSuccess) {
            ce = cudaHostGetDevicePointer(&dp, p, 0);
            if (ce == cudaSuccess && g->stb && (char *)dp != (char *)g->dbase[k] + g->stb) ce = cudaErrorInvalidValue;
            if (ce != cudaSuccess) cudaHostUnregister(p);
        }
        if (ce != cudaSuccess) break;
        if (!g->stb) g->dbase[k] = dp;
    }
    if (k < H) { // (refused, e.g. no room to pin: every segment let go, the rows staged instead)
        cudaGetLastError();
        for (size_t i = 0; i < k; i++) cudaHostUnregister((char *)(i & 1 ? V[i / 2] : K[i / 2]) + g->stb);
        cudaGetLastError();
        sc_unstore(g);
        return KST_OK;
    }
    for (size_t i = 0; !g->stb && i < H; i++) g->hst[i] = i & 1 ? V[i / 2] : K[i / 2];
    g->segoff[g->nseg++] = g->stb; // (recorded first: a failure below unregisters it)
    if (g->nseg == 1)
        CU(cudaMemcpy(g->dstore, g->dbase, H * sizeof(void *), cudaMemcpyHostToDevice), "kv gpu store addresses");
    g->stb = bytes;
done:
    if (rc != KST_OK) sc_unstore(g);
    return rc;
}

extern "C" int kst_kvgpu_sc_stored(const kst_kvgpu *g) { return g->stb > 0; }

extern "C" int kst_kvgpu_sc_staging(kst_kvgpu *g, size_t n, int **hdr, void **rows, float **lw, kst_error *err) {
    int rc = KST_OK;
    size_t ha, ra, need;
    if (!g->sC) return kst_fail(err, KST_ERR_INVALID, "kv gpu: no sample cache reserved");
    if (g->sev_rec) CU(cudaEventSynchronize(g->sev), "kv gpu sample cache upload"); // (done by now, as a rule)
    g->sev_rec = 0;
    g->sdir = g->stb > 0;
    need = sc_layout(g, n, g->sdir, &ha, &ra);
    if (need > g->sall) {
        size_t cap = n + n / 2 + 64, bytes = sc_layout(g, cap, g->sdir, &ha, &ra);
        cudaFree(g->dsall);
        cudaFreeHost(g->hsall);
        g->dsall = g->hsall = g->dsmap = NULL;
        g->sall = 0;
        CU(cudaMallocHost((void **)&g->hsall, bytes), "kv gpu sample cache staging");
        if (!g->smap || cudaHostGetDevicePointer((void **)&g->dsmap, g->hsall, 0) != cudaSuccess) {
            (void)cudaGetLastError(); // (not mapped: the copy)
            g->dsmap = NULL;
            CU(cudaMalloc((void **)&g->dsall, bytes), "kv gpu sample cache staging");
        }
        g->sall = bytes;
        sc_layout(g, n, g->sdir, &ha, &ra);
    }
    g->sn = n;
    *hdr = (int *)(g->hsall + ha);
    *rows = g->sdir ? NULL : g->hsall + ra;
    if (lw) *lw = (float *)g->hsall;
done:
    if (rc != KST_OK) g->sn = SIZE_MAX;
    return rc;
}

extern "C" int kst_kvgpu_sc_send(kst_kvgpu *g, size_t n, const float *lw, kst_error *err) {
    int rc = KST_OK;
    size_t ha, ra, nlw = g->kvh * g->sC, bytes = sc_layout(g, n, g->sdir, &ha, &ra);
    if (!g->sC || n != g->sn || bytes > g->sall)
        return kst_fail(err, KST_ERR_MISUSE, "kv gpu: %zu sample cache slots sent, %zu staged (kst_kvgpu_sc_staging first)",
                        n, g->sn);
    if (g->sdir && !g->stb)
        return kst_fail(err, KST_ERR_MISUSE, "kv gpu: the staged slots name rows no longer registered (kst_kvgpu_sc_store "
                        "after kst_kvgpu_sc_staging: stage them again)");
    KST_TRY(kst_kvgpu_disarm(g, err));
    if (!n && !lw) return KST_OK;
    if (lw && lw != (const float *)g->hsall) memcpy(g->hsall, lw, nlw * sizeof(float));
    { // one kernel reading the staging where it is (mapped), or one copy (from the weights, or from
      // the header where they are not sent) and the kernel
        size_t from = lw ? 0 : ha;
        unsigned nb = (unsigned)n + (lw ? (unsigned)((nlw + 127) / 128) : 0);
        char *base = g->dsmap ? g->dsmap : g->dsall;
        if (!g->dsmap)
            CU(cudaMemcpyAsync(g->dsall + from, g->hsall + from, bytes - from, cudaMemcpyHostToDevice, g->st),
               "kv gpu sample cache upload");
        const int *dh = (const int *)(base + ha);
        const float *dl = lw ? (const float *)base : NULL;
        int d = (int)g->d;
        if (g->sq8 && g->f16)
            sc_scatter_q8_kernel<__half><<<nb, 128, 0, g->st>>>(
                ScSrc<__half>{dh, (const __half *)(base + ra), g->sdir ? (const __half *const *)g->dstore : NULL, d}, (int)n,
                dl, g->sclw, (int)nlw, (int8_t *)g->tK, (int8_t *)g->tV, g->tsc, g->scid, (int)g->tns, (int)g->tch, d);
        else if (g->sq8)
            sc_scatter_q8_kernel<float><<<nb, 128, 0, g->st>>>(
                ScSrc<float>{dh, (const float *)(base + ra), g->sdir ? (const float *const *)g->dstore : NULL, d}, (int)n,
                dl, g->sclw, (int)nlw, (int8_t *)g->tK, (int8_t *)g->tV, g->tsc, g->scid, (int)g->tns, (int)g->tch, d);
        else if (g->f16)
            sc_scatter_kernel<__half><<<nb, 128, 0, g->st>>>(
                ScSrc<__half>{dh, (const __half *)(base + ra), g->sdir ? (const __half *const *)g->dstore : NULL, d}, (int)n,
                dl, g->sclw, (int)nlw, (__half *)g->tK, (__half *)g->tV, g->scid, (int)g->tns, (int)g->tch, d, g->sgrp);
        else
            sc_scatter_kernel<float><<<nb, 128, 0, g->st>>>(
                ScSrc<float>{dh, (const float *)(base + ra), g->sdir ? (const float *const *)g->dstore : NULL, d}, (int)n,
                dl, g->sclw, (int)nlw, (float *)g->tK, (float *)g->tV, g->scid, (int)g->tns, (int)g->tch, d, g->sgrp);
        CU(cudaGetLastError(), "kv gpu sample cache scatter");
    }
    CU(cudaEventRecord(g->sev, g->st), "kv gpu sample cache event");
    g->sev_rec = 1;
done:
    return rc;
}

extern "C" const float *kst_kvgpu_sc_scores(const kst_kvgpu *g) { return g->sC ? g->hscs : NULL; }

extern "C" int kst_kvgpu_sc_fetch(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    if (!g->sC) return kst_fail(err, KST_ERR_INVALID, "kv gpu: no sample cache reserved");
    KST_TRY(kst_kvgpu_disarm(g, err));
    CU(cudaMemcpyAsync(g->hscs, g->scs, g->qh * g->sC * sizeof(float), cudaMemcpyDeviceToHost, g->st),
       "kv gpu centroid scores download");
    CU(cudaEventRecord(g->sfev, g->st), "kv gpu sample cache event");
    g->sf_rec = 1;
done:
    return rc;
}

extern "C" int kst_kvgpu_sc_fetched(kst_kvgpu *g, kst_error *err) {
    int rc = KST_OK;
    if (!g->sf_rec) return kst_fail(err, KST_ERR_MISUSE, "kv gpu: the centroid scores were not fetched");
    CU(cudaEventSynchronize(g->sfev), "kv gpu centroid scores download");
    g->sf_rec = 0;
done:
    return rc;
}

extern "C" int kst_kvgpu_put(kst_kvgpu *g, size_t slot, const void *K, const void *V, size_t n,
                              kst_error *err) {
    int rc = KST_OK;
    if (slot + n > g->cap)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: slots %zu..%zu past %zu", slot, slot + n, g->cap);
    size_t row = g->kvh * g->d * (g->f16 ? 2 : 4);
    if (g->armed) { // staged only: the armed step's first kernel copies them in
        if (g->ndirty + n <= KST_KVGPU_DMAX) {
            char *st = (char *)g->hstage + slot * 2 * row;
            for (size_t i = 0; i < n; i++) {
                memcpy(st + 2 * i * row, (const char *)K + i * row, row);
                memcpy(st + (2 * i + 1) * row, (const char *)V + i * row, row);
                g->dirty[g->ndirty++] = (int)(slot + i);
            }
            return KST_OK;
        }
        KST_TRY(kst_kvgpu_disarm(g, err)); // (copies those listed so far)
    }
    // The staging slots are reused once the ring has gone round: before overwriting one whose
    // upload may still be queued, wait for the stream (at most once a ring of slots; never in
    // a decode loop, whose steps see their uploads done).
    if (g->staged + n > g->ring) {
        CU(cudaStreamSynchronize(g->st), "kv gpu upload");
        g->staged = g->staged_start = 0;
    }
    {
        char *st = (char *)g->hstage + slot * 2 * row;
        for (size_t i = 0; i < n; i++) {
            memcpy(st + 2 * i * row, (const char *)K + i * row, row);
            memcpy(st + (2 * i + 1) * row, (const char *)V + i * row, row);
        }
        CU(cudaMemcpyAsync((char *)g->KV + slot * 2 * row, st, n * 2 * row, cudaMemcpyHostToDevice, g->st),
           "kv gpu keys and values upload");
        g->staged += n;
    }
done:
    return rc;
}

// The step's partials are in: the uploads queued before its start are done too.
static void times_add(kst_kvgpu *g);
static void uploads_done(kst_kvgpu *g) {
    if (g->got) return;
    g->got = 1;
    times_add(g);
    g->staged -= g->staged_start < g->staged ? g->staged_start : g->staged;
    g->staged_start = 0;
}

static int kst_kvgpu_enqueue(kst_kvgpu *g, size_t n, kst_error *err);

// The step's parameters after the query in hq (kv_cuda.h, KST_KVGPU_PRM); the staged slots'
// list moves there.
static void prm_write(kst_kvgpu *g, size_t nsink, size_t rlo, size_t cnt, int skip) {
    int *prm = (int *)(g->hq + g->qh * g->d);
    prm[0] = (int)nsink;
    prm[1] = (int)(rlo % g->ring);
    prm[2] = (int)cnt;
    prm[3] = skip;
    prm[4] = g->ndirty;
    memcpy(prm + 5, g->dirty, (size_t)g->ndirty * sizeof(int));
    if (!skip) { // (never 0: the ready words start at 0)
        if (++g->tstep == 0) g->tstep = 1;
        prm[5 + KST_KVGPU_DMAX] = (int)g->tstep;
    }
    g->ndirty = 0;
}

// The armed chain let go: the flag written (after the query and parameters: x86 stores are
// seen in order; the sequentially consistent store drains the store buffer), its event the
// step's.
static void flag_release_locked(kst_kvgpu *g) {
    for (kst_kvgpu **pp = &arm_head; *pp; pp = &(*pp)->arm_next)
        if (*pp == g) {
            *pp = g->arm_next;
            break;
        }
    g->arm_next = NULL;
    g->seq++;
    __atomic_store_n((uint32_t *)g->flag, g->seq, __ATOMIC_SEQ_CST);
    g->armed = 0;
    g->done = g->ev[g->seq & 1];
}
static void flag_release(kst_kvgpu *g) {
    pthread_mutex_lock(&arm_mu);
    flag_release_locked(g);
    pthread_mutex_unlock(&arm_mu);
}

extern "C" int kst_kvgpu_can_arm(const kst_kvgpu *g) { return g && g->arm_ok; }
extern "C" size_t kst_kvgpu_armed_steps(const kst_kvgpu *g) { return g ? g->narmed : 0; }

extern "C" int kst_kvgpu_arm(kst_kvgpu *g, int *armed, kst_error *err) {
    int rc = KST_OK;
    if (armed) *armed = g->armed;
    // (staged tables, kst_kvgpu_tail_stage: never armed. A chain queued now would hold its slot
    // for its own step, a layer's cycle away, while the layers between read the same slot: their
    // copies would wait for it, and it for them)
    if (g->armed || !g->arm_ok || !g->got || g->timing || g->tq8 == 3) return KST_OK;
    if (!g->arm_want) { // the graph captured anew with the staged slots' kernel at the next step
        g->arm_want = 1;
        g->gen++;
        return KST_OK;
    }
    if (!g->exec || g->graph_n != 0 || g->graph_gen != g->gen) return KST_OK;
    {
        // the wait, then the step's graph and its event (ev[(seq + 1) & 1]: the current step's
        // event, polled until its partials are in, is the other one)
        CUresult r = wait_value()((CUstream)g->st, (CUdeviceptr)g->dflag, g->seq + 1, CU_STREAM_WAIT_VALUE_GEQ);
        if (r != CUDA_SUCCESS) {
            g->arm_ok = 0; // never again on this handle: launched as before
            return KST_OK;
        }
        pthread_mutex_lock(&arm_mu);
        g->armed = 1;
        g->arm_next = arm_head;
        arm_head = g;
        pthread_mutex_unlock(&arm_mu);
        g->ndirty = 0;
        cudaError_t e = cudaGraphLaunch(g->exec, g->st);
        if (e == cudaSuccess) e = cudaEventRecord(g->ev[(g->seq + 1) & 1], g->st);
        if (e != cudaSuccess) { // the wait released with the kernel skipped
            rc = kst_fail(err, KST_ERR_INTERNAL, "kv gpu arm: %s", cudaGetErrorString(e));
            cudaGetLastError();
            kvgpu_release_all(NULL);
            g->arm_ok = 0;
            return rc;
        }
    }
    if (armed) *armed = 1;
    return KST_OK;
}

// Every armed chain of the process let go (its kernel skipped; its staged slots still copied
// in): all flags written, then each stream synchronized.
static int kvgpu_release_all(kst_error *err) {
    int rc = KST_OK;
    kst_kvgpu *rel[64];
    for (;;) {
        size_t nr = 0;
        pthread_mutex_lock(&arm_mu);
        while (arm_head && nr < 64) {
            kst_kvgpu *g = arm_head;
            prm_write(g, 0, 0, 0, 1);
            flag_release_locked(g); // (unlinks it)
            rel[nr++] = g;
        }
        int more = arm_head != NULL;
        pthread_mutex_unlock(&arm_mu);
        for (size_t i = 0; i < nr; i++) {
            kst_kvgpu *g = rel[i];
            cudaError_t e = cudaStreamSynchronize(g->st);
            if (e != cudaSuccess && rc == KST_OK)
                rc = kst_fail(err, KST_ERR_INTERNAL, "kv gpu released chain: %s", cudaGetErrorString(e));
            g->staged = g->staged_start = 0;
            g->got = 1;
        }
        if (!more) break;
    }
    return rc;
}

extern "C" int kst_kvgpu_disarm(kst_kvgpu *g, kst_error *err) {
    if (!g || !g->armed) return KST_OK;
    return kvgpu_release_all(err);
}

extern "C" int kst_kvgpu_release_all(kst_error *err) { return kvgpu_release_all(err); }

extern "C" int kst_kvgpu_partial_start(kst_kvgpu *g, const float *q, size_t nsink, size_t rlo, size_t cnt,
                                        kst_error *err) {
    int rc = KST_OK;
    if (nsink > g->sinks || cnt > g->ring)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu: %zu sinks and %zu ring tokens (%zu and %zu slots)", nsink, cnt,
                        g->sinks, g->ring);
    size_t n = 0; // the graph does not depend on the token counts (read from the parameters)
    if (g->armed && !(g->exec && g->graph_n == n && g->graph_gen == g->gen)) KST_TRY(kst_kvgpu_disarm(g, err));
    if (!g->armed) g->ndirty = 0; // (puts while not armed were copied on the stream)
    memcpy(g->hq, q, g->qh * g->d * sizeof(float));
    prm_write(g, nsink, rlo, cnt, 0);
    g->staged_start = g->staged;
    g->got = 0;
    if (g->armed) { // the step's work is queued behind the flag: release it
        flag_release(g);
        g->narmed++;
        return KST_OK;
    }
    g->stage_hit = 0;
    if (g->tq8 == 3 && g->tns) KST_TRY(stage_use(g, err)); // (may have the graph captured anew)
    if (g->exec && g->graph_n == n && g->graph_gen == g->gen) {
        CU(cudaGraphLaunch(g->exec, g->st), "kv gpu partial attention graph launch");
        CU(cudaEventRecord(g->done, g->st), "kv gpu event");
        return KST_OK;
    }
    if (!g->exec && ((getenv("KESTREL_KV_GPU_GRAPH") && atoi(getenv("KESTREL_KV_GPU_GRAPH")) == 0) || g->timing))
        goto plain;
    {
        // capture once per static-token count (it is sinks + window once the window is full)
        if (g->exec) cudaGraphExecDestroy(g->exec);
        if (g->graph) cudaGraphDestroy(g->graph);
        g->exec = NULL;
        g->graph = NULL;
        CU(cudaStreamBeginCapture(g->st, cudaStreamCaptureModeThreadLocal), "kv gpu graph capture");
        rc = kst_kvgpu_enqueue(g, n, err);
        cudaGraph_t gr = NULL;
        cudaError_t ce = cudaStreamEndCapture(g->st, &gr);
        if (rc != KST_OK) {
            if (gr) cudaGraphDestroy(gr);
            goto done;
        }
        CU(ce, "kv gpu graph capture end");
        g->graph = gr;
        CU(cudaGraphInstantiate(&g->exec, g->graph, 0), "kv gpu graph instantiate");
        g->graph_n = n;
        g->graph_gen = g->gen;
        CU(cudaGraphLaunch(g->exec, g->st), "kv gpu partial attention graph launch");
        CU(cudaEventRecord(g->done, g->st), "kv gpu event");
        return KST_OK;
    }
plain:
    rc = kst_kvgpu_enqueue(g, n, err);
    if (rc != KST_OK) goto done;
    CU(cudaEventRecord(g->done, g->st), "kv gpu event");
done:
    return rc;
}

// Which of the step kernel's tail and centroid blocks take a KV head's query heads together
// (bit 0: tail_grp_body, bit 1: cent_grp_body), as their shapes allow, unless
// KESTREL_KV_GPU_TGRP=0 at creation (g->tgrp 0: the blocks a query head each, as before).
static int kvgpu_grouped(const kst_kvgpu *g) {
    size_t G = g->qh / g->kvh;
    if (!g->tgrp || G > TG_GMAX || g->d > TG_DMAX) return 0;
    return ((g->sC && g->sgrp) || g->tgl ? 1 : 0) | 2;
}

// The sample cache's table read by tail_grp_body (its keys in tg_kpos's layout): decided when it
// is reserved, for P rows a chunk.
// tail_grp_body's layout for P rows a chunk of es-byte values.
static int kvgpu_grouped_fits(const kst_kvgpu *g, size_t P, size_t es) {
    size_t G = g->qh / g->kvh;
    return g->tgrp && G <= TG_GMAX && g->d <= TG_DMAX && G * P <= TG_GP && g->d % (16 / es) == 0;
}
static int kvgpu_sc_grouped(const kst_kvgpu *g, size_t P) { return kvgpu_grouped_fits(g, P, g->sq8 ? 1 : g->f16 ? 2 : 4); }

// The step kernel's launch: T the cache's type, TT the tail table's (T, or int8_t: sq8).
template <typename T, typename TT>
static void step_launch(kst_kvgpu *g, size_t nb, size_t P, size_t nbc, int grp) {
    const TT *tK = (const TT *)g->tK, *tV = (const TT *)g->tV;
    const float *tsc = g->sq8 ? g->tsc : NULL;
    if (g->tq8 == 3 && g->tns) { // the pool's slot (laid out as stage_bytes says)
        char *b = g->pool->s[g->pslot].buf;
        size_t tb = g->tns * g->kvh * g->d;
        tK = (const TT *)b;
        tV = (const TT *)(b + tb);
        tsc = (const float *)(b + 2 * tb);
    }
    (g->minb == 3 ? step_kernel<T, TT, 3> : step_kernel<T, TT, 2>)<<<(unsigned)nb, STEP_THREADS, 0, g->st>>>(
        (const T *)g->KV, g->q, g->o, g->lse, (int)g->sinks, (int)g->ring, (int)g->kvh, (int)(g->qh / g->kvh), (int)g->d,
        g->scale, (int)g->qh, tK, tV, tsc,
        g->tdirect ? g->dtout : g->tout, (int)g->tns, (int)g->tch, (int)g->tnc, (int)P, (int)kst_kvgpu_tail_stride(g),
        g->split, g->sp, g->spc, g->sC ? g->scid : NULL, g->sclw, (int)g->sC, (const T *)g->scent, g->scs, (int)nbc,
        grp, g->tns && g->tdirect ? g->drdy : NULL, g->tcnt);
}

// The step's work on g->st: the query up, the kernel, the partials down.
static int kst_kvgpu_enqueue(kst_kvgpu *g, size_t n, kst_error *err) {
    int rc = KST_OK;
    if (g->timing) CU(cudaEventRecord(g->tev[0], g->st), "kv gpu timing");
    CU(cudaMemcpyAsync(g->q, g->hq, (g->qh * g->d + KST_KVGPU_PRM) * sizeof(float), cudaMemcpyHostToDevice, g->st),
       "kv gpu query upload");
    if (g->timing) CU(cudaEventRecord(g->tev[1], g->st), "kv gpu timing");
    if (g->arm_ok && g->arm_want) // the slots staged while armed (none staged: it returns)
        refresh_kernel<<<KST_KVGPU_DMAX, 256, 0, g->st>>>(g->q, (int)g->qh, (int)g->d, (const char *)g->dstage,
                                                          (char *)g->KV, 2 * g->kvh * g->d * (g->f16 ? 2 : 4));
    {
    size_t P = 32;
    while (P < g->tch) P <<= 1;
    int grp = kvgpu_grouped(g);
    size_t nbc = g->sC ? (grp & 2 ? (g->sC + 127) / 128 : (g->sC + STEP_THREADS - 1) / STEP_THREADS) : 0;
    size_t nb = g->qh * (size_t)g->split + (g->tns ? (grp & 1 ? g->kvh : g->qh) * g->tnc : 0) +
                (grp & 2 ? g->kvh : g->qh) * nbc;
    if (g->f16 && g->sq8 && g->tns)
        step_launch<__half, int8_t>(g, nb, P, nbc, grp);
    else if (g->f16)
        step_launch<__half, __half>(g, nb, P, nbc, grp);
    else if (g->sq8 && g->tns)
        step_launch<float, int8_t>(g, nb, P, nbc, grp);
    else
        step_launch<float, float>(g, nb, P, nbc, grp);
    }
    CU(cudaGetLastError(), "kv gpu step launch");
    if (g->timing) CU(cudaEventRecord(g->tev[2], g->st), "kv gpu timing");
    if (g->tns && !g->tdirect)
        CU(cudaMemcpyAsync(g->htout, g->tout, g->qh * g->tnc * kst_kvgpu_tail_stride(g) * sizeof(float),
                           cudaMemcpyDeviceToHost, g->st), "kv gpu tail sums download");
    CU(cudaMemcpyAsync(g->ho, g->o, (g->qh * g->d + g->qh) * sizeof(float), cudaMemcpyDeviceToHost, g->st),
       "kv gpu output download");
    if (g->timing) CU(cudaEventRecord(g->tev[3], g->st), "kv gpu timing");
done:
    return rc;
}

// The step's partials are in (timing on): its spans added.
static void times_add(kst_kvgpu *g) {
    if (!g->timing) return;
    float ms[3];
    for (int i = 0; i < 3; i++)
        if (cudaEventElapsedTime(&ms[i], g->tev[i], g->tev[i + 1]) != cudaSuccess) {
            cudaGetLastError();
            return;
        }
    for (int i = 0; i < 3; i++) g->tms[i] += ms[i];
    g->tn++;
}

extern "C" size_t kst_kvgpu_times(kst_kvgpu *g, double ms[3]) {
    size_t n = g->tn;
    for (int i = 0; i < 3; i++) {
        ms[i] = g->tms[i];
        g->tms[i] = 0;
    }
    g->tn = 0;
    return n;
}

extern "C" void kst_kvgpu_split(kst_kvgpu *g, int s, int minb) {
    if (s < 1) s = 1;
    if (s > KST_KVGPU_SPLIT_MAX) s = KST_KVGPU_SPLIT_MAX;
    minb = minb == 3 ? 3 : 2;
    if (s == g->split && minb == g->minb) return;
    kst_kvgpu_disarm(g, NULL);
    if (g->st) cudaStreamSynchronize(g->st); // (the last step's kernel done with the scratch)
    g->split = s;
    g->minb = minb;
    g->gen++; // the graph captured anew
}

extern "C" int kst_kvgpu_partial_wait(kst_kvgpu *g, float *o, float *lse, kst_error *err) {
    int rc = KST_OK;
    CU(cudaEventSynchronize(g->done), "kv gpu partial attention");
    uploads_done(g);
    memcpy(o, g->ho, g->qh * g->d * sizeof(float));
    memcpy(lse, g->ho + g->qh * g->d, g->qh * sizeof(float));
done:
    return rc;
}

extern "C" int kst_kvgpu_partial_ready(kst_kvgpu *g, const float **o, const float **lse, kst_error *err) {
    int rc = KST_OK;
    CU(cudaEventSynchronize(g->done), "kv gpu partial attention");
    uploads_done(g);
    *o = g->ho;
    *lse = g->ho + g->qh * g->d;
done:
    return rc;
}

extern "C" int kst_kvgpu_partial_poll(kst_kvgpu *g, const float **o, const float **lse, int *done, kst_error *err) {
    int rc = KST_OK;
    *done = 0;
    cudaError_t e = cudaEventQuery(g->done);
    if (e == cudaErrorNotReady) return KST_OK;
    CU(e, "kv gpu partial attention");
    uploads_done(g);
    *o = g->ho;
    *lse = g->ho + g->qh * g->d;
    *done = 1;
done:
    return rc;
}

// ---------------------------------------------------------------------------------------------
// exact top-k: cuBLAS scores for a block of queries x a chunk of keys, then one block per query
// merges the chunk into the query's running top-k.

#define TOPK_MAX 64
#define SEL_THREADS 256

__global__ void select_kernel(const float *S, int nc, int k0, int k, float *run_v, int *run_i,
                              int first) {
    int qi = blockIdx.x, tid = threadIdx.x;
    const float *row = S + (size_t)qi * nc;
    float lv[TOPK_MAX];
    int li[TOPK_MAX];
    int cnt = 0;
    // thread 0 starts from the running list (already sorted)
    if (tid == 0 && !first)
        for (; cnt < k; cnt++) {
            lv[cnt] = run_v[(size_t)qi * k + cnt];
            li[cnt] = run_i[(size_t)qi * k + cnt];
        }
    for (int j = tid; j < nc; j += SEL_THREADS) {
        float v = row[j];
        if (cnt == k && v <= lv[k - 1]) continue;
        int p = cnt < k ? cnt++ : k - 1;
        while (p > 0 && lv[p - 1] < v) {
            lv[p] = lv[p - 1];
            li[p] = li[p - 1];
            p--;
        }
        lv[p] = v;
        li[p] = k0 + j;
    }
    // k rounds of block argmax over the threads' list heads
    __shared__ float wv[SEL_THREADS / 32];
    __shared__ int wt[SEL_THREADS / 32];
    __shared__ int winner;
    int head = 0, lane = tid & 31, warp = tid >> 5;
    for (int r = 0; r < k; r++) {
        float v = head < cnt ? lv[head] : -INFINITY;
        int t = tid;
        for (int off = 16; off; off >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, off);
            int ot = __shfl_xor_sync(0xffffffffu, t, off);
            if (ov > v || (ov == v && ot < t)) {
                v = ov;
                t = ot;
            }
        }
        if (lane == 0) {
            wv[warp] = v;
            wt[warp] = t;
        }
        __syncthreads();
        if (tid == 0) {
            float bv = wv[0];
            int bt = wt[0];
            for (int w = 1; w < SEL_THREADS / 32; w++)
                if (wv[w] > bv || (wv[w] == bv && wt[w] < bt)) {
                    bv = wv[w];
                    bt = wt[w];
                }
            winner = bt;
        }
        __syncthreads();
        if (tid == winner) {
            run_v[(size_t)qi * k + r] = head < cnt ? lv[head] : -INFINITY;
            run_i[(size_t)qi * k + r] = head < cnt ? li[head] : -1;
            head++;
        }
        __syncthreads();
    }
}

extern "C" int kst_kv_cuda_topk(const float *K, size_t n, size_t d, const float *Q, size_t nq,
                                size_t k, uint32_t *ids, kst_error *err) {
    int rc = KST_OK;
    if (k == 0 || k > TOPK_MAX || k > n)
        return kst_fail(err, KST_ERR_INVALID, "kv gpu top-k: k = %zu (expected 1..%d, <= %zu keys)", k,
                        TOPK_MAX, n);
    if ((rc = kvgpu_release_all(err)) != KST_OK) return rc; // (its allocations and frees)
    const size_t QB = 1024, KC = 65536;
    size_t kc = KC < n ? KC : n;
    float *dK = NULL, *dQ = NULL, *dS = NULL, *rv = NULL;
    int *ri = NULL;
    int *hi = NULL;
    cublasHandle_t hb = NULL;
    const float one = 1.0f, zero = 0.0f;
    if (cublasCreate(&hb) != CUBLAS_STATUS_SUCCESS)
        return kst_fail(err, KST_ERR_INTERNAL, "kv gpu top-k: cublasCreate failed");
    CU(cudaMalloc((void **)&dK, n * d * sizeof(float)), "kv gpu top-k keys");
    CU(cudaMalloc((void **)&dQ, QB * d * sizeof(float)), "kv gpu top-k queries");
    CU(cudaMalloc((void **)&dS, QB * kc * sizeof(float)), "kv gpu top-k scores");
    CU(cudaMalloc((void **)&rv, QB * k * sizeof(float)), "kv gpu top-k lists");
    CU(cudaMalloc((void **)&ri, QB * k * sizeof(int)), "kv gpu top-k lists");
    CU(cudaMemcpy(dK, K, n * d * sizeof(float), cudaMemcpyHostToDevice), "kv gpu top-k keys upload");
    hi = (int *)malloc(QB * k * sizeof(int));
    if (!hi) {
        rc = kst_fail(err, KST_ERR_NOMEM, "kv gpu top-k: out of memory");
        goto done;
    }
    for (size_t q0 = 0; q0 < nq; q0 += QB) {
        size_t qb = nq - q0 < QB ? nq - q0 : QB;
        CU(cudaMemcpy(dQ, Q + q0 * d, qb * d * sizeof(float), cudaMemcpyHostToDevice), "kv gpu top-k queries upload");
        for (size_t k0 = 0; k0 < n; k0 += kc) {
            size_t m = n - k0 < kc ? n - k0 : kc;
            // column-major S (m, qb) = K_chunk^T (m, d) Q (d, qb): row-major (qb, m)
            if (cublasSgemm(hb, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)qb, (int)d, &one, dK + k0 * d,
                            (int)d, dQ, (int)d, &zero, dS, (int)m) != CUBLAS_STATUS_SUCCESS) {
                rc = kst_fail(err, KST_ERR_INTERNAL, "kv gpu top-k: cublasSgemm failed");
                goto done;
            }
            select_kernel<<<(unsigned)qb, SEL_THREADS>>>(dS, (int)m, (int)k0, (int)k, rv, ri, k0 == 0);
            CU(cudaGetLastError(), "kv gpu top-k selection launch");
        }
        CU(cudaMemcpy(hi, ri, qb * k * sizeof(int), cudaMemcpyDeviceToHost), "kv gpu top-k download");
        for (size_t i = 0; i < qb * k; i++) ids[q0 * k + i] = (uint32_t)hi[i];
    }
done:
    free(hi);
    cudaFree(dK);
    cudaFree(dQ);
    cudaFree(dS);
    cudaFree(rv);
    cudaFree(ri);
    cublasDestroy(hb);
    return rc;
}
