// CPU kernels of the multi-tensor norm and scale.
//
// Work is split into the chunks of clip_grad_norm.h; torch::stable::parallel_for hands chunks to
// threads, each chunk's partial lands in its own slot and the slots are combined in a
// fixed order, so the result is bit-identical whatever the thread count.

#include <ganops/checks.h>
#include <ganops/contiguous.h>
#include <ganops/dispatch.h>
#include <ganops/lanes.h>
#include <ganops/registration.h>

#include "clip_grad_norm/clip_grad_norm.h"

namespace ganops::clip_grad_norm {
namespace {

// A chunk's partial. Runs of kRun elements are reduced in ganops/lanes.h's lanes (so the
// compiler vectorises without reassociating one accumulator), and the runs' results are
// combined in double: a float32 sum over a 16384-element chunk would otherwise lose
// about 1e-5 of relative accuracy.
constexpr int64_t kRun = 1024;

// The norm kind K is a template argument, so each kind's loop is compiled without a switch.
template <NormKind K, typename T, typename Acc>
Acc run_partial(const T* x, int64_t n, double p) {
  const NormSpec s{K, p};
  return lane_reduce<Acc>(n, [&](int64_t i) { return norm_term(Acc(x[i]), s); }, NormCombine{s});
}

template <NormKind K, typename T, typename Acc>
double chunk_partial_runs(const T* x, int64_t n, double p) {
  const NormSpec s{K, p};
  double total = 0;
  for (int64_t start = 0; start < n; start += kRun) {
    total = norm_combine(total, static_cast<double>(run_partial<K, T, Acc>(x + start, std::min(kRun, n - start), p)), s);
  }
  return total;
}

template <typename T, typename Acc>
double chunk_partial(const T* x, int64_t n, NormSpec s) {
  switch (s.kind) {
    case kL1: return chunk_partial_runs<kL1, T, Acc>(x, n, s.p);
    case kL2: return chunk_partial_runs<kL2, T, Acc>(x, n, s.p);
    case kLInf: return chunk_partial_runs<kLInf, T, Acc>(x, n, s.p);
    default: return chunk_partial_runs<kLp, T, Acc>(x, n, s.p);
  }
}

// Below this many elements in all, waking a second thread costs more than it saves
// (2000 grads of 64 elements: 268 us on one thread, with 2-thread fork overhead more).
constexpr int64_t kParallelMinElements = 1 << 18;

// Grain for parallel_for over chunks: everything inline for small sets.
int64_t chunk_grain(const Tables& tables, int64_t total_elements) {
  return total_elements < kParallelMinElements ? std::max<int64_t>(tables.n_chunks, 1) : 1;
}

// The gradients as the chunk loops read them, gathered in one pass. Every fact of a tensor
// is a call into libtorch's C shim on the stable ABI, and a list argument is thousands of
// tensors, so each is asked once per tensor here rather than per chunk.
struct Grads {
  std::vector<Tensor> contig;       // the tensors, contiguous (copies of those that were not)
  std::vector<ScalarType> dtypes;   // contig[k]'s dtype
  std::vector<TensorEntry> entries; // contig[k]'s data and size
  int64_t total_elements = 0;
  Tables tables;
};

Grads gather(const TensorList& tensors) {
  Grads g;
  g.contig.reserve(tensors.size());
  g.dtypes.reserve(tensors.size());
  g.entries.reserve(tensors.size());
  for (const auto& t : tensors) {
    Tensor c = as_contiguous(t);
    g.dtypes.push_back(c.scalar_type());
    g.entries.push_back({reinterpret_cast<int64_t>(c.data_ptr()), c.numel(), 0});
    g.total_elements += g.entries.back().numel;
    g.contig.push_back(std::move(c));
  }
  g.tables = build_tables(g.entries, 1);
  return g;
}

// The norm's dtype (result_dtype's rule, from the gathered dtypes).
ScalarType result_dtype(const Grads& g) {
  for (const ScalarType t : g.dtypes) {
    if (acc_dtype(t) == ScalarType::Double) return ScalarType::Double;
  }
  return ScalarType::Float;
}

// Writes the contiguous copies back into the caller's tensors that were not contiguous.
void copy_back(const TensorList& tensors, const Grads& g) {
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (reinterpret_cast<int64_t>(tensors[k].data_ptr()) != g.entries[k].ptr) ganops::copy_back(tensors[k], g.contig[k]);
  }
}

// Partials, per-tensor sums and the total are kept in double here, then rounded once to
// the result dtype.
std::tuple<Tensor, Tensor> norm_impl(const Grads& g, NormSpec s, bool per_tensor) {
  const Tables& tables = g.tables;
  const int64_t n = static_cast<int64_t>(g.contig.size());
  const ScalarType out_dtype = result_dtype(g);
  const TableView view = table_view(tables.buffer.data(), n, tables.n_chunks);
  std::vector<double> partials(tables.n_chunks);
  torch::stable::parallel_for(0, tables.n_chunks, chunk_grain(tables, g.total_elements), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t k = view.chunk_tensor[c];
      GANOPS_DISPATCH_FLOATING_TYPES(g.dtypes[k], "multi_tensor_norm_cpu", [&] {
        const scalar_t* x = reinterpret_cast<const scalar_t*>(g.entries[k].ptr) + view.chunk_offset[c];
        partials[c] = chunk_partial<scalar_t, acc_t<scalar_t>>(x, view.chunk_len[c], s);
      });
    }
  });
  // The finish's two stages with one thread each: every chunk in order, then every tensor.
  std::vector<double> sums(n);
  for (int64_t k = 0; k < n; ++k) sums[k] = tensor_finish_thread<double>(view, partials.data(), k, 0, 1, s);
  const double combined = total_finish_thread<double>(sums.data(), n, 0, 1, s);
  const auto opts = Options{}.dtype(out_dtype);
  Tensor per_out = empty({per_tensor ? n : 0}, opts);
  Tensor total = empty({}, opts);
  GANOPS_DISPATCH_FLOAT_DOUBLE(out_dtype, "multi_tensor_norm_cpu_out", [&] {
    for (int64_t k = 0; k < per_out.numel(); ++k) {
      per_out.mutable_data_ptr<scalar_t>()[k] = static_cast<scalar_t>(norm_finish(sums[k], s));
    }
    total.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(norm_finish(combined, s));
  });
  return {total, per_out};
}

std::tuple<Tensor, Tensor> multi_tensor_norm_cpu(const TensorList& tensors, double norm_type,
                                                         bool per_tensor) {
  check_norm_type(norm_type);
  check_grad_tensors(tensors, DeviceType::CPU);
  return norm_impl(gather(tensors), make_norm_spec(norm_type), per_tensor);
}
GANOPS_KERNEL(CPU, "multi_tensor_norm", multi_tensor_norm_cpu)

// Runs an in-place update (ScaleOp, ClampOp) over contiguous tensors, chunk by chunk in
// parallel: each chunk binds the op for its dtype and walks its elements.
template <typename Op>
void update_impl(const Grads& g, const Op& op) {
  const Tables& tables = g.tables;
  const TableView view = table_view(tables.buffer.data(), static_cast<int64_t>(g.contig.size()), tables.n_chunks);
  torch::stable::parallel_for(0, tables.n_chunks, chunk_grain(tables, g.total_elements), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t k = view.chunk_tensor[c];
      GANOPS_DISPATCH_FLOATING_TYPES(g.dtypes[k], "multi_tensor_update_cpu", [&] {
        const auto f = op.template bind<acc_t<scalar_t>>();
        if (f.identity()) return;
        scalar_t* x = reinterpret_cast<scalar_t*>(g.entries[k].ptr) + view.chunk_offset[c];
        const int64_t len = view.chunk_len[c];
        for (int64_t i = 0; i < len; ++i) update_element(x + i, f);
      });
    }
  });
}

// Scales contiguous tensors in place by the clip coefficient of a norm in host memory.
void scale_impl(const Grads& g, const Tensor& total_norm, double max_norm) {
  GANOPS_DISPATCH_FLOAT_DOUBLE(total_norm.scalar_type(), "clip_coefficient", [&] {
    const scalar_t coef = clip_coefficient(*total_norm.const_data_ptr<scalar_t>(), max_norm);
    const ScaleOp<scalar_t> op{&coef};
    // Multiplying by exactly 1 changes no value (NaN stays NaN), so skip the pass.
    if (op.template bind<scalar_t>().identity()) return;
    update_impl(g, op);
  });
}

void multi_tensor_scale_cpu(const TensorList& tensors, const Tensor& total_norm, double max_norm) {
  check_grad_tensors(tensors, DeviceType::CPU);
  check_total_norm(total_norm, Device(DeviceType::CPU));
  const Grads g = gather(tensors);
  scale_impl(g, total_norm, max_norm);
  copy_back(tensors, g);
}
GANOPS_KERNEL(CPU, "multi_tensor_scale_", multi_tensor_scale_cpu)

void multi_tensor_clamp_cpu(const TensorList& tensors, double clip_value) {
  check_grad_tensors(tensors, DeviceType::CPU);
  const Grads g = gather(tensors);
  update_impl(g, ClampOp{clip_value});
  copy_back(tensors, g);
}
GANOPS_KERNEL(CPU, "multi_tensor_clamp_", multi_tensor_clamp_cpu)

Tensor clip_grad_norm_cpu(const TensorList& grads, double max_norm, double norm_type) {
  check_norm_type(norm_type);
  check_grad_tensors(grads, DeviceType::CPU);
  const Grads g = gather(grads);
  const auto [total, per] = norm_impl(g, make_norm_spec(norm_type), false);
  scale_impl(g, total, max_norm);
  copy_back(grads, g);
  return total;
}
GANOPS_KERNEL(CPU, "clip_grad_norm_", clip_grad_norm_cpu)

}  // namespace

}  // namespace ganops::clip_grad_norm
