"""The three fused ops, each as a dispatcher and its one eager twin, plus CutMix and permutations.

Per op: ``<op>(..., fused=None)`` runs the Triton kernel (``kernels/<op>.py``) or the eager
twin ``<op>_eager`` defined here. The twins are the reference the kernels are tested and
benchmarked against, and what the library runs with ``--eager`` or on the CPU. This module
does not import Triton (the kernels are imported on first fused use); the argument checks
both paths share live in ``fastmix.checks``.

``fused=None`` (the default everywhere) means: fused when the tensor lives on a CUDA device
and Triton is importable, eager otherwise. ``fused=True`` forces the kernels (on CPU they then
need ``TRITON_INTERPRET=1``, which is how the tests check them); ``fused=False`` forces eager
(``train.py --eager`` passes it to the model).
"""
import os

import torch
import torch.nn.functional as F

from fastmix.checks import (attention_scale, check_attention, check_box_tensor,
                            check_cross_entropy, check_cross_entropy_per_sample, check_host_lam,
                            check_mix, check_mix_pair, check_mix_per_sample,
                            check_soft_cross_entropy, check_upsample_mode, is_lam_vector,
                            is_soft_target, scalar_tensor)

def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


FUSED_OPS = ("mixed_cross_entropy", "mixblock_attention", "mix_images")
_OP_PATHS = {}   # op -> fused (True / False) for this process, set by the trainer's self-check


def use_fused(tensor: torch.Tensor, fused=None, op=None) -> bool:
    """Decide whether an op on ``tensor`` runs the fused kernel.

    ``fused=None``: the path ``set_op_paths`` chose for ``op`` if any, else the kernel on
    CUDA (when Triton imports) and eager elsewhere."""
    if fused is None:
        fused = _OP_PATHS.get(op)
    if fused is None:
        return tensor.is_cuda and _triton_available()
    if fused and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("fused kernels on CPU tensors need TRITON_INTERPRET=1 "
                           "(set before fastmix.kernels is imported); use fused=False for eager")
    if fused and not _triton_available():
        raise RuntimeError("fused kernels need triton (`pip install triton`)")
    return bool(fused)


def set_op_paths(paths):
    """Pin each op's path for calls with ``fused=None``: ``{op: True | False}`` (an op left
    out goes back to the default). Returns the previous setting, to restore it."""
    unknown = set(paths) - set(FUSED_OPS)
    if unknown:
        raise ValueError(f"unknown fused ops {sorted(unknown)}; the ops are {FUSED_OPS}")
    previous = dict(_OP_PATHS)
    _OP_PATHS.clear()
    _OP_PATHS.update({op: bool(v) for op, v in paths.items()})
    return previous


_NO_IGNORE = -(2 ** 62)

# While fastmix.selfcheck records which variants, shapes and dtypes a run's step calls
# (``selfcheck.record_op_calls``): a callable ``(dispatcher name, positional args)``.
_CALL_RECORDER = None


def _record(name, *args):
    if _CALL_RECORDER is not None:
        _CALL_RECORDER(name, args)


# ---- mixed cross-entropy (kernels/mixed_ce.py) ------------------------------------------------
def mixed_cross_entropy(logits: torch.Tensor, target_a: torch.Tensor,
                        target_b: "torch.Tensor | None" = None, lam=1.0,
                        label_smoothing: float = 0.0, fused: "bool | None" = None) -> torch.Tensor:
    """``lam * CE(logits, target_a) + (1 - lam) * CE(logits, target_b)``, mean over the batch.

    ``lam`` may be a Python float or a 0-d tensor (never read on the host). ``target_b=None``
    gives plain cross-entropy. Label smoothing follows ``F.cross_entropy(label_smoothing=)``.

    Two more forms, always eager (``fused`` is ignored for them):

    * soft targets: ``target_a`` a float [N, K] tensor of class probabilities (timm's Mixup
      targets, ``fastmix.mixers.soft_targets``), ``target_b=None`` and ``lam`` left at 1.0:
      ``mean_i(-sum_k t_ik log_softmax(z)_ik)``, the smoothing applied to the target as timm
      and torchvision do (``t * (1 - eps) + eps / K``; ``F.cross_entropy``'s own rule for
      probability targets). Eager because the kernel gathers one or two class indices per row
      and builds the one-hot target distribution from them; it cannot take a dense target.
    * a per-sample λ: ``lam`` a float [N] tensor on logits' device (timm's ``pair`` and
      ``elem`` modes): ``mean_i(lam_i CE(z_i, a_i) + (1 - lam_i) CE(z_i, b_i))``. Eager
      because the kernel reads λ from one 0-d pointer for every row (``tl.load(lam_ptr)`` in
      ``kernels/mixed_ce.py``'s ``_targets``); a row-indexed λ is a kernel change, not a new
      argument. Neither form reads a device value on the host.
    """
    _record("mixed_cross_entropy", logits, target_a, target_b, lam, label_smoothing)
    if is_soft_target(target_a):
        check_soft_cross_entropy(logits, target_a, target_b, lam, label_smoothing)
        return F.cross_entropy(logits.float(), target_a.float(), label_smoothing=label_smoothing)
    if is_lam_vector(lam):
        return _mixed_cross_entropy_per_sample(logits, target_a, target_b, lam, label_smoothing)
    if use_fused(logits, fused, "mixed_cross_entropy"):
        from fastmix.kernels.mixed_ce import mixed_cross_entropy as fused_ce
        return fused_ce(logits, target_a, target_b, lam, label_smoothing)
    return mixed_cross_entropy_eager(logits, target_a, target_b, lam, label_smoothing)


def mixed_cross_entropy_eager(logits, target_a, target_b=None, lam=1.0, label_smoothing=0.0):
    """The eager twin of the fused mixed cross-entropy: fp32 ``F.cross_entropy`` of each
    target, mixed with ``lam``. Same checks as the kernel (``fastmix.checks``): every label is
    a class, no ``ignore_index`` (F.cross_entropy would silently drop -100)."""
    check_cross_entropy(logits, target_a, target_b, lam, label_smoothing, eager=True)
    z = logits.float()
    loss_a = F.cross_entropy(z, target_a.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE)
    if target_b is None:
        return loss_a
    loss_b = F.cross_entropy(z, target_b.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE)
    if isinstance(lam, torch.Tensor):
        lam = scalar_tensor(lam, z.device)
    return lam * loss_a + (1.0 - lam) * loss_b


def _mixed_cross_entropy_per_sample(logits, target_a, target_b, lam, label_smoothing):
    """``mean_i(lam_i CE(z_i, a_i) + (1 - lam_i) CE(z_i, b_i))``, fp32, eager (the kernel takes
    one λ): per-row ``F.cross_entropy`` of each target, weighed row by row."""
    check_cross_entropy_per_sample(logits, target_a, target_b, lam, label_smoothing)
    z = logits.float()
    loss_a = F.cross_entropy(z, target_a.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE, reduction="none")
    loss_b = F.cross_entropy(z, target_b.long(), label_smoothing=label_smoothing,
                             ignore_index=_NO_IGNORE, reduction="none")
    lam = lam.float()
    return (lam * loss_a + (1.0 - lam) * loss_b).mean()


# ---- Mix Block attention (kernels/mixblock_attn.py) -------------------------------------------
def mixblock_attention(qk, v, index, q_bias=None, k_bias=None, v_bias=None, scale=None,
                       fused=None):
    """``softmax((qk + q_bias) (qk[index] + k_bias)^T * scale) @ (v[index] + v_bias)`` per
    sample, [N, L] fp32: the Mix Block's attention of each sample over its partner's
    positions (``qk`` [N, L, D] is the shared query/key projection, ``v`` [N, L])."""
    _record("mixblock_attention", qk, v, index, q_bias, k_bias, v_bias, scale)
    if use_fused(qk, fused, "mixblock_attention"):
        from fastmix.kernels.mixblock_attn import mixblock_attention as fused_attention
        return fused_attention(qk, v, index, q_bias, k_bias, v_bias, scale)
    return mixblock_attention_eager(qk, v, index, q_bias, k_bias, v_bias, scale)


def mixblock_attention_eager(qk, v, index, q_bias=None, k_bias=None, v_bias=None, scale=None):
    """The eager twin of the fused attention: gathers ``qk[index]`` and materialises the
    [N, L, L] probabilities; fp32."""
    check_attention(qk, v, index, q_bias, k_bias, v_bias, scale, eager=True)
    s = attention_scale(scale, qk.shape[2])
    q = qk.float()
    k = qk[index].float()
    vv = v[index].float()
    if q_bias is not None:
        q = q + q_bias.float()
    if k_bias is not None:
        k = k + k_bias.float()
    if v_bias is not None:
        if isinstance(v_bias, torch.Tensor):
            v_bias = scalar_tensor(v_bias, vv.device)
        vv = vv + v_bias
    attn = torch.bmm(q, k.transpose(1, 2)) * s          # [N, L, L]
    attn = attn.softmax(dim=-1)                          # over the partner's positions
    return torch.bmm(attn, vv.unsqueeze(-1)).squeeze(-1)


# ---- mask upsampling + image mix (kernels/mask_mix.py) ----------------------------------------
def mix_images(x, index, mask_logits=None, lam=None, mode="nearest", fused=None):
    """Mix each image with its partner ``x[index]``: ``x * (1 - s) + x[index] * s`` with
    ``s = sigmoid(upsample(mask_logits))`` ([N, 1, h, w] logits; s weights the partner), or
    with a constant ``lam * x + (1 - lam) * x[index]`` (``lam``: the weight of x).

    ``lam`` may also be a float [N] tensor on x's device, one λ per sample (timm's ``pair`` /
    ``elem`` modes): ``lam_i * x_i + (1 - lam_i) * x[index_i]``. That form is always eager
    (``fused`` is ignored): the kernel reads its constant λ from one 0-d pointer for every
    sample (``_partner`` in ``kernels/mask_mix.py``), and ``mix_images_eager``, the kernel's
    twin, refuses it as the kernel does."""
    _record("mix_images", x, index, mask_logits, lam, mode)
    if is_lam_vector(lam):
        check_mix_per_sample(x, index, mask_logits, lam, mode)
        return _mix_eager(x, index, None, lam, mode)
    if use_fused(x, fused, "mix_images"):
        from fastmix.kernels.mask_mix import mix_images as fused_mix
        return fused_mix(x, index, mask_logits, lam, mode)
    return mix_images_eager(x, index, mask_logits, lam, mode)


def mix_images_pair(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                    mode="nearest", fused=None):
    """Both mixed batches of an AutoMix step: ``(mix_images(x, index_a, mask_logits_a),
    mix_images(x, index_b, mask_logits_b or lam_b))``; the second gets no gradient. Fused,
    one launch reads each image and its two partners once."""
    _record("mix_images_pair", x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    if use_fused(x, fused, "mix_images"):
        from fastmix.kernels.mask_mix import mix_images_pair as fused_pair
        return fused_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    return mix_images_pair_eager(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)


def mixup_images(x, index, lam, fused=None):
    """Input Mixup: ``lam * x + (1 - lam) * x[index]`` (``lam`` a float or 0-d tensor), or per
    sample with ``lam`` a float [N] tensor on x's device (eager: see ``mix_images``)."""
    return mix_images(x, index, lam=lam, fused=fused)


def _mix_eager(x, index, mask_logits, lam, mode):
    xf = x.float()
    xi = xf[index]
    if mask_logits is not None:
        s = torch.sigmoid(upsample_mask(mask_logits.float(), x.shape[-2:], mode))
        out = xf * (1.0 - s) + xi * s
    elif is_lam_vector(lam):         # one λ per sample (checked by check_mix_per_sample)
        lam = lam.float().view(-1, 1, 1, 1)
        out = lam * xf + (1.0 - lam) * xi
    else:
        if isinstance(lam, torch.Tensor):
            lam = scalar_tensor(lam, x.device)
        out = lam * xf + (1.0 - lam) * xi
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return out.to(dtype=x.dtype, memory_format=fmt)


def is_channels_last(x):
    """True when x [N, C, H, W] is laid out channels_last (ambiguous size-1 cases follow the
    strides); the mixes return their output in x's layout."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not x.is_contiguous():
        return True
    # Both formats describe the same memory (C == 1 or H * W == 1): keep x's own flavour.
    n, c, height, width = x.shape
    if c == 1:
        return height * width > 1 and x.stride(1) == 1
    return height * width == 1 and x.stride(3) == c


def mix_images_eager(x, index, mask_logits=None, lam=None, mode="nearest"):
    """The eager twin of the fused mix (same checks; upsampling by F.interpolate, fp32).

    Unlike the fused op, it differentiates through x too."""
    check_mix(x, index, mask_logits, lam, mode)
    return _mix_eager(x, index, mask_logits, lam, mode)


def mix_images_pair_eager(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                          mode="nearest"):
    """The eager twin of the fused pair: two eager mixes (mask_logits_b detached)."""
    check_mix_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    out_a = _mix_eager(x, index_a, mask_logits_a, None, mode)
    mb = mask_logits_b.detach() if mask_logits_b is not None else None
    return out_a, _mix_eager(x, index_b, mb, lam_b, mode)


def upsample_mask(mask_logits, size, mode="nearest"):
    """Upsample ``[N, 1, h, w]`` logits to ``size`` (nearest or bilinear, align_corners=False)."""
    check_upsample_mode(mode)
    if mode == "nearest":
        return F.interpolate(mask_logits, size=tuple(size), mode="nearest")
    return F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)


def random_permutation(n, device, generator=None, no_fixed_points=False):
    """A random permutation of ``range(n)`` drawn on ``device`` (no host sync).

    ``no_fixed_points=True`` returns a uniformly random single n-cycle, which never maps an
    index to itself: the effect of the official ``mix_shuffle_no_repeat`` without its
    host-side retry loop around ``randperm``. No such permutation of one element exists, so
    ``n == 1`` then raises ``ValueError`` (a batch of one would be mixed with itself).
    """
    if no_fixed_points and n == 1:
        raise ValueError("a permutation without fixed points of 1 element does not exist: "
                         "mix_shuffle_no_repeat (no_fixed_points=True) needs a batch of at least "
                         "2 samples, else every sample is mixed with itself")
    perm = torch.randperm(n, device=device, generator=generator)
    if not no_fixed_points or n < 2:
        return perm
    index = torch.empty_like(perm)
    index[perm] = torch.roll(perm, -1)
    return index


def cutmix_box(height, width, lam, rng):
    """A CutMix box for a target λ, as in the CutMix paper: side ratio sqrt(1 - λ), centre
    uniform over the image, half-sides ``cut // 2`` on both sides, clipped at the border.

    For the same λ and centre this is torchvision's ``v2.CutMix`` box and λ exactly. timm's
    ``rand_bbox`` puts the upper edges at ``centre + (cut + 1) // 2``, one pixel further when
    the cut is odd; its λ correction (``correct_lam=True``) is the same formula
    (``tests/test_peers.py``).

    ``rng`` is a ``numpy.random.Generator``. Returns ``(y0, y1, x0, x1, lam_adjusted)`` with
    ``lam_adjusted = 1 - box area / image area`` (the λ the labels must use). Host-side
    integers only: no device memory is read.
    """
    check_host_lam(lam)
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    from fastmix.mixes import clip_box      # the one box helper of the cutting methods
    y0, y1, x0, x1 = clip_box(cy, cx, cut_h, cut_w, height, width)
    lam_adjusted = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return y0, y1, x0, x1, lam_adjusted


def cutmix_images(x, index, box):
    """Paste ``x[index]``'s box into ``x`` (a new tensor; ``x`` is left unchanged).

    ``box`` is ``(y0, y1, x0, x1)`` as host ints (slicing) or as a 4-element device tensor
    (a select over an in-box mask: same result, fixed shapes, so it can be graph-captured),
    or an integer [N, 4] device tensor, one box per sample (timm's ``pair`` / ``elem`` modes;
    an empty box, e.g. all zeros, leaves its sample unchanged): the same select with a
    per-sample mask, nothing read on the host."""
    if isinstance(box, torch.Tensor) and box.dim() == 2:
        check_box_tensor(box, x)
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        y0, y1, x0, x1 = box.unbind(1)
        inside = (((rows >= y0[:, None]) & (rows < y1[:, None]))[:, None, :, None] &
                  ((cols >= x0[:, None]) & (cols < x1[:, None]))[:, None, None, :])
        return torch.where(inside, x[index], x)
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
