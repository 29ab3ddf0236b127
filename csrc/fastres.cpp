// Torch binding of the CUTLASS kernels: schemas (declared once, here), input checks, stream and
// device handling. No CUTLASS headers here; the kernels sit behind conv_kernels.h.
//
// Ops (namespace fastres; the public op fastres::conv_bn_act is defined in Python and calls them):
//   cutlass_conv_bn_act(...)          the fused conv, CUDA tensors, channels_last operands
//   cutlass_conv_bn_act.out(..., out) the same into a given output (tuning's check poisons it)
//   cutlass_unsupported_reason(...)   "" if some kernel covers a case, else why not (no tensors:
//                                     answers on any machine, which is how CI checks the rules)
//   cutlass_usable_configs(...)       the config ids whose kernel covers the case
//   cutlass_configs(dtype, arch)      ";"-joined names of the kernels that run on an SM version
//   cutlass_archs()                   SM versions this build has device code for, e.g. [80, 90]
//   cutlass_build_digest()            what this library was built from (setup.py's build_digest),
//                                     which names its kernels' code: no two builds are byte-equal
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "conv_kernels.h"

#ifndef FASTRES_BUILD_DIGEST
#define FASTRES_BUILD_DIGEST unknown
#endif
#define FASTRES_STRINGIFY(x) FASTRES_STRINGIFY_(x)
#define FASTRES_STRINGIFY_(x) #x

// `import fastres._C` loads this library; its static initialisers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace fastres {
namespace {

std::vector<ConvKernel> join(std::initializer_list<KernelList> lists) {
  std::vector<ConvKernel> all;
  for (const KernelList& list : lists) all.insert(all.end(), list.kernels, list.kernels + list.count);
  return all;
}

// The kernels that run on a device of SM version `arch`, Hopper's own first. sm_90a code runs
// on sm_90 only; sm_8x code runs on any 8.y with y >= x. The Ampere kernels are compiled for
// every target, so on Hopper they are extra candidates beside the wgmma kernels.
const std::vector<ConvKernel>& kernels_for(at::ScalarType dtype, int64_t arch) {
  static const std::vector<int> built = compiled_device_archs();
  auto has = [&](auto pred) { return std::any_of(built.begin(), built.end(), pred); };
  static const std::vector<ConvKernel> none;
  static const std::vector<ConvKernel> hopper_f16 = join({sm90_kernels_f16(), sm80_kernels_f16()});
  static const std::vector<ConvKernel> hopper_bf16 = join({sm90_kernels_bf16(), sm80_kernels_bf16()});
  static const std::vector<ConvKernel> ampere_f16 = join({sm80_kernels_f16()});
  static const std::vector<ConvKernel> ampere_bf16 = join({sm80_kernels_bf16()});
  const bool half = dtype == at::kHalf, bf16 = dtype == at::kBFloat16;
  if (arch == 90 && has([](int sm) { return sm == 90; })) return half ? hopper_f16 : bf16 ? hopper_bf16 : none;
  if (arch / 10 == 8 && has([&](int sm) { return sm / 10 == 8 && sm <= arch; })) {
    return half ? ampere_f16 : bf16 ? ampere_bf16 : none;
  }
  return none;
}

std::string built_archs() {
  std::string names;
  for (int sm : compiled_device_archs()) names += (names.empty() ? "sm_" : ", sm_") + std::to_string(sm);
  return names.empty() ? "none" : names;
}

// The activation as the epilogue's clamp bounds; false for activations the epilogue lacks.
bool clamp_bounds(c10::string_view act, float* lower, float* upper) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  if (act == "none") { *lower = -inf; *upper = inf; return true; }
  if (act == "relu") { *lower = 0.f; *upper = inf; return true; }
  if (act == "relu6") { *lower = 0.f; *upper = 6.f; return true; }
  return false;
}

int64_t out_extent(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1;
}

ConvArgs make_args(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, c10::string_view act) {
  ConvArgs a;
  a.n = static_cast<int>(x[0]); a.c = static_cast<int>(x[1]); a.h = static_cast<int>(x[2]); a.w_ = static_cast<int>(x[3]);
  a.k = static_cast<int>(w[0]); a.r = static_cast<int>(w[2]); a.s = static_cast<int>(w[3]);
  a.stride_h = static_cast<int>(stride[0]); a.stride_w = static_cast<int>(stride[1]);
  a.pad_h = static_cast<int>(padding[0]); a.pad_w = static_cast<int>(padding[1]);
  a.dil_h = static_cast<int>(dilation[0]); a.dil_w = static_cast<int>(dilation[1]);
  a.p = static_cast<int>(out_extent(x[2], w[2], stride[0], padding[0], dilation[0]));
  a.q = static_cast<int>(out_extent(x[3], w[3], stride[1], padding[1], dilation[1]));
  clamp_bounds(act, &a.act_lower, &a.act_upper);
  return a;
}

// The rules every compiled kernel shares (cheap; the per-tile can_implement check comes after).
std::string static_reason(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype, c10::string_view act,
                          int64_t arch) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return std::string("no CUTLASS kernel for dtype ") + c10::toString(dtype) + " (float16 and bfloat16 only)";
  }
  if (kernels_for(dtype, arch).empty()) {
    return "this build has no CUTLASS kernels that run on sm_" + std::to_string(arch) + " (device code for: " +
           built_archs() + "; TORCH_CUDA_ARCH_LIST chooses)";
  }
  if (x.size() != 4 || w.size() != 4 || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) {
    return "expects 4-D x and weight sizes and (h, w) stride, padding and dilation";
  }
  if (groups != 1) return "grouped convolution (groups=" + std::to_string(groups) + ") is not covered by the CUTLASS kernels";
  if (x[1] % 8 != 0 || w[0] % 8 != 0) {
    return "CUTLASS's 16-byte vector loads (TMA on Hopper, cp.async on Ampere) need C and K to be "
           "multiples of 8, got C=" + std::to_string(x[1]) + ", K=" + std::to_string(w[0]);
  }
  float lower, upper;
  if (!clamp_bounds(act, &lower, &upper)) {
    return "act='" + std::string(act) + "' is not compiled into the CUTLASS epilogue (none, relu and relu6 are)";
  }
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  for (int64_t v : {x[0], x[1], x[2], x[3], w[0], w[2], w[3]}) {
    if (v > int_max) return "an extent exceeds the 32-bit range of CUTLASS's conv problem shape";
  }
  // Past 2**31 elements only the Triton backend's int64 indexing is tested, so leave those to it.
  const int64_t p = out_extent(x[2], w[2], stride[0], padding[0], dilation[0]);
  const int64_t q = out_extent(x[3], w[3], stride[1], padding[1], dilation[1]);
  if (x[0] * x[1] * x[2] * x[3] > int_max || x[0] * w[0] * p * q > int_max) {
    return "x or the output has 2**31 elements or more; the CUTLASS kernels are not tested past 32-bit offsets";
  }
  return "";
}

// Which kernels for (dtype, arch) cover a problem: the shared rules first, then each kernel's own
// can_implement. `reason` is why none does ("" when one does), `usable` the ids of those that do.
struct Coverage {
  std::string reason;
  std::vector<int64_t> usable;
};

Coverage coverage(at::IntArrayRef x_size, at::IntArrayRef w_size, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype, c10::string_view act, int64_t arch) {
  Coverage result{static_reason(x_size, w_size, stride, padding, dilation, groups, dtype, act, arch), {}};
  if (!result.reason.empty()) return result;
  const ConvArgs args = make_args(x_size, w_size, stride, padding, dilation, act);
  const std::vector<ConvKernel>& kernels = kernels_for(dtype, arch);
  std::string first_rejection;
  for (std::size_t i = 0; i < kernels.size(); ++i) {
    std::string why = kernels[i].check(args);
    if (why.empty()) {
      result.usable.push_back(static_cast<int64_t>(i));
    } else if (first_rejection.empty()) {
      first_rejection = "no tile config accepts the problem (" + kernels[i].name + ": " + why + ")";
    }
  }
  if (result.usable.empty()) result.reason = first_rejection;
  return result;
}

std::vector<int64_t> cutlass_usable_configs(at::IntArrayRef x_size, at::IntArrayRef w_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            at::ScalarType dtype, c10::string_view act, int64_t arch) {
  return coverage(x_size, w_size, stride, padding, dilation, groups, dtype, act, arch).usable;
}

std::string cutlass_unsupported_reason(at::IntArrayRef x_size, at::IntArrayRef w_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                       at::ScalarType dtype, c10::string_view act, int64_t arch) {
  return coverage(x_size, w_size, stride, padding, dilation, groups, dtype, act, arch).reason;
}

std::string cutlass_configs(at::ScalarType dtype, int64_t arch) {
  std::string names;
  for (const ConvKernel& kernel : kernels_for(dtype, arch)) {
    if (!names.empty()) names += ";";
    names += kernel.name;
  }
  return names;
}

std::vector<int64_t> cutlass_archs() {
  std::vector<int> sms = compiled_device_archs();
  return std::vector<int64_t>(sms.begin(), sms.end());
}

int64_t device_arch(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "Expected all tensors to be on the same device, but found at least two devices, ",
              x.device(), " and ", t.device(), "! (", name, ")");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "Input type (", x.scalar_type(), ") and ", name, " type (",
              t.scalar_type(), ") should be the same");
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "cutlass_conv_bn_act: ", name, " must be a 4-D channels_last-contiguous tensor");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, "cutlass_conv_bn_act: ", name,
              " must start on a 16-byte boundary (the kernels' vector loads need it); got a view at storage ",
              "offset ", t.storage_offset());
}

void check_vector(const std::optional<at::Tensor>& v, const char* name, const at::Tensor& x, int64_t k) {
  if (!v) return;
  TORCH_CHECK(v->device() == x.device(), "Expected all tensors to be on the same device, but found at least two devices, ",
              x.device(), " and ", v->device(), "! (", name, ")");
  TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->numel() == k && v->is_contiguous(),
              "cutlass_conv_bn_act: expected ", name, " to be a contiguous float32 vector of ", k, " elements, got ",
              v->scalar_type(), " of size ", v->sizes());
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(v->data_ptr()) % 16 == 0, "cutlass_conv_bn_act: ", name,
              " must start on a 16-byte boundary; got a view at storage offset ", v->storage_offset());
}

// The checks of x, weight and the conv's arguments both forms share; the problem they describe.
ConvArgs checked_problem(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view act) {
  TORCH_CHECK(x.is_cuda(), "cutlass_conv_bn_act: expected CUDA tensors, got x on ", x.device());
  check_operand(x, "input", x);
  check_operand(weight, "weight", x);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "cutlass_conv_bn_act: stride, padding and dilation must be (h, w) pairs");
  TORCH_CHECK(x.size(1) == weight.size(1) * groups, "Given groups=", groups, ", weight of size ", weight.sizes(),
              ", expected input", x.sizes(), " to have ", weight.size(1) * groups, " channels, but got ", x.size(1),
              " channels instead");
  const int64_t arch = device_arch(x.get_device());
  const std::string reason =
      static_reason(x.sizes(), weight.sizes(), stride, padding, dilation, groups, x.scalar_type(), act, arch);
  TORCH_CHECK(reason.empty(), "cutlass_conv_bn_act: ", reason);
  return make_args(x.sizes(), weight.sizes(), stride, padding, dilation, act);
}

// Kernel `config` on `args` into `out` (channels_last, the output's size: as the caller allocated or
// checked it), on x's current stream.
at::Tensor& launch(ConvArgs args, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, int64_t config,
                   at::Tensor& out) {
  check_vector(scale, "scale", x, args.k);
  check_vector(shift, "shift", x, args.k);
  if (residual) {
    check_operand(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == out.sizes(), "Expected residual of size ", out.sizes(),
                " (the output's size), but got residual of size ", residual->sizes());
  }
  if (out.numel() == 0) return out;

  const std::vector<ConvKernel>& kernels = kernels_for(x.scalar_type(), device_arch(x.get_device()));
  TORCH_CHECK(config >= 0 && config < static_cast<int64_t>(kernels.size()), "cutlass_conv_bn_act: config ", config,
              " out of range [0, ", kernels.size(), ")");
  const ConvKernel& kernel = kernels[config];
  args.x = x.data_ptr();
  args.w = weight.data_ptr();
  args.scale = scale ? scale->data_ptr<float>() : nullptr;
  args.shift = shift ? shift->data_ptr<float>() : nullptr;
  args.residual = residual ? residual->data_ptr() : nullptr;
  args.out = out.data_ptr();
  const std::string why = kernel.check(args);
  TORCH_CHECK(why.empty(), "cutlass_conv_bn_act (", kernel.name, "): ", why);

  const std::size_t bytes = kernel.workspace_bytes(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  const std::string err =
      kernel.run(args, bytes ? workspace.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err.empty(), "cutlass_conv_bn_act (", kernel.name, "): ", err);
  return out;
}

at::Tensor cutlass_conv_bn_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view act, int64_t config) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvArgs args = checked_problem(x, weight, stride, padding, dilation, groups, act);
  at::Tensor out = at::empty({args.n, args.k, args.p, args.q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  return launch(args, x, weight, scale, shift, residual, config, out);
}

// Into a given output: tuning's float64 check poisons it first, so a kernel that leaves part of it
// unwritten fails there (a fresh output would hold whatever the allocator's block held).
at::Tensor& cutlass_conv_bn_act_out(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                    const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    c10::string_view act, int64_t config, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ConvArgs args = checked_problem(x, weight, stride, padding, dilation, groups, act);
  check_operand(out, "out", x);
  const std::vector<int64_t> size = {args.n, args.k, args.p, args.q};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(size), "Expected out of size ", at::IntArrayRef(size),
              " (the conv's output size), but got out of size ", out.sizes());
  return launch(args, x, weight, scale, shift, residual, config, out);
}

}  // namespace

// FRAGMENT, not TORCH_LIBRARY: the Python side defines fastres::conv_bn_act in the same namespace.
TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.def(
      "cutlass_conv_bn_act(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, str act, int config) -> Tensor");
  m.def(
      "cutlass_conv_bn_act.out(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str act, int config, *, Tensor(a!) out) "
      "-> Tensor(a!)");
  m.def(
      "cutlass_unsupported_reason(int[] x_size, int[] w_size, int[] stride, int[] padding, int[] dilation, int groups, "
      "ScalarType dtype, str act, int arch) -> str",
      &cutlass_unsupported_reason);
  m.def(
      "cutlass_usable_configs(int[] x_size, int[] w_size, int[] stride, int[] padding, int[] dilation, int groups, "
      "ScalarType dtype, str act, int arch) -> int[]",
      &cutlass_usable_configs);
  m.def("cutlass_configs(ScalarType dtype, int arch) -> str", &cutlass_configs);
  m.def("cutlass_archs() -> int[]", &cutlass_archs);
  m.def("cutlass_build_digest() -> str", []() { return std::string(FASTRES_STRINGIFY(FASTRES_BUILD_DIGEST)); });
}

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("cutlass_conv_bn_act", &cutlass_conv_bn_act);
  m.impl("cutlass_conv_bn_act.out", &cutlass_conv_bn_act_out);
}

}  // namespace fastres
