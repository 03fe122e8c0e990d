/* blas_coretype.c - proposed start-up fix for the CLI (api/cli/main.c): when OpenBLAS's
 * DYNAMIC_ARCH build does not recognise the CPU it falls back to its generic "Prescott" (SSE3)
 * kernels. Debian 12's OpenBLAS 0.3.21 does that on this machine's Xeon (family 6, model 207,
 * AVX-512 + AVX512-BF16): sgemm at the encoder's shapes runs 2-5x slower than with the
 * Cooperlake/SkylakeX kernels (see `make bench`, the "what if OPENBLAS_CORETYPE" row).
 * OpenBLAS picks its kernels in a constructor, before main(), so the only fix from inside the
 * program is to set OPENBLAS_CORETYPE and re-exec once. Libraries embedding libkestrel should
 * document OPENBLAS_CORETYPE instead (or link a newer OpenBLAS that knows the CPU).
 *
 * usage in main(): kst_blas_fix_coretype(argv); (returns only when nothing needs doing or on
 * failure, in which case the program simply runs with the fallback kernels). */
#define _DEFAULT_SOURCE
#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

void kst_blas_fix_coretype(char **argv) {
    if (getenv("OPENBLAS_CORETYPE")) return; /* the user chose, or we already re-executed */
    const char *core = openblas_get_corename();
    if (!core || (strcasecmp(core, "prescott") != 0 && strcasecmp(core, "core2") != 0 &&
                  strcasecmp(core, "nehalem") != 0 && strcasecmp(core, "katmai") != 0))
        return; /* OpenBLAS recognised the CPU */
    __builtin_cpu_init();
    const char *want = NULL;
    if (__builtin_cpu_supports("avx512bf16")) want = "Cooperlake";
    else if (__builtin_cpu_supports("avx512f")) want = "SkylakeX";
    else if (__builtin_cpu_supports("avx2")) want = "Haswell";
    if (!want) return;
    if (setenv("OPENBLAS_CORETYPE", want, 1) != 0) return;
    execv("/proc/self/exe", argv); /* returns only on failure: keep running as we are */
}

#ifdef KST_BLAS_CORETYPE_DEMO
#include <stdio.h>
int main(int argc, char **argv) {
    (void)argc;
    kst_blas_fix_coretype(argv);
    printf("OpenBLAS core: %s\n", openblas_get_corename());
    return 0;
}
#endif
