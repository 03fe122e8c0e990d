/* file.h - whole-file reads, read-only memory maps and atomic replacement. */
#ifndef KST_CORE_FILE_H
#define KST_CORE_FILE_H

#include <stddef.h>

#include "error.h"

/* A read-only view of a whole file. `data` is NULL for an empty file. */
typedef struct kst_mmap {
    const unsigned char *data;
    size_t size;
} kst_mmap;

/* Maps `path` read-only. On failure *m is zeroed and err names the path and the OS reason. */
int kst_mmap_open(const char *path, kst_mmap *m, kst_error *err);
/* Unmaps; a zeroed kst_mmap is a no-op. */
void kst_mmap_close(kst_mmap *m);

/* Reads the whole file into a NUL-terminated buffer the caller frees with kst_free.
 * *len (may be NULL) receives the byte count without the NUL. */
int kst_read_file(const char *path, char **out, size_t *len, kst_error *err);

/* Writes `len` bytes to `path` through a temporary file in the same folder, fsync and rename, so
 * readers see either the old file or the whole new one. */
int kst_write_file_atomic(const char *path, const void *data, size_t len, kst_error *err);

/* Creates `path` and its missing parents (mode 0755); an existing folder is fine. */
int kst_mkdirs(const char *path, kst_error *err);

/* 1 when `path` exists (any type), 0 otherwise. */
int kst_path_exists(const char *path);
/* Joins a folder and a name into buf; returns KST_ERR_INVALID when it does not fit. */
int kst_path_join(char *buf, size_t cap, const char *dir, const char *name, kst_error *err);

#endif
