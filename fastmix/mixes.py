"""The other sample-mixing methods of the paper's comparison tables (spec §4-§5).

Each method is a draw (host numbers from a ``numpy.random.Generator``: no device memory is
read) and a mix (device work only). Conventions, shared with Mixup/CutMix: the batch ``x`` is
mixed with its shuffled partner ``x[index]``; ``m`` is the *partner's* weight per pixel and
``λ = 1 - mean(m)`` is the weight of ``y`` (``1 - λ`` goes to ``y[index]``), computed from the
actual mask or box, so the labels carry what the pixels carry.

* :func:`resizemix_box` / :func:`resizemix_images` -- ResizeMix (Qin et al. 2020): the whole
  partner resized (nearest) into a box of side ``τ`` times the image's, ``τ`` in (0.1, 0.8).
* :func:`fmix_mask` -- FMix (Harris et al. 2020): FMix's low-frequency Fourier noise image, as
  its code builds it (:func:`fourier_low_freq_image`), binarised at its top ``⌈λ HW⌉`` or
  ``⌊λ HW⌋`` pixels.
* :func:`gridmix_mask` -- GridMix (Baek et al. 2021): a regular grid of square holes in a crop
  placed as OpenMixup places it (not clamped to the image).
* :func:`smoothmix_mask` -- SmoothMix (Lee et al. 2020): a Gaussian blob.
* :func:`spectral_residual_saliency` / :func:`saliency_box` -- SaliencyMix (Uddin et al. 2021):
  the CutMix box centred on the saliency peak of the partner image, computed on the device
  (a spectral residual with reflect padding; SaliencyMix's code uses OpenCV's fine-grained
  detector on the host).
* :func:`clip_box` -- the CutMix box convention (``centre ± cut // 2``, clipped) that CutMix's,
  ResizeMix's and SaliencyMix's boxes share.

How each differs from OpenMixup's code, measured on scripted draws by ``bench/fidelity.py``:
``docs/methods.md``.

Masks and boxes are host values (numpy arrays, ints) except SaliencyMix's, which depends on
the pixels and so stays on the device (a 4-int tensor: no read-back).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastmix.checks import check_host_lam


# ---- the CutMix box convention ------------------------------------------------------------------
def clip_box(cy, cx, cut_h, cut_w, height, width):
    """``(y0, y1, x0, x1)``: the box of a ``cut_h`` x ``cut_w`` cut around ``(cy, cx)`` in the
    CutMix convention -- ``centre ± cut // 2`` on both sides, clipped at the border:
    ``max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)`` and the same across.

    Host ints give ints; any tensor argument gives tensors (``clamp``, on its device, nothing
    read back), so a box centred on a device argmax stays on the device. The centre must lie in
    the image (``0 <= cy < height``, ``0 <= cx < width``) and the cuts be non-negative, as
    every caller's are: then each side is clipped on its own side only."""
    def lo(v):
        return v.clamp(min=0) if isinstance(v, torch.Tensor) else max(v, 0)

    def hi(v, n):
        return v.clamp(max=n) if isinstance(v, torch.Tensor) else min(v, n)

    return (lo(cy - cut_h // 2), hi(cy + cut_h // 2, height),
            lo(cx - cut_w // 2), hi(cx + cut_w // 2, width))


# ---- ResizeMix ----------------------------------------------------------------------------------
def resizemix_tau(rng, alpha, scope=(0.1, 0.8), use_alpha=True):
    """The paste scale τ: ``Beta(α, α)``, redrawn uniformly in ``scope`` when it falls outside
    (OpenMixup's CIFAR setting ``use_alpha=True``); ``use_alpha=False``: uniform in ``scope``
    (the ResizeMix paper)."""
    if use_alpha and alpha > 0:
        tau = float(rng.beta(alpha, alpha))
        if scope[0] <= tau <= scope[1]:
            return tau
    return float(rng.uniform(scope[0], scope[1]))


def resizemix_box(height, width, tau, rng):
    """``(y0, y1, x0, x1, λ)``: a box of ``int(H τ) x int(W τ)`` around a uniform centre, clipped
    at the border (the CutMix convention: ``centre ± cut // 2``); ``λ = 1 - box area / HW``."""
    cut_h, cut_w = int(height * tau), int(width * tau)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1, x0, x1 = clip_box(cy, cx, cut_h, cut_w, height, width)
    return y0, y1, x0, x1, 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def _nearest_source(dst, start, size, full):
    """For output positions ``dst`` inside a window ``[start, start + size)``, the source row of
    ``F.interpolate(mode="nearest")`` resizing ``full`` -> ``size``: floor((dst - start) *
    full / size) in float32, as PyTorch computes it."""
    size = torch.clamp(size, min=1) if isinstance(size, torch.Tensor) else max(size, 1)
    scale = (torch.as_tensor(full, dtype=torch.float32, device=dst.device)
             / torch.as_tensor(size, dtype=torch.float32, device=dst.device))
    src = torch.floor((dst - start).to(torch.float32) * scale).to(torch.int64)
    return src.clamp(0, full - 1)


def resizemix_images(x, index, box):
    """Paste ``x[index]``, resized (nearest) to the box, into ``x``'s box (a new tensor).

    ``box`` = ``(y0, y1, x0, x1)`` as host ints or a 4-element device tensor: one gather with
    fixed shapes either way (so a CUDA graph can replay it with new boxes). Equal to
    ``F.interpolate(x[index], (y1 - y0, x1 - x0), mode="nearest")`` pasted into the box."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    y0, y1, x0, x1 = (box[i] for i in range(4))
    src_r = _nearest_source(rows, y0, y1 - y0, h)
    src_c = _nearest_source(cols, x0, x1 - x0, w)
    inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
    partner = x[index][:, :, src_r][:, :, :, src_c]
    return torch.where(inside, partner, x)


# ---- FMix ---------------------------------------------------------------------------------------
def fourier_low_freq_image(height, width, decay_power, rng):
    """FMix's ``make_low_freq_image`` for one 2-D mask, as its code computes it: a ``[H, W]``
    float64 image in [0, 1] (``H >= 2``).

    The draw is FMix's: a standard-normal array ``p`` of shape ``[H, Wf, 2]`` (``Wf = W // 2 +
    1``, one more for odd ``W``), scaled per position by ``s = 1 / max(f, 1 / max(H, W)) **
    decay_power`` with ``f = sqrt(fy² + fx²)`` over ``fftfreq(H)`` x ``fftfreq(W)[:Wf]``. FMix
    (ecs-vlc/FMix ``fmix.py``, and OpenMixup's copy) then takes its complex spectrum from the
    first two *rows* of the scaled draw, not from the last axis: the ``[Wf, 2]`` array
    ``s[0] p[0] + 1j s[1] p[1]``, put through ``irfftn(·, (H, W))``. Its rows become the first
    ``Wf`` vertical frequencies (0, 1, ... cycles per height, the ifft zero-pads or truncates
    them to ``H``) and its two columns the horizontal frequencies 0 and 1 cycle per width: the
    noise varies along the width only as one cosine period (no energy at 2 or more cycles
    across), unlike the isotropic 1/f^d field FMix's paper describes. fastmix reproduces this
    exactly (bit for bit on the same draw, ``bench/fidelity.py``), since the methods' tables
    were made with this code."""
    if height < 2:
        raise ValueError(f"FMix's noise image needs at least 2 rows, got {height}")
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[: width // 2 + 1 + (width % 2)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power
    param = rng.standard_normal((*freqs.shape, 2))
    # rows 0 and 1 of the scaled draw: the real and imaginary parts, as FMix's code indexes it
    spectrum = scale[0][:, None] * param[0] + 1j * (scale[1][:, None] * param[1])
    img = np.real(np.fft.irfftn(spectrum, (height, width), axes=(-2, -1)))
    img = img - img.min()
    return img / img.max()


def binarise_top(img, lam, rng):
    """1 at the ``num`` largest pixels of ``img`` (``num`` = ceil or floor of ``λ HW`` with
    probability 1/2 each, as FMix), 0 elsewhere. Ties (measure zero for FMix's noise) go to
    the earlier pixel; FMix's ``argsort()[::-1]`` leaves them in numpy's sort order."""
    flat = img.reshape(-1)
    num = math.ceil(lam * flat.size) if rng.random() > 0.5 else math.floor(lam * flat.size)
    mask = np.zeros(flat.size)
    mask[np.argsort(-flat, kind="stable")[:num]] = 1.0
    return mask.reshape(img.shape)


def fmix_mask(height, width, lam, rng, decay_power=3.0):
    """``(m, λ)``: FMix's binary mask as the partner's weight and ``λ`` = the exact kept area.

    FMix keeps ``x`` where its binarised noise is 1 (``num`` ≈ ``λ HW`` pixels), so the
    partner's weight is ``1 -`` that mask. The draws are FMix's, in its order (the noise, then
    the ceil/floor coin): the same mask as OpenMixup's ``fmix`` on the same draws. FMix labels
    with the sampled λ; the kept area ``num / HW`` differs from it by less than ``1 / HW`` and
    is what fastmix uses."""
    check_host_lam(lam)
    keep = binarise_top(fourier_low_freq_image(height, width, decay_power, rng), lam, rng)
    return 1.0 - keep, float(keep.mean())


# ---- GridMix ------------------------------------------------------------------------------------
def _grid_marks(length, start, extent, patch, hole):
    """The positions along one axis (``length`` pixels) that GridMix's holes cover: for each
    patch ``k`` the slice ``[start + a, start + b)`` with ``a = min(k · patch, extent)``, ``b =
    min(a + hole, extent)``, as numpy slices it. A crop larger than the image has ``start <
    0``: a slice that begins before the image then counts from its far end (a negative index)
    and one that straddles its first pixel is empty, exactly as OpenMixup's (and GridMixup's)
    ``mask[yc1 + y1: yc1 + y2, xc1 + x1: xc1 + x2] = 1``; slices past the far end are cut."""
    marks = np.zeros(length, dtype=bool)
    for k in range(math.ceil(extent / patch) + 1):
        a = min(k * patch, extent)
        marks[start + a:start + min(a + hole, extent)] = True
    return marks


def gridmix_mask(height, width, lam, rng, n_holes=(2, 6), hole_aspect_ratio=(1.0, 1.0),
                 cut_area_ratio=(0.5, 1.0), cut_aspect_ratio=(0.5, 2.0)):
    """``(m, λ)``: GridMix's grid of holes (1 = the partner shows through), as OpenMixup's
    ``gridmix`` draws and places it.

    A crop of area ``int(cut_area_ratio · HW)`` and aspect ``cut_aspect_ratio`` (``cut_w =
    int(sqrt(area / aspect))``, ``cut_h = int(cut_w · aspect)``) at ``x0 = int((W - cut_w) ·
    U)``, ``y0 = int((H - cut_h) · U)`` is divided into ``n_holes`` patches across (``patch =
    ceil(cut_w / n)``, the height ``patch · hole_aspect_ratio``); each patch has a hole in its
    top-left corner whose sides are ``sqrt(1 - λ)`` of the patch's (at least 1 pixel, at most
    the patch side - 1). Each range is drawn uniformly per batch (``n_holes`` as an integer);
    the defaults are OpenMixup's ``MixUpClassification`` ones.

    With these defaults the crop is often larger than the image (an aspect up to 2 at an area
    up to 1: at 32 px about 32% of draws taller, 13% wider). It is not clamped: it keeps its
    drawn size and a negative offset, and the holes are placed with numpy's slice semantics,
    so the mask equals OpenMixup's bit for bit on the same draws (``bench/fidelity.py``,
    square images; OpenMixup takes the column offset's range from the image height and the row
    offset's from its width, which only matters for non-square images, where fastmix uses each
    axis's own).
    A slice that starts before the image wraps to its far edge (see ``_grid_marks``): an
    artefact of that code kept on purpose, since the comparison tables were made with it
    (``docs/methods.md`` measures it against the clamped crop fastmix used before).
    The one guard OpenMixup lacks: the patch height is at least 2, so a hole of at least one
    pixel fits (``int(patch · hole_aspect_ratio) >= 2`` under the defaults anyway)."""
    check_host_lam(lam)
    n = int(rng.integers(n_holes[0], n_holes[1] + 1))
    har = float(rng.uniform(*hole_aspect_ratio))
    car = float(rng.uniform(*cut_area_ratio))
    cas = float(rng.uniform(*cut_aspect_ratio))
    cut_w = int(math.sqrt(int(height * width * car) / cas))
    cut_h = int(cut_w * cas)
    if not 1 <= n <= cut_w // 2:
        raise ValueError(f"GridMix: {n} holes across a {cut_w}-pixel crop; the image is too "
                         f"small for n_holes {n_holes} (at most {cut_w // 2})")
    x0 = int((width - cut_w) * rng.random())
    y0 = int((height - cut_h) * rng.random())
    pw = math.ceil(cut_w / n)
    ph = max(int(pw * har), 2)
    ratio = math.sqrt(1.0 - lam)
    hw = min(max(int(pw * ratio), 1), pw - 1)
    hh = min(max(int(ph * ratio), 1), ph - 1)
    in_r = _grid_marks(height, y0, cut_h, ph, hh)
    in_c = _grid_marks(width, x0, cut_w, pw, hw)
    m = (in_r[:, None] & in_c[None, :]).astype(np.float64)
    return m, 1.0 - float(m.mean())


# ---- SmoothMix ----------------------------------------------------------------------------------
def smoothmix_mask(height, width, rng):
    """``(m, λ)``: SmoothMix's Gaussian blob ``exp(-d² / 2σ²)`` around a uniform pixel centre
    (``- 0.5``, as OpenMixup's rolled kernel), ``σ = (U(0, 1) / 4 + 0.25) · H``. It ignores λ."""
    cy = int(rng.integers(0, height)) - 0.5
    cx = int(rng.integers(0, width)) - 0.5
    sigma = (rng.random() / 4 + 0.25) * height
    yy, xx = np.mgrid[0:height, 0:width]
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    return m, 1.0 - float(m.mean())


# ---- SaliencyMix --------------------------------------------------------------------------------
def spectral_residual_saliency(img, size=64, blur_sigma=2.5, pad=None):
    """Hou & Zhang's spectral-residual saliency of one image ``[C, H, W]`` (any device, torch
    ops only: nothing is read back): grey, resized to ``size`` x ``size``, log-amplitude minus
    its 3x3 mean, back through the inverse FFT with the original phase, squared magnitude,
    Gaussian blur; resized back to ``[H, W]`` (OpenCV's ``StaticSaliencySpectralResidual``
    recipe).

    ``pad`` (default ``size // 8``) pixels of reflect padding go around the resized image
    before the FFT and are cropped off after the blur. The FFT treats the image as periodic:
    without the margin the jump between opposite edges (an object touching one edge, a
    brightness ramp) is an "edge" the residual lights up, and the peak often lands on the
    image border. With it the image continues smoothly across its border and that jump moves
    to the margin's outer edge, ``pad`` pixels away, which is cropped off. This makes border
    peaks rarer, it does not forbid them (a real edge may lie there): measured on
    Fashion-MNIST in ``docs/methods.md``. ``pad=0`` is the plain periodic recipe."""
    h, w = img.shape[-2:]
    pad = size // 8 if pad is None else int(pad)
    if not 0 <= pad < size:
        raise ValueError(f"pad must be in [0, {size}), got {pad}")
    g = img.float().mean(0, keepdim=True)[None]                       # [1, 1, H, W]
    g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
    if pad:
        g = F.pad(g, (pad,) * 4, mode="reflect")
    g = g[0, 0]
    spec = torch.fft.fft2(g)
    amp = spec.abs()
    # a floor relative to the peak: exact zeros of the spectrum (flat synthetic regions)
    # would otherwise dominate the residual with log(0)
    log_amp = torch.log(amp + 1e-6 * amp.amax())
    phase = torch.angle(spec)
    residual = log_amp - F.avg_pool2d(log_amp[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    sal = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
    radius = int(3 * blur_sigma)
    t = torch.arange(-radius, radius + 1, device=img.device, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * blur_sigma ** 2))
    k = k / k.sum()
    sal = F.conv2d(F.pad(sal[None, None], (radius,) * 4, mode="reflect"), k.view(1, 1, 1, -1))
    sal = F.conv2d(sal, k.view(1, 1, -1, 1))
    if pad:
        sal = sal[:, :, pad:pad + size, pad:pad + size]
    return F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def saliency_box(saliency, lam):
    """The CutMix box of side ratio ``sqrt(1 - λ)`` centred on the saliency peak, clipped at
    the border: a 4-int device tensor ``(y0, y1, x0, x1)`` and the 0-d tensor ``λ = 1 - box
    area / HW``, without reading the device. ``λ`` is a float or a 0-d tensor."""
    if isinstance(lam, torch.Tensor):    # a CUDA graph's static λ: the sides on the device
        ratio = torch.sqrt(1.0 - lam.to(torch.float64))
        h, w = saliency.shape
        cut_h, cut_w = (h * ratio).floor().long(), (w * ratio).floor().long()
    else:
        check_host_lam(lam)
        h, w = saliency.shape
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
    peak = torch.argmax(saliency.reshape(-1))
    y0, y1, x0, x1 = clip_box(peak // w, peak % w, cut_h, cut_w, h, w)
    box = torch.stack([y0, y1, x0, x1])
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)).to(torch.float32) / float(h * w)
    return box, lam_adj
