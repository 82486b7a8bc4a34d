"""Model-free batch mixers: timm's ``Mixup`` reproduced draw for draw, and the plain Mixup and
CutMix as callables in the style of torchvision's ``v2.MixUp`` / ``v2.CutMix``.

Every mixer gives, for an image batch ``x`` [N, C, H, W] and int64 labels ``y`` [N]:

* ``mixer(x, y) -> (x_mixed, soft_targets)``, the [N, K] float targets of timm's
  ``mixup_target`` (``soft_targets`` below), to train with a soft-target cross-entropy;
* ``mixer.mix(x, y) -> (x_mixed, y_a, y_b, lam)``, the same information without the [N, K]
  targets: ``mixed_cross_entropy(logits, y_a, y_b, lam, label_smoothing)`` is the loss of those
  soft targets, and it runs the fused kernel when ``lam`` is one number. ``lam`` is a Python
  float in mode ``"batch"`` and a float32 [N] tensor on x's device in modes ``"pair"`` and
  ``"elem"`` (the per-sample forms of ``mixed_cross_entropy`` and ``mix_images``: eager).

The split is the library's usual one (``fastmix.functional``): λ, boxes and flags are drawn on
the host with numpy, never by reading device memory; the pixels are mixed on the device by
``mixup_images`` / ``cutmix_images``. Per-sample λ and boxes (modes pair / elem) are packed in
one float32 host array and reach the device in one copy (pinned, non-blocking, on CUDA); the
partner indices and per-sample masks are built there. ``x`` is never modified in place (timm
mixes in place); when nothing is mixed, ``x`` itself is returned.

``Mixup`` is timm's ``timm.data.mixup.Mixup`` (timm 1.0): the same numpy draws in the same
order from the same generator (numpy's global legacy one by default, as timm), its partner
``x.flip(0)``, its CutMix box (``rand_bbox``: upper edges at ``centre + (cut + 1) // 2``, which
is not ``fastmix.functional.cutmix_box``'s ``cut // 2``), ``rand_bbox_minmax`` and the λ
correction, so its images and targets equal timm's on the same seed
(``tests/test_peers.py``). ``MixUp`` and ``CutMix`` are fastmix's own draws, the order its
trainer uses: a random permutation for the partners first, then λ ~ Beta(α, α) from a numpy
``Generator``, then (CutMix) the box of ``cutmix_box``.
"""
import numbers
from typing import Optional

import numpy as np
import torch

from fastmix.functional import cutmix_images, mixup_images
from fastmix.methods import MIXERS
from fastmix.methods.base import (MODES, _check_batch, _check_mode, _check_smoothing,  # noqa: F401
                                  _to_device, soft_targets)
from fastmix.methods.cutting import FMix, GridMix, ResizeMix, SaliencyMix, SmoothMix
from fastmix.methods.mixup import CutMix, Mixup as MixUp, Vanilla

# fastmix.mixers.<method>: each model-free method's mixer class, by its --method name.
vanilla, mixup, cutmix = Vanilla, MixUp, CutMix
saliencymix, fmix, resizemix, gridmix, smoothmix = SaliencyMix, FMix, ResizeMix, GridMix, SmoothMix
assert set(MIXERS) == {"vanilla", "mixup", "cutmix", "saliencymix", "fmix", "resizemix",
                       "gridmix", "smoothmix"}

__all__ = ["Mixup", "MixUp", "CutMix", "soft_targets", "MIXERS"] + sorted(MIXERS)

def _combine(x, index, lam_blend, boxes, cut, any_mix, any_cut):
    """The per-sample mix: Mixup with ``lam_blend`` [N] (1 for samples that are cut or left
    alone), CutMix with ``boxes`` [N, 4] (empty for samples that are not cut), a per-sample
    select between the two where both occur (``cut`` [N] bool). Device tensors throughout;
    ``any_*`` are host flags, known from the draws."""
    if any_mix and any_cut:
        return torch.where(cut.view(-1, 1, 1, 1), cutmix_images(x, index, boxes),
                           mixup_images(x, index, lam_blend))
    if any_cut:
        return cutmix_images(x, index, boxes)
    if any_mix:
        return mixup_images(x, index, lam_blend)
    return x


# ---- timm's Mixup ---------------------------------------------------------------------------
class _Draws:
    """timm's numpy calls on either numpy API: the legacy global ``np.random`` (timm's own,
    the default) or a ``RandomState`` (``rand`` / ``randint``), or a ``Generator``
    (``random`` / ``integers``). The same calls in the same order: a ``RandomState(s)`` draws
    what ``np.random.seed(s)`` then timm draws."""

    def __init__(self, rng):
        self.rng = np.random if rng is None else rng
        self.new_api = isinstance(self.rng, np.random.Generator)
        if not (self.new_api or hasattr(self.rng, "randint")):
            raise TypeError(f"rng must be None (numpy's global generator), a "
                            f"numpy.random.RandomState or a numpy.random.Generator, "
                            f"got {type(rng).__name__}")

    def rand(self, size=None):
        if self.new_api:
            return self.rng.random(size)
        return self.rng.rand() if size is None else self.rng.rand(size)

    def randint(self, low, high, size=None):
        if self.new_api:
            return self.rng.integers(low, high, size=size)
        return self.rng.randint(low, high, size=size)

    def beta(self, a, b, size=None):
        return self.rng.beta(a, b, size=size)


def _rand_bbox(draws, img_h, img_w, lam):
    """timm's ``rand_bbox`` (margin 0): side ratio sqrt(1 - λ), centre uniform (y, then x),
    lower edges ``centre - cut // 2``, upper edges ``centre + (cut + 1) // 2``, clipped. The
    numpy arithmetic is timm's (λ a float32 in the per-element modes: the cut is computed in
    float32 there, as in timm)."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    cy = draws.randint(0, img_h)
    cx = draws.randint(0, img_w)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + (cut_h + 1) // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + (cut_w + 1) // 2, 0, img_w)
    return yl, yh, xl, xh


def _rand_bbox_minmax(draws, img_h, img_w, minmax):
    """timm's ``rand_bbox_minmax``: box sides uniform in [min, max) of the image's, then the
    corner uniform over the positions that keep the box inside."""
    cut_h = draws.randint(int(img_h * minmax[0]), int(img_h * minmax[1]))
    cut_w = draws.randint(int(img_w * minmax[0]), int(img_w * minmax[1]))
    yl = draws.randint(0, img_h - cut_h + 1)
    xl = draws.randint(0, img_w - cut_w + 1)
    return yl, yl + cut_h, xl, xl + cut_w


def _cutmix_bbox_and_lam(draws, img_h, img_w, lam, ratio_minmax, correct_lam):
    """timm's ``cutmix_bbox_and_lam``: the box, and λ = 1 - box area / image area when
    ``correct_lam`` or a minmax box (else the drawn λ). The box as Python ints."""
    if ratio_minmax is not None:
        yl, yu, xl, xu = _rand_bbox_minmax(draws, img_h, img_w, ratio_minmax)
    else:
        yl, yu, xl, xu = _rand_bbox(draws, img_h, img_w, lam)
    if correct_lam or ratio_minmax is not None:
        bbox_area = (yu - yl) * (xu - xl)
        lam = 1. - bbox_area / float(img_h * img_w)
    return (int(yl), int(yu), int(xl), int(xu)), lam


class Mixup:
    """timm's ``Mixup`` / CutMix, the same draws and results, the pixels mixed on the device.

    ``mixer(x, y)`` -> ``(x_mixed, soft targets [N, num_classes])``; ``mixer.mix(x, y)`` ->
    ``(x_mixed, y_a, y_b, lam)`` for ``mixed_cross_entropy``.

    Args:
        mixup_alpha: Beta(α, α) of Mixup, active when > 0 (timm's).
        cutmix_alpha: Beta(α, α) of CutMix, active when > 0 (timm's).
        cutmix_minmax: CutMix box sides as a (min, max) fraction of the image's (forces
            ``cutmix_alpha = 1``).
        prob: the chance of mixing a batch (or an element / pair).
        switch_prob: the chance of CutMix rather than Mixup when both are active.
        mode: ``"batch"`` (one λ and box), ``"pair"`` (samples i and N - 1 - i mixed with each
            other, one λ / box per pair: the first half's draws, mirrored) or ``"elem"`` (one
            draw per sample).
        correct_lam: λ from the clipped box's area.
        label_smoothing: the soft targets' label smoothing.
        num_classes: the soft targets' classes.
        rng: fastmix's: numpy's global legacy generator by default (as timm: seed it with
            ``np.random.seed``), or a ``RandomState`` / ``Generator`` of one's own.
        fused: fastmix's, for the batch-mode Mixup (``mixup_images``; the default fuses on
            CUDA, where the kernel forms ``1 - lam`` in float32, within an ulp of timm's, which
            forms it in float64 before the multiply; ``fused=False`` is timm's arithmetic
            exactly).

    ``mixup_enabled`` (an attribute, as timm's) turns mixing off. Not timm's ``multi_label``
    (dense multi-label targets).

    The partner of sample i is N - 1 - i (timm's ``x.flip(0)``), so the batch size must be
    even, as timm asserts. ``y_b`` is ``y.flip(0)``.
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                 cutmix_minmax: Optional[tuple] = None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", correct_lam: bool = True,
                 label_smoothing: float = 0.1, num_classes: int = 1000, rng=None,
                 fused: Optional[bool] = None) -> None:
        _check_mode(mode)
        _check_smoothing(label_smoothing)
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be non-negative, got "
                             f"{mixup_alpha} and {cutmix_alpha}")
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {cutmix_minmax!r}")
            cutmix_alpha = 1.0   # timm: "force cutmix alpha == 1.0 when minmax active"
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mode = mode
        self.correct_lam = correct_lam
        self.mixup_enabled = True
        self.draws = _Draws(rng)
        self.fused = fused

    def _nothing_to_mix(self):
        return ValueError("one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax must be "
                          "set (or set mixup_enabled = False)")

    def _params_per_elem(self, batch_size):
        """timm's draws for ``batch_size`` elements: (λ float32 [B], use_cutmix bool [B])."""
        d = self.draws
        lam = np.ones(batch_size, dtype=np.float32)
        use_cutmix = np.zeros(batch_size, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = d.rand(batch_size) < self.switch_prob
                lam_mix = np.where(
                    use_cutmix,
                    d.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size),
                    d.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size))
            elif self.mixup_alpha > 0.:
                lam_mix = d.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size)
            elif self.cutmix_alpha > 0.:
                use_cutmix = np.ones(batch_size, dtype=bool)
                lam_mix = d.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size)
            else:
                raise self._nothing_to_mix()
            lam = np.where(d.rand(batch_size) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self):
        """timm's draws for the batch: (λ float, use_cutmix bool)."""
        d = self.draws
        lam = 1.
        use_cutmix = False
        if self.mixup_enabled and d.rand() < self.mix_prob:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = d.rand() < self.switch_prob
                lam_mix = d.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix else \
                    d.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.mixup_alpha > 0.:
                lam_mix = d.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.cutmix_alpha > 0.:
                use_cutmix = True
                lam_mix = d.beta(self.cutmix_alpha, self.cutmix_alpha)
            else:
                raise self._nothing_to_mix()
            lam = float(lam_mix)
        return lam, bool(use_cutmix)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """``(x_mixed, y_a, y_b, lam)`` with timm's draws: ``y_a = y``, ``y_b = y.flip(0)``,
        ``lam`` a float (batch) or a float32 [N] tensor on x's device (pair, elem)."""
        _check_batch(x, y, even=True)
        n, (h, w) = x.shape[0], x.shape[-2:]
        index = torch.arange(n - 1, -1, -1, device=x.device)      # timm's partner: x.flip(0)
        y_b = y.flip(0)
        if self.mode == "batch":
            lam, use_cutmix = self._params_per_batch()
            if lam == 1.:
                return x, y, y_b, 1.
            if use_cutmix:
                box, lam = _cutmix_bbox_and_lam(self.draws, h, w, lam, self.cutmix_minmax,
                                                self.correct_lam)
                return cutmix_images(x, index, box), y, y_b, float(lam)
            return mixup_images(x, index, lam, fused=self.fused), y, y_b, lam
        pair = self.mode == "pair"
        m = n // 2 if pair else n
        lam_batch, use_cutmix = self._params_per_elem(m)
        # timm's element loop, host numbers only: a box for each mixed CutMix element, drawn
        # in element order, its corrected λ stored (as float32) in place of the drawn one.
        mixed = lam_batch != 1.
        cut = mixed & use_cutmix
        boxes = np.zeros((m, 4), dtype=np.int64)
        for i in np.flatnonzero(cut):
            boxes[i], lam_batch[i] = _cutmix_bbox_and_lam(
                self.draws, h, w, lam_batch[i], self.cutmix_minmax, self.correct_lam)
        if pair:   # sample N - 1 - i takes pair i's λ and box
            lam_batch, boxes, cut, mixed = (np.concatenate((a, a[::-1]))
                                            for a in (lam_batch, boxes, cut, mixed))
        lam_blend = np.where(cut, np.float32(1.), lam_batch)
        host = np.concatenate([lam_batch[:, None], lam_blend[:, None], cut[:, None], boxes],
                              axis=1)
        t = _to_device(host, x.device)
        lam_t = t[:, 0].contiguous()
        x_mix = _combine(x, index, t[:, 1].contiguous(), t[:, 3:].long(), t[:, 2] > 0,
                         bool((mixed & ~cut).any()), bool(cut.any()))
        return x_mix, y, y_b, lam_t

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple:
        """``(x_mixed, soft targets [N, num_classes])``, timm's ``Mixup.__call__`` without
        touching ``x``."""
        x_mix, y_a, y_b, lam = self.mix(x, target)
        return x_mix, soft_targets(y_a, y_b, lam, self.num_classes, self.label_smoothing)


# ---- plain Mixup and CutMix -----------------------------------------------------------------
