/* gpu.h - the CUDA backend's entry points that every layer shares: which device a caller asked
 * for, whether this build and machine can serve it, and what the GPU is.
 *
 * Built with `make CUDA=1` the functions talk to the CUDA runtime (core/gpu.cu); otherwise they
 * come from core/gpu_stub.c and asking for the GPU is a clear KST_ERR_UNSUPPORTED error that says
 * how to get it. Every GPU feature keeps its CPU twin, which gives the same results within the
 * precision the GPU path uses. */
#ifndef KST_CORE_GPU_H
#define KST_CORE_GPU_H

#include "error.h"

/* Devices (also the values of kst_model_opts.device / kst_index_opts.device in kestrel.h). */
enum { KST_DEV_CPU = 0, KST_DEV_CUDA = 1 };

/* Parses "cpu" or "cuda" (also "gpu", "cuda:0") into *out. Errors name the string and the
 * accepted values. */
int kst_device_parse(const char *s, int *out, kst_error *err);
/* "cpu" or "cuda". */
const char *kst_device_name(int dev);

/* KST_OK when this build has the GPU backend and a CUDA device of compute capability 9.0 or
 * newer answers. Otherwise KST_ERR_UNSUPPORTED with why: built without CUDA=1 (rebuild with
 * `make CUDA=1`), no CUDA device, or the driver's own message. */
int kst_gpu_check(kst_error *err);

/* "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79 GiB, CUDA runtime 13000" once a device answered,
 * "CUDA backend built, no device" or "no CUDA backend (built without CUDA=1)". */
const char *kst_gpu_describe(void);

/* 1 when built with CUDA=1. */
int kst_gpu_built(void);

#endif
