"""The minibatch-discrimination layer of a GAN critic (Salimans et al. 2016)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ganops.ops.minibatch_discrimination import minibatch_similarity


class MinibatchDiscrimination(nn.Module):
    """Appends to each sample's features how close it is to the rest of the batch.

    With features f (N, A) and the learned tensor T (A, B, C), M = (f · T.view(A, B·C))
    viewed as (N, B, C), and

        o[i, b] = Σ_{j≠i} exp(−‖M[i,b,:] − M[j,b,:]‖₁)              (N, B)
        output  = cat([f, o], dim=1)                                   (N, A + B)

    A drop-in for torchgan's ``MinibatchDiscrimination1d(in_features, out_features,
    intermediate_features=16)``, positional or keyword: same parameter ``T`` of shape
    (in_features, out_features, intermediate_features), initialised from N(0, 1), same output
    (torchgan sums over every j and subtracts the j = i term, 1); its state dict loads as is.
    ``exclude_self=False`` keeps the j = i term (1 for every sample), as the paper's formula
    has it.

    Where other conventions differ: the original code (Salimans et al., improved-gan)
    weight-normalises T (a direction initialised from N(0, 0.05²) times a learned scale, with
    data-dependent initialisation), excludes j = i by adding a large constant to the L1
    distance, and adds a learned per-kernel bias (initialised to −1) to o. Here T is a plain
    parameter and there is no bias; wrap T in ``torch.nn.utils.parametrizations.weight_norm``
    or add a bias downstream to reproduce them.

    Args:
        in_features: A, the size of each input sample.
        out_features: B, the number of kernels (features appended).
        intermediate_features: C, the dimension each kernel compares samples in (torchgan's
            name and default).
        exclude_self: leave the j = i term out of o.
        backend: ganops backend for the similarity (None: the current default).
        kernel_dims: deprecated keyword name of ``intermediate_features`` (earlier ganops
            releases documented it); warns and maps onto it.
    """

    def __init__(self, in_features: int, out_features: int, intermediate_features: int = 16,
                 exclude_self: bool = True, *, backend: str | None = None, device=None, dtype=None,
                 kernel_dims: int | None = None):
        super().__init__()
        if kernel_dims is not None:
            warnings.warn("MinibatchDiscrimination(kernel_dims=...) is deprecated; use intermediate_features=... "
                          "(torchgan's name)", FutureWarning, stacklevel=2)
            intermediate_features = kernel_dims
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("intermediate_features (kernel_dims)", intermediate_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(exclude_self, bool):
            raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.intermediate_features = intermediate_features
        self.exclude_self = exclude_self
        self.backend = backend
        self.T = nn.Parameter(torch.empty(in_features, out_features, intermediate_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.T, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}) (in_features={self.in_features}), "
                             f"got {tuple(x.shape)}")
        M = (x @ self.T.reshape(self.in_features, -1)).view(x.shape[0], self.out_features,
                                                              self.intermediate_features)
        o = minibatch_similarity(M, exclude_self=self.exclude_self, backend=self.backend)
        return torch.cat([x, o], dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"intermediate_features={self.intermediate_features}, exclude_self={self.exclude_self}")

    @property
    def kernel_dims(self) -> int:
        """Deprecated name of intermediate_features, kept for reading."""
        return self.intermediate_features
