/* checkpoint.h - saves an open encoder's current weights as a checkpoint folder in the layout it
 * was loaded from (sentence-transformers, ColBERT, transformers), loadable by those libraries. */
#ifndef KST_ENCODERS_CHECKPOINT_H
#define KST_ENCODERS_CHECKPOINT_H

#include "core/error.h"
#include "encoders/encoder.h"

/* Writes e's current parameters (e->bert.param_mem) to out_dir as a checkpoint of the source
 * folder's layout (e->dir):
 * - each safetensors file the encoder loaded (model.safetensors, and a sentence-transformers Dense
 *   module's) is rewritten at the same relative path, with exactly the source file's tensor names
 *   and shapes, all float tensors as F32. Tensors Kestrel holds (QKV un-stacked into
 *   query/key/value or q_lin/k_lin/v_lin, LayerNorm gamma/beta kept under the source's spelling)
 *   come from e's parameters; tensors Kestrel does not use (an unused pooler, cls.predictions.*,
 *   position_ids) are carried over from the source file unchanged (half precision widened to F32);
 * - every other file of the source tree is copied unchanged (config.json, tokenizer files,
 *   modules.json, 1_Pooling/config.json, artifact.metadata, README.md, ...), except that the model
 *   config.json's "dtype" / "torch_dtype" becomes "float32" where it said float16 or bfloat16.
 *   Hidden entries (".git", ".cache") and other weight files (*.bin, *.pt, *.onnx, ...: stale
 *   copies of the old weights) are not copied.
 * out_dir is created (with its parents) when missing; files already in it that the checkpoint
 * does not name are left alone (a training run's log stays). Each file is replaced atomically,
 * and the weights are written last, so a failed save leaves no half-written file and never a
 * folder whose safetensors are new but whose config is old.
 * Fails with KST_ERR_INVALID when out_dir is the source folder or inside it (the source is never
 * overwritten), KST_ERR_IO naming the path when a folder or file cannot be made or written,
 * KST_ERR_SHAPE when the source safetensors no longer match the encoder (changed on disk since
 * it was opened), KST_ERR_NOMEM. e is not modified. */
int kst_checkpoint_save(const kst_encoder *e, const char *out_dir, kst_error *err);

#endif
