/* safetensors.c - the safetensors format: u64 header length, JSON header, then raw tensor data.
 *
 * Header entries are {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, offsets
 * relative to the first byte after the header; "__metadata__" holds string pairs. */
#include "safetensors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/json.h"
#include "core/mem.h"


float kst_bf16_to_f32(unsigned short h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static size_t elem_size(const char *dt) {
    static const struct { const char *n; size_t s; } tab[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
        {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8},
        {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(dt, tab[i].n) == 0) return tab[i].s;
    return 0;
}

static int cmp_by_offset(const void *a, const void *b) {
    const kst_st_tensor *x = a, *y = b;
    return x->data < y->data ? -1 : x->data > y->data;
}

static int cmp_by_name(const void *a, const void *b) {
    const kst_st_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

void kst_safetensors_close(kst_safetensors *st) {
    if (!st) return;
    for (size_t i = 0; i < st->n; i++) kst_free(st->tensors[i].name);
    kst_free(st->tensors);
    kst_free(st->path);
    kst_mmap_close(&st->map);
    memset(st, 0, sizeof *st);
}

static int parse_entry(const kst_safetensors *st, const cJSON *e, const unsigned char *base,
                       size_t data_len, kst_st_tensor *t, kst_error *err) {
    const char *path = st->path;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsObject(e) || !cJSON_IsString(dt) || !cJSON_IsArray(shape) ||
        !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: tensor \"%s\": expected {dtype, shape, data_offsets[2]} in header",
                        path, t->name);
    size_t es = elem_size(dt->valuestring);
    if (!es)
        return kst_fail(err, KST_ERR_FORMAT, "%s: tensor \"%s\": unknown dtype \"%s\"", path,
                        t->name, dt->valuestring);
    snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dt->valuestring);
    t->dtype = strcmp(dt->valuestring, "F32") == 0    ? KST_DT_F32
               : strcmp(dt->valuestring, "F16") == 0  ? KST_DT_F16
               : strcmp(dt->valuestring, "BF16") == 0 ? KST_DT_BF16
                                                      : KST_DT_OTHER;
    int nd = cJSON_GetArraySize(shape);
    if (nd > 8) return kst_fail(err, KST_ERR_FORMAT, "%s: tensor \"%s\": %d dims", path, t->name, nd);
    t->ndim = nd;
    t->count = 1;
    for (int i = 0; i < nd; i++) {
        const cJSON *d = cJSON_GetArrayItem(shape, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 0 || d->valuedouble > 1e15)
            return kst_fail(err, KST_ERR_FORMAT, "%s: tensor \"%s\": bad shape entry %d", path,
                            t->name, i);
        t->shape[i] = (size_t)d->valuedouble;
        if (t->shape[i] && t->count > SIZE_MAX / t->shape[i] / 8)
            return kst_fail(err, KST_ERR_FORMAT, "%s: tensor \"%s\": shape overflows", path,
                            t->name);
        t->count *= t->shape[i];
    }
    const cJSON *b = cJSON_GetArrayItem(offs, 0), *en = cJSON_GetArrayItem(offs, 1);
    if (!cJSON_IsNumber(b) || !cJSON_IsNumber(en) || b->valuedouble < 0 ||
        en->valuedouble < b->valuedouble)
        return kst_fail(err, KST_ERR_FORMAT, "%s: tensor \"%s\": data_offsets must be [begin, end]",
                        path, t->name);
    if (en->valuedouble > (double)data_len)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: tensor \"%s\": data_offsets [%.0f, %.0f] run past the end of the data "
                        "(%zu bytes): the file is truncated or corrupt",
                        path, t->name, b->valuedouble, en->valuedouble, data_len);
    size_t begin = (size_t)b->valuedouble, end = (size_t)en->valuedouble;
    if (end - begin != t->count * es)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: tensor \"%s\": %zu bytes of data for %zu %s elements (expected %zu)",
                        path, t->name, end - begin, t->count, t->dtype_name, t->count * es);
    t->data = base + begin;
    return KST_OK;
}

int kst_safetensors_open(const char *path, kst_safetensors *st, kst_error *err) {
    memset(st, 0, sizeof *st);
    int rc = KST_OK;
    cJSON *hdr = NULL;
    st->path = kst_strndup(path, (size_t)-1, err);
    if (!st->path) return KST_ERR_NOMEM;
    KST_TRY(kst_mmap_open(path, &st->map, err));
    const unsigned char *p = st->map.data;
    size_t size = st->map.size;
    if (size < 8) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: %zu bytes, too short for a safetensors header",
                      path, size);
        goto done;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | p[i];
    if (hlen > size - 8 || hlen > (100u << 20)) {
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: header length %llu exceeds the file (%zu bytes): truncated or not "
                      "safetensors",
                      path, (unsigned long long)hlen, size);
        goto done;
    }
    char where[4200];
    snprintf(where, sizeof where, "%s (header)", path);
    KST_TRY(kst_json_parse((const char *)p + 8, (size_t)hlen, where, &hdr, err));
    if (!cJSON_IsObject(hdr)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: header is not a JSON object", path);
        goto done;
    }
    size_t n = 0;
    for (const cJSON *e = hdr->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0) n++;
    st->tensors = kst_calloc(n ? n : 1, sizeof *st->tensors, "safetensors index", err);
    if (!st->tensors) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    const unsigned char *base = p + 8 + hlen;
    size_t data_len = size - 8 - (size_t)hlen;
    for (const cJSON *e = hdr->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) continue;
        kst_st_tensor *t = &st->tensors[st->n];
        t->name = kst_strndup(e->string, (size_t)-1, err);
        if (!t->name) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        st->n++;
        KST_TRY(parse_entry(st, e, base, data_len, t, err));
    }
    /* Overlapping tensors mean a corrupt or hostile file: check neighbours in offset order. */
    qsort(st->tensors, st->n, sizeof *st->tensors, cmp_by_offset);
    for (size_t i = 1; i < st->n; i++) {
        const kst_st_tensor *a = &st->tensors[i - 1], *b = &st->tensors[i];
        size_t alen = a->count * elem_size(a->dtype_name);
        if (a->data + alen > b->data && b->count) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: tensors \"%s\" and \"%s\" overlap", path,
                          a->name, b->name);
            goto done;
        }
    }
    qsort(st->tensors, st->n, sizeof *st->tensors, cmp_by_name);
done:
    cJSON_Delete(hdr);
    if (rc != KST_OK) kst_safetensors_close(st);
    return rc;
}

const kst_st_tensor *kst_safetensors_find(const kst_safetensors *st, const char *name) {
    size_t lo = 0, hi = st->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(st->tensors[mid].name, name);
        if (c == 0) return &st->tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

static void shape_str(char *buf, size_t cap, int ndim, const size_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%zu", i ? ", " : "", shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

int kst_st_tensor_to_f32(const kst_safetensors *st, const kst_st_tensor *t, int ndim,
                         const size_t *shape, float *dst, kst_error *err) {
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char want[128], got[128];
        shape_str(want, sizeof want, ndim, shape);
        shape_str(got, sizeof got, t->ndim, t->shape);
        return kst_fail(err, KST_ERR_SHAPE, "%s: tensor \"%s\" has shape %s, expected %s",
                        st->path, t->name, got, want);
    }
    const unsigned char *s = t->data;
    switch (t->dtype) {
    case KST_DT_F32:
        memcpy(dst, s, t->count * 4);
        break;
    case KST_DT_F16:
        for (size_t i = 0; i < t->count; i++)
            dst[i] = kst_f16_to_f32((unsigned short)(s[2 * i] | (s[2 * i + 1] << 8)));
        break;
    case KST_DT_BF16:
        for (size_t i = 0; i < t->count; i++)
            dst[i] = kst_bf16_to_f32((unsigned short)(s[2 * i] | (s[2 * i + 1] << 8)));
        break;
    default:
        return kst_fail(err, KST_ERR_SHAPE,
                        "%s: tensor \"%s\" has dtype %s, expected F32, F16 or BF16", st->path,
                        t->name, t->dtype_name);
    }
    return KST_OK;
}
