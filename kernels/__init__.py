"""Fused Triton kernels of fastmix, installed as ``fastmix.kernels``.

One module per fused op; each holds the Triton kernels, their launch configuration and the
``torch.autograd.Function`` that launches them. The op's eager twin (the reference the kernel
is tested and benchmarked against) and the argument checks both share are Triton-free, in
``fastmix.functional`` and ``fastmix.checks``.
Importing this package does not import Triton: each op module does, on first use.
"""
