/* gpu_stub.c - the device helpers every build has, and the GPU entry points of a build without
 * CUDA=1: asking for the GPU is a clear error that says how to get it. */
#include "gpu.h"

#include <string.h>

#include "check.h"

int kst_device_parse(const char *s, int *out, kst_error *err) {
    if (s && strcmp(s, "cpu") == 0) {
        *out = KST_DEV_CPU;
        return KST_OK;
    }
    if (s && (strcmp(s, "cuda") == 0 || strcmp(s, "gpu") == 0 || strcmp(s, "cuda:0") == 0)) {
        *out = KST_DEV_CUDA;
        return KST_OK;
    }
    return kst_fail(err, KST_ERR_INVALID, "device \"%s\": expected cpu or cuda", s ? s : "(null)");
}

const char *kst_device_name(int dev) { return dev == KST_DEV_CUDA ? "cuda" : "cpu"; }

#ifndef KST_CUDA
int kst_gpu_check(kst_error *err) {
    return kst_fail(err, KST_ERR_UNSUPPORTED,
                    "device cuda: this kestrel was built without the GPU backend; rebuild with "
                    "`make CUDA=1` (needs the CUDA toolkit: nvcc and cuBLAS) or use --device cpu");
}

const char *kst_gpu_describe(void) { return "no CUDA backend (built without CUDA=1)"; }

int kst_gpu_built(void) { return 0; }
#endif
