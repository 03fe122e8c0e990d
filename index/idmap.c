/* idmap.c - the internal -> external id map beside each FAISS file (see idmap.h). */
#include "index/idmap.h"

#include <stdio.h>
#include <string.h>

#include "core/check.h"
#include "core/file.h"
#include "core/mem.h"

#define MAGIC "KSTIDMAP"
#define VERSION 1u
#define HEADER 40u /* magic 8, version 4, zero 4, slots 8, count 8, blob 8 */

struct kst_idmap {
    kst_mmap map;
    uint64_t slots, count, blob_len;
    const unsigned char *off; /* (slots + 1) little-endian u64, unaligned-safe reads */
    const char *blob;
    char *path;
};

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void wr64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* ------------------------------------------------------------------------------------------ */
/* writing */

typedef struct {
    uint64_t *end;    /* end[i]: blob length after id i (grown as ids come, in order) */
    size_t cap_end;
    uint64_t slots, count;
    char *blob;
    size_t len, cap;
    int64_t last;
    kst_error *err;
} builder;

static int grow(void **p, size_t *cap, size_t need, size_t elem, const char *what, kst_error *err) {
    if (need <= *cap) return KST_OK;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    int rc = kst_realloc(p, c, elem, what, err);
    if (rc == KST_OK) *cap = c;
    return rc;
}

static int add_one(void *ctx, int64_t id, const char *ext, size_t len) {
    builder *b = ctx;
    if (id < 0 || id <= b->last)
        return kst_fail(b->err, KST_ERR_FORMAT, "internal id %lld out of order (after %lld)",
                        (long long)id, (long long)b->last);
    size_t slots = (size_t)id + 1;
    int rc = grow((void **)&b->end, &b->cap_end, slots, sizeof *b->end, "id map offsets", b->err);
    if (rc == KST_OK) rc = grow((void **)&b->blob, &b->cap, b->len + len, 1, "id map", b->err);
    if (rc != KST_OK) return rc;
    for (uint64_t i = b->slots; i < (uint64_t)id; i++) b->end[i] = b->len; /* ids with no row */
    memcpy(b->blob + b->len, ext, len);
    b->len += len;
    b->end[id] = b->len;
    b->slots = slots;
    b->count++;
    b->last = id;
    return KST_OK;
}

int kst_idmap_write(kst_store *s, const char *path, kst_error *err) {
    builder b = {0};
    b.last = -1;
    b.err = err;
    int rc = kst_store_scan_ext_ids(s, add_one, &b, err);
    unsigned char *file = NULL;
    size_t total = HEADER + (b.slots + 1) * 8 + b.len;
    if (rc == KST_OK) {
        file = kst_malloc(total, 1, "id map file", err);
        if (!file) rc = KST_ERR_NOMEM;
    }
    if (rc == KST_OK) {
        memcpy(file, MAGIC, 8);
        memset(file + 8, 0, 8);
        file[8] = (unsigned char)VERSION;
        wr64(file + 16, b.slots);
        wr64(file + 24, b.count);
        wr64(file + 32, b.len);
        unsigned char *o = file + HEADER;
        wr64(o, 0);
        for (uint64_t i = 0; i < b.slots; i++) wr64(o + 8 * (i + 1), b.end[i]);
        if (b.len) memcpy(o + 8 * (b.slots + 1), b.blob, b.len);
        rc = kst_write_file_atomic(path, file, total, err);
    }
    kst_free(file);
    kst_free(b.end);
    kst_free(b.blob);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* reading */

int kst_idmap_open(const char *path, kst_idmap **out, kst_error *err) {
    *out = NULL;
    kst_idmap *m = kst_calloc(1, sizeof *m, "id map", err);
    if (!m) return KST_ERR_NOMEM;
    m->path = kst_strndup(path, (size_t)-1, err);
    int rc = m->path ? kst_mmap_open(path, &m->map, err) : KST_ERR_NOMEM;
    if (rc == KST_OK) {
        const unsigned char *d = m->map.data;
        size_t n = m->map.size;
        if (n < HEADER + 8 || memcmp(d, MAGIC, 8) != 0) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: not a kestrel id map (expected the magic \"" MAGIC
                          "\" and a %u-byte header); delete it and kestrel reads external ids from "
                          "SQLite, or rebuild the index", path, HEADER);
        } else if (d[8] != VERSION || d[9] || d[10] || d[11]) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: id map version %u, this kestrel reads version %u",
                          path, (unsigned)d[8] | (unsigned)d[9] << 8, VERSION);
        } else {
            m->slots = rd64(d + 16);
            m->count = rd64(d + 24);
            m->blob_len = rd64(d + 32);
            uint64_t want = (uint64_t)-1;
            if (m->slots < ((uint64_t)1 << 60) && m->blob_len < ((uint64_t)1 << 62))
                want = HEADER + (m->slots + 1) * 8 + m->blob_len;
            if (want != n || m->count > m->slots)
                rc = kst_fail(err, KST_ERR_FORMAT, "%s: id map of %llu ids and %llu blob bytes should "
                              "be %llu bytes long, the file has %zu (truncated or corrupt; delete it "
                              "and kestrel reads external ids from SQLite)",
                              path, (unsigned long long)m->slots, (unsigned long long)m->blob_len,
                              (unsigned long long)want, n);
            m->off = d + HEADER;
            m->blob = (const char *)d + HEADER + (m->slots + 1) * 8;
        }
    }
    if (rc != KST_OK) {
        kst_idmap_close(m);
        return rc;
    }
    *out = m;
    return KST_OK;
}

void kst_idmap_close(kst_idmap *m) {
    if (!m) return;
    kst_mmap_close(&m->map);
    kst_free(m->path);
    kst_free(m);
}

const char *kst_idmap_get(const kst_idmap *m, int64_t id, size_t *len) {
    *len = 0;
    if (id < 0 || (uint64_t)id >= m->slots) return NULL;
    uint64_t a = rd64(m->off + 8 * (uint64_t)id), b = rd64(m->off + 8 * ((uint64_t)id + 1));
    if (a > b || b > m->blob_len) {
        *len = SIZE_MAX;
        return NULL;
    }
    if (a == b) return NULL;
    *len = (size_t)(b - a);
    return m->blob + a;
}

uint64_t kst_idmap_count(const kst_idmap *m) { return m->count; }
const char *kst_idmap_path(const kst_idmap *m) { return m->path; }
