// Ampere / Ada fused conv kernels, bfloat16.
#include "conv_sm80.cuh"

namespace fastres {

KernelList sm80_kernels_bf16() { return sm80_kernels<cutlass::bfloat16_t>("bf16"); }

}  // namespace fastres
