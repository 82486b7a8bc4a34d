"""Vanilla training (ERM), Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019).

Argument names follow timm/torchvision: ``alpha`` for Beta(α, α), ``label_smoothing``. The
partner of sample i is ``x[index[i]]`` for a random permutation drawn on the device; λ is the
weight of ``y`` and the share of ``x``'s own pixels (CutMix: from the clipped box).
"""
import numpy as np
import torch

from fastmix.functional import cutmix_box, cutmix_images, mixup_images
from fastmix.methods.base import Classifier, Mixer, _check_mode, _to_device


class Vanilla(Mixer):
    """No mixing: plain cross-entropy on the clean batch (ERM)."""
    name = "vanilla"
    default_alpha = 0.0
    draws_lam = False

    def draw(self, x):
        return {}

    def mix_with(self, x, y, draw, model=None):
        return x, y, None, 1.0


class _ModeMixer(Mixer):
    """Mixup and CutMix draw, in this order: the partners (a random permutation on x's
    device), then λ ~ Beta(α, α) from ``self.rng`` (α = 0: λ = 1, nothing drawn), then the
    method's box. ``mode`` (timm's and torchvision issue #8191's per-sample λ):

    * ``"batch"``: one λ; sample i's partner is ``index[i]``;
    * ``"elem"``: ``rng.beta(α, α, size=N)``: λ_i for sample i and its partner ``index[i]``;
    * ``"pair"``: timm's pairs taken in the permuted order: samples ``perm[k]`` and
      ``perm[N - 1 - k]`` are each other's partner and share λ (and CutMix's box), drawn
      ``size=N // 2``; with N odd the middle sample is its own partner, λ = 1.

    Per-sample λ and boxes are drawn on the host and reach the device in one copy; λ is then a
    float32 [N] tensor, which the per-sample (eager) forms of ``mixed_cross_entropy`` and
    ``mix_images`` take: the fused kernels read one λ per batch."""

    modes = ("batch", "pair", "elem")

    def __init__(self, alpha=None, label_smoothing=0.0, num_classes=None, seed=None, fused=None,
                 rng=None, mode="batch"):
        _check_mode(mode)
        super().__init__(alpha, label_smoothing, num_classes, seed=seed, fused=fused, rng=rng)
        self.mode = mode

    def _partners(self, n, device):
        """``(perm, index, draws)``: the permutation, sample i's partner and the number of
        per-sample draws of this mode."""
        perm = self.permutation(n, device)
        if self.mode != "pair":
            return perm, perm, n
        index = torch.empty_like(perm)
        index[perm] = perm.flip(0)
        return perm, index, n // 2

    def _per_sample(self, host, perm):
        """Per-draw rows ``host`` [D, F] to per-sample rows on the device in one copy: elem
        rows are samples; pair rows k are mirrored (k < N // 2, then a middle row of λ = 1 and
        an empty box for N odd, then reversed) and scattered to the samples ``perm``."""
        n = perm.shape[0]
        if self.mode == "pair":
            middle = np.zeros((n % 2, host.shape[1]), dtype=host.dtype)
            middle[:, 0] = 1.0
            host = np.concatenate((host, middle, host[::-1]))
        t = _to_device(host, perm.device)
        if self.mode != "pair":
            return t
        out = torch.empty_like(t)
        out[perm] = t
        return out

    def _lams(self, draws):
        if self.alpha == 0:
            return np.ones(draws)
        return self.rng.beta(self.alpha, self.alpha, draws)

    def extra_repr(self):
        return f"mode={self.mode}"


class Mixup(_ModeMixer):
    """``λ x + (1 - λ) x[index]``, λ ~ Beta(α, α) (default α = 1, spec §4.2); per sample with
    ``mode="pair"|"elem"``. torchvision's ``v2.MixUp`` on the same partners and λ
    (``tests/test_peers.py``). Batch mode can take the fused kernel; pair / elem are eager."""
    name = "mixup"
    default_alpha = 1.0

    def draw(self, x):
        n = x.shape[0]
        perm, index, draws = self._partners(n, x.device)
        if self.mode == "batch":
            return {"lam": self.sample_lam(), "index": index}
        lam = np.asarray(self._lams(draws), dtype=np.float32).reshape(-1, 1)
        return {"lam": self._per_sample(lam, perm)[:, 0].contiguous(), "index": index}

    def mix_with(self, x, y, draw, model=None):
        index, lam = draw["index"], draw["lam"]
        return mixup_images(x, index, lam, fused=self.fused), y, y[index], lam


class CutMix(_ModeMixer):
    """The partner's box pasted into the image: side ratio sqrt(1 - λ), centre uniform,
    clipped at the border; λ = 1 - box area / image area (default α = 0.2, spec §4.2). The box
    is ``fastmix.functional.cutmix_box``'s (the CutMix paper's and torchvision's ``v2.CutMix``'s:
    ``tests/test_peers.py``), drawn after λ; in pair / elem mode the boxes are drawn after all
    the λ, in draw order (pair mode: the two partners swap the same box)."""
    name = "cutmix"
    default_alpha = 0.2
    recipe = "cutting"

    def draw(self, x):
        n, (h, w) = x.shape[0], x.shape[-2:]
        perm, index, draws = self._partners(n, x.device)
        if self.mode == "batch":
            *box, lam = cutmix_box(h, w, self.sample_lam(), self.rng)
            return {"lam": lam, "index": index, "box": tuple(box)}
        host = np.zeros((draws, 5), dtype=np.float32)
        for k, lam in enumerate(self._lams(draws)):
            y0, y1, x0, x1, lam_adj = cutmix_box(h, w, float(lam), self.rng)
            host[k] = (lam_adj, y0, y1, x0, x1)
        t = self._per_sample(host, perm)
        return {"lam": t[:, 0].contiguous(), "index": index, "box": t[:, 1:].long()}

    def mix_with(self, x, y, draw, model=None):
        index = draw["index"]
        return cutmix_images(x, index, draw["box"]), y, y[index], draw["lam"]


__all__ = ["Vanilla", "Mixup", "CutMix", "Classifier"]
