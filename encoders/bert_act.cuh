/* bert_act.cuh - the feed-forward activations of encoders/bert.h (KST_ACT_*) on the GPU, for the
 * inference (bert_gpu.cu) and training (bert_gpu_train.cu) kernels alike. */
#ifndef KST_ENCODERS_BERT_ACT_CUH
#define KST_ENCODERS_BERT_ACT_CUH

#include <math.h>

#include "encoders/bert.h"

static __device__ __forceinline__ float act_fn(float x, int act) {
    switch (act) {
    case KST_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case KST_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f;
        return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
    case KST_ACT_RELU: return x > 0 ? x : 0.0f;
    case KST_ACT_TANH: return tanhf(x);
    default: return x;
    }
}

#endif
