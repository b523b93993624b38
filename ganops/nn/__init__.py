"""Modules built on the ganops ops."""

from ganops.nn.minibatch_discrimination import MinibatchDiscrimination
from ganops.nn.minibatch_stddev import MinibatchStdDev
from ganops.nn.multihead_attention import MultiheadAttention
from ganops.nn.spectral_norm import SpectralNorm, spectral_norm
from ganops.nn import utils

__all__ = ["MinibatchDiscrimination", "MinibatchStdDev", "MultiheadAttention", "SpectralNorm", "spectral_norm", "utils"]
