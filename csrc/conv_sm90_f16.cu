// Hopper fused conv kernels, float16.
#include "conv_sm90.cuh"

namespace fastres {

KernelList sm90_kernels_f16() {
  using T = cutlass::half_t;
  static const ConvKernel kernels[] = {
      Sm90ConvBnAct<T, Tile128x128>::entry("sm90_f16_128x128x64"),
      Sm90ConvBnAct<T, Tile128x64>::entry("sm90_f16_128x64x64"),
      Sm90ConvBnAct<T, Tile64x128>::entry("sm90_f16_64x128x64"),
      Sm90ConvBnAct<T, Tile64x64>::entry("sm90_f16_64x64x64"),
  };
  return {kernels, static_cast<int>(sizeof(kernels) / sizeof(kernels[0]))};
}

// __CUDA_ARCH_LIST__ (nvcc >= 11.5) lists every device target of this compilation, also in the
// host pass: report whether sm_90 device code exists (setup.py builds it as sm_90a).
bool sm90_compiled() {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int arch : archs) {
    if (arch == 900) return true;
  }
#endif
  return false;
}

}  // namespace fastres
