/* safetensors_write.h - writes .safetensors files as the Python library does, streamed and
 * atomically replaced. */
#ifndef KST_ENCODERS_SAFETENSORS_WRITE_H
#define KST_ENCODERS_SAFETENSORS_WRITE_H

#include <stddef.h>

#include "core/error.h"
#include "encoders/safetensors.h"

/* One tensor to write. `data` holds count(shape) elements of `src`'s dtype, little-endian:
 * - dtype "F32" with src KST_DT_F32, F16 or BF16: written as float32 (half precision converted
 *   exactly, a chunk at a time, so no whole-tensor copy is made);
 * - any other dtype (src KST_DT_OTHER, e.g. "I64" position ids): `nbytes` bytes copied as they are.
 * The caller keeps `name` and `data` valid for the call. */
typedef struct kst_st_out {
    const char *name;
    const char *dtype;   /* as written in the header: "F32", "I64", ... */
    kst_dtype src;       /* the dtype `data` holds */
    int ndim;            /* 0..8 */
    size_t shape[8];
    const void *data;
    size_t nbytes;       /* only read for pass-through (non-F32 output) tensors */
} kst_st_out;

/* Writes the n tensors to `path` in the layout the safetensors library (0.4+) writes:
 * u64 little-endian header length, a compact JSON header whose first key is "__metadata__"
 * ({"format": format}; left out when format is NULL), then one entry per tensor {"dtype", "shape", "data_offsets"} in data
 * order, padded with spaces to a multiple of 8 bytes so the data region starts aligned; tensors
 * sorted by element size (largest first), then by name, and laid out back to back. The file is
 * written to a temporary name beside `path`, fsynced, and renamed over it, so readers see the old
 * file or the whole new one. Fails (naming the file and the tensor) on a duplicate or empty name,
 * an unknown dtype or src/dtype pair, a bad ndim, an I/O error, or memory; on failure `path` is
 * untouched and no temporary file remains. Inputs are not modified. transformers refuses a
 * model.safetensors without format "pt"; sentence-transformers' Dense files carry no metadata. */
int kst_safetensors_write(const char *path, const kst_st_out *tensors, size_t n,
                          const char *format, kst_error *err);

/* Bytes per element of a header dtype name ("F32" -> 4, "I64" -> 8); 0 when unknown. */
size_t kst_st_dtype_size(const char *dtype);

#endif
