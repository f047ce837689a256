"""Fused ops. One op per file: Triton kernels, launchers, autograd.Function, and `<op>_ref` in pure torch."""
