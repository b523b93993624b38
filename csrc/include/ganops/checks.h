// Input checks shared by the kernels' host code. Python validates arguments first and
// raises errors naming them; these checks are the last line, so a bad call from C++ or
// torch.ops never reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

namespace ganops {

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

inline void check_float(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, std::string_view a_name, const at::Tensor& b,
                              std::string_view b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// b must match a's shape, dtype and device.
inline void check_like(const at::Tensor& a, std::string_view a_name, const at::Tensor& b,
                       std::string_view b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), a_name, " and ", b_name, " must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, a_name, b, b_name);
}

inline void check_dim(const at::Tensor& t, int64_t dim, std::string_view name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

}  // namespace ganops
