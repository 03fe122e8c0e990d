/* npy.h - NumPy .npy files (format version 1.0): float32, int64 and int32 arrays, C order. */
#ifndef KST_CORE_NPY_H
#define KST_CORE_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef enum { KST_NPY_F32, KST_NPY_I64, KST_NPY_I32 } kst_npy_dtype;

/* An array read from disk; `data` is owned (free with kst_npy_free). */
typedef struct kst_npy {
    kst_npy_dtype dtype;
    int ndim;          /* 0..4 */
    size_t shape[4];
    size_t count;      /* product of shape */
    void *data;
} kst_npy;

/* Writes a C-order array of `ndim` dims atomically. */
int kst_npy_write(const char *path, kst_npy_dtype dtype, const void *data, int ndim,
                  const size_t *shape, kst_error *err);
/* Reads a little-endian, C-order .npy of dtype <f4, <i8 or <i4. Anything else is KST_ERR_FORMAT
 * naming the file and what was found. */
int kst_npy_read(const char *path, kst_npy *out, kst_error *err);
void kst_npy_free(kst_npy *a);

/* Streams rows of a 2-D array to `path` when the row count is not known up front: rows go to a
 * temporary file whose fixed-size header is rewritten on finish, then renamed into place (so a
 * failed run leaves no partial file at `path`). */
typedef struct kst_npy_writer {
    char *path, *tmp;
    void *fp;        /* FILE * */
    kst_npy_dtype dtype;
    size_t cols, rows;
} kst_npy_writer;
int kst_npy_writer_open(kst_npy_writer *w, const char *path, kst_npy_dtype dtype, size_t cols,
                        kst_error *err);
int kst_npy_writer_append(kst_npy_writer *w, const void *rows, size_t nrows, kst_error *err);
/* Finishes and renames into place; on any earlier failure call kst_npy_writer_abort instead. */
int kst_npy_writer_finish(kst_npy_writer *w, kst_error *err);
/* Removes the temporary file; safe after finish (no-op) or on a zeroed writer. */
void kst_npy_writer_abort(kst_npy_writer *w);

#endif
