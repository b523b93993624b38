// CUDA kernels of the multi-tensor norm and scale.
//
// Launches per call, however many tensors: one host-to-device copy of the tables, one
// partial-norm kernel per grad dtype present, one finishing kernel; the scale is one kernel
// per dtype. Block b reduces chunk b (clip_grad_norm.h) into partials[b]; the finishing
// block combines the partials in a fixed order, so the norm is deterministic, and the clip
// coefficient is read from device memory: nothing waits on the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

#include "clip_grad_norm/clip_grad_norm.h"

namespace ganops::clip_grad_norm {
namespace {

template <typename T, typename Out>
__global__ void __launch_bounds__(kThreads)
    chunk_partial_kernel(const int64_t* table, int64_t n_tensors, int64_t n_chunks,
                         int64_t first_chunk, Out* partials, NormSpec s) {
  using Acc = acc_t<T>;
  const TableView view = table_view(table, n_tensors, n_chunks);
  const int64_t c = first_chunk + blockIdx.x;
  const T* chunk = reinterpret_cast<const T*>(view.ptrs[view.chunk_tensor[c]]) + view.chunk_offset[c];
  const Acc partial = thread_partial<T, Acc>(chunk, view.chunk_len[c], threadIdx.x, kThreads, s);
  const Acc block = block_reduce<kThreads>(partial, NormCombine{s});
  if (threadIdx.x == 0) partials[c] = static_cast<Out>(block);
}

template <typename Out>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const int64_t* table, int64_t n_tensors, int64_t n_chunks, const Out* partials,
                  Out* per_tensor, Out* total, NormSpec s) {
  const TableView view = table_view(table, n_tensors, n_chunks);
  const Out local = finish_thread<Out>(view, partials, n_tensors, threadIdx.x, kThreads, per_tensor, s);
  const Out block = block_reduce<kThreads>(local, NormCombine{s});
  if (threadIdx.x == 0) *total = norm_finish(block, s);
}

template <typename T, typename Tot>
__global__ void __launch_bounds__(kThreads)
    chunk_scale_kernel(const int64_t* table, int64_t n_tensors, int64_t n_chunks, int64_t first_chunk,
                       const Tot* total_norm, double max_norm) {
  using Acc = acc_t<T>;
  const Tot coef = clip_coefficient(*total_norm, max_norm);
  // Multiplying by exactly 1 changes no value: leave the chunk unread and unwritten.
  if (coef == Tot(1)) return;
  const TableView view = table_view(table, n_tensors, n_chunks);
  const int64_t c = first_chunk + blockIdx.x;
  T* chunk = reinterpret_cast<T*>(view.ptrs[view.chunk_tensor[c]]) + view.chunk_offset[c];
  const Acc scale = static_cast<Acc>(coef);
  for_each_thread_element(view.chunk_len[c], threadIdx.x, kThreads,
                          [&](int64_t i) { chunk[i] = static_cast<T>(static_cast<Acc>(chunk[i]) * scale); });
}

void check_cuda_tensors(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "expected at least one tensor");
  for (const auto& t : tensors) check_grad_tensor(t, tensors[0].device());
}

// Copies the tables to the device without blocking the host: pinned staging memory, whose
// block the caching host allocator keeps until the copy has run.
at::Tensor tables_on_device(const Tables& tables, const at::Device& device) {
  at::Tensor staging = at::empty({static_cast<int64_t>(tables.buffer.size())},
                                 at::TensorOptions().dtype(c10::kLong).pinned_memory(true));
  std::copy(tables.buffer.begin(), tables.buffer.end(), staging.data_ptr<int64_t>());
  return staging.to(device, /*non_blocking=*/true);
}

template <typename Out>
void launch_norm(const std::vector<at::Tensor>& tensors, const Tables& tables, const at::Tensor& table,
                 NormSpec s, at::Tensor& total, at::Tensor& per, bool per_tensor) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials = at::empty({std::max<int64_t>(tables.n_chunks, 1)}, total.options());
  for (int g = 0; g < kNumGroups; ++g) {
    const int64_t first = tables.group_first_chunk[g];
    const int64_t count = tables.group_first_chunk[g + 1] - first;
    if (count == 0) continue;
    c10::ScalarType dtype = c10::kFloat;
    for (const auto& t : tensors) {
      if (dtype_group(t.scalar_type()) == g) dtype = t.scalar_type();
    }
    GANOPS_DISPATCH_FLOATING_TYPES(dtype, "multi_tensor_norm_cuda", [&] {
      chunk_partial_kernel<scalar_t, Out><<<count, kThreads, 0, stream>>>(
          table.const_data_ptr<int64_t>(), n, tables.n_chunks, first, partials.data_ptr<Out>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_kernel<Out><<<1, kThreads, 0, stream>>>(table.const_data_ptr<int64_t>(), n, tables.n_chunks,
                                                partials.const_data_ptr<Out>(),
                                                per_tensor ? per.data_ptr<Out>() : nullptr,
                                                total.data_ptr<Out>(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const std::vector<at::Tensor>& contig, const at::Tensor& table,
                                             const Tables& tables, NormSpec s, bool per_tensor,
                                             c10::ScalarType out_dtype) {
  const auto opts = at::TensorOptions().dtype(out_dtype).device(contig[0].device());
  at::Tensor total = at::empty({}, opts);
  at::Tensor per = at::empty({per_tensor ? static_cast<int64_t>(contig.size()) : 0}, opts);
  if (out_dtype == c10::kDouble) {
    launch_norm<double>(contig, tables, table, s, total, per, per_tensor);
  } else {
    launch_norm<float>(contig, tables, table, s, total, per, per_tensor);
  }
  return {total, per};
}

void scale_impl(const std::vector<at::Tensor>& contig, const at::Tensor& table, const Tables& tables,
                const at::Tensor& total, double max_norm) {
  const int64_t n = static_cast<int64_t>(contig.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int g = 0; g < kNumGroups; ++g) {
    const int64_t first = tables.group_first_chunk[g];
    const int64_t count = tables.group_first_chunk[g + 1] - first;
    if (count == 0) continue;
    c10::ScalarType dtype = c10::kFloat;
    for (const auto& t : contig) {
      if (dtype_group(t.scalar_type()) == g) dtype = t.scalar_type();
    }
    GANOPS_DISPATCH_FLOATING_TYPES(dtype, "multi_tensor_scale_cuda", [&] {
      using grad_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "multi_tensor_scale_cuda_total", [&] {
        chunk_scale_kernel<grad_t, scalar_t><<<count, kThreads, 0, stream>>>(
            table.const_data_ptr<int64_t>(), n, tables.n_chunks, first, total.const_data_ptr<scalar_t>(),
            max_norm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

// Non-contiguous inputs were scaled in contiguous copies: write those back.
void copy_back(at::TensorList tensors, const std::vector<at::Tensor>& contig) {
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (!tensors[k].is_same(contig[k])) tensors[k].copy_(contig[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors, double norm_type,
                                                          bool per_tensor) {
  check_norm_type(norm_type);
  check_cuda_tensors(tensors);
  c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto contig = contiguous_all(tensors);
  const Tables tables = build_tables(entries_of(contig, /*by_dtype=*/true), kNumGroups);
  const at::Tensor table = tables_on_device(tables, tensors[0].device());
  return norm_impl(contig, table, tables, make_norm_spec(norm_type), per_tensor, result_dtype(tensors));
}

void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  check_cuda_tensors(tensors);
  check_total_norm(total_norm, tensors[0].device());
  c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto contig = contiguous_all(tensors);
  const Tables tables = build_tables(entries_of(contig, /*by_dtype=*/true), kNumGroups);
  const at::Tensor table = tables_on_device(tables, tensors[0].device());
  scale_impl(contig, table, tables, total_norm.contiguous(), max_norm);
  copy_back(tensors, contig);
}

at::Tensor clip_grad_norm_cuda(at::TensorList grads, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  check_cuda_tensors(grads);
  c10::cuda::CUDAGuard guard(grads[0].device());
  const auto contig = contiguous_all(grads);
  const Tables tables = build_tables(entries_of(contig, /*by_dtype=*/true), kNumGroups);
  const at::Tensor table = tables_on_device(tables, grads[0].device());
  const auto [total, per] =
      norm_impl(contig, table, tables, make_norm_spec(norm_type), false, result_dtype(grads));
  scale_impl(contig, table, tables, total, max_norm);
  copy_back(grads, contig);
  return total;
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cuda);
  m.impl("clip_grad_norm_", &clip_grad_norm_cuda);
}

}  // namespace ganops::clip_grad_norm
