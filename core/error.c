/* error.c - status text and the kst_error helpers. */
#include "check.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *kst_status_str(int code) {
    switch (code) {
#define KST_X_STR(name, value, text) \
    case value:                      \
        return text;
        KST_STATUS_LIST(KST_X_STR)
#undef KST_X_STR
    }
    return "unknown status";
}

const char *kst_status_name(int code) {
    switch (code) {
#define KST_X_NAME(name, value, text) \
    case value:                       \
        return #name;
        KST_STATUS_LIST(KST_X_NAME)
#undef KST_X_NAME
    }
    return "KST_UNKNOWN";
}

int kst_fail(kst_error *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int kst_error_prefix(kst_error *err, const char *fmt, ...) {
    if (!err) return KST_OK;
    char prefix[KST_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    /* Build "prefix: old" by hand: the result is cut to the message size, which is intended. */
    char out[KST_ERROR_MSG_MAX];
    size_t n = strlen(prefix), m = strlen(err->msg), at = 0;
    for (size_t i = 0; i < n && at + 1 < sizeof out; i++) out[at++] = prefix[i];
    for (size_t i = 0; i < 2 && at + 1 < sizeof out; i++) out[at++] = ": "[i];
    for (size_t i = 0; i < m && at + 1 < sizeof out; i++) out[at++] = err->msg[i];
    out[at] = '\0';
    memcpy(err->msg, out, at + 1);
    return err->code;
}

void kst_error_clear(kst_error *err) {
    if (!err) return;
    err->code = KST_OK;
    err->msg[0] = '\0';
}
