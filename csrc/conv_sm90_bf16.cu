// Hopper fused conv kernels, bfloat16.
#include "conv_sm90.cuh"

namespace fastres {

KernelList sm90_kernels_bf16() { return sm90_kernels<cutlass::bfloat16_t>("bf16"); }

}  // namespace fastres
