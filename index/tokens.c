/* tokens.c - the append-only float16 token store behind ColBERT re-ranking. */
#include "tokens.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "core/mem.h"
#include "core/half.h"

#define HEADER 64
static const char MAGIC[8] = {'K', 'S', 'T', 'T', 'O', 'K', '0', '1'};

struct kst_tokens {
    char *path;
    int fd;
    int writable;
    size_t dim;
    uint64_t rows;
    pthread_rwlock_t lock; /* guards the map against a remap by an appending thread */
    const unsigned char *map;
    size_t map_len;
};


static int remap(kst_tokens *t, kst_error *err) {
    struct stat st;
    if (fstat(t->fd, &st) != 0) return kst_fail(err, KST_ERR_IO, "%s: cannot stat: %s", t->path, strerror(errno));
    size_t len = (size_t)st.st_size;
    if (t->map) munmap((void *)t->map, t->map_len);
    t->map = NULL;
    t->map_len = 0;
    if (len < HEADER) return kst_fail(err, KST_ERR_FORMAT, "%s: %zu bytes, shorter than the header", t->path, len);
    void *p = mmap(NULL, len, PROT_READ, MAP_SHARED, t->fd, 0);
    if (p == MAP_FAILED) return kst_fail(err, KST_ERR_IO, "%s: cannot map: %s", t->path, strerror(errno));
    t->map = p;
    t->map_len = len;
    /* A torn last row (crash mid-append) is not a row. */
    t->rows = (uint64_t)((len - HEADER) / (t->dim * 2));
    return KST_OK;
}

int kst_tokens_open(const char *path, size_t dim, int writable, kst_tokens **out, kst_error *err) {
    *out = NULL;
    if (dim == 0 || dim > 65536) return kst_fail(err, KST_ERR_INVALID, "%s: token dim %zu", path, dim);
    kst_tokens *t = kst_calloc(1, sizeof *t, "token store", err);
    if (!t) return KST_ERR_NOMEM;
    int rc = KST_OK;
    t->fd = -1;
    t->dim = dim;
    t->writable = writable;
    pthread_rwlock_init(&t->lock, NULL);
    t->path = kst_strndup(path, (size_t)-1, err);
    if (!t->path) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    t->fd = open(path, (writable ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, 0644);
    if (t->fd < 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto done;
    }
    struct stat st;
    if (fstat(t->fd, &st) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto done;
    }
    if (st.st_size == 0 && writable) {
        unsigned char h[HEADER] = {0};
        memcpy(h, MAGIC, 8);
        uint32_t d = (uint32_t)dim;
        memcpy(h + 8, &d, 4);
        if (pwrite(t->fd, h, HEADER, 0) != HEADER || fsync(t->fd) != 0) {
            rc = kst_fail(err, KST_ERR_IO, "%s: cannot write the header: %s", path, strerror(errno));
            goto done;
        }
    }
    KST_TRY(remap(t, err));
    uint32_t fdim;
    memcpy(&fdim, t->map + 8, 4);
    if (memcmp(t->map, MAGIC, 8) != 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: not a Kestrel token store (bad magic)", path);
        goto done;
    }
    if (fdim != dim) {
        rc = kst_fail(err, KST_ERR_SHAPE, "%s: token vectors have dim %u, expected %zu", path, fdim, dim);
        goto done;
    }
done:
    if (rc != KST_OK) {
        kst_tokens_close(t);
        return rc;
    }
    *out = t;
    return KST_OK;
}

void kst_tokens_close(kst_tokens *t) {
    if (!t) return;
    if (t->map) munmap((void *)t->map, t->map_len);
    if (t->fd >= 0) close(t->fd);
    pthread_rwlock_destroy(&t->lock);
    kst_free(t->path);
    kst_free(t);
}

int kst_tokens_append(kst_tokens *t, const float *rows, size_t n, uint64_t *first, kst_error *err) {
    if (!t->writable) return kst_fail(err, KST_ERR_MISUSE, "%s: opened read-only", t->path);
    size_t count = n * t->dim;
    unsigned short *h = kst_malloc(count ? count : 1, sizeof *h, "float16 rows", err);
    if (!h) return KST_ERR_NOMEM;
    for (size_t i = 0; i < count; i++) h[i] = kst_f32_to_f16(rows[i]);
    pthread_rwlock_wrlock(&t->lock);
    int rc = KST_OK;
    /* Rows go right after the last whole row, overwriting a torn tail from an earlier crash. */
    off_t at = (off_t)(HEADER + t->rows * t->dim * 2);
    size_t bytes = count * 2, done_b = 0;
    while (done_b < bytes) {
        ssize_t w = pwrite(t->fd, (const char *)h + done_b, bytes - done_b, at + (off_t)done_b);
        if (w < 0) {
            if (errno == EINTR) continue;
            rc = kst_fail(err, KST_ERR_IO, "%s: write failed: %s", t->path, strerror(errno));
            break;
        }
        done_b += (size_t)w;
    }
    if (rc == KST_OK) {
        *first = t->rows;
        rc = remap(t, err);
    }
    pthread_rwlock_unlock(&t->lock);
    kst_free(h);
    return rc;
}

int kst_tokens_sync(kst_tokens *t, kst_error *err) {
    if (t->writable && fsync(t->fd) != 0)
        return kst_fail(err, KST_ERR_IO, "%s: cannot sync: %s", t->path, strerror(errno));
    return KST_OK;
}

int kst_tokens_read(kst_tokens *t, uint64_t first, size_t n, float *out, kst_error *err) {
    pthread_rwlock_rdlock(&t->lock);
    int rc = KST_OK;
    if (first + n > t->rows) {
        /* Another process may have appended since we mapped: look again once. */
        pthread_rwlock_unlock(&t->lock);
        pthread_rwlock_wrlock(&t->lock);
        rc = remap(t, err);
        if (rc == KST_OK && first + n > t->rows)
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: rows %llu..%llu requested but the store has %llu",
                          t->path, (unsigned long long)first, (unsigned long long)(first + n),
                          (unsigned long long)t->rows);
    }
    if (rc == KST_OK) {
        const unsigned char *p = t->map + HEADER + first * t->dim * 2;
        for (size_t i = 0; i < n * t->dim; i++) out[i] = kst_f16_to_f32((unsigned short)(p[2 * i] | (p[2 * i + 1] << 8)));
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

size_t kst_tokens_dim(const kst_tokens *t) { return t->dim; }
uint64_t kst_tokens_rows(const kst_tokens *t) { return t->rows; }
