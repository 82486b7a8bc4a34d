"""Benchmark cases for the fused mixed cross-entropy (kernels/mixed_ce.py).

Byte counts (the fewest bytes each pass must move):
  * bytes_fwd: logits read once + the gradient written once (the fused forward writes
    d loss / d logits, Liger-style) + the two label vectors. The eager twin's own minimum is
    only the logits read once (+ labels): see ``extra["bytes_fwd_eager_min"]``.
  * bytes_fwd_bwd: bytes_fwd + the backward's scaling pass (read the stored gradient, write
    the gradient scaled by grad_output / N).
"""
import torch

from fastmix import functional as E   # the eager twin

try:
    from bench.common import Case
except ImportError:   # run with bench/ itself on sys.path
    from common import Case

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(mixed_ce, n, k, dtype, device, eps=0.0):
    def make():
        logits = (torch.randn(n, k, device=device) * 3).to(dtype).requires_grad_()
        target_a = torch.randint(0, k, (n,), device=device)
        target_b = torch.randint(0, k, (n,), device=device)
        lam = torch.rand((), device=device)          # 0-d device tensor, as in training
        return (logits, target_a, target_b, lam), {"label_smoothing": eps}

    elt = torch.empty((), dtype=dtype).element_size()
    logits_bytes = n * k * elt
    label_bytes = 2 * n * 8
    bytes_fwd = logits_bytes + logits_bytes + label_bytes        # read logits, write grad
    bytes_fwd_bwd = bytes_fwd + 2 * logits_bytes                 # + read grad, write grad
    shape = f"N={n} K={k} {_SHORT[dtype]}" + (f" eps={eps}" if eps else "")
    return Case(
        op="mixed_ce",
        shape=shape,
        make=make,
        eager=E.mixed_cross_entropy_eager,
        fused=mixed_ce.mixed_cross_entropy,
        bytes_fwd=bytes_fwd,
        bytes_fwd_bwd=bytes_fwd_bwd,
        flops_fwd=None,
        extra={"bytes_fwd_eager_min": logits_bytes + label_bytes},
    )


def cases(device: str, quick: bool) -> list:
    # Imported here, not at module import: Triton reads TRITON_INTERPRET when the kernel
    # module is imported, and the harness may set it after collecting the case modules.
    from fastmix.kernels import mixed_ce

    if quick:
        shapes = [(4, 10), (8, 100)]
        dtypes = [torch.float32]
    else:
        shapes = [(n, k) for n in (128, 256) for k in (10, 100, 1000)] + [(4096, 1000)]
        dtypes = [torch.float32, torch.bfloat16]
    return [_case(mixed_ce, n, k, dtype, device) for dtype in dtypes for n, k in shapes]
