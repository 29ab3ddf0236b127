// The fused conv kernel for Hopper, as one CUTLASS 3 template, and its list of tiles. Included by
// conv_sm90_<dtype>.cu.
//
// Mainloop: implicit GEMM with TMA im2col loads of NHWC activations and KRSC filters, wgmma with
// fp32 accumulation (KernelImplicitTmaWarpSpecializedSm90: the only SM90 conv schedule CUTLASS
// accepts). Epilogue: the visitor tree PerColLinCombPerColBiasEltAct, which computes
//   D = clamp(scale[k] * acc + beta * C + shift[k], lower, upper)
// with C = the residual (beta = 1, or beta = 0 and no load of C) and the clamp standing for
// none / relu / relu6, chosen at run time, so one instantiation serves every activation.
#pragma once

#include <limits>
#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cute/tensor.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "conv_kernels.h"
#include "cutlass_status.h"

namespace fastres {

template <class Element, class TileShape>
struct Sm90ConvBnAct {
  using Layout = cutlass::layout::TensorNHWC;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using FusionOp = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<
      cutlass::epilogue::thread::Clamp, Element, float, /*bias*/ float, /*source*/ Element, /*scalar*/ float>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, Layout, kAlignment, Element, Layout, kAlignment,
      cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Element, Layout, kAlignment, Element, Layout, kAlignment, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static typename Conv::Arguments arguments(const ConvArgs& a) {
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation,
                       {a.n, a.h, a.w_, a.c}, {a.k, a.r, a.s, a.c},
                       {a.pad_h, a.pad_w}, {a.pad_h, a.pad_w},
                       {a.stride_h, a.stride_w}, {a.dil_h, a.dil_w}, /*groups=*/1);
    // The output (and residual) strides, innermost first, as CUTLASS's conv testbed sets them.
    typename Kernel::StrideC stride_c{};
    typename Kernel::StrideD stride_d{};
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    // Without a residual, C points at the output: valid memory for the TMA descriptor, never
    // read because beta = 0 switches the source load off.
    auto* c_ptr = static_cast<const Element*>(a.residual ? a.residual : a.out);
    typename Conv::Arguments args{
        shape,
        {static_cast<const Element*>(a.x), static_cast<const Element*>(a.w)},
        {{}, c_ptr, stride_c, static_cast<Element*>(a.out), stride_d}};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.f;
    fusion.alpha_ptr = a.scale;  // per-column (per output channel) vector when non-null
    fusion.beta = a.residual ? 1.f : 0.f;
    fusion.bias_ptr = a.shift;
    fusion.activation.lower_bound = a.act_lower;
    fusion.activation.upper_bound = a.act_upper;
    return args;
  }

  static std::string check(const ConvArgs& a) { return can_implement_reason(Conv::can_implement(arguments(a))); }

  static std::size_t workspace_bytes(const ConvArgs& a) { return Conv::get_workspace_size(arguments(a)); }

  static std::string run(const ConvArgs& a, void* workspace, cudaStream_t stream) {
    Conv conv;
    cutlass::Status status = conv.initialize(arguments(a), workspace, stream);
    if (status == cutlass::Status::kSuccess) status = conv.run(stream);
    return launch_result(status);
  }

  static ConvKernel entry(const char* dtype) {
    using namespace cute;
    return {kernel_name("sm90", dtype, size<0>(TileShape{}), size<1>(TileShape{}), size<2>(TileShape{})), &check,
            &workspace_bytes, &run};
  }
};

// Tile shapes (M pixels x N channels x K reduction): 128x128 for the wide middle layers,
// 128x64 for K = 64 layers, 64x128 and 64x64 for the few-pixel late layers and small batches.
// K = 64 elements (128 B of fp16) per stage: one TMA box row. No 128x256: with this schedule's
// single consumer warpgroup its 256 fp32 accumulators per thread make ptxas serialize wgmma (C7511).
using Tile128x128 = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
using Tile128x64 = cute::Shape<cute::_128, cute::_64, cute::Shape<cute::_64>>;
using Tile64x128 = cute::Shape<cute::_64, cute::_128, cute::Shape<cute::_64>>;
using Tile64x64 = cute::Shape<cute::_64, cute::_64, cute::Shape<cute::_64>>;

template <class Element>
KernelList sm90_kernels(const char* dtype) {
  static const ConvKernel kernels[] = {
      Sm90ConvBnAct<Element, Tile128x128>::entry(dtype),
      Sm90ConvBnAct<Element, Tile128x64>::entry(dtype),
      Sm90ConvBnAct<Element, Tile64x128>::entry(dtype),
      Sm90ConvBnAct<Element, Tile64x64>::entry(dtype),
  };
  return {kernels, static_cast<int>(sizeof(kernels) / sizeof(kernels[0]))};
}

}  // namespace fastres
