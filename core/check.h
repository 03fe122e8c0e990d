/* check.h - internal error helpers: fill a kst_error with printf-style detail and return.
 *
 * llm.c's fopenCheck/mallocCheck shape (file, expected, actual) without exiting: each helper
 * fills err and returns the code, so callers write `return kst_fail(err, ...)` or
 * `rc = kst_fail(...); goto done;`. */
#ifndef KST_CORE_CHECK_H
#define KST_CORE_CHECK_H

#include "error.h"

#if defined(__GNUC__)
#define KST_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define KST_PRINTF(a, b)
#endif

/* Sets err (may be NULL) to code and the formatted message; returns code. */
int kst_fail(kst_error *err, int code, const char *fmt, ...) KST_PRINTF(3, 4);
/* Prepends "prefix: " to err's message, keeping its code; returns err's code (KST_OK if none). */
int kst_error_prefix(kst_error *err, const char *fmt, ...) KST_PRINTF(2, 3);
/* Resets err (may be NULL) to KST_OK with an empty message. */
void kst_error_clear(kst_error *err);

/* Runs a fallible call and jumps to `done` with rc set when it fails. */
#define KST_TRY(call)                 \
    do {                              \
        rc = (call);                  \
        if (rc != KST_OK) goto done;  \
    } while (0)

#endif
