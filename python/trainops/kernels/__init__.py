"""Triton kernels (pure @triton.jit functions and their launchers)."""
