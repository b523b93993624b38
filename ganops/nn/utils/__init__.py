"""ganops.nn.utils mirrors torch.nn.utils, so switching is one import line.

    from torch.nn.utils import clip_grad_norm_, spectral_norm    # before
    from ganops.nn.utils import clip_grad_norm_, spectral_norm   # after

``spectral_norm`` / ``remove_spectral_norm`` are the older hook API (``weight_orig``,
``weight_u``, ``weight_v``), as in torch; the parametrization is
``ganops.nn.utils.parametrizations.spectral_norm`` (also ganops.spectral_norm).
"""

from ganops.nn.utils import parametrizations
from ganops.nn.utils.spectral_norm_hook import remove_spectral_norm, spectral_norm
from ganops.ops.clip_grad_norm import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "parametrizations",
    "remove_spectral_norm",
    "spectral_norm",
]
