"""One hub per op: its argument checks, its pure-PyTorch reference, its registry entries
(ganops._library: schema, fake, Triton twin, autograd) and its public functions."""
