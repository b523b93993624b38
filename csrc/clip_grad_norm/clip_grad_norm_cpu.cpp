// CPU kernels of the multi-tensor norm and scale.
//
// Work is split into the chunks of clip_grad_norm.h; at::parallel_for hands chunks to
// threads, each chunk's partial lands in its own slot and the slots are combined in a
// fixed order, so the result is bit-identical whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

#include "clip_grad_norm/clip_grad_norm.h"

namespace ganops::clip_grad_norm {
namespace {

// A chunk's partial, sequential over 16 independent lanes so the compiler can vectorise
// the loop without reassociating a single accumulator.
template <NormKind K, typename T, typename Acc>
Acc chunk_partial_lanes(const T* x, int64_t n, double p) {
  constexpr int L = 16;
  const NormSpec s{K, p};
  Acc lanes[L];
  for (int l = 0; l < L; ++l) lanes[l] = Acc(0);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) lanes[l] = norm_combine(lanes[l], norm_term(Acc(x[i + l]), s), s);
  }
  for (; i < n; ++i) lanes[0] = norm_combine(lanes[0], norm_term(Acc(x[i]), s), s);
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] = norm_combine(lanes[l], lanes[l + w], s);
  }
  return lanes[0];
}

template <typename T, typename Acc>
Acc chunk_partial(const T* x, int64_t n, NormSpec s) {
  switch (s.kind) {
    case kL1: return chunk_partial_lanes<kL1, T, Acc>(x, n, s.p);
    case kL2: return chunk_partial_lanes<kL2, T, Acc>(x, n, s.p);
    case kLInf: return chunk_partial_lanes<kLInf, T, Acc>(x, n, s.p);
    default: return chunk_partial_lanes<kLp, T, Acc>(x, n, s.p);
  }
}

void check_inputs(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(norm_type > 0, "norm_type must be positive, got ", norm_type);
  for (const auto& t : tensors) {
    check_float(t, "every tensor in tensors");
    TORCH_CHECK(t.device().is_cpu(), "multi_tensor_norm (CPU): every tensor must be on the CPU, got ",
                t.device());
  }
}

template <typename Out>
std::tuple<at::Tensor, at::Tensor> norm_impl(const std::vector<at::Tensor>& tensors, NormSpec s,
                                             bool per_tensor, c10::ScalarType out_dtype) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  const Tables tables = build_tables(entries_of(tensors, /*by_dtype=*/false), 1);
  const TableView view = table_view(tables.buffer.data(), n, tables.n_chunks);
  std::vector<Out> partials(tables.n_chunks);
  at::parallel_for(0, tables.n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const at::Tensor& t = tensors[view.chunk_tensor[c]];
      GANOPS_DISPATCH_FLOATING_TYPES(t.scalar_type(), "multi_tensor_norm_cpu", [&] {
        const scalar_t* x = t.const_data_ptr<scalar_t>() + view.chunk_offset[c];
        partials[c] = static_cast<Out>(chunk_partial<scalar_t, acc_t<scalar_t>>(x, view.chunk_len[c], s));
      });
    }
  });
  at::Tensor per = at::empty({per_tensor ? n : 0}, at::TensorOptions().dtype(out_dtype));
  // One "thread" over all tensors: every chunk in order, then every tensor in order.
  const Out combined =
      finish_thread<Out>(view, partials.data(), n, 0, 1, per_tensor ? per.data_ptr<Out>() : nullptr, s);
  at::Tensor total = at::empty({}, at::TensorOptions().dtype(out_dtype));
  total.data_ptr<Out>()[0] = norm_finish(combined, s);
  return {total, per};
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double norm_type,
                                                         bool per_tensor) {
  check_inputs(tensors, norm_type);
  const auto contig = contiguous_all(tensors);
  const NormSpec s = make_norm_spec(norm_type);
  const auto out_dtype = result_dtype(tensors);
  if (out_dtype == c10::kDouble) return norm_impl<double>(contig, s, per_tensor, out_dtype);
  return norm_impl<float>(contig, s, per_tensor, out_dtype);
}

template <typename T>
void scale_contiguous(T* x, int64_t n, double coef) {
  using Acc = acc_t<T>;
  const Acc c = static_cast<Acc>(coef);
  at::parallel_for(0, chunks_for(n), 1, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(n, end * kChunkSize);
    for (int64_t i = begin * kChunkSize; i < stop; ++i) x[i] = static_cast<T>(Acc(x[i]) * c);
  });
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  TORCH_CHECK(total_norm.numel() == 1, "total_norm must hold one value, got shape ", total_norm.sizes());
  TORCH_CHECK(total_norm.device().is_cpu(), "total_norm must be on the CPU, got ", total_norm.device());
  TORCH_CHECK(total_norm.scalar_type() == c10::kFloat || total_norm.scalar_type() == c10::kDouble,
              "total_norm must be float32 or float64, got ", total_norm.scalar_type());
  for (const auto& t : tensors) {
    check_float(t, "every tensor in tensors");
    TORCH_CHECK(t.device().is_cpu(), "multi_tensor_scale_ (CPU): every tensor must be on the CPU, got ",
                t.device());
  }
  // The norm is in host memory here, so reading it costs no synchronisation.
  double coef = 0;
  AT_DISPATCH_FLOATING_TYPES(total_norm.scalar_type(), "clip_coefficient", [&] {
    coef = static_cast<double>(clip_coefficient(total_norm.data_ptr<scalar_t>()[0], max_norm));
  });
  // Multiplying by exactly 1 changes no value (NaN stays NaN), so skip the pass.
  if (coef == 1.0) return;
  for (const auto& t : tensors) {
    at::Tensor target = t.is_contiguous() ? t : t.contiguous();
    GANOPS_DISPATCH_FLOATING_TYPES(t.scalar_type(), "multi_tensor_scale_cpu", [&] {
      scale_contiguous(target.data_ptr<scalar_t>(), target.numel(), coef);
    });
    if (!t.is_contiguous()) t.copy_(target);
  }
}

// Emulates the CUDA launch (clip_grad_norm_cuda.cu) block by block and thread by thread,
// with the same tables, per-thread functions and reduction order.
template <typename Out>
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_check_impl(const std::vector<at::Tensor>& tensors,
                                                                 NormSpec s, c10::ScalarType out_dtype) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  const Tables tables = build_tables(entries_of(tensors, /*by_dtype=*/true), kNumGroups);
  const TableView view = table_view(tables.buffer.data(), n, tables.n_chunks);
  std::vector<int64_t> base(n + 1, 0);
  for (int64_t k = 0; k < n; ++k) base[k + 1] = base[k] + tensors[k].numel();
  at::Tensor coverage = at::zeros({base[n]}, at::TensorOptions().dtype(c10::kInt));
  int32_t* visits = coverage.data_ptr<int32_t>();

  std::vector<Out> partials(tables.n_chunks);
  for (int g = 0; g < kNumGroups; ++g) {
    for (int64_t c = tables.group_first_chunk[g]; c < tables.group_first_chunk[g + 1]; ++c) {
      const int64_t k = view.chunk_tensor[c];
      GANOPS_DISPATCH_FLOATING_TYPES(tensors[k].scalar_type(), "launch_check", [&] {
        using Acc = acc_t<scalar_t>;
        const scalar_t* chunk = reinterpret_cast<const scalar_t*>(view.ptrs[k]) + view.chunk_offset[c];
        std::vector<Acc> block(kThreads);
        for (int tid = 0; tid < kThreads; ++tid) {
          block[tid] = thread_partial<scalar_t, Acc>(chunk, view.chunk_len[c], tid, kThreads, s);
          for_each_thread_element(view.chunk_len[c], tid, kThreads,
                                  [&](int64_t i) { ++visits[base[k] + view.chunk_offset[c] + i]; });
        }
        for (int stride = kThreads / 2; stride > 0; stride /= 2) {
          for (int tid = 0; tid < kThreads; ++tid) tree_reduce_step(block.data(), tid, stride, s);
        }
        partials[c] = static_cast<Out>(block[0]);
      });
    }
  }
  at::Tensor per = at::empty({n}, at::TensorOptions().dtype(out_dtype));
  std::vector<Out> block(kThreads);
  for (int tid = 0; tid < kThreads; ++tid) {
    block[tid] = finish_thread<Out>(view, partials.data(), n, tid, kThreads, per.data_ptr<Out>(), s);
  }
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    for (int tid = 0; tid < kThreads; ++tid) tree_reduce_step(block.data(), tid, stride, s);
  }
  at::Tensor total = at::empty({}, at::TensorOptions().dtype(out_dtype));
  total.data_ptr<Out>()[0] = norm_finish(block[0], s);
  return {coverage, per, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_launch_check(at::TensorList tensors, double norm_type) {
  check_inputs(tensors, norm_type);
  const auto contig = contiguous_all(tensors);
  const NormSpec s = make_norm_spec(norm_type);
  const auto out_dtype = result_dtype(tensors);
  if (out_dtype == c10::kDouble) return launch_check_impl<double>(contig, s, out_dtype);
  return launch_check_impl<float>(contig, s, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cpu);
  m.impl("_multi_tensor_norm_cuda_launch_check", &cuda_launch_check);
}

}  // namespace ganops::clip_grad_norm
