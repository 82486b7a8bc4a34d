"""Helpers shared by the kernel modules (no Triton import here)."""
import os

import torch

# Tests set this to True so every output buffer a kernel allocates starts as NaN (floats)
# or as an impossible value (ints): an element the kernel forgets to write then fails.
POISON_OUTPUTS = False


def empty(shape, dtype, device, memory_format=torch.contiguous_format):
    """Allocate a kernel output; NaN-filled when POISON_OUTPUTS is set."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.fill_(-(2 ** 30) if dtype != torch.bool else True)
    return out


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
