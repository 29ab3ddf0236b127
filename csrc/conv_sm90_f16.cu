// Hopper fused conv kernels, float16.
#include "conv_sm90.cuh"

namespace fastres {

KernelList sm90_kernels_f16() { return sm90_kernels<cutlass::half_t>("f16"); }

}  // namespace fastres
