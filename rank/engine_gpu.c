/* engine_gpu.c - moving an open index's encoders and dense search to the GPU. */
#include "engine.h"

#include "core/check.h"
#include "core/gpu.h"

int kst_ix_set_device(kst_ix *ix, int device, kst_error *err) {
    int rc = KST_OK;
    if (device != KST_DEV_CPU && device != KST_DEV_CUDA)
        return kst_fail(err, KST_ERR_INVALID, "device %d: expected 0 (cpu) or 1 (cuda)", device);
    if (device == KST_DEV_CUDA) KST_TRY(kst_gpu_check(err));
    ix->device = device;
    kst_encoder *encs[4] = {ix->dense, ix->colbert, ix->cross, ix->query};
    for (int i = 0; i < 4; i++)
        if (encs[i]) KST_TRY(kst_encoder_set_device(encs[i], device, err));
    if (ix->ann) KST_TRY(kst_ann_set_device(ix->ann, device, 0, err));
done:
    return rc;
}
