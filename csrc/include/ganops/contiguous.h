// Kernels read and write contiguous memory. An in-place op on a tensor that is not
// contiguous works in a contiguous copy, and copy_back then writes the result into the
// caller's tensor; a tensor that was contiguous already is its own copy and is left alone.
#pragma once

#include <ganops/tensor.h>

#include <vector>

namespace ganops {

inline std::vector<Tensor> contiguous_all(const TensorList& tensors) {
  std::vector<Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(as_contiguous(t));
  return out;
}

inline void copy_back(const Tensor& tensor, const Tensor& contig) {
  if (same_data(tensor, contig)) return;
  Tensor dst = tensor;  // a handle to the caller's tensor
  copy_(dst, contig);
}

inline void copy_back(const TensorList& tensors, const std::vector<Tensor>& contig) {
  for (size_t k = 0; k < tensors.size(); ++k) copy_back(tensors[k], contig[k]);
}

}  // namespace ganops
