/* blas.h - OpenBLAS, loaded at first use so that its CPU kernels suit this machine.
 *
 * Debian's OpenBLAS 0.3.21 does not recognise recent Xeons (Sapphire/Emerald Rapids) and falls
 * back to its generic SSE3 kernels, about 5x slower. OpenBLAS picks its kernels once, when it is
 * loaded, from OPENBLAS_CORETYPE; so Kestrel loads it itself (dlopen) and, when the variable is
 * unset, first sets it from the CPU's features: SkylakeX on AVX-512 machines, Haswell on AVX2.
 * A value the user set is never changed, and an OpenBLAS already loaded in the process is used
 * as it is. */
#ifndef KST_CORE_BLAS_H
#define KST_CORE_BLAS_H

#include "error.h"

/* Loads OpenBLAS once (thread-safe). Fails with a message naming the library and the package to
 * install when it cannot be loaded; kst_sgemm then still works through a slow portable loop. */
int kst_blas_init(kst_error *err);

/* Row-major C (M, N) = alpha * op(A) (M, K) @ op(B) (K, N) + beta * C, as cblas_sgemm. */
void kst_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
               int lda, const float *B, int ldb, float beta, float *C, int ldc);

/* The kernel set OpenBLAS chose ("SkylakeX", "Prescott", ...), or "portable" without OpenBLAS. */
const char *kst_blas_core(void);
/* Any symbol of the loaded OpenBLAS (e.g. "sgemm_" for the FAISS binding), or NULL. */
void *kst_blas_symbol(const char *name);

/* Threads OpenBLAS may use (0: its default). */
void kst_blas_set_threads(int n);

#endif
