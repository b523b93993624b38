"""One module per op: public functions, the pure-PyTorch reference, fake impls, autograd."""
