// Schemas of the fused pieces behind ganops.gradient_penalty and ganops.r1_penalty.
// Tensors are viewed as (N, M): N = size(0) samples of M = numel / N elements each.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // x̂ = alpha[i] * real + (1 - alpha[i]) * fake, alpha of shape (N,) and real's dtype.
  m.def("interpolate(Tensor real, Tensor fake, Tensor alpha) -> Tensor");
  // (grad_real, grad_fake, grad_alpha) = (alpha * grad, (1 - alpha) * grad,
  // Σ_j grad * (real - fake) per sample); an output not asked for comes back empty.
  m.def("interpolate_backward(Tensor grad, Tensor real, Tensor fake, Tensor alpha, bool need_real, "
        "bool need_fake, bool need_alpha) -> (Tensor, Tensor, Tensor)");
  // (penalty, sumsq): penalty = weight / N * Σ_i h(‖inv_scale * grads[i]‖) with
  // h(n) = (n - center)² or, one-sided, max(0, n - center)², in grads' dtype; sumsq (N,) holds
  // ‖inv_scale * grads[i]‖² in the accumulation dtype (float32 for half types) for the
  // backward. inv_scale, when given, is one value in the accumulation dtype on grads' device.
  m.def("gradient_norm_penalty(Tensor grads, Tensor? inv_scale, float center, bool one_sided, float weight) "
        "-> (Tensor, Tensor)");
  // ∂penalty/∂grads, given ∂loss/∂penalty (a 0-dim tensor) and the forward's sumsq.
  m.def("gradient_norm_penalty_backward(Tensor grad_penalty, Tensor grads, Tensor sumsq, Tensor? inv_scale, "
        "float center, bool one_sided, float weight) -> Tensor");
}
