// CUDA kernels of the multi-tensor norm and scale.
//
// Launches per call, however many tensors: one host-to-device copy of the tables, one
// partial-norm kernel per grad dtype present, two finishing kernels (one block per tensor,
// then one block over the tensors, which also computes the clip coefficient once); the
// scale (and the clamp of clip_grad_value_) is one kernel per dtype. Block b reduces chunk b
// (clip_grad_norm.h) into partials[b]; the finishing blocks combine the partials in a fixed
// order, so the norm is deterministic, and the clip coefficient is read from device memory:
// nothing waits on the host.

#include <ganops/checks.h>
#include <ganops/cuda.h>
#include <ganops/contiguous.h>
#include <ganops/dispatch.h>
#include <ganops/grid.h>
#include <ganops/registration.h>

#include <optional>

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

// The finish's first stage: block k combines tensor k's chunk partials into sums[k] (and
// writes its norm when per_tensor is non-null).
template <typename Out>
__global__ void __launch_bounds__(kThreads)
    tensor_finish_kernel(const int64_t* table, int64_t n_tensors, int64_t n_chunks, const Out* partials,
                         Out* sums, Out* per_tensor, NormSpec s) {
  const TableView view = table_view(table, n_tensors, n_chunks);
  const int64_t k = blockIdx.x;
  const Out local = tensor_finish_thread<Out>(view, partials, k, threadIdx.x, kThreads, s);
  const Out block = block_reduce<kThreads>(local, NormCombine{s});
  if (threadIdx.x == 0) {
    sums[k] = block;
    if (per_tensor != nullptr) per_tensor[k] = norm_finish(block, s);
  }
}

// The second stage: one block combines the tensor sums into the total norm and, when coef
// is non-null, its clip coefficient for max_norm, computed here once for every scale block.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
    total_finish_kernel(const Out* sums, int64_t n_tensors, Out* total, Out* coef, double max_norm, NormSpec s) {
  const Out local = total_finish_thread<Out>(sums, n_tensors, threadIdx.x, kThreads, s);
  const Out block = block_reduce<kThreads>(local, NormCombine{s});
  if (threadIdx.x == 0) {
    const Out norm = norm_finish(block, s);
    *total = norm;
    if (coef != nullptr) *coef = clip_coefficient(norm, max_norm);
  }
}

// The clip coefficient of a norm given by the caller (multi_tensor_scale_), once.
template <typename Out>
__global__ void coefficient_kernel(const Out* total, Out* coef, double max_norm) {
  *coef = clip_coefficient(*total, max_norm);
}

// Block b updates chunk first_chunk + b in place with the op (ScaleOp, ClampOp of
// clip_grad_norm.h) bound for T's accumulation type.
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    chunk_update_kernel(const int64_t* table, int64_t n_tensors, int64_t n_chunks, int64_t first_chunk,
                        Op op) {
  const auto f = op.template bind<acc_t<T>>();
  // An identity (a clip coefficient of exactly 1) leaves the chunk unread and unwritten.
  if (f.identity()) return;
  const TableView view = table_view(table, n_tensors, n_chunks);
  const int64_t c = first_chunk + blockIdx.x;
  T* chunk = reinterpret_cast<T*>(view.ptrs[view.chunk_tensor[c]]) + view.chunk_offset[c];
  for_each_thread_element(view.chunk_len[c], threadIdx.x, kThreads,
                          [&](int64_t i) { update_element(chunk + i, f); });
}

// Table values carried in a kernel's parameters: 16 + 8 * 496 = 3984 bytes, under the
// 4 KB of parameters every architecture accepts.
constexpr int kUploadValues = 496;
struct UploadSlice {
  int64_t offset;
  int64_t count;
  int64_t values[kUploadValues];
};

__global__ void upload_kernel(int64_t* table, UploadSlice slice) {
  for (int64_t i = threadIdx.x; i < slice.count; i += blockDim.x) table[slice.offset + i] = slice.values[i];
}

void check_cuda_tensors(const TensorList& tensors) {
  STD_TORCH_CHECK(!tensors.empty(), "expected at least one tensor");
  check_grad_tensors(tensors, DeviceType::CUDA);
}

// The tables on the device, without blocking the host and safe to capture in a CUDA graph.
//
// Eagerly: one copy from pinned staging memory, whose block the caching host allocator
// keeps until the copy recorded on it has run. Under stream capture that copy would become
// a graph node that reads the staging block at every replay, long after it was freed and
// handed out again; so the values travel instead in the parameters of upload kernels
// (kUploadValues per launch), which the graph stores with its nodes. The device table
// itself comes from the graph's memory pool, as every temporary of a captured call does.
Tensor tables_on_device(const Tables& tables, const Device& device) {
  const int64_t size = static_cast<int64_t>(tables.buffer.size());
  const cudaStream_t stream = current_stream(device);
  if (capturing(stream)) {
    Tensor table = empty({std::max<int64_t>(size, 1)}, ScalarType::Long, device);
    for (int64_t offset = 0; offset < size; offset += kUploadValues) {
      UploadSlice slice{};
      slice.offset = offset;
      slice.count = std::min<int64_t>(kUploadValues, size - offset);
      std::copy_n(tables.buffer.begin() + offset, slice.count, slice.values);
      upload_kernel<<<1, 256, 0, stream>>>(table.mutable_data_ptr<int64_t>(), slice);
      GANOPS_CUDA_LAUNCH_CHECK();
    }
    return table;
  }
  Tensor staging = torch::stable::empty({size}, ScalarType::Long, std::nullopt, Device(DeviceType::CPU),
                                        /*pin_memory=*/true);
  std::copy(tables.buffer.begin(), tables.buffer.end(), staging.mutable_data_ptr<int64_t>());
  return torch::stable::to(staging, device, /*non_blocking=*/true);
}

// Calls launch(dtype, first_chunk, count) for every dtype group that has chunks: one kernel
// launch per grad dtype, over its contiguous range of chunks.
template <typename Launch>
void for_each_dtype_group(const std::vector<Tensor>& tensors, const Tables& tables, Launch&& launch) {
  for (int g = 0; g < kNumGroups; ++g) {
    const int64_t first = tables.group_first_chunk[g];
    const int64_t count = tables.group_first_chunk[g + 1] - first;
    if (count == 0) continue;
    c10::ScalarType dtype = ScalarType::Float;
    for (const auto& t : tensors) {
      if (dtype_group(t.scalar_type()) == g) dtype = t.scalar_type();
    }
    launch(dtype, first, count);
  }
}

// The tensors, contiguous (copies of those that were not), and their chunk tables on the host
// and on the device: what every launch below reads.
struct ChunkedTensors {
  std::vector<Tensor> contig;
  Tables tables;
  Tensor table;  // tables.buffer on the device
};

ChunkedTensors chunked(const TensorList& tensors) {
  std::vector<Tensor> contig = contiguous_all(tensors);
  Tables tables = build_tables(entries_of(contig, /*by_dtype=*/true), kNumGroups);
  Tensor table = tables_on_device(tables, tensors[0].device());
  return {std::move(contig), std::move(tables), std::move(table)};
}

// The norm's outputs; coef is defined when the call clips.
struct NormOutputs {
  Tensor total, per, coef;
};

template <typename Out>
void launch_norm(const ChunkedTensors& c, NormSpec s, NormOutputs& out, double max_norm) {
  const int64_t n = static_cast<int64_t>(c.contig.size());
  const cudaStream_t stream = current_stream(out.total);
  Tensor partials = empty({std::max<int64_t>(c.tables.n_chunks, 1)}, options(out.total));
  for_each_dtype_group(c.contig, c.tables, [&](c10::ScalarType dtype, int64_t first, int64_t count) {
    GANOPS_DISPATCH_FLOATING_TYPES(dtype, "multi_tensor_norm_cuda", [&] {
      chunk_partial_kernel<scalar_t, Out><<<count, kThreads, 0, stream>>>(
          c.table.const_data_ptr<int64_t>(), n, c.tables.n_chunks, first, partials.mutable_data_ptr<Out>(), s);
      GANOPS_CUDA_LAUNCH_CHECK();
    });
  });
  Tensor sums = empty({n}, options(out.total));
  tensor_finish_kernel<Out><<<grid_x(n, "multi_tensor_norm"), kThreads, 0, stream>>>(
      c.table.const_data_ptr<int64_t>(), n, c.tables.n_chunks, partials.const_data_ptr<Out>(), sums.mutable_data_ptr<Out>(),
      out.per.numel() > 0 ? out.per.mutable_data_ptr<Out>() : nullptr, s);
  GANOPS_CUDA_LAUNCH_CHECK();
  total_finish_kernel<Out><<<1, kThreads, 0, stream>>>(sums.const_data_ptr<Out>(), n, out.total.mutable_data_ptr<Out>(),
                                                       out.coef.defined() ? out.coef.mutable_data_ptr<Out>() : nullptr,
                                                       max_norm, s);
  GANOPS_CUDA_LAUNCH_CHECK();
}

// The total norm, the per-tensor norms when per_tensor, and the clip coefficient when
// max_norm is given.
NormOutputs norm_impl(const ChunkedTensors& c, NormSpec s, bool per_tensor, c10::ScalarType out_dtype,
                      std::optional<double> max_norm = std::nullopt) {
  const auto opts = Options{}.dtype(out_dtype).device(c.contig[0].device());
  NormOutputs out{empty({}, opts), empty({per_tensor ? static_cast<int64_t>(c.contig.size()) : 0}, opts),
                  max_norm ? empty({}, opts) : Tensor()};
  if (out_dtype == ScalarType::Double) {
    launch_norm<double>(c, s, out, max_norm.value_or(0.0));
  } else {
    launch_norm<float>(c, s, out, max_norm.value_or(0.0));
  }
  return out;
}

// One chunk_update_kernel launch per dtype group.
template <typename Op>
void update_impl(const ChunkedTensors& c, const Op& op) {
  const int64_t n = static_cast<int64_t>(c.contig.size());
  const cudaStream_t stream = current_stream(c.table);
  for_each_dtype_group(c.contig, c.tables, [&](c10::ScalarType dtype, int64_t first, int64_t count) {
    GANOPS_DISPATCH_FLOATING_TYPES(dtype, "multi_tensor_update_cuda", [&] {
      chunk_update_kernel<scalar_t, Op><<<count, kThreads, 0, stream>>>(
          c.table.const_data_ptr<int64_t>(), n, c.tables.n_chunks, first, op);
      GANOPS_CUDA_LAUNCH_CHECK();
    });
  });
}

// Scales by a clip coefficient already on the device.
void scale_impl(const ChunkedTensors& c, const Tensor& coef) {
  GANOPS_DISPATCH_FLOAT_DOUBLE(coef.scalar_type(), "multi_tensor_scale_cuda", [&] {
    update_impl(c, ScaleOp<scalar_t>{coef.const_data_ptr<scalar_t>()});
  });
}

std::tuple<Tensor, Tensor> multi_tensor_norm_cuda(const TensorList& tensors, double norm_type,
                                                          bool per_tensor) {
  check_norm_type(norm_type);
  check_cuda_tensors(tensors);
  CudaDeviceGuard guard(tensors[0]);
  NormOutputs out = norm_impl(chunked(tensors), make_norm_spec(norm_type), per_tensor, result_dtype(tensors));
  return {out.total, out.per};
}
GANOPS_KERNEL(CUDA, "multi_tensor_norm", multi_tensor_norm_cuda)

void multi_tensor_scale_cuda(const TensorList& tensors, const Tensor& total_norm, double max_norm) {
  check_cuda_tensors(tensors);
  check_total_norm(total_norm, tensors[0].device());
  CudaDeviceGuard guard(tensors[0]);
  const ChunkedTensors c = chunked(tensors);
  Tensor coef = empty({}, options(total_norm));
  GANOPS_DISPATCH_FLOAT_DOUBLE(total_norm.scalar_type(), "clip_coefficient_cuda", [&] {
    coefficient_kernel<scalar_t><<<1, 1, 0, current_stream(tensors[0])>>>(
        total_norm.const_data_ptr<scalar_t>(), coef.mutable_data_ptr<scalar_t>(), max_norm);
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  scale_impl(c, coef);
  copy_back(tensors, c.contig);
}
GANOPS_KERNEL(CUDA, "multi_tensor_scale_", multi_tensor_scale_cuda)

void multi_tensor_clamp_cuda(const TensorList& tensors, double clip_value) {
  check_cuda_tensors(tensors);
  CudaDeviceGuard guard(tensors[0]);
  const ChunkedTensors c = chunked(tensors);
  update_impl(c, ClampOp{clip_value});
  copy_back(tensors, c.contig);
}
GANOPS_KERNEL(CUDA, "multi_tensor_clamp_", multi_tensor_clamp_cuda)

Tensor clip_grad_norm_cuda(const TensorList& grads, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  check_cuda_tensors(grads);
  CudaDeviceGuard guard(grads[0]);
  const ChunkedTensors c = chunked(grads);
  const NormOutputs out = norm_impl(c, make_norm_spec(norm_type), false, result_dtype(grads), max_norm);
  scale_impl(c, out.coef);
  copy_back(grads, c.contig);
  return out.total;
}
GANOPS_KERNEL(CUDA, "clip_grad_norm_", clip_grad_norm_cuda)

}  // namespace

}  // namespace ganops::clip_grad_norm
