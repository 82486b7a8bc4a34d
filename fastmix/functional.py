"""Functional ops with one switch between the fused Triton kernels and their eager twins.

``fused=None`` (the default everywhere) means: fused when the tensor lives on a CUDA device
and Triton is importable, eager otherwise. ``fused=True`` forces the kernels (on CPU they then
need ``TRITON_INTERPRET=1``, which is how the tests check them); ``fused=False`` forces eager
(``train.py --eager`` passes it to the model).
"""
import os

import torch
import torch.nn.functional as F

def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(tensor: torch.Tensor, fused=None) -> bool:
    """Decide whether an op on ``tensor`` runs the fused kernel."""
    if fused is None:
        return tensor.is_cuda and _triton_available()
    if fused and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("fused kernels on CPU tensors need TRITON_INTERPRET=1 "
                           "(set before fastmix.kernels is imported); use fused=False for eager")
    if fused and not _triton_available():
        raise RuntimeError("fused kernels need triton (`pip install triton`)")
    return bool(fused)


def _check_lam(lam):
    """A float λ must lie in [0, 1]; a tensor λ is not read (that would sync the device)."""
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a float or a 0-d tensor, got shape {tuple(lam.shape)}")
    elif not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")


_NO_IGNORE = -(2 ** 62)


def mixed_cross_entropy(logits, target_a, target_b=None, lam=1.0, label_smoothing=0.0, fused=None):
    """``lam * CE(logits, target_a) + (1 - lam) * CE(logits, target_b)``, mean over the batch.

    ``lam`` may be a Python float or a 0-d tensor (never read on the host). ``target_b=None``
    gives plain cross-entropy. Label smoothing follows ``F.cross_entropy(label_smoothing=)``.
    """
    _check_lam(lam)
    if use_fused(logits, fused):
        from fastmix.kernels.mixed_ce import mixed_cross_entropy as fused_ce
        return fused_ce(logits, target_a, target_b, lam, label_smoothing)
    return mixed_cross_entropy_eager(logits, target_a, target_b, lam, label_smoothing)


def mixed_cross_entropy_eager(logits, target_a, target_b=None, lam=1.0, label_smoothing=0.0):
    """The eager twin of the fused mixed cross-entropy (``kernels/mixed_ce.py`` is tested
    against this very function): fp32 ``F.cross_entropy`` of each target, mixed with ``lam``.

    Every label is a class: no ``ignore_index`` (F.cross_entropy would silently drop -100), so
    an out-of-range label raises (CPU) or trips a device assert (CUDA), as in the kernel."""
    _check_lam(lam)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z = logits.float()
    loss_a = F.cross_entropy(z, target_a.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE)
    if target_b is None:
        return loss_a
    loss_b = F.cross_entropy(z, target_b.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=z.device, dtype=torch.float32)
    return lam * loss_a + (1.0 - lam) * loss_b


def mixup_images(x, index, lam, fused=None):
    """Input Mixup: ``lam * x + (1 - lam) * x[index]`` (``lam`` a float or 0-d tensor)."""
    _check_lam(lam)
    if use_fused(x, fused):
        from fastmix.kernels.mask_mix import mix_images
        return mix_images(x, index, lam=lam)
    return x * lam + x[index] * (1.0 - lam)


def mask_mix_images(x, index, mask_logits, mode="nearest", fused=None):
    """``x * (1 - s) + x[index] * s`` with ``s = sigmoid(upsample(mask_logits))``.

    ``mask_logits`` is ``[N, 1, h, w]``; gradients flow to it, not to the images.
    """
    if use_fused(x, fused):
        from fastmix.kernels.mask_mix import mix_images
        return mix_images(x, index, mask_logits=mask_logits, mode=mode)
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 4 or \
            mask_logits.shape[0] != x.shape[0] or mask_logits.shape[1] != 1:
        raise ValueError(f"mask_logits must be [N, 1, h, w] with N = {x.shape[0]}, got "
                         f"{tuple(getattr(mask_logits, 'shape', ()))}")
    s = torch.sigmoid(upsample_mask(mask_logits, x.shape[-2:], mode).float())
    return (x * (1.0 - s) + x[index] * s).to(x.dtype)


def upsample_mask(mask_logits, size, mode="nearest"):
    """Upsample ``[N, 1, h, w]`` logits to ``size`` (nearest or bilinear, align_corners=False)."""
    if mode == "nearest":
        return F.interpolate(mask_logits, size=tuple(size), mode="nearest")
    if mode == "bilinear":
        return F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    raise ValueError(f"upsampling mode must be 'nearest' or 'bilinear', got {mode!r}")


def random_permutation(n, device, generator=None, no_fixed_points=False):
    """A random permutation of ``range(n)`` drawn on ``device`` (no host sync).

    ``no_fixed_points=True`` returns a uniformly random single n-cycle, which never maps an
    index to itself (n > 1): the effect of the official ``mix_shuffle_no_repeat`` without its
    host-side retry loop around ``randperm``.
    """
    perm = torch.randperm(n, device=device, generator=generator)
    if not no_fixed_points or n < 2:
        return perm
    index = torch.empty_like(perm)
    index[perm] = torch.roll(perm, -1)
    return index


def cutmix_box(height, width, lam, rng):
    """A CutMix box for a target λ, as in the CutMix paper and timm: side ratio sqrt(1 - λ),
    centre uniform over the image, clipped at the border.

    ``rng`` is a ``numpy.random.Generator``. Returns ``(y0, y1, x0, x1, lam_adjusted)`` with
    ``lam_adjusted = 1 - box area / image area`` (the λ the labels must use). Host-side
    integers only: no device memory is read.
    """
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam_adjusted = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return y0, y1, x0, x1, lam_adjusted


def cutmix_images(x, index, box):
    """Paste ``x[index]``'s box into ``x`` (a new tensor; ``x`` is left unchanged).

    ``box`` is ``(y0, y1, x0, x1)`` as host ints (slicing) or as a 4-element device tensor
    (a select over an in-box mask: same result, fixed shapes, so it can be graph-captured)."""
    if isinstance(box, torch.Tensor):
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        inside = (((rows >= box[0]) & (rows < box[1]))[:, None] &
                  ((cols >= box[2]) & (cols < box[3]))[None, :])
        return torch.where(inside, x[index], x)
    y0, y1, x0, x1 = box[:4]
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[index, :, y0:y1, x0:x1]
    return out
