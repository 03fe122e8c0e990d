/* gpu_util.cuh - what the .cu files share (built only with CUDA=1): turning CUDA and cuBLAS
 * failures into kst_error values, and the process-wide device state. */
#ifndef KST_CORE_GPU_UTIL_CUH
#define KST_CORE_GPU_UTIL_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "core/check.h"
#include "core/gpu.h"
}

/* Fills err with what failed (`what`: the call, in words) and CUDA's message. */
int kst_cuda_fail(kst_error *err, cudaError_t e, const char *what);
int kst_cublas_fail(kst_error *err, cublasStatus_t s, const char *what);

/* Runs a CUDA call; on failure fills err and jumps to done with rc set. */
#define CU_TRY(call, what)                                                   \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess) {                                             \
            rc = kst_cuda_fail(err, e_, what);                               \
            goto done;                                                       \
        }                                                                    \
    } while (0)
#define CUBLAS_TRY(call, what)                                               \
    do {                                                                     \
        cublasStatus_t s_ = (call);                                          \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                   \
            rc = kst_cublas_fail(err, s_, what);                             \
            goto done;                                                       \
        }                                                                    \
    } while (0)
/* After a kernel launch: the launch's own error. */
#define CU_LAUNCHED(what) CU_TRY(cudaGetLastError(), what)

/* Device properties read once (kst_gpu_check must have succeeded). */
const cudaDeviceProp *kst_gpu_props(void);

/* cudaMalloc with a message naming what and how much on failure. */
int kst_gpu_alloc(void **p, size_t bytes, const char *what, kst_error *err);

#endif
