/* json.c - JSON files through cJSON, with errors that name the file, line and key. */
#include "json.h"

#include <string.h>

#include "check.h"
#include "file.h"
#include "mem.h"

/* cJSON allocates through kst_malloc so the allocation-failure tests reach inside parsing. */
static _Thread_local int json_oom; /* set when an allocation inside cJSON failed */

static void *json_malloc(size_t n) {
    void *p = kst_malloc(n, 1, "JSON", NULL);
    if (!p) json_oom = 1;
    return p;
}

static void json_init(void) {
    static int done = 0;
    if (done) return;
    cJSON_Hooks hooks = {json_malloc, kst_free};
    cJSON_InitHooks(&hooks);
    done = 1;
}

int kst_json_parse(const char *text, size_t len, const char *where, cJSON **out, kst_error *err) {
    json_init();
    const char *end = NULL;
    json_oom = 0;
    *out = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (*out) return KST_OK;
    if (json_oom) return kst_fail(err, KST_ERR_NOMEM, "%s: out of memory while parsing JSON", where);
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
