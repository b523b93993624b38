// Input checks shared by the kernels' host code. Python validates arguments first and
// raises errors naming them; these checks are the last line, so a bad call from C++ or
// torch.ops never reaches a kernel.
#pragma once

#include <ganops/tensor.h>

#include <string_view>

namespace ganops {

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

inline void check_float(const Tensor& t, std::string_view name) {
  STD_TORCH_CHECK(is_supported_float(t.scalar_type()), name,
                  " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_same_device(const Tensor& a, std::string_view a_name, const Tensor& b, std::string_view b_name) {
  STD_TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ",
                  device_text(a), " and ", device_text(b));
}

// t must be on a device of type `type` (the kernel's own).
inline void check_device_type(const Tensor& t, std::string_view name, DeviceType type) {
  STD_TORCH_CHECK(t.device().type() == type, name, " must be a ", device_type_text(type), " tensor here, got ",
                  device_text(t));
}

// b must match a's shape, dtype and device.
inline void check_like(const Tensor& a, std::string_view a_name, const Tensor& b, std::string_view b_name) {
  STD_TORCH_CHECK(a.sizes().equals(b.sizes()), a_name, " and ", b_name, " must have the same shape, got ",
                  shape_text(a), " and ", shape_text(b));
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
                  a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, a_name, b, b_name);
}

inline void check_dim(const Tensor& t, int64_t dim, std::string_view name) {
  STD_TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", shape_text(t));
}

}  // namespace ganops
