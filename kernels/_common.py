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


def scalar_tensor(value, device, dtype=torch.float32):
    """A 0-d device tensor from a Python number or a 0-d tensor, without a host sync."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"expected a scalar or 0-d tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=device)


INDEX_DTYPES = (torch.int64, torch.int32)


def check_index(name, t, n, device, ref, high=None):
    """Validate an index/label tensor: a 1-d int64/int32 tensor of length ``n`` on ``device``
    (``ref`` names the tensor it must match), with values in ``[0, high)`` (``high``: ``n``
    unless given). The range is where a kernel would otherwise read out of bounds and return
    NaN or garbage, while the eager op raises: on the CPU it is read and an out-of-range value
    raises ``IndexError`` as eager PyTorch does; on CUDA it is a device-side assert
    (``torch._assert_async``), as eager CUDA ops do, with no host sync."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of indices, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}] to match {ref}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}")
    high = n if high is None else high
    if t.numel() == 0:
        return
    if t.device.type == "cuda":
        torch._assert_async(((t >= 0) & (t < high)).all(),
                            f"{name}: a value lies outside [0, {high})")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= high:
        raise IndexError(f"{name}: values must lie in [0, {high}) ({ref}), found "
                         f"{lo if lo < 0 else hi}")
