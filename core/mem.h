/* mem.h - checked allocation: overflow-safe sizes, errors as values, failure injection for tests. */
#ifndef KST_CORE_MEM_H
#define KST_CORE_MEM_H

#include <stddef.h>

#include "error.h"

/* Allocates count*size bytes (uninitialised). Returns NULL and fills err (naming `what`) when the
 * product overflows or memory runs out. Free with kst_free. */
void *kst_malloc(size_t count, size_t size, const char *what, kst_error *err);
/* As kst_malloc, zero-filled. */
void *kst_calloc(size_t count, size_t size, const char *what, kst_error *err);
/* Grows *ptr to count*size bytes. On failure *ptr is left valid and untouched. Returns a status. */
int kst_realloc(void **ptr, size_t count, size_t size, const char *what, kst_error *err);
/* As kst_malloc, the block aligned to `align` bytes (a power of two, a multiple of
 * sizeof(void *)): for big arrays read at random, 2 MiB-aligned so that huge pages can back all
 * of them and rows of a power-of-two size never straddle an extra cache line. Free with
 * kst_free. */
void *kst_malloc_aligned(size_t count, size_t size, size_t align, const char *what, kst_error *err);
/* Copies a NUL-terminated string (n bytes when n != (size_t)-1). NULL on failure. */
char *kst_strndup(const char *s, size_t n, kst_error *err);
/* Frees memory from the functions above; NULL is a no-op. */
void kst_free(void *p);

/* Test hook, as SQLite's malloc tests: the Nth allocation from now (1-based) and every one after
 * it fail; 0 turns injection off. Returns how many allocations were made since the last call. */
long kst_mem_fail_after(long n);

#endif
