"""The baselines on the same loss and trainer: vanilla (ERM), input Mixup and CutMix.

Argument names follow timm/torchvision: ``alpha`` for Beta(α, α), ``label_smoothing``.
CutMix's λ is corrected to the pasted box's area, so the label weights match the pixels.
"""
import torch

from fastmix.backbones import ClsHead
from fastmix.method import MixMethod
from fastmix.functional import (cutmix_box, cutmix_images, mixed_cross_entropy, mixup_images,
                                use_fused)

BASELINES = ("vanilla", "mixup", "cutmix")


class MixupClassifier(MixMethod):
    """One backbone and one linear head trained with ``method`` in {vanilla, mixup, cutmix}."""

    def __init__(self, backbone, num_classes, method="mixup", alpha=1.0, label_smoothing=0.0,
                 seed=None, fused=None):
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        super().__init__(num_classes, alpha=alpha, label_smoothing=label_smoothing, seed=seed,
                         fused=fused)
        self.method = method
        self.backbone = backbone
        self.head = ClsHead(backbone.out_channels[1], num_classes)

    def logits(self, x):
        return self.head(self.backbone(x)[-1])

    def draw(self, x):
        """λ and the permutation (and CutMix's box, as host ints) of one step; nothing for vanilla."""
        if self.method == "vanilla" or self.alpha == 0:
            return {}
        lam = self.sample_lam()
        index = self.permutation(x.shape[0], x.device)
        if self.method == "mixup":
            return {"lam": lam, "index": index}
        *box, lam_adjusted = cutmix_box(x.shape[-2], x.shape[-1], lam, self.rng)
        return {"lam": lam_adjusted, "index": index, "box": tuple(box)}

    def mix_with(self, x, y, draw):
        """``(mixed images, y_a, y_b, λ)`` for this batch and ``draw``."""
        if not draw:
            return x, y, None, 1.0
        index = draw["index"]
        if self.method == "mixup":
            x_mix = mixup_images(x, index, draw["lam"], fused=self.fused)
        else:
            x_mix = cutmix_images(x, index, draw["box"])
        return x_mix, y, y[index], draw["lam"]

    def mix(self, x, y):
        """``(mixed images, y_a, y_b, λ)`` for this batch, with a fresh draw."""
        return self.mix_with(x, y, self.draw(x))

    def losses(self, x, y, draw):
        x_mix, y_a, y_b, lam = self.mix_with(x, y, draw)
        loss = mixed_cross_entropy(self.logits(x_mix), y_a, y_b, lam, self.label_smoothing,
                                   fused=self.fused)
        return loss, {"loss_cls": loss.detach()}

    @torch.no_grad()
    def predict(self, x):
        return {"cls": self.logits(x)}

    def inference_model(self):
        return self.backbone, self.head

    def extra_repr(self):
        return f"method={self.method}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"


__all__ = ["MixupClassifier", "BASELINES", "use_fused"]
