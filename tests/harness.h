/* harness.h - shared helpers for the cmocka unit tests: data paths, tensor comparison, skips. */
#ifndef KST_TESTS_HARNESS_H
#define KST_TESTS_HARNESS_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "core/error.h"

/* Root of the repository's shared data (`../shared/data` beside the clone), or $KESTREL_SHARED. */
static inline const char *shared_dir(void) {
    const char *e = getenv("KESTREL_SHARED");
    return e && *e ? e : "../shared/data";
}

/* Formats a path under shared_dir() into a static buffer (one at a time). */
static inline const char *shared_path(const char *rel) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", shared_dir(), rel);
    return buf;
}

/* Fails the test with the error's message when rc is not KST_OK. */
#define assert_ok(rc, err)                                                              \
    do {                                                                                \
        int rc_ = (rc);                                                                 \
        if (rc_ != KST_OK) fail_msg("%s -> %s: %s", #rc, kst_status_name(rc_), (err)->msg); \
    } while (0)

/* Asserts that msg contains needle, printing both when it does not. */
#define assert_msg_has(msg, needle)                                                       \
    do {                                                                                  \
        if (!strstr((msg), (needle))) fail_msg("message \"%s\" lacks \"%s\"", (msg), (needle)); \
    } while (0)

/* Compares two float tensors. Passes when every |a-b| <= atol + rtol*|b|; on failure prints the
 * tensor's name, its first values on both sides and the largest difference with its index. */
static inline void assert_close_f32(const char *name, const float *got, const float *want,
                                    size_t n, double atol, double rtol) {
    double maxd = 0;
    size_t at = 0, bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!(d <= atol + rtol * fabs((double)want[i]))) bad++;
        if (d > maxd || d != d) {
            maxd = d;
            at = i;
        }
    }
    if (bad) {
        fprintf(stderr, "%s: %zu of %zu values differ; max |diff| %.3g at %zu (got %.7g want %.7g)\n",
                name, bad, n, maxd, at, got[at], want[at]);
        fprintf(stderr, "  got :");
        for (size_t i = 0; i < n && i < 6; i++) fprintf(stderr, " %.6f", got[i]);
        fprintf(stderr, "\n  want:");
        for (size_t i = 0; i < n && i < 6; i++) fprintf(stderr, " %.6f", want[i]);
        fprintf(stderr, "\n");
        fail_msg("%s mismatch (atol %.1g, rtol %.1g)", name, atol, rtol);
    }
}

/* Cosine similarity of two vectors. */
static inline double cosine_f32(const float *a, const float *b, size_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (size_t i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return ab / (sqrt(aa) * sqrt(bb) + 1e-30);
}

/* Skips the current test with a stated reason (cmocka counts it as skipped). */
#define skip_because(...)                   \
    do {                                    \
        fprintf(stderr, "[ SKIPPED  ] ");   \
        fprintf(stderr, __VA_ARGS__);       \
        fprintf(stderr, "\n");              \
        skip();                             \
    } while (0)

/* Reads a text file into lines (without "\n"); returns the count, fails the test when the file
 * cannot be read. Free with free_lines. */
static inline size_t read_lines(const char *path, char ***out) {
    FILE *fp = fopen(path, "rb");
    if (!fp) fail_msg("cannot open %s", path);
    size_t n = 0, cap = 16;
    char **v = malloc(cap * sizeof *v);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t r;
    while ((r = getline(&line, &lcap, fp)) >= 0) {
        if (r > 0 && line[r - 1] == '\n') line[--r] = '\0';
        if (n == cap) v = realloc(v, (cap *= 2) * sizeof *v);
        v[n++] = strdup(line);
    }
    free(line);
    fclose(fp);
    *out = v;
    return n;
}

static inline void free_lines(char **v, size_t n) {
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

#endif
