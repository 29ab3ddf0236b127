// The seam between the torch binding (fastres.cpp, ATen, no CUTLASS) and the CUTLASS kernels
// (conv_sm80_*.cu and conv_sm90_*.cu, CUTLASS, no ATen). Keeping the two apart halves compile
// time and memory.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace fastres {

// One fused conv + BN + residual + activation call. Operands are packed channels_last:
// x is NHWC, w is KRSC, residual and out are NPQK. Optional pointers may be null.
struct ConvArgs {
  const void* x = nullptr;
  const void* w = nullptr;
  const float* scale = nullptr;     // per output channel, multiplies the accumulator
  const float* shift = nullptr;     // per output channel, added after the scale
  const void* residual = nullptr;   // added after the shift
  void* out = nullptr;
  int n = 0, h = 0, w_ = 0, c = 0;  // input extents (w_ to keep `w` for the weight pointer)
  int k = 0, r = 0, s = 0;          // filter extents
  int p = 0, q = 0;                 // output extents
  int pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
  // The activation as a clamp: none = (-inf, inf), relu = (0, inf), relu6 = (0, 6).
  float act_lower = 0.f, act_upper = 0.f;
};

// One compiled tile configuration of the fused kernel.
struct ConvKernel {
  std::string name;  // family_dtype_tile, e.g. "sm90_f16_128x128x64"; Python parses the tile
  std::string (*check)(const ConvArgs&);      // "" when it can run these args, else why not
  std::size_t (*workspace_bytes)(const ConvArgs&);
  std::string (*run)(const ConvArgs&, void* workspace, cudaStream_t);  // "" on success
};

struct KernelList {
  const ConvKernel* kernels;
  int count;
};

// Hopper (sm_90a) kernels: CUTLASS 3 implicit GEMM, TMA im2col + wgmma, EVT epilogue.
// One dtype per .cu file, so nvcc builds them in parallel.
KernelList sm90_kernels_f16();
KernelList sm90_kernels_bf16();

// Ampere / Ada kernels: CUTLASS 2 implicit GEMM, cp.async + mma.sync, broadcast epilogue.
KernelList sm80_kernels_f16();
KernelList sm80_kernels_bf16();

inline std::string kernel_name(const char* family, const char* dtype, int m, int n, int k) {
  return std::string(family) + "_" + dtype + "_" + std::to_string(m) + "x" + std::to_string(n) + "x" +
         std::to_string(k);
}

// The device architectures this build has machine code for, as SM numbers (TORCH_CUDA_ARCH_LIST
// "8.0;9.0a" gives {80, 90}). Every .cu file is compiled for all of them.
std::vector<int> compiled_device_archs();

}  // namespace fastres
