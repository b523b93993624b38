// Schemas of the multi-tensor norm and scale behind ganops.clip_grad_norm_.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // The norm of every tensor (per_tensor) and of all of them together, in one pass over
  // memory. Returns (total, per_tensor_norms); per_tensor_norms is empty unless asked for.
  // The result dtype is float64 if any tensor is float64, else float32.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor) -> (Tensor, Tensor)");
  // Scales every tensor in place by min(max_norm / (total_norm + 1e-6), 1), the
  // coefficient computed on the tensors' device.
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()");
  // Both of the above in one call: returns the norm, scales in place. One call keeps the
  // per-call cost of passing thousands of tensors from Python down to once.
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor");
  // Clamps every tensor in place to [-clip_value, clip_value] (clip_grad_value_): the lower
  // bound first, then the upper one, as torch does; NaN stays NaN.
  m.def("multi_tensor_clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
}
