"""Modules built on the ganops ops."""

from ganops.nn.minibatch_discrimination import MinibatchDiscrimination

__all__ = ["MinibatchDiscrimination"]
