/* error.h - status codes and the caller-owned error record every fallible call fills.
 *
 * This header is public-safe: it is spliced into the installed kestrel.h, so it includes only
 * standard headers and declares only kst_-prefixed names. */
#ifndef KST_CORE_ERROR_H
#define KST_CORE_ERROR_H

#include <stddef.h>

/* One list generates the enum, kst_status_str and kst_status_name. Codes are 0 or negative and
 * never change meaning once released (they are also the CLI's exit codes, negated). */
#define KST_STATUS_LIST(X)                                                         \
    X(KST_OK, 0, "success")                                                        \
    X(KST_ERR_INVALID, -1, "invalid argument")                                     \
    X(KST_ERR_IO, -2, "input/output error")                                        \
    X(KST_ERR_FORMAT, -3, "malformed input")                                       \
    X(KST_ERR_NOMEM, -4, "out of memory")                                          \
    X(KST_ERR_NOTFOUND, -5, "not found")                                           \
    X(KST_ERR_UNSUPPORTED, -6, "unsupported")                                      \
    X(KST_ERR_SHAPE, -7, "tensor shape or dtype mismatch")                        \
    X(KST_ERR_MISUSE, -8, "library misuse")                                        \
    X(KST_ERR_INTERNAL, -9, "internal error")

typedef enum kst_status {
#define KST_X_ENUM(name, value, text) name = value,
    KST_STATUS_LIST(KST_X_ENUM)
#undef KST_X_ENUM
} kst_status;

#define KST_ERROR_MSG_MAX 512

/* The caller owns it, so it is thread-safe and no later call overwrites it. Every API that takes
 * a `kst_error *err` accepts NULL (the detail is then dropped, the status still returned). */
typedef struct kst_error {
    int code;                     /* a kst_status, KST_OK when nothing failed */
    char msg[KST_ERROR_MSG_MAX];  /* names the file, line, field or tensor at fault */
} kst_error;

/* Generic text of a status ("malformed input"); never NULL. */
const char *kst_status_str(int code);
/* Symbolic name of a status ("KST_ERR_FORMAT"); never NULL. */
const char *kst_status_name(int code);

#endif
