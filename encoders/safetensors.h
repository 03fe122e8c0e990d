/* safetensors.h - read-only access to .safetensors files through a memory map. */
#ifndef KST_ENCODERS_SAFETENSORS_H
#define KST_ENCODERS_SAFETENSORS_H

#include "core/half.h"
#include <stddef.h>

#include "core/error.h"
#include "core/file.h"

typedef enum { KST_DT_F32, KST_DT_F16, KST_DT_BF16, KST_DT_OTHER } kst_dtype;

typedef struct kst_st_tensor {
    char *name;
    kst_dtype dtype;
    char dtype_name[8];          /* as written in the header ("F32", "I64", ...) */
    int ndim;
    size_t shape[8];
    size_t count;                /* product of shape */
    const unsigned char *data;   /* into the map; count * element size bytes */
} kst_st_tensor;

typedef struct kst_safetensors {
    char *path;
    kst_mmap map;
    kst_st_tensor *tensors;
    size_t n;
} kst_safetensors;

/* Maps and validates `path`: the 8-byte header length, the JSON header, every tensor's dtype,
 * shape and data_offsets (inside the data region, consistent with shape and dtype, not
 * overlapping). Errors name the file and the tensor. Close with kst_safetensors_close. */
int kst_safetensors_open(const char *path, kst_safetensors *st, kst_error *err);
/* Unmaps and frees; a zeroed struct is a no-op. */
void kst_safetensors_close(kst_safetensors *st);
/* The tensor called `name`, or NULL. */
const kst_st_tensor *kst_safetensors_find(const kst_safetensors *st, const char *name);
/* Copies tensor `t` into dst as float32, converting F16/BF16. Fails (naming the file, the tensor,
 * the expected and the found shape) unless t has exactly the `ndim` dims in `shape`, or when its
 * dtype is not F32, F16 or BF16. */
int kst_st_tensor_to_f32(const kst_safetensors *st, const kst_st_tensor *t, int ndim,
                         const size_t *shape, float *dst, kst_error *err);

/* Half-precision conversions (exact); float16 lives in core/half.h. */
float kst_bf16_to_f32(unsigned short h);

#endif
