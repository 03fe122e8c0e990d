/* gemm.cuh - CUTLASS 4 sm90 products for the LayerNorm-fold benchmark (bench_cutlass_gemm.cu):
 * D (M, N) = epilogue(A (M, K) @ W (N, K)^T), bf16 in and out, float32 accumulation, on the TMA
 * warp-specialized kernels (cooperative or ping-pong), epilogues as visitor trees:
 *   EPI_BIAS   D = acc + b[n]
 *   EPI_NORM   D = r[m] acc + q[m] c[n] + b[n]          (q = -mu r: LayerNorm applied after the product)
 *   EPI_NORMG  D = gelu(r[m] acc + q[m] c[n] + b[n])
 *   EPI_RES    D = acc + (S[m,n] r[m] + q[m]) g[n] + b[n]  (residual LN(S) rebuilt from S and its stats)
 *   EPI_RESST  EPI_RES, and sum[m] += sum_n D, sq[m] += sum_n D^2 (float atomics)
 * Row vectors (r, q, sum, sq) float32 per token; column vectors (b, c, g) float32 per feature. */
#pragma once
#include <cuda_runtime.h>

enum { EPI_BIAS, EPI_NORM, EPI_NORMG, EPI_RES, EPI_RESST };
enum { SCHED_COOP, SCHED_PING, SCHED_COOPN };

struct cg_args {
    int M, N, K;
    const void *A, *W; /* bf16 (M, K), (N, K) */
    void *D;           /* bf16 (M, N) */
    const void *S;     /* bf16 (M, N): EPI_RES / EPI_RESST */
    const float *r, *q, *b, *c, *g;
    float *sum, *sq;
};

/* runs one product; returns 0, or -1 when CUTLASS refuses it (can_implement / initialize) */
#define CG_DECL(epi, sched) int cg_run_##epi##_##sched(const cg_args *a, void *ws, size_t ws_bytes, cudaStream_t s)
CG_DECL(0, 0); CG_DECL(1, 0); CG_DECL(2, 0); CG_DECL(3, 0); CG_DECL(4, 0);
CG_DECL(0, 1); CG_DECL(1, 1); CG_DECL(2, 1); CG_DECL(3, 1); CG_DECL(4, 1);
CG_DECL(0, 2); CG_DECL(1, 2); CG_DECL(2, 2); CG_DECL(3, 2); CG_DECL(4, 2);

#ifdef CG_IMPL
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace cg {
using namespace cute;
namespace fus = cutlass::epilogue::fusion;
using bf = cutlass::bfloat16_t;
constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;

__device__ __forceinline__ float gelu_tanh(float z) {
    float t = cutlass::fast_tanh(z * (0.7978845608028654f + 0.0356774081363001f * z * z));
    return 0.5f * (z + z * t);
}

/* r acc + q c + b [then GELU] (T: cutlass::Array<float, N>) */
template <class T> struct FoldNorm {
    CUTLASS_HOST_DEVICE T operator()(T const &a, T const &r, T const &q, T const &c, T const &b) const {
        T o;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < T::kElements; i++) o[i] = fmaf(r[i], a[i], fmaf(q[i], c[i], b[i]));
        return o;
    }
};
template <class T> struct FoldNormGelu {
    CUTLASS_HOST_DEVICE T operator()(T const &a, T const &r, T const &q, T const &c, T const &b) const {
        T o;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < T::kElements; i++) o[i] = gelu_tanh(fmaf(r[i], a[i], fmaf(q[i], c[i], b[i])));
        return o;
    }
};
/* acc + (s r + q) g + b */
template <class T> struct FoldRes {
    CUTLASS_HOST_DEVICE T operator()(T const &a, T const &s, T const &r, T const &q, T const &g, T const &b) const {
        T o;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < T::kElements; i++) o[i] = a[i] + fmaf(fmaf(s[i], r[i], q[i]), g[i], b[i]);
        return o;
    }
};
template <class T> struct Plus {
    CUTLASS_HOST_DEVICE T operator()(T const &a, T const &b) const {
        T o;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < T::kElements; i++) o[i] = a[i] + b[i];
        return o;
    }
};
/* register-level reduction of squares: acc + x^2 */
template <class T> struct PlusSq {
    CUTLASS_HOST_DEVICE T operator()(T const &a, T const &x) const { return a + x * x; }
};

template <class Tile> using RowV = fus::Sm90RowBroadcast<0, Tile, float, float>;
template <class Tile> using ColV = fus::Sm90ColBroadcast<0, Tile, float, float>;
template <class Tile, template <class> class Reg>
using ColSum = fus::Sm90ColReduction<Reg, cutlass::plus, cutlass::atomic_add, 0, Tile, float, float, RN>;

template <int EPI, class Tile> struct Fusion;
template <class Tile> struct Fusion<EPI_BIAS, Tile> {
    using T = fus::Sm90EVT<fus::Sm90Compute<Plus, bf, float, RN>, fus::Sm90AccFetch, RowV<Tile>>;
    static typename T::Arguments args(const cg_args *a) { return {{}, {a->b}, {}}; }
};
template <class Tile> struct Fusion<EPI_NORM, Tile> {
    using T = fus::Sm90EVT<fus::Sm90Compute<FoldNorm, bf, float, RN>, fus::Sm90AccFetch, ColV<Tile>, ColV<Tile>,
                           RowV<Tile>, RowV<Tile>>;
    static typename T::Arguments args(const cg_args *a) { return {{}, {a->r}, {a->q}, {a->c}, {a->b}, {}}; }
};
template <class Tile> struct Fusion<EPI_NORMG, Tile> {
    using T = fus::Sm90EVT<fus::Sm90Compute<FoldNormGelu, bf, float, RN>, fus::Sm90AccFetch, ColV<Tile>,
                           ColV<Tile>, RowV<Tile>, RowV<Tile>>;
    static typename T::Arguments args(const cg_args *a) { return {{}, {a->r}, {a->q}, {a->c}, {a->b}, {}}; }
};
template <class Tile> struct Fusion<EPI_RES, Tile> {
    using T = fus::Sm90EVT<fus::Sm90Compute<FoldRes, bf, float, RN>, fus::Sm90AccFetch, fus::Sm90SrcFetch<bf>,
                           ColV<Tile>, ColV<Tile>, RowV<Tile>, RowV<Tile>>;
    static typename T::Arguments args(const cg_args *a) { return {{}, {}, {a->r}, {a->q}, {a->g}, {a->b}, {}}; }
};
template <class Tile> struct Fusion<EPI_RESST, Tile> {
    using Inner = fus::Sm90EVT<fus::Sm90Compute<FoldRes, float, float, RN>, fus::Sm90AccFetch, fus::Sm90SrcFetch<bf>,
                               ColV<Tile>, ColV<Tile>, RowV<Tile>, RowV<Tile>>;
    using T = fus::Sm90EVT<fus::Sm90Compute<cutlass::epilogue::thread::Identity, bf, float, RN>,
                           fus::Sm90EVT<ColSum<Tile, cutlass::plus>, fus::Sm90EVT<ColSum<Tile, PlusSq>, Inner>>>;
    static typename T::Arguments args(const cg_args *a) {
        return {{{{{}, {}, {a->r}, {a->q}, {a->g}, {a->b}, {}}, {a->sq}}, {a->sum}}, {}};
    }
};

template <int SCHED> struct Sched;
template <> struct Sched<SCHED_COOP> {
    using Tile = Shape<_256, _128, _64>;
    using Cluster = Shape<_1, _2, _1>;
    using K = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
    using E = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
template <> struct Sched<SCHED_PING> {
    using Tile = Shape<_128, _128, _64>;
    using Cluster = Shape<_1, _2, _1>;
    using K = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
    using E = cutlass::epilogue::TmaWarpSpecialized;
};

template <> struct Sched<SCHED_COOPN> {
    using Tile = Shape<_128, _256, _64>;
    using Cluster = Shape<_2, _1, _1>;
    using K = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
    using E = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

template <class S> static S packed(int64_t ld, int64_t batch) {
    S s{};
    cute::get<0>(s) = ld;
    cute::get<2>(s) = batch;
    return s;
}

template <int EPI, int SCHED> struct Gemm {
    using S = Sched<SCHED>;
    using F = Fusion<EPI, typename S::Tile>;
    using LA = cutlass::layout::RowMajor;    /* A (M, K), K contiguous */
    using LB = cutlass::layout::ColumnMajor; /* W (N, K) row-major is B (K, N) column-major */
    using LC = cutlass::layout::RowMajor;
    using EC = cute::conditional_t<EPI == EPI_RES || EPI == EPI_RESST, bf, void>;
    using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename S::Tile, typename S::Cluster,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, EC, LC, 8, bf, LC, 8, typename S::E,
        typename F::T>::CollectiveOp;
    using Main = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf, LA, 8, bf, LB, 8, float, typename S::Tile,
        typename S::Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
        typename S::K>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi>;
    using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    static int run(const cg_args *a, void *ws, size_t ws_bytes, cudaStream_t s) {
        using SA = typename Kernel::StrideA;
        using SB = typename Kernel::StrideB;
        using SC = typename Kernel::StrideC;
        using SD = typename Kernel::StrideD;
        /* all row-major in their (rows, K or N) shape: (ld, 1, rows * ld) */
        SA sa = packed<SA>(a->K, (int64_t)a->M * a->K);
        SB sb = packed<SB>(a->K, (int64_t)a->N * a->K);
        SC sc = packed<SC>(a->N, (int64_t)a->M * a->N);
        SD sd = packed<SD>(a->N, (int64_t)a->M * a->N);
        typename Op::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                    {a->M, a->N, a->K, 1},
                                    {(const bf *)a->A, sa, (const bf *)a->W, sb},
                                    {F::args(a), (const bf *)a->S, sc, (bf *)a->D, sd}};
        Op op;
        if (op.can_implement(args) != cutlass::Status::kSuccess) return -1;
        if (Op::get_workspace_size(args) > ws_bytes) return -2;
        if (op.initialize(args, ws, s) != cutlass::Status::kSuccess) return -3;
        return op.run(s) == cutlass::Status::kSuccess ? 0 : -4;
    }
};
} // namespace cg

#define CG_DEF(epi, sched)                                                                                   \
    CG_DECL(epi, sched) { return cg::Gemm<epi, sched>::run(a, ws, ws_bytes, s); }
#endif
