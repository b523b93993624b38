// The CUDA launches of scaled_dot_product_attention_cuda.cu run on the CPU, block by block and
// thread by thread (ganops/launch_emulation.h), with the grids the CUDA host code chooses and
// the block programs of scaled_dot_product_attention.h: the forward's lse and out kernels, the
// backward's D, dQ and dK/dV kernels, and the double backward's row-statistics, row-side and
// column-side kernels, each order fed the previous one's results. A test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/dispatch.h>
#include <ganops/launch_emulation.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "scaled_dot_product_attention/scaled_dot_product_attention.h"

namespace ganops::scaled_dot_product_attention {
namespace {

// The block programs' Block in the emulation: a phase runs for every thread in turn, which is
// what the GPU's threads and barrier give, as no phase reads a slot written in the same phase.
struct EmulatedBlock {
  template <typename F>
  void run(F&& f) const {
    for (int tid = 0; tid < kThreads; ++tid) f(tid);
  }
};

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                               Tensor, Tensor, Tensor>;

// Runs block(index, shared) for every block of a 1-D grid, each with fresh shared memory.
template <typename Acc, typename Block>
void for_each_block(int64_t blocks, Block&& block) {
  for (int64_t index = 0; index < blocks; ++index) {
    SharedTile<Acc> shared{};
    block(index, shared);
  }
}

template <typename T>
LaunchCheck launch_check_impl(const Sizes& n, double scale, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& grad_out,
                              const std::array<Tensor, 3>& cotangents) {
  using Acc = acc_t<T>;
  const EmulatedBlock block;
  const int64_t rows = n.B * n.L, keys = n.B * n.S;
  const auto acc_options = options(q).dtype(acc_dtype(q.scalar_type()));
  Tensor out = empty({n.B, n.L, n.Ev}, options(q)), lse = empty({n.B, n.L}, acc_options);
  Tensor delta = empty({n.B, n.L}, acc_options), stats = empty({3, n.B, n.L}, acc_options);
  Tensor grad_q = empty(q.sizes(), q), grad_k = zeros_like(k), grad_v = zeros_like(v);
  Tensor grad_grad_out = empty(grad_out.sizes(), grad_out);
  Tensor grad_grad_q = empty(q.sizes(), q), grad_grad_k = zeros_like(k), grad_grad_v = zeros_like(v);

  // Writes counted per element, the tensors one after another (the host code zero-fills dK,
  // dV, grad of K and of V only when there is no query row; the test checks they are written
  // once otherwise).
  const std::array<const Tensor*, 11> written{&out,           &lse,    &delta,       &grad_q,
                                                  &grad_k,        &grad_v, &stats,       &grad_grad_out,
                                                  &grad_grad_q,   &grad_grad_k, &grad_grad_v};
  int64_t total = 0;
  for (const Tensor* t : written) total += t->numel();
  const Coverage visits({total});
  std::vector<Coverage> coverage;
  int64_t offset = 0;
  for (const Tensor* t : written) {
    coverage.push_back(visits.from(offset));
    offset += t->numel();
  }
  const auto visit = [&](int t) { return [&coverage, t](int64_t k) { coverage[t].visit(k); }; };

  if (rows > 0) {
    // Forward: lse_kernel, then out_kernel, a block per query row.
    Operands<T, Acc> o = make_operands<T>(n, scale, q, k, v);
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      forward_lse_block(block, sh, o, row, lse.mutable_data_ptr<Acc>(), visit(1));
    });
    o.lse = lse.const_data_ptr<Acc>();
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      forward_out_block(block, sh, o, row, out.mutable_data_ptr<T>(), visit(0));
    });

    // Backward: D and dQ a block per query row, dK and dV a block per key row.
    const Operands<T, Acc> ob = make_operands<T>(n, scale, q, k, v, grad_out, out, lse);
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      row_delta_block(block, sh, ob, row, delta.mutable_data_ptr<Acc>(), visit(2));
    });
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      backward_query_block(block, sh, ob, delta.const_data_ptr<Acc>(), row, grad_q.mutable_data_ptr<T>(), visit(3));
    });
    for_each_block<Acc>(keys, [&](int64_t key, SharedTile<Acc>& sh) {
      backward_key_block(block, sh, ob, delta.const_data_ptr<Acc>(), key, grad_k.mutable_data_ptr<T>(),
                         grad_v.mutable_data_ptr<T>(), visit(4), visit(5));
    });

    // Double backward: the row statistics and the row-side kernel a block per query row, the
    // column-side kernel a block per key row.
    const Operands<T, Acc> od = make_operands<T>(n, scale, q, k, v, grad_out, out, lse, cotangents);
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      row_stats_block(block, sh, od, row, stats.mutable_data_ptr<Acc>(), visit(6));
    });
    for_each_block<Acc>(rows, [&](int64_t row, SharedTile<Acc>& sh) {
      double_backward_query_block(block, sh, od, stats.const_data_ptr<Acc>(), row, grad_grad_out.mutable_data_ptr<T>(),
                                  grad_grad_q.mutable_data_ptr<T>(), visit(7), visit(8));
    });
    for_each_block<Acc>(keys, [&](int64_t key, SharedTile<Acc>& sh) {
      double_backward_key_block(block, sh, od, stats.const_data_ptr<Acc>(), key, grad_grad_k.mutable_data_ptr<T>(),
                                grad_grad_v.mutable_data_ptr<T>(), visit(9), visit(10));
    });
  }
  return {out, lse, grad_q, grad_k, grad_v, grad_grad_out, grad_grad_q, grad_grad_k, grad_grad_v, visits.counts()};
}

LaunchCheck cuda_launch_check(const Tensor& query, const Tensor& key, const Tensor& value,
                              const Tensor& grad_out, const std::optional<Tensor>& grad_grad_query,
                              const std::optional<Tensor>& grad_grad_key,
                              const std::optional<Tensor>& grad_grad_value, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value, is_causal, DeviceType::CPU);
  check_operand(grad_out, "grad_out", {n.B, n.L, n.Ev}, query);
  const std::array<Tensor, 3> cotangents =
      check_cotangents(grad_grad_query, grad_grad_key, grad_grad_value, query, n);
  return GANOPS_DISPATCH_FLOATING_TYPES(query.scalar_type(), "scaled_dot_product_attention_launch_check", [&] {
    return launch_check_impl<scalar_t>(n, scale, as_contiguous(query), as_contiguous(key), as_contiguous(value),
                                       as_contiguous(grad_out), cotangents);
  });
}

// Runs the CUDA kernels' block programs for every block and thread of the launches the CUDA
// host code would choose: the forward, then the backward given grad_out, then the double
// backward given the cotangents (None: zero). Returns (out, logsumexp, grad_query, grad_key,
// grad_value, grad of grad_out, grad of query, grad of key, grad of value, visits): visits
// counts the writes of every element of out, logsumexp, D, dQ, dK, dV, the (3, B, L) row
// statistics, and the four double-backward outputs, flat and in that order.
GANOPS_LAUNCH_CHECK_OP("_scaled_dot_product_attention_cuda_launch_check", "(Tensor query, Tensor key, Tensor value, "
                       "Tensor grad_out, Tensor? grad_grad_query, Tensor? grad_grad_key, Tensor? grad_grad_value, "
                       "float scale, bool is_causal) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                       "Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::scaled_dot_product_attention
