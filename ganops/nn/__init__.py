"""Modules built on the ganops ops."""

from ganops.nn.minibatch_discrimination import MinibatchDiscrimination
from ganops.nn.spectral_norm import SpectralNorm, spectral_norm

__all__ = ["MinibatchDiscrimination", "SpectralNorm", "spectral_norm"]
