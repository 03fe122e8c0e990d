#define CG_IMPL
#include "encoders/cutlass/gemm.cuh"
CG_DEF(2, 0)
