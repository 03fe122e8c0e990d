/* idmap.h - internal id -> external id, in a memory-mapped file beside each FAISS file.
 *
 * A dense search returns FAISS's internal ids; turning them into the caller's external ids
 * through SQLite costs a B-tree walk per hit (1-4 us each once FAISS has evicted its pages from
 * the CPU caches), more than the 5% the search path may add to FAISS. Each generation's
 * `dense.N.faiss` gets a `dense.N.ids` written in the same transaction, from the same rows, so
 * the map always describes exactly the vectors of its FAISS file; opening it maps it and checks
 * its header (O(1)); a lookup is two loads.
 *
 * Layout (little-endian): magic "KSTIDMAP", u32 version (1), u32 zero, u64 slots (largest
 * internal id + 1), u64 count (documents present), u64 blob bytes, u64 off[slots + 1], then the
 * blob. Internal id i's external id is blob[off[i] .. off[i + 1]); an empty range means no
 * document has that id. Lookups check the offsets they read, so a corrupt file gives an error,
 * never a read out of bounds. */
#ifndef KST_INDEX_IDMAP_H
#define KST_INDEX_IDMAP_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "index/store.h"

typedef struct kst_idmap kst_idmap;

/* Writes every (id, ext_id) of the store's documents table, as the store's connection sees it
 * (uncommitted rows of its open transaction included), to `path` atomically. */
int kst_idmap_write(kst_store *s, const char *path, kst_error *err);

/* Maps `path`. A file that is not an id map, or whose sizes disagree with its length, is
 * KST_ERR_FORMAT naming it. */
int kst_idmap_open(const char *path, kst_idmap **out, kst_error *err);
void kst_idmap_close(kst_idmap *m);

/* The external id of internal id `id` (not NUL-terminated: *len bytes), or NULL with *len = 0
 * when the map has no such id. A corrupt entry is NULL with *len = SIZE_MAX. */
const char *kst_idmap_get(const kst_idmap *m, int64_t id, size_t *len);

/* Documents in the map. */
uint64_t kst_idmap_count(const kst_idmap *m);
const char *kst_idmap_path(const kst_idmap *m);

#endif
