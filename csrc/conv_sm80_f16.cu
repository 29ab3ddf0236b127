// Ampere / Ada fused conv kernels, float16.
#include "conv_sm80.cuh"

namespace fastres {

KernelList sm80_kernels_f16() { return sm80_kernels<cutlass::half_t>("f16"); }

}  // namespace fastres
