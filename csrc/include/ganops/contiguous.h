// Kernels read and write contiguous memory. An in-place op on a tensor that is not
// contiguous works in a contiguous copy, and copy_back then writes the result into the
// caller's tensor; a tensor that was contiguous already is its own copy and is left alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ganops {

inline std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

inline void copy_back(const at::Tensor& tensor, const at::Tensor& contig) {
  if (!tensor.is_same(contig)) tensor.copy_(contig);
}

inline void copy_back(at::TensorList tensors, const std::vector<at::Tensor>& contig) {
  for (size_t k = 0; k < tensors.size(); ++k) copy_back(tensors[k], contig[k]);
}

}  // namespace ganops
