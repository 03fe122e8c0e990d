/* mem.c - checked allocation with overflow guards and test-time failure injection. */
#include "mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* Injection state is process-wide; tests that use it run single-threaded. */
static long g_fail_at = 0;
static long g_count = 0;

long kst_mem_fail_after(long n) {
    long made = g_count;
    g_count = 0;
    g_fail_at = n;
    return made;
}

static int injected_failure(void) {
    g_count++;
    return g_fail_at > 0 && g_count >= g_fail_at;
}

static int size_product(size_t count, size_t size, size_t *out) {
    /* count*size must not wrap: a wrapped size would allocate a small block and overflow it. */
    if (size != 0 && count > SIZE_MAX / size) return 0;
    *out = count * size;
    return 1;
}

void *kst_malloc(size_t count, size_t size, const char *what, kst_error *err) {
    size_t n;
    if (!size_product(count, size, &n)) {
        kst_fail(err, KST_ERR_NOMEM, "%s: size %zu x %zu overflows", what, count, size);
        return NULL;
    }
    void *p = injected_failure() ? NULL : malloc(n ? n : 1);
    if (!p) kst_fail(err, KST_ERR_NOMEM, "%s: cannot allocate %zu bytes", what, n);
    return p;
}

void *kst_malloc_aligned(size_t count, size_t size, size_t align, const char *what, kst_error *err) {
    size_t n;
    if (!size_product(count, size, &n)) {
        kst_fail(err, KST_ERR_NOMEM, "%s: size %zu x %zu overflows", what, count, size);
        return NULL;
    }
    void *p = NULL;
    if (!injected_failure() && posix_memalign(&p, align, n ? n : 1) != 0) p = NULL;
    if (!p) kst_fail(err, KST_ERR_NOMEM, "%s: cannot allocate %zu bytes (aligned to %zu)", what, n, align);
    return p;
}

void *kst_calloc(size_t count, size_t size, const char *what, kst_error *err) {
    void *p = kst_malloc(count, size, what, err);
    if (p) memset(p, 0, count * size);
    return p;
}

int kst_realloc(void **ptr, size_t count, size_t size, const char *what, kst_error *err) {
    size_t n;
    if (!size_product(count, size, &n))
        return kst_fail(err, KST_ERR_NOMEM, "%s: size %zu x %zu overflows", what, count, size);
    void *p = injected_failure() ? NULL : realloc(*ptr, n ? n : 1);
    if (!p) return kst_fail(err, KST_ERR_NOMEM, "%s: cannot allocate %zu bytes", what, n);
    *ptr = p;
    return KST_OK;
}

char *kst_strndup(const char *s, size_t n, kst_error *err) {
    if (n == (size_t)-1) n = strlen(s);
    char *p = kst_malloc(n + 1, 1, "string copy", err);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void kst_free(void *p) { free(p); }
