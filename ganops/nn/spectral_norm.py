"""ganops.spectral_norm: a drop-in for torch.nn.utils.parametrizations.spectral_norm.

The same parametrization machinery (torch.nn.utils.parametrize), the same buffers and
state_dict keys (``parametrizations.<name>.original``, ``parametrizations.<name>.0._u``,
``..._v``), the same random draws for u and v and the same 15 warm-up iterations, so a
seeded model gives the same numbers with either library and checkpoints move both ways.
The forward runs ganops' fused kernels (ganops.spectral_normalize). A state_dict saved with
the older hook API (torch.nn.utils.spectral_norm: ``<name>_orig``, ``<name>_u``,
``<name>_v``) also loads through plain ``module.load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ganops.ops import spectral_norm as ops

# torch's parametrization runs this many power iterations at registration.
_WARM_UP_ITERATIONS = 15


class SpectralNorm(nn.Module):
    """The parametrization W -> W / sigma(W), registered by ganops.spectral_norm.

    Mirrors torch.nn.utils.parametrizations._SpectralNorm: buffers ``_u`` (size(dim)) and
    ``_v`` (numel / size(dim)) in the weight's dtype, drawn from N(0, 1) in that order,
    normalised, then 15 power iterations. In training mode each forward runs
    ``n_power_iterations`` more, in place; eval mode runs none. ``backend`` picks the
    implementation (None: the current ganops backend); complex weights are computed by the
    pure-PyTorch reference (conjugate transpose) whatever it says, the kernels being real.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 backend: str | None = None) -> None:
        super().__init__()
        ops.check_weight(weight)
        ndim = weight.ndim
        self.dim = ops.check_dim(dim, ndim)
        self.n_power_iterations = ops.check_n_power_iterations(n_power_iterations)
        self.eps = ops.check_eps(eps)
        self.backend = backend
        if ndim > 1:
            rows, cols = ops.matrix_size(weight, self.dim)
            # The same draws, in the same order and dtype, as torch's _SpectralNorm.
            u = weight.new_empty(rows).normal_(0, 1)
            v = weight.new_empty(cols).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            ops.power_iteration_(weight, self._u, self._v, _WARM_UP_ITERATIONS, self.eps, self.dim, backend)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        # Arguments were checked at registration; the kernels check shapes and dtypes again.
        weight_sn, _ = ops.normalize_unchecked(weight, self._u, self._v, self.n_power_iterations, self.eps, self.dim,
                                               self.training, self.backend)
        return weight_sn

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"


class _LoadHookAPIState:
    """A load_state_dict pre-hook that renames the hook API's keys to the parametrization's:
    ``<name>_orig`` -> ``parametrizations.<name>.original``, ``<name>_u`` / ``<name>_v`` ->
    ``parametrizations.<name>.0._u`` / ``._v``. The hook API's u and v are the same vectors
    (u of size(dim), v of numel / size(dim)), so the values carry over unchanged."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        old = prefix + self.name
        if old + "_orig" not in state_dict:
            return
        new = f"{prefix}parametrizations.{self.name}."
        state_dict[new + "original"] = state_dict.pop(old + "_orig")
        for suffix in ("_u", "_v"):
            if old + suffix in state_dict:
                state_dict[new + "0." + suffix] = state_dict.pop(old + suffix)
        # Only the oldest hook-API checkpoints (before v) also saved the normalised weight.
        state_dict.pop(old, None)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, backend: str | None = None) -> nn.Module:
    """Applies spectral normalization to ``module.<name>``: W_sn = W / sigma(W).

    A drop-in for torch.nn.utils.parametrizations.spectral_norm, same arguments and
    semantics: ``dim`` defaults to 0, or 1 for ConvTranspose1d/2d/3d; sigma is estimated by
    ``n_power_iterations`` of the power method each time the weight is accessed in training
    mode; 1-D weights are simply normalised. Returns ``module``, its weight parametrized.
    ``backend`` (keyword only) picks ganops' implementation; None follows ganops.use_backend.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, backend))
    module._register_load_state_dict_pre_hook(_LoadHookAPIState(name))
    return module
