/* json.h - JSON files through cJSON, with errors that name the file, line and key. */
#ifndef KST_CORE_JSON_H
#define KST_CORE_JSON_H

#include <cjson/cJSON.h>

#include "error.h"

/* Parses the JSON file at `path` into *out (free with cJSON_Delete). A syntax error names the file
 * and the line and column where parsing stopped. */
int kst_json_load(const char *path, cJSON **out, kst_error *err);
/* Parses `len` bytes of text; `where` names the source in messages (a file, "line 12 of x"). */
int kst_json_parse(const char *text, size_t len, const char *where, cJSON **out, kst_error *err);

/* Typed getters. A missing key leaves *out at the default the caller set and returns KST_OK; a key
 * of the wrong type is KST_ERR_FORMAT naming `where` and the key. */
int kst_json_int(const cJSON *obj, const char *key, long *out, const char *where, kst_error *err);
int kst_json_num(const cJSON *obj, const char *key, double *out, const char *where, kst_error *err);
int kst_json_bool(const cJSON *obj, const char *key, int *out, const char *where, kst_error *err);
/* *out points into obj (valid while obj lives), or stays as set when the key is absent or null. */
int kst_json_str(const cJSON *obj, const char *key, const char **out, const char *where,
                 kst_error *err);

#endif
