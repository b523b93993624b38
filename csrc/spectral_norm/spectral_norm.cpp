// Schemas of the spectral-normalization kernels behind ganops.spectral_norm.
//
// `dim` picks the weight's output dimension: the matrix is weight.permute(dim, ...).flatten(1),
// read in place (spectral_norm.h). u has size(dim) elements, v numel / size(dim); both have
// the weight's dtype, as torch's buffers do. sigma is float32 for half weights (they
// accumulate in float32), else the weight's dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // Runs n_power_iterations of u <- normalize(W v), v <- normalize(W^T u), updating u and v
  // in place, and returns (weight / sigma, sigma, u_used, v_used): sigma = u^T W v from the
  // last iteration's norm, and copies of the final u and v for the backward (the buffers may
  // change again before it runs, as in D(real) - D(fake)). n_power_iterations = 0 (eval
  // mode) leaves u, v alone and computes sigma = u^T W v with one matrix-vector product.
  m.def("spectral_norm_forward_(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // dW = (G - <G, W/sigma> u v^T) / sigma + grad_sigma u v^T, for sigma = u^T W v with u, v constant.
  m.def("spectral_norm_backward(Tensor grad, Tensor? grad_sigma, Tensor weight, Tensor u, Tensor v, "
        "Tensor sigma, int dim) -> Tensor");
}
