"""The cutting and masking family of the paper's comparison tables (spec §4-§5): SaliencyMix,
FMix, ResizeMix, GridMix and SmoothMix. Their boxes and masks are drawn by ``fastmix.mixes``
(host numbers from the numpy generator, no device read); SaliencyMix's box follows the
partner's pixels and so is made on the device. λ is the share of ``x``'s own pixels in the
box or mask actually used (docs/methods.md lists every difference from OpenMixup's code)."""
import torch

from fastmix import mixes
from fastmix.functional import cutmix_images
from fastmix.methods.base import Mixer


class _MaskMixer(Mixer):
    """Mixes with a per-batch pixel mask ``m`` (the partner's weight): ``lerp(x, x[index], m)``."""
    recipe = "cutting"

    def mix_with(self, x, y, draw, model=None):
        index = draw["index"]
        mask = draw["mask"].to(x.device, non_blocking=True).to(x.dtype)
        return torch.lerp(x, x[index], mask), y, y[index], draw["lam"]


class SaliencyMix(Mixer):
    """CutMix's box centred on the saliency peak of the batch's first partner image (as
    SaliencyMix's and OpenMixup's code: one box per batch), made on the device."""
    name = "saliencymix"
    default_alpha = 0.2
    recipe = "cutting"

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        return {"lam": self.sample_lam(), "index": index}

    def mix_with(self, x, y, draw, model=None):
        index = draw["index"]
        # index_select keeps the index on the device (no read-back)
        source = x.index_select(0, index[:1])[0]
        box, lam = mixes.saliency_box(mixes.spectral_residual_saliency(source), draw["lam"])
        return cutmix_images(x, index, box), y, y[index], lam


class FMix(_MaskMixer):
    """FMix's binarised low-frequency Fourier mask (Harris et al. 2020)."""
    name = "fmix"
    default_alpha = 0.2

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        mask, lam = mixes.fmix_mask(x.shape[-2], x.shape[-1], self.sample_lam(), self.rng)
        return {"lam": lam, "index": index, "mask": self.host_mask(mask, x)}


class GridMix(_MaskMixer):
    """GridMix's regular grid of holes (Baek et al. 2021)."""
    name = "gridmix"
    default_alpha = 0.2

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        mask, lam = mixes.gridmix_mask(x.shape[-2], x.shape[-1], self.sample_lam(), self.rng)
        return {"lam": lam, "index": index, "mask": self.host_mask(mask, x)}


class SmoothMix(_MaskMixer):
    """SmoothMix's Gaussian blob (Lee et al. 2020); it draws no λ (α is unused)."""
    name = "smoothmix"
    default_alpha = 1.0
    draws_lam = False
    recipe = "baseline"         # not among spec §4.2's "cutting-based methods" (wd 5e-4)

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        mask, lam = mixes.smoothmix_mask(x.shape[-2], x.shape[-1], self.rng)
        return {"lam": lam, "index": index, "mask": self.host_mask(mask, x)}


class ResizeMix(Mixer):
    """The whole partner resized (nearest) into a box of side τ times the image's
    (Qin et al. 2020), τ ~ Beta(α, α) redrawn uniformly in (0.1, 0.8) when outside it."""
    name = "resizemix"
    default_alpha = 1.0
    recipe = "cutting"

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        tau = mixes.resizemix_tau(self.rng, self.alpha)
        *box, lam = mixes.resizemix_box(x.shape[-2], x.shape[-1], tau, self.rng)
        return {"lam": lam, "index": index, "box": tuple(box)}

    def mix_with(self, x, y, draw, model=None):
        index = draw["index"]
        return mixes.resizemix_images(x, index, draw["box"]), y, y[index], draw["lam"]


__all__ = ["SaliencyMix", "FMix", "GridMix", "SmoothMix", "ResizeMix"]
