"""ganops: fused GAN-training ops for PyTorch.

Every op has compiled (C++ CPU / CUDA), Triton and pure-PyTorch implementations behind one
entry point; ``backend=`` or ``use_backend`` picks one, ``auto`` takes the fastest that can
serve the tensors' device.
"""

from ganops import nn
from ganops._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    build_info,
    get_backend,
    set_backend,
    use_backend,
)
from ganops.nn import SpectralNorm, spectral_norm
from ganops.ops.clip_grad_norm import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_norm,
)
from ganops.ops.gradient_penalty import (
    gradient_norm_penalty,
    gradient_penalty,
    input_gradient_penalty,
    interpolate,
    r1_penalty,
)
from ganops.ops.minibatch_discrimination import minibatch_similarity
from ganops.ops.minibatch_stddev import minibatch_stddev
from ganops.ops.scaled_dot_product_attention import scaled_dot_product_attention
from ganops.ops.spectral_norm import spectral_normalize

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SpectralNorm",
    "available_backends",
    "build_info",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "get_backend",
    "grad_norm",
    "gradient_norm_penalty",
    "gradient_penalty",
    "input_gradient_penalty",
    "interpolate",
    "minibatch_similarity",
    "minibatch_stddev",
    "nn",
    "r1_penalty",
    "scaled_dot_product_attention",
    "set_backend",
    "spectral_norm",
    "spectral_normalize",
    "use_backend",
]
