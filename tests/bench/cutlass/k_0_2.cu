#define CG_IMPL
#include "gemm.cuh"
CG_DEF(0, 2)
