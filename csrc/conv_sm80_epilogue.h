// The epilogue output op of the Ampere kernels (conv_sm80.cuh), apart so that its arithmetic can
// be tested on the host (tests/test_cuda_build.py compiles it into a small program).
//
// Why a custom output op: CUTLASS 2's conv epilogues carry one source tensor and ONE broadcast
// vector, and their alpha/beta are scalars, while we need a per-channel scale AND a per-channel
// shift AND the residual. The broadcast vector is typed by the output op, so we make its element
// a (scale, shift) pair: each thread loads its columns' pairs once per tile, and the op computes
//   D = clamp(scale[k] * acc + shift[k] + C, lower, upper)
// exactly in fp32 (folding the scale into fp16 weights instead would round it a second time).
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/array.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/numeric_conversion.h"

namespace fastres {

// One output channel's folded batch norm; the element type of the epilogue's broadcast vector.
struct ChannelAffine {
  float scale;
  float shift;
  ChannelAffine() = default;
  // Array<ChannelAffine>::clear() builds T(0): columns past K read as a zero pair.
  CUTLASS_HOST_DEVICE explicit ChannelAffine(int zero) : scale(float(zero)), shift(float(zero)) {}
};

// The output op of EpilogueWithBroadcast (single-source form): Z = clamp(scale * AB + shift + C).
// ElementCompute is what the epilogue's broadcast fragment holds, hence the pair; all arithmetic
// is float. The source C (the residual) is read only when Params::residual is set.
template <class Element, int N>
class ScaleShiftResidualClamp {
 public:
  static bool const kIsSingleSource = true;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;
  static int const kElementsPerAccess = N;
  static int const kCount = N;

  using ElementOutput = Element;
  using ElementC = Element;
  using ElementZ = Element;
  using ElementT = Element;
  using ElementAccumulator = float;
  using ElementCompute = ChannelAffine;
  using ElementVector = ChannelAffine;

  using FragmentAccumulator = cutlass::Array<float, N>;
  using FragmentCompute = cutlass::Array<ChannelAffine, N>;
  using FragmentC = cutlass::Array<Element, N>;
  using FragmentOutput = cutlass::Array<Element, N>;
  using FragmentZ = cutlass::Array<Element, N>;
  using FragmentT = cutlass::Array<Element, N>;

  struct Params {
    float lower = 0.f;
    float upper = 0.f;
    bool residual = false;
  };

  CUTLASS_HOST_DEVICE explicit ScaleShiftResidualClamp(Params const& params) : params_(params) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params_.residual; }

  // Serial split-K is never launched (split_k_slices = 1), so there are no partial tiles.
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& ab, FragmentC const& c,
                                      FragmentCompute const& affine) const {
    cutlass::NumericArrayConverter<float, Element, N> to_float;
    FragmentAccumulator residual = to_float(c);
    FragmentAccumulator y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = affine[i].scale * ab[i] + affine[i].shift + residual[i];
    store(z, y);
  }

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& ab,
                                      FragmentCompute const& affine) const {
    FragmentAccumulator y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = affine[i].scale * ab[i] + affine[i].shift;
    store(z, y);
  }

 private:
  CUTLASS_HOST_DEVICE void store(FragmentZ& z, FragmentAccumulator y) const {
    cutlass::epilogue::thread::Clamp<float> clamp;  // NaN-propagating, like torch.relu
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = clamp(y[i], params_.lower, params_.upper);
    z = cutlass::NumericArrayConverter<Element, float, N>()(y);
  }

  Params params_;
};

}  // namespace fastres
