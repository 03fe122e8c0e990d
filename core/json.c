/* json.c - JSON files through cJSON, with errors that name the file, line and key. */
#include "json.h"

#include <string.h>

#include "check.h"
#include "file.h"
#include "mem.h"

int kst_json_parse(const char *text, size_t len, const char *where, cJSON **out, kst_error *err) {
    const char *end = NULL;
    *out = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (*out) return KST_OK;
    /* cJSON reports where it stopped; turn the offset into a line and column for the user. */
    size_t off = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    long line = 1, col = 1;
    for (size_t i = 0; i < off; i++) {
        if (text[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    return kst_fail(err, KST_ERR_FORMAT, "%s: invalid JSON at line %ld, column %ld", where, line,
                    col);
}

int kst_json_load(const char *path, cJSON **out, kst_error *err) {
    *out = NULL;
    char *text;
    size_t len;
    int rc = kst_read_file(path, &text, &len, err);
    if (rc != KST_OK) return rc;
    rc = kst_json_parse(text, len, path, out, err);
    kst_free(text);
    return rc;
}

static const cJSON *member(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return (v && !cJSON_IsNull(v)) ? v : NULL;
}

int kst_json_int(const cJSON *obj, const char *key, long *out, const char *where, kst_error *err) {
    const cJSON *v = member(obj, key);
    if (!v) return KST_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(long)v->valuedouble)
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" must be an integer", where, key);
    *out = (long)v->valuedouble;
    return KST_OK;
}

int kst_json_num(const cJSON *obj, const char *key, double *out, const char *where, kst_error *err) {
    const cJSON *v = member(obj, key);
    if (!v) return KST_OK;
    if (!cJSON_IsNumber(v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" must be a number", where, key);
    *out = v->valuedouble;
    return KST_OK;
}

int kst_json_bool(const cJSON *obj, const char *key, int *out, const char *where, kst_error *err) {
    const cJSON *v = member(obj, key);
    if (!v) return KST_OK;
    if (!cJSON_IsBool(v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" must be true or false", where, key);
    *out = cJSON_IsTrue(v);
    return KST_OK;
}

int kst_json_str(const cJSON *obj, const char *key, const char **out, const char *where,
                 kst_error *err) {
    const cJSON *v = member(obj, key);
    if (!v) return KST_OK;
    if (!cJSON_IsString(v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" must be a string", where, key);
    *out = v->valuestring;
    return KST_OK;
}
