"""Triton kernels of the ganops ops, installed as ``ganops.triton_kernels``.

Each module holds one op's kernels and the launchers the op's hub (ganops/ops/<op>.py)
calls. Importing a module imports triton; the hubs import these lazily.
"""
