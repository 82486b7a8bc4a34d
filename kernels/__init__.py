"""Fused Triton kernels of fastmix, installed as ``fastmix.kernels``.

One module per fused op; each holds the Triton kernels, the ``torch.autograd.Function``
that launches them, and the eager PyTorch twin the kernel is tested against.
Importing this package does not import Triton: each op module does, on first use.
"""
