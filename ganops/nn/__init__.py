"""Modules built on the ganops ops."""
