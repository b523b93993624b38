// Schemas of scaled-dot-product attention with a fused double backward, behind
// ganops.scaled_dot_product_attention. query is (B, L, E), key (B, S, E), value (B, S, Ev), all
// of one float dtype; B folds every batch and head dimension. P = softmax(scale · Q Kᵀ), with
// key j of query row i masked out where j > i when is_causal (torch's top-left alignment).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // (out, logsumexp): out = P V, (B, L, Ev) in query's dtype; logsumexp[b, i] = log Σ_j
  // exp(scale · q_i · k_j) over the unmasked j, (B, L) in the accumulation dtype (float32 for
  // half types, else query's). Nothing of size L × S is kept.
  m.def("scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, float scale, bool is_causal) "
        "-> (Tensor, Tensor)");
  // (grad_query, grad_key, grad_value) given grad_out = ∂loss/∂out and the forward's out and
  // logsumexp; the tiles of P are recomputed.
  m.def("scaled_dot_product_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor out, Tensor logsumexp, float scale, bool is_causal) -> (Tensor, Tensor, Tensor)");
  // The backward's backward: (grad of grad_out, grad of query, grad of key, grad of value)
  // given the cotangents of the backward's three outputs (None: zero), as total derivatives
  // (out and logsumexp are functions of query, key and value and get no gradient of their own).
  m.def("scaled_dot_product_attention_double_backward(Tensor? grad_grad_query, Tensor? grad_grad_key, "
        "Tensor? grad_grad_value, Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor logsumexp, float scale, bool is_causal) -> (Tensor, Tensor, Tensor, Tensor)");
}
