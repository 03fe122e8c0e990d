#define CG_IMPL
#include "encoders/cutlass/gemm.cuh"
/* the LayerNorm-folded products of the GPU encoder (KESTREL_GPU_LNFOLD): ping-pong schedule */
CG_DEF(3, 1)
