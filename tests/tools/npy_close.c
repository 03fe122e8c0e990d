/* npy_close.c - test tool: compares float32 data (a .npy file, or a text file of numbers) with a
 * reference .npy within tolerances; prints the largest difference. Exit 0 when close.
 *
 *   npy_close GOT.npy|GOT.txt WANT.npy ATOL RTOL
 *
 * Arrays are compared as flat values (a [n*q, d] result against a [n, q, d] reference is fine
 * when the counts and last dims agree); int64 arrays are compared as numbers too. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/npy.h"

/* The array's values as floats (int64 offsets fit exactly for the sizes tests use). */
static float *as_f32(kst_npy *a) {
    if (a->dtype == KST_NPY_F32) return a->data;
    float *v = malloc((a->count ? a->count : 1) * sizeof *v);
    for (size_t i = 0; i < a->count; i++)
        v[i] = a->dtype == KST_NPY_I64 ? (float)((long long *)a->data)[i] : (float)((int *)a->data)[i];
    free(a->data);
    a->data = v;
    a->dtype = KST_NPY_F32;
    return v;
}

static float *read_text(const char *path, size_t *n) {
    FILE *fp = fopen(path, "r");
    if (!fp) return NULL;
    size_t cap = 1024;
    float *v = malloc(cap * sizeof *v);
    *n = 0;
    float x;
    while (fscanf(fp, "%f", &x) == 1) {
        if (*n == cap) v = realloc(v, (cap *= 2) * sizeof *v);
        v[(*n)++] = x;
    }
    fclose(fp);
    return v;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: npy_close GOT.npy|GOT.txt WANT.npy ATOL RTOL\n");
        return 2;
    }
    kst_error err;
    kst_npy want, gotn = {0};
    if (kst_npy_read(argv[2], &want, &err) != KST_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    const float *got;
    size_t n;
    float *text = NULL;
    size_t len = strlen(argv[1]);
    if (len > 4 && strcmp(argv[1] + len - 4, ".npy") == 0) {
        if (kst_npy_read(argv[1], &gotn, &err) != KST_OK) {
            fprintf(stderr, "%s\n", err.msg);
            kst_npy_free(&want);
            return 2;
        }
        got = as_f32(&gotn);
        n = gotn.count;
        if (gotn.ndim && want.ndim && gotn.shape[gotn.ndim - 1] != want.shape[want.ndim - 1]) {
            fprintf(stderr, "last dimension differs: got %zu, want %zu\n", gotn.shape[gotn.ndim - 1],
                    want.shape[want.ndim - 1]);
            kst_npy_free(&gotn);
            kst_npy_free(&want);
            return 1;
        }
    } else {
        text = read_text(argv[1], &n);
        if (!text) {
            perror(argv[1]);
            kst_npy_free(&want);
            return 2;
        }
        got = text;
    }
    if (n != want.count) {
        fprintf(stderr, "count differs: got %zu values, want %zu\n", n, want.count);
        free(text);
        kst_npy_free(&gotn);
        kst_npy_free(&want);
        return 1;
    }
    double atol = atof(argv[3]), rtol = atof(argv[4]), worst = 0;
    size_t bad = 0, at = 0;
    const float *w = as_f32(&want);
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - w[i]);
        if (!(d <= atol + rtol * fabs((double)w[i]))) bad++;
        if (d > worst || d != d) {
            worst = d;
            at = i;
        }
    }
    printf("%s: %zu values, max |diff| %.3g at %zu, %zu outside tolerance\n", argv[1], n, worst, at, bad);
    free(text);
    kst_npy_free(&gotn);
    kst_npy_free(&want);
    return bad ? 1 : 0;
}
