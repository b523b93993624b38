// The CUDA launches run on the CPU, for the launch checks (csrc/<op>/<op>_launch_check.cpp,
// test ops registered for CPU tensors).
//
// A launch check replays the grid the CUDA host code would choose: for every block and every
// thread it calls the kernel's per-thread functions from <op>.h, counts in a Coverage how
// often each element is visited (an element touched twice or never is the commonest CUDA
// bug), and combines a block's values with block.h's tree steps in the kernel's order, so
// its results are the kernel's to the bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ganops/block.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace ganops {

// Visit counts: one int32 per element of an int32 tensor of the given sizes, zero at first.
class Coverage {
 public:
  explicit Coverage(std::initializer_list<int64_t> sizes)
      : counts_(at::zeros(sizes, at::TensorOptions().dtype(c10::kInt))), data_(counts_.data_ptr<int32_t>()) {}

  // Counts one visit of the element at flat index k.
  void visit(int64_t k) const { ++data_[k]; }
  // The counts from flat index offset on, as a Coverage of their own: one launch's row of
  // a [launches, n] tensor, one tensor's elements in a list's concatenation.
  Coverage from(int64_t offset) const { return Coverage(counts_, data_ + offset); }
  const at::Tensor& counts() const { return counts_; }

 private:
  Coverage(at::Tensor counts, int32_t* data) : counts_(std::move(counts)), data_(data) {}
  at::Tensor counts_;
  int32_t* data_;
};

// The tree of block_reduce (block.h) over the values of n_threads threads, step by step;
// returns thread 0's value.
template <typename Acc, typename Combine>
Acc emulate_block_reduce(Acc* values, int n_threads, Combine combine) {
  for (int stride = n_threads / 2; stride > 0; stride /= 2) {
    for (int tid = 0; tid < n_threads; ++tid) tree_reduce_step(values, tid, stride, combine);
  }
  return values[0];
}

// One block of kThreads: thread_value(tid) is thread tid's contribution (run in thread order,
// with whatever it records on the way); returns what block_reduce<kThreads> gives thread 0.
template <int kThreads, typename Acc, typename Combine = Plus, typename ThreadValue>
Acc emulate_block(ThreadValue&& thread_value, Combine combine = {}) {
  std::vector<Acc> values(kThreads);
  for (int tid = 0; tid < kThreads; ++tid) values[tid] = thread_value(tid);
  return emulate_block_reduce(values.data(), kThreads, combine);
}

}  // namespace ganops

// Defines a launch check's test op, `schema`, with FN its kernel for CPU tensors (the only
// device it runs on: it stands in for the GPU).
#define GANOPS_LAUNCH_CHECK_OP(SCHEMA, FN) \
  TORCH_LIBRARY_FRAGMENT(ganops, m) { m.def(SCHEMA, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(FN))); }
