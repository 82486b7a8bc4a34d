"""The other sample-mixing methods of the paper's comparison tables (spec §4-§5).

Each method is a draw (host numbers from a ``numpy.random.Generator``: no device memory is
read) and a mix (device work only). Conventions, shared with Mixup/CutMix: the batch ``x`` is
mixed with its shuffled partner ``x[index]``; ``m`` is the *partner's* weight per pixel and
``λ = 1 - mean(m)`` is the weight of ``y`` (``1 - λ`` goes to ``y[index]``), computed from the
actual mask or box, so the labels carry what the pixels carry.

* :func:`resizemix_box` / :func:`resizemix_images` -- ResizeMix (Qin et al. 2020): the whole
  partner resized (nearest) into a box of side ``τ`` times the image's, ``τ`` in (0.1, 0.8).
* :func:`fmix_mask` -- FMix (Harris et al. 2020): a low-frequency Fourier noise image (power
  ``1/f^decay``) binarised at its top ``round(λ HW)`` pixels.
* :func:`gridmix_mask` -- GridMix (Baek et al. 2021): a regular grid of square holes.
* :func:`smoothmix_mask` -- SmoothMix (Lee et al. 2020): a Gaussian blob.
* :func:`spectral_residual_saliency` / :func:`saliency_box` -- SaliencyMix (Uddin et al. 2021):
  the CutMix box centred on the saliency peak of the partner image, computed on the device.

Masks and boxes are host values (numpy arrays, ints) except SaliencyMix's, which depends on
the pixels and so stays on the device (a 4-int tensor: no read-back).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastmix.checks import check_host_lam


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
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
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
    """A ``[H, W]`` float64 image whose spectrum has random Gaussian coefficients scaled by
    ``1 / max(f, 1 / max(H, W)) ** decay_power`` (FMix's ``make_low_freq_image``), in [0, 1]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[: width // 2 + 1 + (width % 2)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power
    param = rng.standard_normal((*freqs.shape, 2))
    spectrum = scale * param[..., 0] + 1j * scale * param[..., 1]
    img = np.real(np.fft.irfftn(spectrum, (height, width)))
    img = img - img.min()
    return img / img.max()


def binarise_top(img, lam, rng):
    """1 at the ``num`` largest pixels of ``img`` (``num`` = ceil or floor of ``λ HW`` with
    probability 1/2 each, as FMix), 0 elsewhere."""
    flat = img.reshape(-1)
    num = math.ceil(lam * flat.size) if rng.random() > 0.5 else math.floor(lam * flat.size)
    mask = np.zeros(flat.size)
    mask[np.argsort(-flat, kind="stable")[:num]] = 1.0
    return mask.reshape(img.shape)


def fmix_mask(height, width, lam, rng, decay_power=3.0):
    """``(m, λ)``: FMix's binary mask as the partner's weight and ``λ`` = the exact kept area.

    FMix keeps ``x`` where its binarised noise is 1 (``num`` ≈ ``λ HW`` pixels), so the
    partner's weight is ``1 -`` that mask. FMix labels with the sampled λ; the kept area
    ``num / HW`` differs from it by less than ``1 / HW`` and is what fastmix uses."""
    check_host_lam(lam)
    keep = binarise_top(fourier_low_freq_image(height, width, decay_power, rng), lam, rng)
    return 1.0 - keep, float(keep.mean())


# ---- GridMix ------------------------------------------------------------------------------------
def gridmix_mask(height, width, lam, rng, n_holes=(2, 6), hole_aspect_ratio=(1.0, 1.0),
                 cut_area_ratio=(0.5, 1.0), cut_aspect_ratio=(0.5, 2.0)):
    """``(m, λ)``: GridMix's grid of holes (1 = the partner shows through).

    A crop of area ``cut_area_ratio · HW`` and aspect ``cut_aspect_ratio`` at a uniform
    position is divided into ``n_holes`` patches across (``patch = ceil(crop width / n)``, the
    height ``patch · hole_aspect_ratio``); each patch has a hole in its top-left corner whose
    sides are ``sqrt(1 - λ)`` of the patch's (at least 1 pixel, at most the patch side - 1).
    Each range is drawn uniformly per batch (``n_holes`` as an integer); the defaults are
    OpenMixup's ``MixUpClassification`` ones. The crop is clamped to the image (OpenMixup would
    index outside it when ``cut_aspect_ratio`` makes it taller than the image)."""
    check_host_lam(lam)
    n = int(rng.integers(n_holes[0], n_holes[1] + 1))
    har = float(rng.uniform(*hole_aspect_ratio))
    car = float(rng.uniform(*cut_area_ratio))
    cas = float(rng.uniform(*cut_aspect_ratio))
    cut_w = min(int(math.sqrt(int(height * width * car) / cas)), width)
    cut_h = min(int(cut_w * cas), height)
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
    cols = np.arange(width) - x0
    rows = np.arange(height) - y0
    in_c = (cols >= 0) & (cols < cut_w) & (np.mod(cols, pw) < hw)
    in_r = (rows >= 0) & (rows < cut_h) & (np.mod(rows, ph) < hh)
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
def spectral_residual_saliency(img, size=64, blur_sigma=2.5):
    """Hou & Zhang's spectral-residual saliency of one image ``[C, H, W]`` (any device):
    grey, resized to ``size`` x ``size``, log-amplitude minus its 3x3 mean, back through the
    inverse FFT with the original phase, squared magnitude, Gaussian blur; resized back to
    ``[H, W]`` (OpenCV's ``StaticSaliencySpectralResidual`` recipe)."""
    h, w = img.shape[-2:]
    g = img.float().mean(0, keepdim=True)[None]                       # [1, 1, H, W]
    g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
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
    cy, cx = peak // w, peak % w
    y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    box = torch.stack([y0, y1, x0, x1])
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)).to(torch.float32) / float(h * w)
    return box, lam_adj
