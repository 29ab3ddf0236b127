// The fused conv kernel for Ampere and Ada (sm_80 / sm_86 / sm_89), as one CUTLASS 2 template,
// and its list of tiles. Included by conv_sm80_<dtype>.cu. The same code also compiles for sm_90a
// and runs on Hopper (mma.sync), where it is one more candidate for the tuner beside wgmma.
//
// Mainloop: CUTLASS 2 implicit GEMM (optimized NHWC iterators, cp.async multistage, mma.sync
// 16x8x16, fp32 accumulation). Epilogue: EpilogueWithBroadcast with our own output op
// (conv_sm80_epilogue.h), whose broadcast vector holds a (scale, shift) pair per channel; the
// pairs are packed into the workspace by a tiny kernel before the conv.
#pragma once

#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"

#include "conv_kernels.h"
#include "conv_sm80_epilogue.h"
#include "cutlass_status.h"

namespace fastres {

// The workspace: the packed pairs first, then CUTLASS's own workspace at a 256-byte boundary.
inline std::size_t affine_bytes(int k) {
  return (static_cast<std::size_t>(k) * sizeof(ChannelAffine) + 255) / 256 * 256;
}

// Packs (scale or 1, shift or 0) per channel into the workspace's pairs (conv_common.cu).
std::string pack_affine(const ConvArgs& a, void* workspace, cudaStream_t stream);

template <class Element, class ThreadblockShape, class WarpShape, int Stages>
struct Sm80ConvBnAct {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte cp.async
  using Layout = cutlass::layout::TensorNHWC;
  using OutputOp = ScaleShiftResidualClamp<Element, kAlignment>;

  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, Layout, Element, Layout, Element, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
      cutlass::gemm::GemmShape<16, 8, 16>, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, Stages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, kAlignment, kAlignment>::Kernel;
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Conv::Arguments arguments(const ConvArgs& a, const ChannelAffine* affine) {
    cutlass::conv::Conv2dProblemSize size(a.n, a.h, a.w_, a.c, a.k, a.r, a.s, a.p, a.q, a.pad_h, a.pad_w, a.stride_h,
                                          a.stride_w, a.dil_h, a.dil_w, cutlass::conv::Mode::kCrossCorrelation);
    auto x = static_cast<Element*>(const_cast<void*>(a.x));
    auto w = static_cast<Element*>(const_cast<void*>(a.w));
    auto out = static_cast<Element*>(a.out);
    // Without a residual, C aliases the output; is_source_needed() = false keeps it unread.
    auto c = a.residual ? static_cast<Element*>(const_cast<void*>(a.residual)) : out;
    Layout x_layout = Layout::packed({a.n, a.h, a.w_, a.c});
    Layout w_layout = Layout::packed({a.k, a.r, a.s, a.c});
    Layout out_layout = Layout::packed({a.n, a.p, a.q, a.k});
    typename OutputOp::Params epilogue{a.act_lower, a.act_upper, a.residual != nullptr};
    // ldr = 0: every output row (pixel) reads the same per-channel vector.
    return typename Conv::Arguments(size, {x, x_layout}, {w, w_layout}, {c, out_layout}, {out, out_layout}, epilogue,
                                    cutlass::conv::SplitKMode::kSerial, const_cast<ChannelAffine*>(affine), nullptr,
                                    /*ldr=*/0, /*ldt=*/0);
  }

  static std::string check(const ConvArgs& a) {
    return can_implement_reason(Conv::can_implement(arguments(a, nullptr)));
  }

  static std::size_t workspace_bytes(const ConvArgs& a) {
    return affine_bytes(a.k) + Conv::get_workspace_size(arguments(a, nullptr));
  }

  static std::string run(const ConvArgs& a, void* workspace, cudaStream_t stream) {
    std::string err = pack_affine(a, workspace, stream);
    if (!err.empty()) return err;
    auto affine = static_cast<const ChannelAffine*>(workspace);
    void* conv_workspace = static_cast<char*>(workspace) + affine_bytes(a.k);
    Conv conv;
    cutlass::Status status = conv.initialize(arguments(a, affine), conv_workspace, stream);
    if (status == cutlass::Status::kSuccess) status = conv(stream);
    return launch_result(status);
  }

  static ConvKernel entry(const char* dtype) {
    return {kernel_name("sm80", dtype, ThreadblockShape::kM, ThreadblockShape::kN, ThreadblockShape::kK), &check,
            &workspace_bytes, &run};
  }
};

// Tiles (M pixels x N channels x K reduction, warp tile, stages): 64x64 warp tiles except for
// the narrow ones, 32 channels of reduction per stage (64 B fp16 rows per cp.async), stages sized
// to fit the ~100 KB of shared memory an Ada SM gives one block. 256x128 (8 warps) for the widest
// layers at large batch, 128x128 for the middle layers, 128x64 for K = 64 layers, 64x64 for the
// few-pixel late layers.
using Sm80Tile256x128 = cutlass::gemm::GemmShape<256, 128, 32>;
using Sm80Warp256x128 = cutlass::gemm::GemmShape<64, 64, 32>;
using Sm80Tile128x128 = cutlass::gemm::GemmShape<128, 128, 32>;
using Sm80Warp128x128 = cutlass::gemm::GemmShape<64, 64, 32>;
using Sm80Tile128x64 = cutlass::gemm::GemmShape<128, 64, 32>;
using Sm80Warp128x64 = cutlass::gemm::GemmShape<64, 32, 32>;
using Sm80Tile64x64 = cutlass::gemm::GemmShape<64, 64, 32>;
using Sm80Warp64x64 = cutlass::gemm::GemmShape<32, 32, 32>;

template <class Element>
KernelList sm80_kernels(const char* dtype) {
  static const ConvKernel kernels[] = {
      Sm80ConvBnAct<Element, Sm80Tile256x128, Sm80Warp256x128, 3>::entry(dtype),
      Sm80ConvBnAct<Element, Sm80Tile128x128, Sm80Warp128x128, 4>::entry(dtype),
      Sm80ConvBnAct<Element, Sm80Tile128x64, Sm80Warp128x64, 4>::entry(dtype),
      Sm80ConvBnAct<Element, Sm80Tile64x64, Sm80Warp64x64, 5>::entry(dtype),
  };
  return {kernels, static_cast<int>(sizeof(kernels) / sizeof(kernels[0]))};
}

}  // namespace fastres
