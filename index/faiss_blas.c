/* faiss_blas.c - the Fortran BLAS/LAPACK symbols libfaiss.a calls, forwarded to the OpenBLAS
 * that core/blas.c loads at run time.
 *
 * Debian ships only a static libfaiss.a, whose objects call sgemm_, dsyev_, ... by their Fortran
 * names (see `nm -u libfaiss.a`). Kestrel links no BLAS (core/blas.c dlopens OpenBLAS after
 * choosing its kernels), so this file defines those 13 names and forwards each call to the
 * OpenBLAS symbol of the same name, looked up once.
 *
 * Calling convention (gfortran's, which OpenBLAS follows): every argument by pointer, integers are
 * 32-bit (Debian's libopenblas0 is the LP64 build: blasint is int, as FAISS's FINTEGER). FAISS
 * declares these functions without the hidden CHARACTER-length arguments. What the callee expects
 * differs by routine:
 *  - sgemm_, dgemm_, ssyrk_ (and sgetrf_/dgetrf_) are OpenBLAS's own C code (OpenBLAS interface/ sources,
 *    declared in f77blas.h without lengths): they are called exactly as declared there.
 *  - dsyev_, sgesvd_, dgesvd_ come from reference LAPACK compiled by gfortran 12 (they call
 *    lsame_/ilaenv_/xerbla_ Fortran-style): gfortran >= 8 appends one size_t length per CHARACTER
 *    argument after the declared ones. Omitting them is the bug LAPACK and R hit with GCC 9's
 *    sibling-call optimisation (the callee may reuse the caller's stack slots for them), so we
 *    pass them, each 1 (the flags are single characters).
 *  - sgetri_, dgetri_, sgeqrf_, sorgqr_, sgelsd_ have no CHARACTER arguments.
 *
 * The index layer refuses to create or read an index when OpenBLAS cannot be loaded
 * (kst_faiss_blas_ready, called by index/faiss_c.cpp), so these forwarders always find their
 * target; if one ever does not, it reports the symbol on stderr and aborts, since a Fortran BLAS
 * routine has no way to return an error. */
#include "index/faiss_ext.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/blas.h"
#include "core/check.h"

/* ---------------------------------------------------------------------------------------------
 * The symbol table, resolved once
 * ------------------------------------------------------------------------------------------- */

#define KST_FAISS_BLAS_LIST(X) \
    X(sgemm_) X(dgemm_) X(ssyrk_) X(sgetrf_) X(dgetrf_) X(sgetri_) X(dgetri_) X(sgeqrf_) \
    X(sorgqr_) X(sgesvd_) X(dgesvd_) X(dsyev_) X(sgelsd_)

enum {
#define KST_X_ENUM(name) SYM_##name,
    KST_FAISS_BLAS_LIST(KST_X_ENUM)
#undef KST_X_ENUM
    SYM_COUNT
};

static const char *const g_names[SYM_COUNT] = {
#define KST_X_NAME(name) #name,
    KST_FAISS_BLAS_LIST(KST_X_NAME)
#undef KST_X_NAME
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void *g_sym[SYM_COUNT];
static const char *g_missing; /* first symbol not found, NULL when all were */

static void resolve(void) {
    for (int i = 0; i < SYM_COUNT; i++) {
        g_sym[i] = kst_blas_symbol(g_names[i]);
        if (!g_sym[i] && !g_missing) g_missing = g_names[i];
    }
}

int kst_faiss_blas_ready(kst_error *err) {
    pthread_once(&g_once, resolve);
    if (!g_missing) return KST_OK;
    int rc = kst_blas_init(err);
    if (rc != KST_OK) return kst_error_prefix(err, "FAISS needs BLAS/LAPACK");
    return kst_fail(err, KST_ERR_NOTFOUND,
                    "FAISS needs BLAS/LAPACK: the loaded OpenBLAS has no %s", g_missing);
}

static void *target(int which) {
    pthread_once(&g_once, resolve);
    if (!g_sym[which]) {
        fprintf(stderr, "kestrel: libfaiss called %s but OpenBLAS is not loaded or lacks it\n",
                g_names[which]);
        abort();
    }
    return g_sym[which];
}

/* ---------------------------------------------------------------------------------------------
 * Forwarders. Signatures are FAISS 1.7.3's declarations (int return, as f2c), argument for
 * argument; FINTEGER is int.
 * ------------------------------------------------------------------------------------------- */

typedef size_t flen; /* gfortran's hidden CHARACTER length */

/* OpenBLAS C implementations: no hidden lengths. */
typedef void (*gemm_s)(const char *, const char *, int *, int *, int *, const float *,
                       const float *, int *, const float *, int *, float *, float *, int *);
typedef void (*gemm_d)(const char *, const char *, int *, int *, int *, const double *,
                       const double *, int *, const double *, int *, double *, double *, int *);
typedef void (*syrk_s)(const char *, const char *, int *, int *, float *, float *, int *,
                       float *, float *, int *);
typedef void (*getrf_s)(int *, int *, float *, int *, int *, int *);
typedef void (*getrf_d)(int *, int *, double *, int *, int *, int *);
/* Fortran, no CHARACTER arguments. */
typedef void (*getri_s)(int *, float *, int *, int *, float *, int *, int *);
typedef void (*getri_d)(int *, double *, int *, int *, double *, int *, int *);
typedef void (*geqrf_s)(int *, int *, float *, int *, float *, float *, int *, int *);
typedef void (*orgqr_s)(int *, int *, int *, float *, int *, float *, float *, int *, int *);
typedef void (*gelsd_s)(int *, int *, int *, float *, int *, float *, int *, float *, float *,
                        int *, float *, int *, int *, int *);
/* Fortran with CHARACTER arguments: lengths appended. */
typedef void (*gesvd_s)(const char *, const char *, int *, int *, float *, int *, float *,
                        float *, int *, float *, int *, float *, int *, int *, flen, flen);
typedef void (*gesvd_d)(const char *, const char *, int *, int *, double *, int *, double *,
                        double *, int *, double *, int *, double *, int *, int *, flen, flen);
typedef void (*syev_d)(const char *, const char *, int *, double *, int *, double *, double *,
                       int *, int *, flen, flen);

/* Hidden: they are for the libfaiss.a objects linked beside them (in libkestrel.a users' programs
 * or in libkestrel.so), and must not interpose on another BLAS that a process using
 * libkestrel.so links. Static linking resolves hidden symbols across objects as usual. */
#pragma GCC visibility push(hidden)

/* Prototypes, as FAISS declares them. */
int sgemm_(const char *transa, const char *transb, int *m, int *n, int *k, const float *alpha,
           const float *a, int *lda, const float *b, int *ldb, float *beta, float *c, int *ldc);
int dgemm_(const char *transa, const char *transb, int *m, int *n, int *k, const double *alpha,
           const double *a, int *lda, const double *b, int *ldb, double *beta, double *c,
           int *ldc);
int ssyrk_(const char *uplo, const char *trans, int *n, int *k, float *alpha, float *a, int *lda,
           float *beta, float *c, int *ldc);
int sgetrf_(int *m, int *n, float *a, int *lda, int *ipiv, int *info);
int dgetrf_(int *m, int *n, double *a, int *lda, int *ipiv, int *info);
int sgetri_(int *n, float *a, int *lda, int *ipiv, float *work, int *lwork, int *info);
int dgetri_(int *n, double *a, int *lda, int *ipiv, double *work, int *lwork, int *info);
int sgeqrf_(int *m, int *n, float *a, int *lda, float *tau, float *work, int *lwork, int *info);
int sorgqr_(int *m, int *n, int *k, float *a, int *lda, float *tau, float *work, int *lwork,
            int *info);
int sgelsd_(int *m, int *n, int *nrhs, float *a, int *lda, float *b, int *ldb, float *s,
            float *rcond, int *rank, float *work, int *lwork, int *iwork, int *info);
int sgesvd_(const char *jobu, const char *jobvt, int *m, int *n, float *a, int *lda, float *s,
            float *u, int *ldu, float *vt, int *ldvt, float *work, int *lwork, int *info);
int dgesvd_(const char *jobu, const char *jobvt, int *m, int *n, double *a, int *lda, double *s,
            double *u, int *ldu, double *vt, int *ldvt, double *work, int *lwork, int *info);
int dsyev_(const char *jobz, const char *uplo, int *n, double *a, int *lda, double *w,
           double *work, int *lwork, int *info);

int sgemm_(const char *transa, const char *transb, int *m, int *n, int *k, const float *alpha,
           const float *a, int *lda, const float *b, int *ldb, float *beta, float *c, int *ldc) {
    ((gemm_s)target(SYM_sgemm_))(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return 0;
}

int dgemm_(const char *transa, const char *transb, int *m, int *n, int *k, const double *alpha,
           const double *a, int *lda, const double *b, int *ldb, double *beta, double *c,
           int *ldc) {
    ((gemm_d)target(SYM_dgemm_))(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return 0;
}

int ssyrk_(const char *uplo, const char *trans, int *n, int *k, float *alpha, float *a, int *lda,
           float *beta, float *c, int *ldc) {
    ((syrk_s)target(SYM_ssyrk_))(uplo, trans, n, k, alpha, a, lda, beta, c, ldc);
    return 0;
}

int sgetrf_(int *m, int *n, float *a, int *lda, int *ipiv, int *info) {
    ((getrf_s)target(SYM_sgetrf_))(m, n, a, lda, ipiv, info);
    return 0;
}

int dgetrf_(int *m, int *n, double *a, int *lda, int *ipiv, int *info) {
    ((getrf_d)target(SYM_dgetrf_))(m, n, a, lda, ipiv, info);
    return 0;
}

int sgetri_(int *n, float *a, int *lda, int *ipiv, float *work, int *lwork, int *info) {
    ((getri_s)target(SYM_sgetri_))(n, a, lda, ipiv, work, lwork, info);
    return 0;
}

int dgetri_(int *n, double *a, int *lda, int *ipiv, double *work, int *lwork, int *info) {
    ((getri_d)target(SYM_dgetri_))(n, a, lda, ipiv, work, lwork, info);
    return 0;
}

int sgeqrf_(int *m, int *n, float *a, int *lda, float *tau, float *work, int *lwork, int *info) {
    ((geqrf_s)target(SYM_sgeqrf_))(m, n, a, lda, tau, work, lwork, info);
    return 0;
}

int sorgqr_(int *m, int *n, int *k, float *a, int *lda, float *tau, float *work, int *lwork,
            int *info) {
    ((orgqr_s)target(SYM_sorgqr_))(m, n, k, a, lda, tau, work, lwork, info);
    return 0;
}

int sgelsd_(int *m, int *n, int *nrhs, float *a, int *lda, float *b, int *ldb, float *s,
            float *rcond, int *rank, float *work, int *lwork, int *iwork, int *info) {
    ((gelsd_s)target(SYM_sgelsd_))(m, n, nrhs, a, lda, b, ldb, s, rcond, rank, work, lwork, iwork,
                                   info);
    return 0;
}

int sgesvd_(const char *jobu, const char *jobvt, int *m, int *n, float *a, int *lda, float *s,
            float *u, int *ldu, float *vt, int *ldvt, float *work, int *lwork, int *info) {
    ((gesvd_s)target(SYM_sgesvd_))(jobu, jobvt, m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork,
                                   info, 1, 1);
    return 0;
}

int dgesvd_(const char *jobu, const char *jobvt, int *m, int *n, double *a, int *lda, double *s,
            double *u, int *ldu, double *vt, int *ldvt, double *work, int *lwork, int *info) {
    ((gesvd_d)target(SYM_dgesvd_))(jobu, jobvt, m, n, a, lda, s, u, ldu, vt, ldvt, work, lwork,
                                   info, 1, 1);
    return 0;
}

int dsyev_(const char *jobz, const char *uplo, int *n, double *a, int *lda, double *w,
           double *work, int *lwork, int *info) {
    ((syev_d)target(SYM_dsyev_))(jobz, uplo, n, a, lda, w, work, lwork, info, 1, 1);
    return 0;
}

#pragma GCC visibility pop
