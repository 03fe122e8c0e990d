/* tokens.h - the late-interaction token store: per-document ColBERT vectors in float16, in one
 * append-only file that readers memory-map.
 *
 * Layout of `tokens.f16`: a 64-byte header (magic "KSTTOK01", u32 dim, zero padding), then rows
 * of `dim` little-endian IEEE half floats. A document's rows are (offset, count) kept in the
 * SQLite store, committed only after the rows are written and synced, so a crash leaves at most
 * unreferenced rows at the end of the file, never a reference to missing rows. */
#ifndef KST_INDEX_TOKENS_H
#define KST_INDEX_TOKENS_H

#include "core/half.h"
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct kst_tokens kst_tokens;

/* Opens (writable: creating when absent) `path` for vectors of `dim` floats. A file of another
 * dim or without the magic is an error naming it. */
int kst_tokens_open(const char *path, size_t dim, int writable, kst_tokens **out, kst_error *err);
void kst_tokens_close(kst_tokens *t);

/* Appends n rows (n, dim) converted to float16 (round to nearest even); *first receives the
 * row number of the first. Data is durable only after kst_tokens_sync. */
int kst_tokens_append(kst_tokens *t, const float *rows, size_t n, uint64_t *first, kst_error *err);
int kst_tokens_sync(kst_tokens *t, kst_error *err);

/* Copies rows [first, first + n) as float32 into out (n, dim). Rows past the end of the mapped
 * file are an error naming the file (a stale or corrupt reference). Safe to call from several
 * threads at once on a read-only store. */
int kst_tokens_read(kst_tokens *t, uint64_t first, size_t n, float *out, kst_error *err);

size_t kst_tokens_dim(const kst_tokens *t);
uint64_t kst_tokens_rows(const kst_tokens *t);


#endif
