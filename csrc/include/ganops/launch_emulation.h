// The CUDA launches run on the CPU, for the launch checks (csrc/<op>/<op>_launch_check.cpp,
// test ops registered for CPU tensors).
//
// A launch check replays the grid the CUDA host code would choose: for every block and every
// thread it calls the kernel's per-thread functions from <op>.h, counts in a Coverage how
// often each element is visited (an element touched twice or never is the commonest CUDA
// bug), and combines a block's values with block.h's tree steps in the kernel's order, so
// its results are the kernel's to the bit.
#pragma once

#include <torch/csrc/stable/library.h>

#include <ganops/block.h>
#include <ganops/tensor.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace ganops {

// Visit counts: one int32 per element of an int32 tensor of the given sizes, zero at first.
class Coverage {
 public:
  explicit Coverage(std::initializer_list<int64_t> sizes)
      : counts_(zeros(sizes, ScalarType::Int, Device(DeviceType::CPU))), data_(counts_.mutable_data_ptr<int32_t>()) {}

  // Counts one visit of the element at flat index k.
  void visit(int64_t k) const { ++data_[k]; }
  // The counts from flat index offset on, as a Coverage of their own: one launch's row of
  // a [launches, n] tensor, one tensor's elements in a list's concatenation.
  Coverage from(int64_t offset) const { return Coverage(counts_, data_ + offset); }
  const Tensor& counts() const { return counts_; }

 private:
  Coverage(Tensor counts, int32_t* data) : counts_(std::move(counts)), data_(data) {}
  Tensor counts_;
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

// Defines a launch check's test op, NAME with SIGNATURE "(args) -> returns", with FN its
// kernel for CPU tensors (the only device it runs on: it stands in for the GPU). Test ops
// are not in the registry: their schema is written here, once.
#define GANOPS_LAUNCH_CHECK_OP(NAME, SIGNATURE, FN)                          \
  STABLE_TORCH_LIBRARY_FRAGMENT(ganops, m) { m.def(NAME SIGNATURE); }       \
  STABLE_TORCH_LIBRARY_IMPL(ganops, CPU, m) { m.impl(NAME, TORCH_BOX(&FN)); }
