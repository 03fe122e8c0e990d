/* npy.c - NumPy .npy reader and writer (format 1.0: magic, version, header length, dict header). */
#include "npy.h"

#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <string.h>

#include "check.h"
#include "file.h"
#include "mem.h"

static const char *descr_of(kst_npy_dtype t) {
    return t == KST_NPY_F32 ? "<f4" : t == KST_NPY_I64 ? "<i8" : "<i4";
}
static size_t size_of(kst_npy_dtype t) { return t == KST_NPY_I64 ? 8 : 4; }

int kst_npy_write(const char *path, kst_npy_dtype dtype, const void *data, int ndim,
                  const size_t *shape, kst_error *err) {
    if (ndim < 0 || ndim > 4) return kst_fail(err, KST_ERR_INVALID, "%s: ndim %d", path, ndim);
    char hdr[256];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                     descr_of(dtype));
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        n += snprintf(hdr + n, sizeof hdr - (size_t)n, "%zu%s", shape[i],
                      (ndim == 1 || i + 1 < ndim) ? ", " : "");
        count *= shape[i];
    }
    if (ndim == 1) n -= 1; /* "(5,)" not "(5, )" */
    n += snprintf(hdr + n, sizeof hdr - (size_t)n, "), }");
    /* The format pads magic+version+len+header+'\n' to a multiple of 64 bytes. */
    size_t total_hdr = 10 + (size_t)n + 1;
    size_t pad = (64 - total_hdr % 64) % 64;
    size_t hlen = (size_t)n + pad + 1;
    size_t bytes = count * size_of(dtype);
    unsigned char *buf = kst_malloc(10 + hlen + bytes, 1, path, err);
    if (!buf) return KST_ERR_NOMEM;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)(hlen & 0xff);
    buf[9] = (unsigned char)(hlen >> 8);
    memcpy(buf + 10, hdr, (size_t)n);
    memset(buf + 10 + n, ' ', pad);
    buf[10 + hlen - 1] = '\n';
    if (bytes) memcpy(buf + 10 + hlen, data, bytes);
    int rc = kst_write_file_atomic(path, buf, 10 + hlen + bytes, err);
    kst_free(buf);
    return rc;
}

int kst_npy_read(const char *path, kst_npy *out, kst_error *err) {
    memset(out, 0, sizeof *out);
    kst_mmap m;
    int rc = kst_mmap_open(path, &m, err);
    if (rc != KST_OK) return rc;
    const unsigned char *p = m.data;
    if (m.size < 10 || memcmp(p, "\x93NUMPY", 6) != 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: not a .npy file (bad magic)", path);
        goto done;
    }
    size_t hlen, off;
    if (p[6] == 1) {
        hlen = (size_t)p[8] | ((size_t)p[9] << 8);
        off = 10;
    } else if (p[6] == 2 || p[6] == 3) {
        if (m.size < 12) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: truncated header", path);
            goto done;
        }
        hlen = (size_t)p[8] | ((size_t)p[9] << 8) | ((size_t)p[10] << 16) | ((size_t)p[11] << 24);
        off = 12;
    } else {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: unsupported .npy version %d", path, p[6]);
        goto done;
    }
    if (hlen > m.size - off || hlen > 65536) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: header length %zu exceeds file", path, hlen);
        goto done;
    }
    char hdr[65537];
    memcpy(hdr, p + off, hlen);
    hdr[hlen] = '\0';
    if (strstr(hdr, "'fortran_order': True")) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: Fortran-order arrays are not supported", path);
        goto done;
    }
    if (strstr(hdr, "'<f4'")) out->dtype = KST_NPY_F32;
    else if (strstr(hdr, "'<i8'")) out->dtype = KST_NPY_I64;
    else if (strstr(hdr, "'<i4'")) out->dtype = KST_NPY_I32;
    else {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: dtype must be <f4, <i8 or <i4 (header: %s)", path,
                      hdr);
        goto done;
    }
    const char *s = strstr(hdr, "'shape':");
    const char *lp = s ? strchr(s, '(') : NULL;
    const char *rp = lp ? strchr(lp, ')') : NULL;
    if (!rp) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: header has no shape", path);
        goto done;
    }
    out->count = 1;
    for (const char *q = lp + 1; q < rp;) {
        while (q < rp && (*q == ' ' || *q == ',')) q++;
        if (q >= rp) break;
        if (out->ndim == 4 || *q < '0' || *q > '9') {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: unsupported shape in header %s", path, hdr);
            goto done;
        }
        size_t v = 0;
        while (q < rp && *q >= '0' && *q <= '9') v = v * 10 + (size_t)(*q++ - '0');
        out->shape[out->ndim++] = v;
        out->count *= v;
    }
    size_t bytes = out->count * size_of(out->dtype);
    if (m.size - off - hlen != bytes) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: expected %zu data bytes, found %zu", path, bytes,
                      m.size - off - hlen);
        goto done;
    }
    out->data = kst_malloc(bytes ? bytes : 1, 1, path, err);
    if (!out->data) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (bytes) memcpy(out->data, p + off + hlen, bytes);
done:
    kst_mmap_close(&m);
    return rc;
}

void kst_npy_free(kst_npy *a) {
    if (!a) return;
    kst_free(a->data);
    a->data = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* streaming writer */

#define STREAM_HDR 128 /* fixed header size, rewritten with the final shape */

static int write_stream_header(kst_npy_writer *w, kst_error *err) {
    char hdr[STREAM_HDR + 1];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (%zu, %zu), }",
                     descr_of(w->dtype), w->rows, w->cols);
    if (n < 0 || n > STREAM_HDR - 11) return kst_fail(err, KST_ERR_INVALID, "%s: shape too large", w->path);
    unsigned char buf[STREAM_HDR];
    size_t hlen = STREAM_HDR - 10;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)(hlen & 0xff);
    buf[9] = (unsigned char)(hlen >> 8);
    memset(buf + 10, ' ', hlen);
    memcpy(buf + 10, hdr, (size_t)n);
    buf[STREAM_HDR - 1] = '\n';
    FILE *fp = w->fp;
    if (fseek(fp, 0, SEEK_SET) != 0 || fwrite(buf, 1, STREAM_HDR, fp) != STREAM_HDR)
        return kst_fail(err, KST_ERR_IO, "%s: write failed: %s", w->tmp, strerror(errno));
    return fseek(fp, 0, SEEK_END) == 0 ? KST_OK
                                      : kst_fail(err, KST_ERR_IO, "%s: seek failed", w->tmp);
}

int kst_npy_writer_open(kst_npy_writer *w, const char *path, kst_npy_dtype dtype, size_t cols,
                        kst_error *err) {
    memset(w, 0, sizeof *w);
    w->dtype = dtype;
    w->cols = cols;
    size_t n = strlen(path);
    w->path = kst_strndup(path, n, err);
    w->tmp = kst_malloc(n + 32, 1, "temporary path", err);
    if (!w->path || !w->tmp) {
        kst_npy_writer_abort(w);
        return KST_ERR_NOMEM;
    }
    snprintf(w->tmp, n + 32, "%s.tmp.%ld", path, (long)getpid());
    w->fp = fopen(w->tmp, "w+b");
    if (!w->fp) {
        int rc = kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", w->tmp, strerror(errno));
        kst_npy_writer_abort(w);
        return rc;
    }
    int rc = write_stream_header(w, err);
    if (rc != KST_OK) kst_npy_writer_abort(w);
    return rc;
}

int kst_npy_writer_append(kst_npy_writer *w, const void *rows, size_t nrows, kst_error *err) {
    size_t bytes = nrows * w->cols * size_of(w->dtype);
    if (bytes && fwrite(rows, 1, bytes, w->fp) != bytes)
        return kst_fail(err, KST_ERR_IO, "%s: write failed: %s", w->tmp, strerror(errno));
    w->rows += nrows;
    return KST_OK;
}

int kst_npy_writer_finish(kst_npy_writer *w, kst_error *err) {
    int rc = write_stream_header(w, err);
    if (rc == KST_OK && (fflush(w->fp) != 0 || fsync(fileno(w->fp)) != 0))
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot flush: %s", w->tmp, strerror(errno));
    if (fclose(w->fp) != 0 && rc == KST_OK)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot close: %s", w->tmp, strerror(errno));
    w->fp = NULL;
    if (rc == KST_OK && rename(w->tmp, w->path) != 0)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot rename into place: %s", w->path, strerror(errno));
    kst_npy_writer_abort(w);
    return rc;
}

void kst_npy_writer_abort(kst_npy_writer *w) {
    if (w->fp) fclose(w->fp);
    if (w->tmp) unlink(w->tmp); /* harmless after a successful rename */
    kst_free(w->tmp);
    kst_free(w->path);
    memset(w, 0, sizeof *w);
}
