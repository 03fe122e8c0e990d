/* safetensors_write.c - the safetensors format on the way out.
 *
 * Format (huggingface/safetensors, docs "Format"): 8 bytes little-endian u64 N, then N bytes of
 * UTF-8 JSON, then the byte buffer. The JSON maps each tensor name to {"dtype", "shape",
 * "data_offsets": [begin, end]} (offsets relative to the buffer) and may hold "__metadata__", a
 * string-to-string map. The reference writer pads the header with spaces (0x20) so that N is a
 * multiple of 8, orders tensors by dtype alignment (largest first) then name, writes them back to
 * back with no gaps, and emits the JSON compactly with "__metadata__" first and the entries in data
 * order. Doing the same makes our files byte-identical to the library's for the same tensors. */
#include "safetensors_write.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "core/mem.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors_write.c writes host-order floats: add byte swapping for big-endian hosts"
#endif

/* ------------------------------------------------------------------------------------------ */
/* helpers */

size_t kst_st_dtype_size(const char *dt) {
    static const struct { const char *n; size_t s; } tab[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
        {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8},
        {"F8_E4M3", 1}, {"F8_E5M2", 1}};
    for (size_t i = 0; dt && i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(dt, tab[i].n) == 0) return tab[i].s;
    return 0;
}

typedef struct entry {
    const kst_st_out *t;
    size_t esize, count, nbytes, begin;
} entry;

static int cmp_entry(const void *a, const void *b) {
    const entry *x = a, *y = b;
    if (x->esize != y->esize) return x->esize > y->esize ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

/* Appends s to the header as a JSON string (quotes included); returns bytes written. */
static size_t json_string(char *dst, const char *s) {
    size_t n = 0;
    dst[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            dst[n++] = '\\';
            dst[n++] = (char)*p;
        } else if (*p < 0x20) {
            n += (size_t)sprintf(dst + n, "\\u%04x", *p);
        } else {
            dst[n++] = (char)*p;
        }
    }
    dst[n++] = '"';
    return n;
}

static int write_all(FILE *fp, const void *p, size_t n) { return fwrite(p, 1, n, fp) == n ? 0 : -1; }

/* Streams one tensor's bytes, converting half precision to float32 a block at a time. */
static int write_tensor(FILE *fp, const entry *e) {
    const kst_st_out *t = e->t;
    if (strcmp(t->dtype, "F32") != 0 || t->src == KST_DT_F32)
        return write_all(fp, t->data, e->nbytes);
    float buf[4096];
    const unsigned char *s = t->data;
    for (size_t i = 0; i < e->count;) {
        size_t m = e->count - i < 4096 ? e->count - i : 4096;
        for (size_t k = 0; k < m; k++, i++) {
            unsigned short h = (unsigned short)(s[2 * i] | (s[2 * i + 1] << 8));
            buf[k] = t->src == KST_DT_F16 ? kst_f16_to_f32(h) : kst_bf16_to_f32(h);
        }
        if (write_all(fp, buf, m * sizeof(float))) return -1;
    }
    return 0;
}

/* Makes the rename durable: fsync the folder that holds `path` (best effort). */
static void sync_parent(const char *path) {
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* API */

int kst_safetensors_write(const char *path, const kst_st_out *tensors, size_t n,
                          const char *format, kst_error *err) {
    int rc = KST_OK;
    entry *ents = NULL;
    char *hdr = NULL;
    FILE *fp = NULL;
    int created = 0; /* the temporary file exists and must go on failure */
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", path);
    ents = kst_calloc(n ? n : 1, sizeof *ents, "safetensors entries", err);
    if (!ents) return KST_ERR_NOMEM;
    /* Validate and size every tensor; the header bound counts each name escaped at worst. */
    size_t cap = 64 + (format ? 6 * strlen(format) : 0);
    for (size_t i = 0; i < n; i++) {
        const kst_st_out *t = &tensors[i];
        entry *e = &ents[i];
        e->t = t;
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor %zu has an empty or reserved name", path, i);
            goto done;
        }
        e->esize = kst_st_dtype_size(t->dtype);
        int f32 = t->dtype && strcmp(t->dtype, "F32") == 0;
        int ok_src = f32 ? (t->src == KST_DT_F32 || t->src == KST_DT_F16 || t->src == KST_DT_BF16)
                         : t->src == KST_DT_OTHER;
        if (!e->esize || !ok_src) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\": cannot write dtype %s from this source dtype",
                          path, t->name, t->dtype ? t->dtype : "(null)");
            goto done;
        }
        if (t->ndim < 0 || t->ndim > 8) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\": %d dims (0 to 8 allowed)", path,
                          t->name, t->ndim);
            goto done;
        }
        e->count = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] && e->count > SIZE_MAX / 16 / t->shape[d]) {
                rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\": shape overflows", path, t->name);
                goto done;
            }
            e->count *= t->shape[d];
        }
        e->nbytes = e->count * e->esize;
        if (!f32 && t->nbytes != e->nbytes) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\": %zu bytes given for %zu %s elements",
                          path, t->name, t->nbytes, e->count, t->dtype);
            goto done;
        }
        if (e->nbytes && !t->data) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\": no data", path, t->name);
            goto done;
        }
        cap += 6 * strlen(t->name) + 96 + 22 * (size_t)t->ndim;
    }
    qsort(ents, n, sizeof *ents, cmp_entry);
    /* Names are few (a dozen per layer): the quadratic check is cheaper than another sort. */
    for (size_t i = 0; i < n; i++)
        for (size_t k = i + 1; k < n; k++)
            if (strcmp(ents[i].t->name, ents[k].t->name) == 0) {
                rc = kst_fail(err, KST_ERR_INVALID, "%s: tensor \"%s\" given twice", path, ents[i].t->name);
                goto done;
            }

    /* Header: u64 length, JSON, spaces up to a multiple of 8. */
    hdr = kst_malloc(cap + 8 + 8, 1, "safetensors header", err);
    if (!hdr) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    char *j = hdr + 8;
    size_t len = 0;
    j[len++] = '{';
    if (format) {
        len += (size_t)sprintf(j + len, "\"__metadata__\":{\"format\":");
        len += json_string(j + len, format);
        j[len++] = '}';
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        entry *e = &ents[i];
        e->begin = off;
        if (len > 1) j[len++] = ',';
        len += json_string(j + len, e->t->name);
        len += (size_t)sprintf(j + len, ":{\"dtype\":\"%s\",\"shape\":[", e->t->dtype);
        for (int d = 0; d < e->t->ndim; d++)
            len += (size_t)sprintf(j + len, d ? ",%zu" : "%zu", e->t->shape[d]);
        len += (size_t)sprintf(j + len, "],\"data_offsets\":[%zu,%zu]}", off, off + e->nbytes);
        off += e->nbytes;
    }
    j[len++] = '}';
    while (len % 8) j[len++] = ' ';
    uint64_t hlen = len;
    for (int b = 0; b < 8; b++) hdr[b] = (char)((hlen >> (8 * b)) & 0xff);

    /* Data, streamed to a temporary file, then fsync and rename. */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        goto done;
    }
    created = 1;
    fp = fdopen(fd, "wb");
    if (!fp) {
        close(fd);
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot open for writing: %s", tmp, strerror(errno));
        goto done;
    }
    if (write_all(fp, hdr, 8 + len)) goto io_error;
    for (size_t i = 0; i < n; i++)
        if (write_tensor(fp, &ents[i])) goto io_error;
    if (fflush(fp) != 0 || fsync(fileno(fp)) != 0) goto io_error;
    {
        FILE *f = fp;
        fp = NULL;
        if (fclose(f) != 0) goto io_error;
    }
    if (rename(tmp, path) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot replace: %s", path, strerror(errno));
        goto done;
    }
    created = 0;
    sync_parent(path);
    goto done;
io_error:
    rc = kst_fail(err, KST_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
done:
    if (fp) fclose(fp);
    if (created) unlink(tmp);
    kst_free(hdr);
    kst_free(ents);
    return rc;
}
