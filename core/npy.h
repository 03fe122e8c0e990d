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

#endif
