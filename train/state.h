/* state.h - the resumable training state file: a JSON header (step, schedule position, data
 * position, RNG, options) and the flat parameter and AdamW moment buffers, replaced atomically.
 *
 * Layout (little-endian):
 *   8 bytes   magic "KSTTRAIN"
 *   u32       version (1)
 *   u32       number of float blocks `nb` (3 for a training state: params, AdamW m, AdamW v)
 *   u64       floats per block `n`
 *   u64       JSON length `j` (bytes, no NUL)
 *   j bytes   JSON header (the trainer's fields; this module does not interpret it)
 *   padding   zero bytes up to a multiple of 64 from the start of the file
 *   nb * n    float32, block after block
 * The file is written to `path`.tmp, fsynced, renamed over `path`, and the folder fsynced, so a
 * crash (kill -9, power loss) at any moment leaves either the previous state or the new one
 * whole, never a mixture; a reader refuses a file whose size does not match its header. */
#ifndef KST_TRAIN_STATE_H
#define KST_TRAIN_STATE_H

#include <stddef.h>

#include "core/error.h"

/* Writes the state: json (NUL-terminated) and nb blocks of n floats each. Fails with KST_ERR_IO
 * naming the file (and then `path` is untouched and the temporary removed) or KST_ERR_INVALID
 * for a path that does not fit. Inputs are not modified.
 * Crash-test hook: the environment variable KESTREL_TEST_KILL=mid_state_save[:N] kills the
 * process (SIGKILL) during its Nth state write (default 1st), after the first block is written
 * to the temporary file, before the rename. */
int kst_train_state_write(const char *path, const char *json, const float *const *blocks,
                          size_t nb, size_t n, kst_error *err);

/* Reads a state written above: *json (OUT, NUL-terminated, free with kst_free) and the float
 * blocks into the caller's nb buffers of n floats each. Fails with KST_ERR_NOTFOUND when `path`
 * does not exist, KST_ERR_FORMAT naming the file for a wrong magic, version, size or block
 * shape (a state saved from another model: "holds N parameters, the model has M"),
 * KST_ERR_IO, KST_ERR_NOMEM. On failure the blocks may be partly overwritten. */
int kst_train_state_read(const char *path, char **json, float *const *blocks, size_t nb,
                         size_t n, kst_error *err);

#endif
