"""ganops: fused GAN-training ops for PyTorch.

Every op has compiled (C++ CPU / CUDA), Triton and pure-PyTorch implementations behind one
entry point; ``backend=`` or ``use_backend`` picks one, ``auto`` takes the fastest that can
serve the tensors' device.
"""

from ganops import _ext
from ganops._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from ganops._ext import build_info
from ganops.ops.clip_grad_norm import clip_grad_norm_, clip_grads_with_norm_, get_total_norm, grad_norm
from ganops.ops.minibatch_discrimination import minibatch_similarity
from ganops import nn

_ext.load()

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "build_info",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "get_backend",
    "grad_norm",
    "minibatch_similarity",
    "set_backend",
    "use_backend",
]
