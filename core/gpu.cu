/* gpu.cu - the CUDA device: found once, described, and failures turned into kst_error values. */
#include "core/gpu_util.cuh"

#include <mutex>
#include <stdio.h>

static std::once_flag g_once;
static cudaError_t g_err = cudaSuccess;
static int g_ndev = 0;
static cudaDeviceProp g_prop;
static char g_desc[320] = "CUDA backend built, no device";

static void probe(void) {
    g_err = cudaGetDeviceCount(&g_ndev);
    if (g_err != cudaSuccess || g_ndev == 0) return;
    g_err = cudaGetDeviceProperties(&g_prop, 0);
    if (g_err != cudaSuccess) return;
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    snprintf(g_desc, sizeof g_desc, "%.120s, sm_%d%d, %d SMs, %.0f GiB, CUDA runtime %d", g_prop.name,
             g_prop.major, g_prop.minor, g_prop.multiProcessorCount,
             (double)g_prop.totalGlobalMem / (1 << 30), rt);
}

extern "C" int kst_gpu_check(kst_error *err) {
    std::call_once(g_once, probe);
    if (g_err != cudaSuccess)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "device cuda: no usable CUDA device (%s: %s)",
                        cudaGetErrorName(g_err), cudaGetErrorString(g_err));
    if (g_ndev == 0)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "device cuda: no CUDA device on this machine");
    if (g_prop.major < 9)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "device cuda: %s is compute capability %d.%d; this build targets sm_90 "
                        "(H100/H200): rebuild with NVCC_ARCH=sm_%d%d",
                        g_prop.name, g_prop.major, g_prop.minor, g_prop.major, g_prop.minor);
    return KST_OK;
}

extern "C" const char *kst_gpu_describe(void) {
    std::call_once(g_once, probe);
    return g_desc;
}

extern "C" int kst_gpu_built(void) { return 1; }

const cudaDeviceProp *kst_gpu_props(void) {
    std::call_once(g_once, probe);
    return &g_prop;
}

int kst_cuda_fail(kst_error *err, cudaError_t e, const char *what) {
    int code = e == cudaErrorMemoryAllocation ? KST_ERR_NOMEM : KST_ERR_INTERNAL;
    return kst_fail(err, code, "GPU: %s failed: %s (%s)", what, cudaGetErrorString(e),
                    cudaGetErrorName(e));
}

int kst_cublas_fail(kst_error *err, cublasStatus_t s, const char *what) {
    int code = s == CUBLAS_STATUS_ALLOC_FAILED ? KST_ERR_NOMEM : KST_ERR_INTERNAL;
    return kst_fail(err, code, "GPU: %s failed: %s (%s)", what, cublasGetStatusString(s),
                    cublasGetStatusName(s));
}

int kst_gpu_alloc(void **p, size_t bytes, const char *what, kst_error *err) {
    *p = NULL;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *p = NULL;
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        return kst_fail(err, e == cudaErrorMemoryAllocation ? KST_ERR_NOMEM : KST_ERR_INTERNAL,
                        "GPU: cannot allocate %.1f MiB for %s (%.1f MiB free of %.1f): %s",
                        bytes / 1048576.0, what, fr / 1048576.0, tot / 1048576.0,
                        cudaGetErrorString(e));
    }
    return KST_OK;
}
