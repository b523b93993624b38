"""Mirrors torch.nn.utils.parametrizations: ``spectral_norm`` is ganops' parametrization
(ganops.spectral_norm: ``parametrizations.weight.original``, ``..._u``, ``..._v``)."""

from ganops.nn.spectral_norm import spectral_norm

__all__ = ["spectral_norm"]
