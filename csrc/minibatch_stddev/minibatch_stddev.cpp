// Schemas of minibatch standard deviation (StyleGAN2's MinibatchStdLayer), behind
// ganops.minibatch_stddev. x is (N, C, H, W); group_size is already resolved to the G that
// divides N (min(group_size, N), or N), num_channels is F, which divides C.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ganops, m) {
  // cat([x, s], 1), (N, C + F, H, W): s[n, f, :, :] is the mean over the (C / F, H, W)
  // elements of channel group f of sqrt(var + 1e-8), var the variance (divisor G) over the G
  // samples of n's group, {g · N/G + n % (N/G)}.
  m.def("minibatch_stddev(Tensor x, int group_size, int num_channels) -> Tensor");
  // ∂x given grad = ∂loss/∂output, (N, C + F, H, W).
  m.def("minibatch_stddev_backward(Tensor grad, Tensor x, int group_size, int num_channels) -> Tensor");
}
