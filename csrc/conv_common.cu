// What every kernel family shares: which device architectures this build compiled, and the
// (scale, shift) packing the Ampere epilogue broadcasts.
#include <initializer_list>
#include <string>
#include <vector>

#include "conv_kernels.h"
#include "conv_sm80_epilogue.h"

namespace fastres {

// __CUDA_ARCH_LIST__ (nvcc >= 11.5) lists every device target of this compilation, also in the
// host pass, e.g. 800,900 for TORCH_CUDA_ARCH_LIST="8.0;9.0a".
std::vector<int> compiled_device_archs() {
  std::vector<int> sms;
#if defined(__CUDA_ARCH_LIST__)
  for (int arch : {__CUDA_ARCH_LIST__}) sms.push_back(arch / 10);
#endif
  return sms;
}

__global__ void pack_channel_affine(const float* scale, const float* shift, ChannelAffine* out, int k) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < k) {
    out[i].scale = scale ? scale[i] : 1.f;
    out[i].shift = shift ? shift[i] : 0.f;
  }
}

std::string pack_affine(const ConvArgs& a, void* workspace, cudaStream_t stream) {
  constexpr int kThreads = 256;
  pack_channel_affine<<<(a.k + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      a.scale, a.shift, static_cast<ChannelAffine*>(workspace), a.k);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("CUDA error after packing scale and shift: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace fastres
