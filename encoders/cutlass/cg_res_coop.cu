#define CG_IMPL
#include "encoders/cutlass/gemm.cuh"
/* the LayerNorm-folded products of the GPU encoder (KESTREL_GPU_LNFOLD): cooperative schedule (FC2: K = 4 C) */
CG_DEF(3, 0)
