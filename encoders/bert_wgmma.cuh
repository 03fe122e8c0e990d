/* bert_wgmma.cuh - the Hopper (sm_90a) attention kernel for heads of 64 dims: warpgroup matrix
 * products (wgmma) for S = Q K^T (both operands in shared memory) and O += P V (P from registers,
 * V in shared memory read transposed by the instruction), the online softmax of attention2_kernel
 * on the S accumulators in between. Q, K and V tiles are rows of 64 bf16 (128 bytes) in the
 * 128-byte swizzled layout the instruction's descriptors describe (16-byte chunk c of row r at
 * r * 128 + ((c ^ (r & 7)) << 4), tiles 1024-byte aligned), filled by cp.async. Built only where
 * the compiler targets sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the kernels are empty stubs
 * and wgmma_probe_kernel reports 0, so that the host keeps attention2_kernel. attention_ws_kernel
 * (warp-specialized, persistent, bulk tensor copies) is the default where the driver makes tensor
 * maps, else attention_wg_kernel (key tiles of 64; KESTREL_GPU_ATT=1); attention_wg128_kernel (key
 * tiles of 128, K and V on mbarriers) is KESTREL_GPU_ATT=5, 6 with ping-pong. */
#ifndef KST_ENCODERS_BERT_WGMMA_CUH
#define KST_ENCODERS_BERT_WGMMA_CUH

#include "encoders/bert_mma.cuh"

#include <cuda.h> /* CUtensorMap (the types alone: the map is made through the runtime's driver entry point) */
#include <cudaTypedefs.h>
#include <mutex>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KST_WGMMA 1
#else
#define KST_WGMMA 0
#endif

/* byte offset of 16-byte chunk c of row r in a swizzled tile of 128-byte rows */
static __device__ __forceinline__ uint32_t sw128(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

/* shared-memory matrix descriptor, 128-byte swizzle; SBO 1024 bytes (8 rows of 128 bytes) */
static __device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

#if KST_WGMMA
static __device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
static __device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/* keeps the compiler from moving accesses of d across the asynchronous products */
static __device__ __forceinline__ void reg_fence(float (&d)[32]) {
#pragma unroll
    for (int i = 0; i < 32; i++) asm volatile("" : "+f"(d[i])::"memory");
}
/* d (64 x 64, float32) (+)= A (64 x 16, descriptor) B (16 x 64, descriptor, K-major) */
static __device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(scale_d));
}
/* d (64 x 64) += A (64 x 16, registers) B (16 x 64, descriptor; TB = 1: MN-major, read transposed) */
template <int TB>
static __device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    asm volatile("{\nwgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, %37;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(TB));
}
#endif

#define WG_KT 64 /* keys a tile */

#if KST_WGMMA
/* S (64 x 64 scores of a warpgroup) = Q K^T: q, k the shared addresses of the warpgroup's 64 Q
 * rows and of the K tile (issued and committed, not waited for) */
static __device__ __forceinline__ void wg_issue_s(float (&sc)[32], uint32_t q, uint32_t k) {
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) wgmma_ss(sc, wg_desc(q + kk * 32, 16), wg_desc(k + kk * 32, 16), kk > 0);
    wg_commit();
}
/* The online softmax of a tile in place (wg_online_softmax below; attention_ws_kernel): sc becomes the tile's exponentials (P before its
 * rounding to bf16, wg_pack), al0 and al1 the factors by which O must be scaled before this tile's
 * P V is added; m, l: the running maximum (log2 units) and sum of rows g and g + 8 of the thread's
 * fragment. O is scaled apart (wg_rescale) so that the warp-specialized kernel can scale it while
 * this softmax runs under the previous tile's P V. */
template <int NJ>
static __device__ __forceinline__ void wg_softmax_x(float (&sc)[4 * NJ], float &m0, float &m1, float &l0, float &l1,
                                                    int k0, int Lv, int t, float &al0, float &al1) {
    const float qscale = 0.125f * 1.4426950408889634f; /* 1/sqrt(64) * log2(e) */
    if (k0 + 8 * NJ > Lv) {
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int key = k0 + j * 8 + t * 2;
            if (key >= Lv) sc[4 * j] = sc[4 * j + 2] = -INFINITY;
            if (key + 1 >= Lv) sc[4 * j + 1] = sc[4 * j + 3] = -INFINITY;
        }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    const float mn0 = fmaxf(m0, mx0 * qscale), mn1 = fmaxf(m1, mx1 * qscale);
    al0 = ex2_approx(m0 - mn0);
    al1 = ex2_approx(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        sc[4 * j] = ex2_approx(fmaf(sc[4 * j], qscale, -mn0));
        sc[4 * j + 1] = ex2_approx(fmaf(sc[4 * j + 1], qscale, -mn0));
        sc[4 * j + 2] = ex2_approx(fmaf(sc[4 * j + 2], qscale, -mn1));
        sc[4 * j + 3] = ex2_approx(fmaf(sc[4 * j + 3], qscale, -mn1));
        s0 += sc[4 * j] + sc[4 * j + 1];
        s1 += sc[4 * j + 2] + sc[4 * j + 3];
    }
    l0 = l0 * al0 + s0;
    l1 = l1 * al1 + s1;
}
/* the exponentials of wg_softmax_x as P, the A operand (bf16 pairs) of the P V products */
template <int NJ>
static __device__ __forceinline__ void wg_pack(const float (&sc)[4 * NJ], uint32_t (&pa)[NJ / 2][4]) {
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        pa[j >> 1][(j & 1) * 2 + 0] = pack_bf16(sc[4 * j], sc[4 * j + 1]);
        pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(sc[4 * j + 2], sc[4 * j + 3]);
    }
}
/* rows g and g + 8 of O scaled by a0 and a1 */
static __device__ __forceinline__ void wg_rescale(float (&o)[32], float a0, float a1) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
        o[4 * j] *= a0;
        o[4 * j + 1] *= a0;
        o[4 * j + 2] *= a1;
        o[4 * j + 3] *= a1;
    }
}
/* The online softmax of a tile's scores sc (NJ fragments of 8 keys: keys k0 .. k0 + 8 NJ - 1;
 * keys at or past Lv get -inf) into P (pa, bf16) and O rescaled. m, l: the running maximum
 * (log2 units) and sum of rows g and g + 8 of the thread's fragment. */
template <int NJ>
static __device__ __forceinline__ void wg_online_softmax(float (&o)[32], float (&sc)[4 * NJ], uint32_t (&pa)[NJ / 2][4],
                                                         float &m0, float &m1, float &l0, float &l1, int k0, int Lv,
                                                         int t) {
    float al0, al1;
    wg_softmax_x<NJ>(sc, m0, m1, l0, l1, k0, Lv, t, al0, al1);
    wg_pack<NJ>(sc, pa);
    wg_rescale(o, al0, al1);
}
/* The end of a warpgroup's rows: O / l into the warpgroup's 64 rows of the Q tile (os, the warp's
 * own 16), then out in 16-byte chunks to rows row0 .. row0 + 63 (those below T) of sequence
 * offset seq (b * T), head h. */
static __device__ __forceinline__ void wg_store_out(__nv_bfloat16 *out, unsigned char *os, const float (&o)[32], float l0,
                                                    float l1, int warp, int lane, int row0, int T, size_t seq, int C,
                                                    int h) {
    const int g = lane >> 2, t = lane & 3;
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    const int r0 = warp * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        *reinterpret_cast<uint32_t *>(os + sw128(r0, j) + t * 4) = pack_bf16(o[4 * j] * i0, o[4 * j + 1] * i0);
        *reinterpret_cast<uint32_t *>(os + sw128(r1, j) + t * 4) = pack_bf16(o[4 * j + 2] * i1, o[4 * j + 3] * i1);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int i = lane + j * 32, r = warp * 16 + (i >> 3), c = i & 7, row = row0 + r;
        if (row < T)
            *reinterpret_cast<uint4 *>(out + (seq + row) * C + (size_t)h * 64 + c * 8) =
                *reinterpret_cast<const uint4 *>(os + sw128(r, c));
    }
}

/* wg_online_softmax of a 64-key tile, then O += P V issued (v: the shared address of the V
 * tile; not waited for). */
static __device__ __forceinline__ void wg_softmax_pv(float (&o)[32], float (&sc)[32], uint32_t (&pa)[4][4], float &m0,
                                                     float &m1, float &l0, float &l1, int k0, int Lv, int t,
                                                     uint32_t v) {
    wg_online_softmax<WG_KT / 8>(o, sc, pa, m0, m1, l0, l1, k0, Lv, t);
    wg_fence();
#pragma unroll
    for (int jj = 0; jj < 4; jj++) wgmma_rs<1>(o, pa[jj], wg_desc(v + jj * 16 * 128, 8192));
    wg_commit();
}
#endif

/* Two warpgroups a block (128 query rows: 2 blocks an SM, 16 warps, at most 128 registers a
 * thread), a ring of 4 K/V tile slots. Measured on an H100 (BERT-base, B = 256, tests/bench/
 * README.md): one warpgroup a block, 2 or 3 slots, 4 warpgroups, V transposed in shared memory
 * and each product waited for at once were all slower or no faster. */
#define WG_NWG 2
#define WG_NS 4
#define WG_QR (64 * WG_NWG)
#define WG_THREADS (128 * WG_NWG)

/* dynamic shared memory: Q (WG_QR rows), WG_NS slots of a K and a V tile, 1024 bytes of
 * alignment slack */
struct wg_smem {
    static constexpr uint32_t q = 0, k = WG_QR * 128, v = k + WG_NS * WG_KT * 128;
    static constexpr size_t bytes = v + WG_NS * WG_KT * 128 + 1024;
};
#define WG_SMEM_BYTES wg_smem::bytes

/* grid (query tiles of WG_QR rows, heads, batch), warpgroups of 64 query rows; hs = 64.
 * Masking as attention2_kernel: keys at or past valid[b] get -inf, tiles wholly past it are
 * skipped, K/V rows past it are zero-filled; every query row below T is computed and written.
 * K/V tiles go through the ring, loaded two tiles ahead of the one in use, and each tile's P V
 * overlaps the next tile's wait and Q K^T (see the loop). */
__global__ void __launch_bounds__(WG_THREADS, 2)
attention_wg_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *qkv, const int *valid, int T, int C, int NH) {
#if KST_WGMMA
    typedef wg_smem L;
    constexpr int NS = WG_NS, QR = WG_QR, NT = WG_THREADS;
    extern __shared__ unsigned char wg_smem_raw[];
    unsigned char *sm = wg_smem_raw + ((1024 - (smem_u32(wg_smem_raw) & 1023)) & 1023);
    const uint32_t sb = smem_u32(sm);
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int t = lane & 3;
    const int q0 = blockIdx.x * QR, h = blockIdx.y, b = blockIdx.z;
    int Lv = valid[b];
    if (Lv > T) Lv = T;
    if (Lv < 1) Lv = 1;
    const int ntiles = (Lv + WG_KT - 1) / WG_KT;
    const __nv_bfloat16 *base = qkv + (size_t)b * T * 3 * C + (size_t)h * 64;
    auto load = [&](uint32_t off, int part, int r0, int R, int rows) {
#pragma unroll
        for (int j = 0; j < (R * 8 + NT - 1) / NT; j++) {
            int i = tid + j * NT;
            if (i < R * 8) {
                int r = i >> 3, c = i & 7;
                bool ok = r0 + r < rows;
                const __nv_bfloat16 *src = ok ? base + (size_t)(r0 + r) * 3 * C + (size_t)part * C + c * 8 : base;
                cp_async16(sm + off + sw128(r, c), src, ok ? 16 : 0);
            }
        }
    };
    auto load_tile = [&](int tile) { /* K and V of key tile `tile` into its slot */
        if (tile < ntiles) {
            load(L::k + (tile % NS) * WG_KT * 128, 1, tile * WG_KT, WG_KT, Lv);
            load(L::v + (tile % NS) * WG_KT * 128, 2, tile * WG_KT, WG_KT, Lv);
        }
    };
    float o[32], sc[32];
    uint32_t pa[4][4]; /* P of the tile in flight; kept live until its product is waited for */
#pragma unroll
    for (int i = 0; i < 32; i++) o[i] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    auto issue_s = [&](int kt) { wg_issue_s(sc, sb + L::q + wg * 64 * 128, sb + L::k + (kt % NS) * WG_KT * 128); };
    auto softmax_pv = [&](int kt) {
        wg_softmax_pv(o, sc, pa, m0, m1, l0, l1, kt * WG_KT, Lv, t, sb + L::v + (kt % NS) * WG_KT * 128);
    };
    /* cp.async group j holds tile j (group 0 also Q); each thread waits for its own copies, then
     * makes them visible to the products (async proxy) and to the other threads */
    load(L::q, 0, q0, QR, T);
    load_tile(0);
    cp_async_commit();
    /* P V of tile kt runs while the warps wait for tile kt + 1 and issue its Q K^T into sc
     * (free once P is in registers); one wait covers both, so no product is in flight across
     * iterations. Tile kt + NS - 1 goes into the slot of tile kt - 1, which no product reads
     * any more once every warp has passed this iteration's barrier. */
#pragma unroll
    for (int p = 1; p < NS - 1; p++) {
        load_tile(p);
        cp_async_commit();
    }
    cp_async_wait<NS - 2>(); /* group 0 */
    fence_async_smem();
    __syncthreads();
    issue_s(0);
    wg_wait<0>();
    reg_fence(sc);
    for (int kt = 0; kt < ntiles; kt++) {
        softmax_pv(kt);
        if (kt + 1 < ntiles) {
            cp_async_wait<NS - 3>(); /* groups 0 .. kt + 1 */
            fence_async_smem();
            __syncthreads();
            load_tile(kt + NS - 1);
            cp_async_commit();
            issue_s(kt + 1);
        }
        wg_wait<0>();
        reg_fence(o);
        reg_fence(sc);
#pragma unroll
        for (int i = 0; i < 16; i++) asm volatile("" : "+r"(pa[i >> 2][i & 3])::"memory");
    }
    wg_store_out(out, sm + L::q + wg * 64 * 128, o, l0, l1, warp, lane, q0 + wg * 64, T, (size_t)b * T, C, h);
#endif
}

/* Key tiles of 128 (KESTREL_GPU_ATT=5): S = Q K^T of a warpgroup's 64 rows against 128 keys in
 * one m64n128k16 chain (64 score registers a thread), then the online softmax over the 128 and
 * O += P V in 8 m64n64k16 steps; P V is waited for before the next tile's Q K^T (no overlap, so
 * that scores, P and O fit the 128 registers of 2 blocks an SM). Two K/V slots of 128 keys: a
 * sequence of up to 256 keys has all its K/V in flight from the start. The K and the V half of
 * each slot complete on their own mbarriers (cp.async.mbarrier.arrive.noinc, 256 arrivals a
 * phase), so that Q K^T and the softmax of a tile start before its V has landed, and the
 * warpgroups meet at a block barrier only before a slot is refilled (never at 256 keys or
 * fewer). Masking as attention_wg_kernel (tiles of 128 keys wholly past valid[b] skipped); the
 * online softmax the same, rescaled once every 128 keys instead of 64. */
#define WG128_KT 128
#define WG128_NS 2
struct wg128_smem {
    static constexpr uint32_t q = 0, k = WG_QR * 128, v = k + WG128_NS * WG128_KT * 128;
    static constexpr uint32_t bar = v + WG128_NS * WG128_KT * 128; /* a K and a V mbarrier a slot */
    static constexpr size_t bytes = bar + 4 * 8 + 1024;
};
#define WG128_SMEM_BYTES wg128_smem::bytes

#if KST_WGMMA
/* d (64 x 128, float32) (+)= A (64 x 16, descriptor) B (16 x 128, descriptor, K-major) */
static __device__ __forceinline__ void wgmma_ss128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(scale_d));
}
static __device__ __forceinline__ void mbar_init(uint32_t a, int n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(n) : "memory");
}
/* an arrive on the mbarrier once all of this thread's earlier cp.async copies have landed */
static __device__ __forceinline__ void mbar_cp_async_arrive(uint32_t a) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
static __device__ __forceinline__ void mbar_wait(uint32_t a, int parity) {
    uint32_t ok;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok)
                     : "r"(a), "r"(parity)
                     : "memory");
    } while (!ok);
}
#endif

#if KST_WGMMA
/* named barriers 1 and 2 of N threads (0 is __syncthreads; the ids are immediates, so that the
 * kernel is known to use 3 barriers): named_sync waits until N threads have reached barrier id by
 * named_sync or named_arrive; named_arrive does not wait */
template <int N>
static __device__ __forceinline__ void named_sync(int id) {
    if (id == 1) asm volatile("bar.sync 1, %0;\n" ::"n"(N) : "memory");
    else asm volatile("bar.sync 2, %0;\n" ::"n"(N) : "memory");
}
template <int N>
static __device__ __forceinline__ void named_arrive(int id) {
    if (id == 1) asm volatile("bar.arrive 1, %0;\n" ::"n"(N) : "memory");
    else asm volatile("bar.arrive 2, %0;\n" ::"n"(N) : "memory");
}
#endif

/* PP = 1 (KESTREL_GPU_ATT=6): ping-pong of the two warpgroups (as FlashAttention-3): each product
 * (Q K^T, P V) is issued only in a warpgroup's turn, the turns alternating by named barriers 1
 * (warpgroup 0's) and 2 (warpgroup 1's), so that one warpgroup's softmax runs while the other's
 * products keep the tensor cores busy. */
template <int PP>
__global__ void __launch_bounds__(WG_THREADS, 2)
attention_wg128_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *qkv, const int *valid, int T, int C, int NH) {
#if KST_WGMMA
    typedef wg128_smem L;
    constexpr int NS = WG128_NS, QR = WG_QR, NT = WG_THREADS, KT = WG128_KT;
    extern __shared__ unsigned char wg_smem_raw[];
    unsigned char *sm = wg_smem_raw + ((1024 - (smem_u32(wg_smem_raw) & 1023)) & 1023);
    const uint32_t sb = smem_u32(sm);
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int t = lane & 3;
    const int q0 = blockIdx.x * QR, h = blockIdx.y, b = blockIdx.z;
    int Lv = valid[b];
    if (Lv > T) Lv = T;
    if (Lv < 1) Lv = 1;
    const int ntiles = (Lv + KT - 1) / KT;
    const __nv_bfloat16 *base = qkv + (size_t)b * T * 3 * C + (size_t)h * 64;
    auto load = [&](uint32_t off, int part, int r0, int R, int rows) {
#pragma unroll
        for (int j = 0; j < (R * 8 + NT - 1) / NT; j++) {
            int i = tid + j * NT;
            if (i < R * 8) {
                int r = i >> 3, c = i & 7;
                bool ok = r0 + r < rows;
                const __nv_bfloat16 *src = ok ? base + (size_t)(r0 + r) * 3 * C + (size_t)part * C + c * 8 : base;
                cp_async16(sm + off + sw128(r, c), src, ok ? 16 : 0);
            }
        }
    };
    auto load_tile = [&](int tile) {
        if (tile < ntiles) {
            load(L::k + (tile % NS) * KT * 128, 1, tile * KT, KT, Lv);
            mbar_cp_async_arrive(sb + L::bar + (tile % NS) * 8);
            load(L::v + (tile % NS) * KT * 128, 2, tile * KT, KT, Lv);
            mbar_cp_async_arrive(sb + L::bar + 16 + (tile % NS) * 8);
        }
    };
    float o[32], sc[64];
    uint32_t pa[8][4];
#pragma unroll
    for (int i = 0; i < 32; i++) o[i] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    /* group 0: Q and tile 0; group 1: tile 1; tile kt + 1 goes into the slot of tile kt - 1
     * once every warp has passed step kt's barrier (its P V of tile kt - 1 waited for) */
    if (tid == 0)
        for (int i = 0; i < 4; i++) mbar_init(sb + L::bar + i * 8, NT);
    __syncthreads();
    /* tiles 0 and 1 into the two slots (Q with tile 0's K); tile kt + 1 goes into the slot of
     * tile kt - 1 once every warp is past it. Slot s's barriers complete once a use: tile kt
     * waits for phase (kt / 2) & 1. Each thread waits on the barrier, then orders the copies
     * before the products (async proxy). */
    load(L::q, 0, q0, QR, T);
    load_tile(0);
    load_tile(1);
    /* ping-pong: warpgroup 0 takes the first turn; each turn ends by handing it to the other */
    if (PP && wg == 1) named_arrive<NT>(1);
    for (int kt = 0; kt < ntiles; kt++) {
        if (kt >= 1 && kt + 1 < ntiles) {
            __syncthreads();
            load_tile(kt + 1);
        }
        mbar_wait(sb + L::bar + (kt % NS) * 8, (kt / NS) & 1);
        fence_async_smem();
        const uint32_t ks = sb + L::k + (kt % NS) * KT * 128, vs = sb + L::v + (kt % NS) * KT * 128;
        if (PP) named_sync<NT>(1 + wg);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            wgmma_ss128(sc, wg_desc(sb + L::q + wg * 64 * 128 + kk * 32, 16), wg_desc(ks + kk * 32, 16), kk > 0);
        wg_commit();
        if (PP) named_arrive<NT>(2 - wg);
        wg_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; i++) asm volatile("" : "+f"(sc[i])::"memory");
        wg_online_softmax<KT / 8>(o, sc, pa, m0, m1, l0, l1, kt * KT, Lv, t);
        mbar_wait(sb + L::bar + 16 + (kt % NS) * 8, (kt / NS) & 1);
        fence_async_smem();
        if (PP) named_sync<NT>(1 + wg);
        wg_fence();
#pragma unroll
        for (int jj = 0; jj < 8; jj++) wgmma_rs<1>(o, pa[jj], wg_desc(vs + jj * 16 * 128, 8192));
        wg_commit();
        if (PP) named_arrive<NT>(2 - wg);
        wg_wait<0>();
        reg_fence(o);
#pragma unroll
        for (int i = 0; i < 32; i++) asm volatile("" : "+r"(pa[i >> 2][i & 3])::"memory");
    }
    /* warpgroup 1's last hand-over, so that no arrival is left pending on barrier 1 */
    if (PP && wg == 0) named_sync<NT>(1);
    wg_store_out(out, sm + L::q + wg * 64 * 128, o, l0, l1, warp, lane, q0 + wg * 64, T, (size_t)b * T, C, h);
#endif
}

/* The warp-specialized persistent kernel (the default for 64-dim heads; KESTREL_GPU_ATT=7, 8 with
 * ping-pong), the structure of FlashAttention-3: one block an SM (a grid of at most one block a
 * multiprocessor), each block taking work items (128 query rows of one head) blockIdx.x,
 * blockIdx.x + gridDim.x, ...; 3 warpgroups: warpgroup 0 the producer (one thread issues the bulk
 * tensor copies of Q, K and V tiles; setmaxnreg down to 40 registers), warpgroups 1 and 2 the
 * consumers (64 query rows each, setmaxnreg up to 232). Q in WS_NQ buffers, K and V of 128 keys in a
 * ring of WS_NS stages, each buffer with a full mbarrier (the copy's bytes) and an empty one (one
 * arrival a consumer warp), so the loads of the next tiles and items run while the consumers
 * compute. Inside a consumer (as FlashAttention-3), tile kt's Q K^T and tile kt - 1's P V are
 * issued together and the softmax of tile kt runs under that P V; P is packed to bf16 once the P
 * V has completed. PP = 1 (KESTREL_GPU_ATT=8): the two consumers' product issues alternate (named
 * barriers 1 and 2, as attention_wg128_kernel<1>). The tensor map is the
 * QKV buffer as (3 C, T, B) bf16, boxes of 64 x 128 x 1, 128-byte swizzle (rows at or past T read
 * as zeros). Masking as attention_wg_kernel: keys at or past valid[b] get -inf, tiles wholly past
 * it are skipped (their rows below T are read but masked); every query row below T is written. */
#define WS_KT 128
#define WS_NS 4
#define WS_NQ 2
#define WS_THREADS 384
struct ws_smem {
    static constexpr uint32_t tile = WS_KT * 128; /* bytes of a 128-row tile */
    static constexpr uint32_t q = 0, k = WS_NQ * tile, v = k + WS_NS * tile;
    /* mbarriers: Q full / empty, K full / empty, V full / empty */
    static constexpr uint32_t qf = v + WS_NS * tile, qe = qf + 8 * WS_NQ, kf = qe + 8 * WS_NQ, ke = kf + 8 * WS_NS,
                              vf = ke + 8 * WS_NS, ve = vf + 8 * WS_NS;
    static constexpr size_t bytes = ve + 8 * WS_NS + 1024;
};
#define WS_SMEM_BYTES ws_smem::bytes

#if KST_WGMMA
static __device__ __forceinline__ void mbar_arrive(uint32_t a) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
}
static __device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes) : "memory");
}
/* box (x, y, z) of the tensor map into shared memory at dst, completing on mbarrier bar */
static __device__ __forceinline__ void tma_load3(uint32_t dst, const void *map, int x, int y, int z, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
                 "[%5];\n" ::"r"(dst),
                 "l"(map), "r"(x), "r"(y), "r"(z), "r"(bar)
                 : "memory");
}
#endif

template <int PP>
__global__ void __launch_bounds__(WS_THREADS, 1)
attention_ws_kernel(const __grid_constant__ CUtensorMap map, __nv_bfloat16 *out, const int *valid, int T, int C,
                    int NH, int B) {
#if KST_WGMMA
    typedef ws_smem L;
    constexpr int NS = WS_NS, NQ = WS_NQ, KT = WS_KT;
    extern __shared__ unsigned char wg_smem_raw[];
    unsigned char *sm = wg_smem_raw + ((1024 - (smem_u32(wg_smem_raw) & 1023)) & 1023);
    const uint32_t sb = smem_u32(sm);
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int nq = (T + KT - 1) / KT, nitems = nq * NH * B;
    if (tid == 0) {
        for (int i = 0; i < NQ; i++) {
            mbar_init(sb + L::qf + 8 * i, 1);
            mbar_init(sb + L::qe + 8 * i, 8);
        }
        for (int i = 0; i < NS; i++) {
            mbar_init(sb + L::kf + 8 * i, 1);
            mbar_init(sb + L::ke + 8 * i, 8);
            mbar_init(sb + L::vf + 8 * i, 1);
            mbar_init(sb + L::ve + 8 * i, 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (wg == 0) {
        /* the producer: phases of the empty barriers start at 1, so the first wait on each passes */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (tid == 0) {
            int kit = 0, qit = 0;
            for (int item = blockIdx.x; item < nitems; item += gridDim.x, qit++) {
                const int qt = item % nq, h = (item / nq) % NH, b = item / (nq * NH);
                int Lv = valid[b];
                if (Lv > T) Lv = T;
                if (Lv < 1) Lv = 1;
                const int ntiles = (Lv + KT - 1) / KT, qb = qit % NQ;
                mbar_wait(sb + L::qe + 8 * qb, ((qit / NQ) & 1) ^ 1);
                mbar_expect_tx(sb + L::qf + 8 * qb, L::tile);
                tma_load3(sb + L::q + qb * L::tile, &map, h * 64, qt * KT, b, sb + L::qf + 8 * qb);
                for (int kt = 0; kt < ntiles; kt++, kit++) {
                    const int st = kit % NS, ph = ((kit / NS) & 1) ^ 1;
                    mbar_wait(sb + L::ke + 8 * st, ph);
                    mbar_expect_tx(sb + L::kf + 8 * st, L::tile);
                    tma_load3(sb + L::k + st * L::tile, &map, C + h * 64, kt * KT, b, sb + L::kf + 8 * st);
                    mbar_wait(sb + L::ve + 8 * st, ph);
                    mbar_expect_tx(sb + L::vf + 8 * st, L::tile);
                    tma_load3(sb + L::v + st * L::tile, &map, 2 * C + h * 64, kt * KT, b, sb + L::vf + 8 * st);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        const int cw = wg - 1, t = lane & 3;
        constexpr int NC = 256; /* consumer threads (the named barriers' count) */
        float o[32], sc[64];
        uint32_t pa[8][4];
        int kit = 0, qit = 0;
        /* ping-pong: consumer 0 takes the first turn; each turn ends by handing it to the other */
        if (PP && cw == 1) named_arrive<NC>(1);
        auto issue_s = [&](uint32_t q, int st) {
            const uint32_t ks = sb + L::k + st * L::tile;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wgmma_ss128(sc, wg_desc(q + kk * 32, 16), wg_desc(ks + kk * 32, 16), kk > 0);
            wg_commit();
        };
        auto issue_pv = [&](int st) {
            const uint32_t vs = sb + L::v + st * L::tile;
            wg_fence();
#pragma unroll
            for (int jj = 0; jj < 8; jj++) wgmma_rs<1>(o, pa[jj], wg_desc(vs + jj * 16 * 128, 8192));
            wg_commit();
        };
        auto release = [&](uint32_t bar) { /* this warp is done with the buffer of mbarrier bar */
            __syncwarp();
            if (lane == 0) mbar_arrive(bar);
        };
        for (int item = blockIdx.x; item < nitems; item += gridDim.x, qit++) {
            const int qt = item % nq, h = (item / nq) % NH, b = item / (nq * NH);
            int Lv = valid[b];
            if (Lv > T) Lv = T;
            if (Lv < 1) Lv = 1;
            const int ntiles = (Lv + KT - 1) / KT, qb = qit % NQ;
            const uint32_t q = sb + L::q + qb * L::tile + cw * 64 * 128;
            float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f, al0, al1;
            mbar_wait(sb + L::qf + 8 * qb, (qit / NQ) & 1);
            /* tile 0: Q K^T, softmax (O starts at 0: no rescale) */
            int st = kit % NS, ph = (kit / NS) & 1;
            mbar_wait(sb + L::kf + 8 * st, ph);
            if (PP) named_sync<NC>(1 + cw);
            issue_s(q, st);
            if (PP) named_arrive<NC>(2 - cw);
            wg_wait<0>();
#pragma unroll
            for (int i = 0; i < 64; i++) asm volatile("" : "+f"(sc[i])::"memory");
            release(sb + L::ke + 8 * st);
            wg_softmax_x<KT / 8>(sc, m0, m1, l0, l1, 0, Lv, t, al0, al1);
            wg_wait<0>();
            reg_fence(o);
#pragma unroll
            for (int i = 0; i < 32; i++) asm volatile("" : "+r"(pa[i >> 2][i & 3])::"memory");
#pragma unroll
            for (int i = 0; i < 32; i++) o[i] = 0.0f;
            wg_pack<KT / 8>(sc, pa);
            /* tile kt (as FlashAttention-3): its Q K^T issued, O scaled by tile kt - 1's factors and
             * tile kt - 1's P V issued, then the softmax of tile kt under that P V; P packed once
             * the P V has completed */
            for (int kt = 1; kt < ntiles; kt++) {
                const int st1 = (kit + 1) % NS, ph1 = ((kit + 1) / NS) & 1;
                mbar_wait(sb + L::kf + 8 * st1, ph1);
                mbar_wait(sb + L::vf + 8 * st, ph);
                if (PP) named_sync<NC>(1 + cw);
                issue_s(q, st1);
                wg_rescale(o, al0, al1);
                issue_pv(st);
                if (PP) named_arrive<NC>(2 - cw);
                wg_wait<1>();
#pragma unroll
                for (int i = 0; i < 64; i++) asm volatile("" : "+f"(sc[i])::"memory");
                release(sb + L::ke + 8 * st1);
                wg_softmax_x<KT / 8>(sc, m0, m1, l0, l1, kt * KT, Lv, t, al0, al1);
                wg_wait<0>();
                reg_fence(o);
#pragma unroll
                for (int i = 0; i < 32; i++) asm volatile("" : "+r"(pa[i >> 2][i & 3])::"memory");
                release(sb + L::ve + 8 * st);
                wg_pack<KT / 8>(sc, pa);
                kit++;
                st = st1;
                ph = ph1;
            }
            /* the last tile's P V */
            mbar_wait(sb + L::vf + 8 * st, ph);
            wg_rescale(o, al0, al1);
            if (PP) named_sync<NC>(1 + cw);
            issue_pv(st);
            if (PP) named_arrive<NC>(2 - cw);
            wg_wait<0>();
            reg_fence(o);
#pragma unroll
            for (int i = 0; i < 32; i++) asm volatile("" : "+r"(pa[i >> 2][i & 3])::"memory");
            release(sb + L::ve + 8 * st);
            kit++;
            /* O / l out through this consumer's 64 rows of the Q buffer, which then goes back to
             * the producer (generic-proxy accesses ordered before its next bulk copy) */
            wg_store_out(out, sm + L::q + qb * L::tile + cw * 64 * 128, o, l0, l1, warp, lane, qt * KT + cw * 64, T,
                         (size_t)b * T, C, h);
            fence_async_smem();
            release(sb + L::qe + 8 * qb);
        }
        /* consumer 1's last hand-over, so that no arrival is left pending on barrier 1 */
        if (PP && cw == 0) named_sync<NC>(1);
    }
#endif
}

/* The driver's cuTensorMapEncodeTiled through the runtime (no link to libcuda); NULL where the
 * driver lacks it */
static PFN_cuTensorMapEncodeTiled_v12000 ws_encoder(void) {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = NULL;
    static std::once_flag once;
    std::call_once(once, [] {
        void *f = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (PFN_cuTensorMapEncodeTiled_v12000)f;
        else
            cudaGetLastError();
    });
    return fn;
}
/* The tensor map of attention_ws_kernel over the QKV buffer (B, T, 3 C) bf16 (16-byte aligned, C
 * a multiple of 8); 0 on success */
static int ws_tensor_map(CUtensorMap *m, const void *qkv, int B, int T, int C) {
    PFN_cuTensorMapEncodeTiled_v12000 enc = ws_encoder();
    if (!enc) return -1;
    cuuint64_t dims[3] = {(cuuint64_t)3 * C, (cuuint64_t)T, (cuuint64_t)B};
    cuuint64_t strides[2] = {(cuuint64_t)3 * C * 2, (cuuint64_t)T * 3 * C * 2};
    cuuint32_t box[3] = {64, WS_KT, 1}, es[3] = {1, 1, 1};
    CUresult r = enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void *>(qkv), dims, strides, box, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 0 : -1;
}

/* 1 when this build holds the wgmma kernel (compiled for sm_90a) */
__global__ void wgmma_probe_kernel(int *flag) { *flag = KST_WGMMA; }

#endif
