/* blas.c - OpenBLAS through dlopen, with its kernel set chosen from the CPU's features. */
#include "blas.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* cblas enums: RowMajor = 101, NoTrans = 111, Trans = 112 */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*threads_fn)(int);
typedef char *(*corename_fn)(void);

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static sgemm_fn g_sgemm;
static threads_fn g_threads;
static corename_fn g_corename;
static char g_error[KST_ERROR_MSG_MAX];
static void *g_handle;

static const char *preferred_core(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
    return NULL;
}

static void load(void) {
    static const char *names[] = {
        "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0", "libopenblas.so.0",
        "libopenblas.so"};
    void *h = NULL;
    /* An OpenBLAS the process already has is initialised: use it as it is. */
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !h; i++)
        h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h) {
        const char *core = preferred_core();
        if (core && !getenv("OPENBLAS_CORETYPE")) setenv("OPENBLAS_CORETYPE", core, 0);
        for (size_t i = 0; i < sizeof names / sizeof names[0] && !h; i++)
            h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    }
    if (!h) {
        snprintf(g_error, sizeof g_error,
                 "cannot load OpenBLAS (libopenblas.so.0: %s); install libopenblas0-openmp "
                 "(make deps)", dlerror());
        return;
    }
    g_handle = h;
    g_sgemm = (sgemm_fn)dlsym(h, "cblas_sgemm");
    g_threads = (threads_fn)dlsym(h, "openblas_set_num_threads");
    g_corename = (corename_fn)dlsym(h, "openblas_get_corename");
    if (!g_sgemm) snprintf(g_error, sizeof g_error, "libopenblas.so.0 has no cblas_sgemm");
}

int kst_blas_init(kst_error *err) {
    pthread_once(&g_once, load);
    if (!g_sgemm) return kst_fail(err, KST_ERR_NOTFOUND, "%s", g_error);
    return KST_OK;
}

const char *kst_blas_core(void) {
    pthread_once(&g_once, load);
    return g_corename ? g_corename() : "portable";
}

void *kst_blas_symbol(const char *name) {
    pthread_once(&g_once, load);
    return g_handle ? dlsym(g_handle, name) : NULL;
}

void kst_blas_set_threads(int n) {
    pthread_once(&g_once, load);
    if (g_threads && n > 0) g_threads(n);
}

/* The portable fallback: correct, unblocked, only for machines without OpenBLAS. */
static void sgemm_portable(int ta, int tb, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0;
            for (int k = 0; k < K; k++) {
                float a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                s += a * b;
            }
            C[(size_t)i * ldc + j] = alpha * s + (beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j]);
        }
}

void kst_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
               int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    pthread_once(&g_once, load);
    if (g_sgemm)
        g_sgemm(101, trans_a ? 112 : 111, trans_b ? 112 : 111, M, N, K, alpha, A, lda, B, ldb,
                beta, C, ldc);
    else
        sgemm_portable(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
