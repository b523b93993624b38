// Schemas of the minibatch-discrimination similarity behind ganops.minibatch_similarity.
// The backward and double backward are ops of their own, so the backward can carry its own
// autograd formula (ganops/ops/minibatch_discrimination.py): gradient penalties
// differentiate through this layer twice.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // o[i,b] = Σ_j exp(−Σ_c |M[i,b,c] − M[j,b,c]|) for M (N, B, C); o is (N, B) in M's dtype.
  // exclude_self leaves the j = i term (always 1) out.
  m.def("minibatch_discrimination(Tensor M, bool exclude_self) -> Tensor");
  // dM[i,b,c] = −Σ_j (grad[i,b] + grad[j,b]) K[i,j,b] sign(M[i,b,c] − M[j,b,c]), with the
  // similarities K recomputed rather than stored. Same for either exclude_self.
  m.def("minibatch_discrimination_backward(Tensor grad, Tensor M) -> Tensor");
  // The vector-Jacobian product of minibatch_discrimination_backward with grad_grad_M, the
  // gradient flowing into its output: returns (d/d grad, d/d M).
  m.def("minibatch_discrimination_double_backward(Tensor grad_grad_M, Tensor grad, Tensor M) -> (Tensor, Tensor)");
}
