// What a thread of a CUDA block does, shared by every op's kernels and by the CPU launch
// checks that replay them (launch_emulation.h): the elements a thread visits, and the
// block-wide tree reduction (one order, written once, so a CPU test follows the kernel's
// arithmetic exactly).
#pragma once

#include <ganops/common.h>

namespace ganops {

// Elements of a chunk that thread `tid` of `nthreads` visits: tid, tid + nthreads, ...
// Consecutive threads touch consecutive elements, so global loads coalesce.
template <typename F>
GANOPS_HD void for_each_thread_element(int64_t chunk_len, int tid, int nthreads, F&& f) {
  for (int64_t i = tid; i < chunk_len; i += nthreads) f(i);
}

// Addition as a function object: the combine of every sum.
struct Plus {
  template <typename T>
  GANOPS_HD T operator()(T a, T b) const { return a + b; }
};

// The reduction's step: thread t < stride combines in thread t + stride's value. The CUDA
// block_reduce below and its CPU emulation (launch_emulation.h) both take these steps.
template <typename Acc, typename Combine>
GANOPS_HD void tree_reduce_step(Acc* values, int tid, int stride, Combine combine) {
  if (tid < stride) values[tid] = combine(values[tid], values[tid + stride]);
}

#if defined(__CUDACC__)
// Every thread of a block of kThreads (a power of two) passes its value; all get the total.
template <int kThreads, typename Acc, typename Combine>
__device__ Acc block_reduce(Acc value, Combine combine) {
  __shared__ Acc values[kThreads];
  values[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    tree_reduce_step(values, threadIdx.x, stride, combine);
    __syncthreads();
  }
  const Acc out = values[0];
  // The shared array may be reused by the next reduction in the same kernel.
  __syncthreads();
  return out;
}

// The sum over a block of kThreads.
template <int kThreads, typename Acc>
__device__ Acc block_sum(Acc value) {
  return block_reduce<kThreads>(value, Plus{});
}
#endif

}  // namespace ganops
