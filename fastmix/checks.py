"""Argument checks of the three fused ops, shared by the eager twins (``fastmix.functional``)
and the Triton launchers (``kernels/``), so both refuse the same inputs with the same message.

Host metadata only: no check reads a CUDA tensor's values (that would sync the device). An
index's range is read on the CPU and asserted on the device (``check_index``). Triton-free.
"""
import contextlib
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32)
UPSAMPLE_MODES = ("nearest", "bilinear")


_DEVICE_SIDE = False     # check_index asserts on the device whatever the device (see below)


@contextlib.contextmanager
def device_side_index_checks():
    """Inside, ``check_index`` takes its CUDA path on every device: a ``torch._assert_async``,
    nothing read on the host. ``bench/counts.py`` counts the CUDA step on CPU tensors so."""
    global _DEVICE_SIDE
    previous, _DEVICE_SIDE = _DEVICE_SIDE, True
    try:
        yield
    finally:
        _DEVICE_SIDE = previous


def check_host_lam(lam):
    """A λ drawn on the host for a box or mask (CutMix, FMix, GridMix): a number in [0, 1]."""
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")


def describe(t):
    """``shape (..)`` of a tensor, else the type name: for error messages."""
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def scalar_tensor(value, device, dtype=torch.float32):
    """A 0-d tensor on ``device`` from a Python number or a 0-d tensor, without a host sync.

    A tensor on ``device`` is cast there. A CPU tensor bound for an accelerator is read on the
    host (host memory: no device sync) and filled on the device, not copied: a pageable
    host-to-device copy waits for the stream and is illegal inside a CUDA graph capture. (In
    a capture the fill's value is recorded: pass a device tensor to change it between replays,
    as ``CUDAGraphStep`` does.)"""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"expected a scalar or 0-d tensor, got shape {tuple(value.shape)}")
        device = torch.device(device)
        if value.device.type == "cpu" and device.type != "cpu" and not value.requires_grad:
            value = float(value)
        else:
            return value.to(device=device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=device)


def check_scalar(name, value, device, ref, unit_range=False):
    """A Python real or a 0-d tensor (float or int, no grad, on ``device`` or the CPU).

    ``unit_range``: a Python value must lie in [0, 1] (λ); a tensor is never read."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, "
                             f"got a tensor of shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in INDEX_DTYPES):
            raise TypeError(f"{name} tensor must be floating point, got {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad: the op treats it as a constant "
                             f"(pass {name}.detach())")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but {ref} is on {device}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, "
                        f"got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if unit_range and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_lam(lam, device=None, ref="the input", name="lam"):
    """λ: a Python float in [0, 1] or a 0-d tensor (not read: that would sync the device)."""
    if isinstance(lam, torch.Tensor) and device is None:
        device = lam.device
    check_scalar(name, lam, device, ref, unit_range=True)


def check_index(name, t, n, device, ref, high=None):
    """Validate an index/label tensor: a 1-d int64/int32 tensor of length ``n`` on ``device``
    (``ref`` names the tensor it must match), with values in ``[0, high)`` (``high``: ``n``
    unless given). The range is where a kernel would otherwise read out of bounds and return
    NaN or garbage, while the eager op raises: on the CPU it is read and an out-of-range value
    raises ``IndexError`` as eager PyTorch does; on CUDA it is a device-side assert
    (``torch._assert_async``), as eager CUDA ops do, with no host sync (five small launches).

    A tensor whose range was checked is not checked again while its version counter stands
    (no in-place write since) and the bound is no tighter: AutoMix's step hands the same
    labels and permutations to several ops (9 checks become 5: bench/counts.py)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of indices, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) integer tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}] (a 1-d tensor of length N={n}) "
                         f"to match {ref}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}")
    high = n if high is None else high
    if t.numel() == 0:
        return
    memo = not t.is_inference()              # inference tensors have no version counter
    if memo:
        seen = getattr(t, "_fastmix_range", None)
        if seen is not None and seen[0] == t._version and seen[1] <= high:
            return
    if t.device.type == "cuda" or _DEVICE_SIDE:
        torch._assert_async(((t >= 0) & (t < high)).all(),
                            f"{name}: a value lies outside [0, {high})")
    else:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= high:
            raise IndexError(f"{name}: values must lie in [0, {high}) ({ref}), found "
                             f"{lo if lo < 0 else hi}")
    if memo:
        t._fastmix_range = (t._version, high)


def _check_float(name, t, eager):
    """The kernels take fp32/fp16/bf16; the eager twins also take float64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (MASK_DTYPES if eager else FLOAT_DTYPES):
        raise TypeError(f"{name} must be float32, float16 or bfloat16"
                        f"{' (or float64, eager)' if eager else ''}, got {t.dtype}")


# ---- mixed cross-entropy -------------------------------------------------------------------
def check_cross_entropy(logits, target_a, target_b, lam, label_smoothing, eager=False):
    n, k = _check_logits(logits, eager)
    classes = f"the {k} classes of logits"
    check_index("target_a", target_a, n, logits.device, classes, high=k)
    if target_b is not None:
        check_index("target_b", target_b, n, logits.device, classes, high=k)
    check_lam(lam, logits.device, "logits")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a Python float, "
                        f"got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


# ---- Mix Block attention -------------------------------------------------------------------
def check_attention(qk, v, index, q_bias, k_bias, v_bias, scale, eager=False):
    _check_float("qk", qk, eager)
    if qk.dim() != 3:
        raise ValueError(f"qk must be 3-D [N, L, D], got shape {tuple(qk.shape)}")
    N, L, D = qk.shape
    if L == 0 or D == 0:
        raise ValueError(f"qk must have L > 0 and D > 0, got shape {tuple(qk.shape)}")
    dev = qk.device
    _check_float("v", v, eager)
    if v.dim() != 2 or tuple(v.shape) != (N, L):
        raise ValueError(f"v must have shape [N, L] = [{N}, {L}] to match qk, "
                         f"got {tuple(v.shape)}")
    if v.device != dev:
        raise ValueError(f"v is on {v.device} but qk is on {dev}")
    check_index("index", index, N, dev, "qk")
    for name, b in (("q_bias", q_bias), ("k_bias", k_bias)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{name} must be None or a [D] tensor, got {type(b).__name__}")
        if tuple(b.shape) != (D,):
            raise ValueError(f"{name} must have shape [D] = [{D}], got {tuple(b.shape)}")
        if not b.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {b.dtype}")
        if b.device != dev:
            raise ValueError(f"{name} is on {b.device} but qk is on {dev}")
    if v_bias is not None:   # a 0-d tensor may require grad (the λ column's weight)
        if isinstance(v_bias, torch.Tensor):
            if v_bias.dim() != 0:
                raise ValueError(f"v_bias must be None, a Python float or a 0-d tensor, "
                                 f"got a tensor of shape {tuple(v_bias.shape)}")
            if not v_bias.is_floating_point():
                raise TypeError(f"v_bias must be floating point, got {v_bias.dtype}")
            if v_bias.device != dev and v_bias.device.type != "cpu":
                raise ValueError(f"v_bias is on {v_bias.device} but qk is on {dev}")
        elif isinstance(v_bias, bool) or not isinstance(v_bias, numbers.Real):
            raise TypeError(f"v_bias must be None, a Python float or a 0-d tensor, "
                            f"got {type(v_bias).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be None or a Python float, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")


def attention_scale(scale, D):
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


# ---- mask mix ------------------------------------------------------------------------------
def _check_images(x):
    _check_float("x", x, eager=False)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D image batch [N, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    per_image = x.numel() // x.shape[0]
    if per_image >= 2 ** 31:
        raise ValueError(f"one image of x has {per_image} elements; at most 2**31 - 1")


def _check_mask(name, m, x):
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, 1, h, w], got shape {tuple(m.shape)}")
    if m.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
    if m.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {m.shape[0]} samples but x has {x.shape[0]}")
    if m.shape[1] != 1:
        raise ValueError(f"{name} must have one channel [N, 1, h, w], got {m.shape[1]}")
    h, w = m.shape[2:]
    height, width = x.shape[2:]
    if h == 0 or w == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(m.shape)}")
    if h > height or w > width:
        raise ValueError(f"{name} ({h}x{w}) must not be larger than the images "
                         f"({height}x{width}): the mask is upsampled, never downsampled")
    if m.device != x.device:
        raise ValueError(f"{name} is on {m.device} but x is on {x.device}")


def _check_source(mask_name, m, lam_name, lam, x):
    if (m is None) == (lam is None):
        raise ValueError(f"pass exactly one of {mask_name} (a mask) or {lam_name} "
                         f"(a constant mix), got {'both' if m is not None else 'neither'}")
    if m is not None:
        _check_mask(mask_name, m, x)
    else:
        check_lam(lam, x.device, "x", lam_name)


def check_upsample_mode(mode):
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def check_mix(x, index, mask_logits, lam, mode):
    """``mix_images``: a mask or a constant λ for one partner ``index``."""
    _check_images(x)
    check_index("index", index, x.shape[0], x.device, "x")
    _check_source("mask_logits", mask_logits, "lam", lam, x)
    check_upsample_mode(mode)


def check_mix_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode):
    """``mix_images_pair``: a masked mix (a) and a masked or constant mix (b)."""
    _check_images(x)
    check_index("index_a", index_a, x.shape[0], x.device, "x")
    if mask_logits_a is None:
        raise ValueError("mix_images_pair needs mask_logits_a (the first mix is always masked)")
    _check_mask("mask_logits_a", mask_logits_a, x)
    check_index("index_b", index_b, x.shape[0], x.device, "x")
    _check_source("mask_logits_b", mask_logits_b, "lam_b", lam_b, x)
    check_upsample_mode(mode)


# ---- the eager-only forms: per-sample λ, soft targets, per-sample boxes --------------------
# (``fastmix.functional`` routes them past the kernels; the checks above are left as they are.)
def is_lam_vector(lam):
    """A per-sample λ: a 1-d tensor (one weight per sample). A 0-d tensor is one λ."""
    return isinstance(lam, torch.Tensor) and lam.dim() == 1


def is_soft_target(target):
    """Soft targets: a floating-point tensor (class probabilities [N, K]); labels are ints."""
    return isinstance(target, torch.Tensor) and target.is_floating_point()


def check_lam_vector(lam, n, device, ref, name="lam"):
    """A per-sample λ: a 1-d floating-point tensor [N] on ``device`` that needs no gradient.
    Its values are not read (that would sync the device); they should lie in [0, 1]."""
    if lam.dim() != 1 or lam.shape[0] != n:
        raise ValueError(f"{name} must be a Python float, a 0-d tensor or a per-sample [N] = "
                         f"[{n}] tensor to match {ref}, got shape {tuple(lam.shape)}")
    if not lam.is_floating_point():
        raise TypeError(f"a per-sample {name} must be floating point, got {lam.dtype}")
    if lam.requires_grad:
        raise ValueError(f"{name} must not require grad: the op treats it as a constant "
                         f"(pass {name}.detach())")
    if lam.device != device:
        raise ValueError(f"a per-sample {name} is on {lam.device} but {ref} is on {device} "
                         f"(move it there once: it is not copied per call)")


def _check_logits(logits, eager):
    _check_float("logits", logits, eager)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, K], got shape {tuple(logits.shape)}")
    n, k = logits.shape
    if n == 0 or k == 0:
        raise ValueError(f"logits must be non-empty [N, K], got shape {tuple(logits.shape)}")
    return n, k


def _check_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a Python float, "
                        f"got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_soft_cross_entropy(logits, target, target_b, lam, label_smoothing):
    """Cross-entropy against soft targets: ``target`` [N, K] float class probabilities (the
    mix is already in them, so no ``target_b`` and ``lam`` left at 1). Eager only."""
    n, k = _check_logits(logits, eager=True)
    if target.dim() != 2 or tuple(target.shape) != (n, k):
        raise ValueError(f"target_a must be int64 class indices [N] = [{n}] or float class "
                         f"probabilities [N, K] = [{n}, {k}] to match logits, "
                         f"got a {target.dtype} tensor of shape {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target_a is on {target.device} but logits is on {logits.device}")
    if target_b is not None:
        raise ValueError("soft targets (a float [N, K] target_a) already hold the mix: "
                         "pass target_b=None")
    if isinstance(lam, (torch.Tensor, bool)) or not isinstance(lam, numbers.Real) \
            or float(lam) != 1.0:
        got = f"a tensor of {describe(lam)}" if isinstance(lam, torch.Tensor) else repr(lam)
        raise ValueError(f"soft targets (a float [N, K] target_a) already hold the mix: "
                         f"leave lam at 1.0, got {got}")
    _check_smoothing(label_smoothing)


def check_cross_entropy_per_sample(logits, target_a, target_b, lam, label_smoothing):
    """Mixed cross-entropy with a per-sample λ [N] (``check_cross_entropy`` otherwise). Eager
    only."""
    n, k = _check_logits(logits, eager=True)
    classes = f"the {k} classes of logits"
    check_index("target_a", target_a, n, logits.device, classes, high=k)
    if target_b is None:
        raise ValueError("a per-sample lam weighs target_a against target_b: pass target_b")
    check_index("target_b", target_b, n, logits.device, classes, high=k)
    check_lam_vector(lam, n, logits.device, "logits")
    _check_smoothing(label_smoothing)


def check_mix_per_sample(x, index, mask_logits, lam, mode):
    """``mix_images`` with a per-sample λ [N] (``check_mix`` otherwise). Eager only."""
    _check_images(x)
    check_index("index", index, x.shape[0], x.device, "x")
    if mask_logits is not None:
        raise ValueError("pass exactly one of mask_logits (a mask) or lam (a constant mix), "
                         "got both")
    check_lam_vector(lam, x.shape[0], x.device, "x")
    check_upsample_mode(mode)


def check_box_tensor(box, x):
    """A CutMix box as a device tensor: ``(y0, y1, x0, x1)`` [4] for the batch or [N, 4], one
    box per sample (integers; rows and columns ``[y0, y1) x [x0, x1)``, empty when y0 >= y1
    or x0 >= x1). Not read on the host."""
    if box.dim() == 1 and box.shape[0] == 4:
        return
    if box.dim() != 2 or tuple(box.shape) != (x.shape[0], 4):
        raise ValueError(f"box must be (y0, y1, x0, x1): 4 host ints, a [4] tensor or one box "
                         f"per sample [N, 4] = [{x.shape[0]}, 4], got shape {tuple(box.shape)}")
    if box.is_floating_point() or box.is_complex() or box.dtype == torch.bool:
        raise TypeError(f"a per-sample box must be an integer tensor, got {box.dtype}")
    if box.device != x.device:
        raise ValueError(f"box is on {box.device} but x is on {x.device}")
