// The CUDA launch of minibatch_discrimination_cuda.cu runs on the CPU, block by block and
// thread by thread (ganops/launch_emulation.h), with the same row mapping and per-thread
// functions, for the forward, the backward and the double backward: a test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/dispatch.h>
#include <ganops/grid.h>
#include <ganops/launch_emulation.h>

#include <tuple>

#include "minibatch_discrimination/minibatch_discrimination.h"

namespace ganops::minibatch_discrimination {
namespace {

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

LaunchCheck cuda_launch_check(const Tensor& M_in, const Tensor& grad_in, const Tensor& h_in,
                              bool exclude_self) {
  check_M(M_in, DeviceType::CPU);
  const int64_t N = M_in.size(0), B = M_in.size(1), C = M_in.size(2);
  check_like(grad_in, "grad", M_in, {N, B});
  check_like(h_in, "grad_grad_M", M_in, M_in.sizes());
  // The CUDA host code's check, before anything is made contiguous: a test passes an
  // expanded tensor too large to exist.
  grid_x(num_blocks(N, B), "minibatch_discrimination");
  const Tensor M = as_contiguous(M_in), grad = as_contiguous(grad_in), h = as_contiguous(h_in);
  const Coverage rows({N, B});
  const auto acc_opts = options(M).dtype(acc_dtype(M.scalar_type()));
  Tensor o = zeros({N, B}, acc_opts), dM = zeros({N, B, C}, acc_opts);
  Tensor dg = zeros({N, B}, acc_opts), dM2 = zeros({N, B, C}, acc_opts);
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_launch_check", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* m = M.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    for (int64_t block = 0; block < num_blocks(N, B); ++block) {
      for (int tid = 0; tid < kThreads; ++tid) {
        const RowIndex r = thread_row(block, tid, N, B);
        if (!r.valid) continue;
        const int64_t row = r.i * B + r.b;
        rows.visit(row);
        o.mutable_data_ptr<Acc>()[row] = similarity_row<scalar_t, Acc>(m, N, B, C, r.i, r.b, exclude_self);
        similarity_backward_row<scalar_t, Acc>(g, m, N, B, C, r.i, r.b, dM.mutable_data_ptr<Acc>() + row * C);
        dg.mutable_data_ptr<Acc>()[row] = similarity_double_backward_row<scalar_t, Acc>(
            h.const_data_ptr<scalar_t>(), g, m, N, B, C, r.i, r.b, dM2.mutable_data_ptr<Acc>() + row * C);
      }
    }
  });
  const auto dtype = M.scalar_type();
  return {rows.counts(), to_dtype(o, dtype), to_dtype(dM, dtype), to_dtype(dg, dtype), to_dtype(dM2, dtype)};
}

// Runs the CUDA kernels' per-thread functions for every block and thread of the launch the
// CUDA host code would choose. Returns (times each (i, b) row was visited, o, dM, then the
// double backward's d/d grad and d/d M).
GANOPS_LAUNCH_CHECK_OP("_minibatch_discrimination_cuda_launch_check", "(Tensor M, Tensor grad, Tensor grad_grad_M, "
                       "bool exclude_self) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::minibatch_discrimination
