// The CUDA norm launches of clip_grad_norm_cuda.cu run on the CPU, block by block and thread
// by thread (ganops/launch_emulation.h), with the same tables, per-thread functions and
// reduction order: a test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/contiguous.h>
#include <ganops/dispatch.h>
#include <ganops/launch_emulation.h>

#include <tuple>
#include <vector>

#include "clip_grad_norm/clip_grad_norm.h"

namespace ganops::clip_grad_norm {
namespace {

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename Out>
LaunchCheck launch_check_impl(const std::vector<Tensor>& tensors, NormSpec s, c10::ScalarType out_dtype) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  const Tables tables = build_tables(entries_of(tensors, /*by_dtype=*/true), kNumGroups);
  const TableView view = table_view(tables.buffer.data(), n, tables.n_chunks);
  // Tensor k's elements are counted from base[k] on.
  std::vector<int64_t> base(n + 1, 0);
  for (int64_t k = 0; k < n; ++k) base[k + 1] = base[k] + tensors[k].numel();
  const Coverage visits({base[n]});

  // chunk_partial_kernel, one launch per dtype group: a chunk per block.
  std::vector<Out> partials(tables.n_chunks);
  for (int g = 0; g < kNumGroups; ++g) {
    for (int64_t c = tables.group_first_chunk[g]; c < tables.group_first_chunk[g + 1]; ++c) {
      const int64_t k = view.chunk_tensor[c];
      const Coverage chunk_visits = visits.from(base[k] + view.chunk_offset[c]);
      GANOPS_DISPATCH_FLOATING_TYPES(tensors[k].scalar_type(), "launch_check", [&] {
        using Acc = acc_t<scalar_t>;
        const scalar_t* chunk = reinterpret_cast<const scalar_t*>(view.ptrs[k]) + view.chunk_offset[c];
        const Acc partial = emulate_block<kThreads, Acc>(
            [&](int tid) {
              for_each_thread_element(view.chunk_len[c], tid, kThreads, [&](int64_t i) { chunk_visits.visit(i); });
              return thread_partial<scalar_t, Acc>(chunk, view.chunk_len[c], tid, kThreads, s);
            },
            NormCombine{s});
        partials[c] = static_cast<Out>(partial);
      });
    }
  }

  // tensor_finish_kernel, block k for tensor k; total_finish_kernel, one block. Every read of
  // a partial and of a tensor sum is counted.
  const Coverage partial_reads({tables.n_chunks});
  const Coverage sum_reads({n});
  Tensor per = empty({n}, Options{}.dtype(out_dtype));
  std::vector<Out> sums(n);
  for (int64_t k = 0; k < n; ++k) {
    const Coverage tensor_reads = partial_reads.from(view.first_chunk[k]);
    sums[k] = emulate_block<kThreads, Out>(
        [&](int tid) {
          for (int64_t c = tid; c < view.num_chunks[k]; c += kThreads) tensor_reads.visit(c);
          return tensor_finish_thread<Out>(view, partials.data(), k, tid, kThreads, s);
        },
        NormCombine{s});
    per.mutable_data_ptr<Out>()[k] = norm_finish(sums[k], s);
  }
  const Out combined = emulate_block<kThreads, Out>(
      [&](int tid) {
        for (int64_t k = tid; k < n; k += kThreads) sum_reads.visit(k);
        return total_finish_thread<Out>(sums.data(), n, tid, kThreads, s);
      },
      NormCombine{s});
  Tensor total = empty({}, Options{}.dtype(out_dtype));
  total.mutable_data_ptr<Out>()[0] = norm_finish(combined, s);
  return {visits.counts(), partial_reads.counts(), sum_reads.counts(), per, total};
}

LaunchCheck cuda_launch_check(const TensorList& tensors, double norm_type) {
  check_norm_type(norm_type);
  check_grad_tensors(tensors, DeviceType::CPU);
  const auto contig = contiguous_all(tensors);
  const NormSpec s = make_norm_spec(norm_type);
  const auto out_dtype = result_dtype(tensors);
  if (out_dtype == ScalarType::Double) return launch_check_impl<double>(contig, s, out_dtype);
  return launch_check_impl<float>(contig, s, out_dtype);
}

// Runs the CUDA norm kernels' per-thread functions for every block and thread of the
// launch the CUDA host code would choose. Returns (times each element was visited, times
// the finish read each chunk's partial, times it read each tensor's sum, per-tensor norms,
// total norm).
GANOPS_LAUNCH_CHECK_OP("_multi_tensor_norm_cuda_launch_check", "(Tensor[] tensors, float norm_type) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::clip_grad_norm
