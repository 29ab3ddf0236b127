// Hopper fused conv kernels, bfloat16.
#include "conv_sm90.cuh"

namespace fastres {

KernelList sm90_kernels_bf16() {
  using T = cutlass::bfloat16_t;
  static const ConvKernel kernels[] = {
      Sm90ConvBnAct<T, Tile128x128>::entry("sm90_bf16_128x128x64"),
      Sm90ConvBnAct<T, Tile128x64>::entry("sm90_bf16_128x64x64"),
      Sm90ConvBnAct<T, Tile64x128>::entry("sm90_bf16_64x128x64"),
      Sm90ConvBnAct<T, Tile64x64>::entry("sm90_bf16_64x64x64"),
  };
  return {kernels, static_cast<int>(sizeof(kernels) / sizeof(kernels[0]))};
}

}  // namespace fastres
