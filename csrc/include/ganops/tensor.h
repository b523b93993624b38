// The tensor vocabulary of the kernels' host code, on LibTorch's stable ABI.
//
// Every compiled module of ganops is built against torch/csrc/stable and torch/headeronly
// only, with TORCH_TARGET_VERSION = 2.11 (setup.py): it calls libtorch through its C shim,
// never through a C++ symbol, so one binary loads beside every torch from 2.11 on. This
// header gives the host code the few tensor operations it needs, named as ATen names them;
// what the stable API lacks is done here with sizes and pointers, or in Python.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace ganops {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using Device = torch::stable::Device;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
// What a Tensor[] argument of a schema arrives as.
using TensorList = std::vector<Tensor>;

// narrow and copy_ are the stable API's own.
using torch::stable::copy_;
using torch::stable::narrow;

// The C shim's calls for a new tensor, zeroing and cloning (called qualified, ganops::zero_
// and ganops::clone: the stable API's own are found too, by argument-dependent lookup). The stable API's empty(),
// empty_like(), zero_() and clone() call their ATen ops through the dispatcher, by name, a
// few microseconds each, and a small op makes several (a spectral-norm step on a 64 × 48
// weight: about 0.3 ms in all); these are direct calls.
namespace detail {
inline int32_t shim_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return aoti_torch_dtype_float32();
    case ScalarType::Double: return aoti_torch_dtype_float64();
    case ScalarType::Half: return aoti_torch_dtype_float16();
    case ScalarType::BFloat16: return aoti_torch_dtype_bfloat16();
    case ScalarType::Long: return aoti_torch_dtype_int64();
    case ScalarType::Int: return aoti_torch_dtype_int32();
    case ScalarType::Bool: return aoti_torch_dtype_bool();
    default: STD_TORCH_CHECK(false, "ganops: no tensor of dtype ", t, " is made here");
  }
  return 0;
}
inline int32_t shim_device_type(DeviceType t) {
  return t == DeviceType::CUDA ? aoti_torch_device_type_cuda() : aoti_torch_device_type_cpu();
}
}  // namespace detail

inline Tensor zero_(Tensor t) {
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(t.get()));
  return t;
}
inline Tensor clone(const Tensor& t) {
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_clone(t.get(), &out));
  return Tensor(out);
}

// A new tensor's dtype and device (what ATen's TensorOptions says here): options(t) for t's,
// options(t).dtype(d) for t's device with another dtype. The device defaults to the CPU.
struct Options {
  ScalarType dtype_ = ScalarType::Float;
  Device device_ = Device(DeviceType::CPU);

  Options dtype(ScalarType d) const { return {d, device_}; }
  Options device(Device d) const { return {dtype_, d}; }
};
inline Options options(const Tensor& t) { return {t.scalar_type(), t.device()}; }

// A new contiguous tensor.
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, Device device) {
  const int64_t dim = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> strides(dim);
  int64_t stride = 1;
  for (int64_t d = dim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(dim, sizes.data(), strides.data(), detail::shim_dtype(dtype),
                                                         detail::shim_device_type(device.type()), device.index(),
                                                         &out));
  return Tensor(out);
}
// A new tensor of `sizes` with like's dtype and device.
inline Tensor empty(IntArrayRef sizes, const Tensor& like) { return empty(sizes, like.scalar_type(), like.device()); }
inline Tensor empty(IntArrayRef sizes, const Options& o) { return empty(sizes, o.dtype_, o.device_); }
inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, Device device) {
  Tensor t = empty(sizes, dtype, device);
  ganops::zero_(t);
  return t;
}
inline Tensor zeros(IntArrayRef sizes, const Tensor& like) { return zeros(sizes, like.scalar_type(), like.device()); }
inline Tensor zeros(IntArrayRef sizes, const Options& o) { return zeros(sizes, o.dtype_, o.device_); }
inline Tensor zeros_like(const Tensor& t) { return zeros(t.sizes(), t); }
inline Tensor full(IntArrayRef sizes, double value, const Tensor& like) {
  Tensor t = empty(sizes, like);
  torch::stable::fill_(t, value);
  return t;
}
// t itself when it is contiguous, else a contiguous copy. Asked first here: the stable
// contiguous() is an op call through the dispatcher (a microsecond or two) even for a tensor
// that is contiguous already, and clipping makes one per gradient (2000 gradients: 5.4 ms
// against 2.3 ms with ATen's inline check, before this test).
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) { return torch::stable::to(t, dtype); }

// Whether a and b start at the same memory (as_contiguous(t) returned t itself).
inline bool same_data(const Tensor& a, const Tensor& b) { return a.data_ptr() == b.data_ptr(); }

// Sizes as ATen prints them, for error messages: "[2, 3, 4]".
inline std::string shape_text(IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}
inline std::string shape_text(const Tensor& t) { return shape_text(t.sizes()); }

// "cpu", "cuda" (lower case), or "CPU", "CUDA", as torch names a device type.
inline std::string device_type_text(DeviceType type, bool lower_case = false) {
  switch (type) {
    case DeviceType::CPU: return lower_case ? "cpu" : "CPU";
    case DeviceType::CUDA: return lower_case ? "cuda" : "CUDA";
    case DeviceType::Meta: return lower_case ? "meta" : "META";
    default: return lower_case ? "other" : "OTHER";
  }
}
// A device as torch prints it: "cpu", "cuda:0".
inline std::string device_text(const Device& device) {
  std::string text = device_type_text(device.type(), true);
  if (device.index() >= 0) text += ":" + std::to_string(device.index());
  return text;
}
inline std::string device_text(const Tensor& t) { return device_text(t.device()); }

// A layout as torch prints it ("Strided", "Sparse", ...), for error messages.
inline std::string layout_text(torch::headeronly::Layout layout) {
  using torch::headeronly::Layout;
  switch (layout) {
    case Layout::Strided: return "Strided";
    case Layout::Sparse: return "Sparse";
    case Layout::SparseCsr: return "SparseCsr";
    case Layout::SparseCsc: return "SparseCsc";
    case Layout::SparseBsr: return "SparseBsr";
    case Layout::SparseBsc: return "SparseBsc";
    case Layout::Mkldnn: return "Mkldnn";
    default: return "non-strided";
  }
}

}  // namespace ganops
