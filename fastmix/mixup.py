"""The comparison methods on the same loss and trainer: vanilla (ERM), Mixup, CutMix, and the
other sample-mixing methods of the paper's tables (ManifoldMix, SaliencyMix, FMix, ResizeMix,
GridMix, SmoothMix: ``fastmix.mixes``; PuzzleMix: ``fastmix.puzzlemix``).

Argument names follow timm/torchvision: ``alpha`` for Beta(α, α), ``label_smoothing``. Every
method labels with ``λ = 1 - the partner's share of the pixels`` of the mask or box it actually
used, so the label weights match the pixels.
"""
import numpy as np
import torch
import torch.nn.functional as F

from fastmix import mixes
from fastmix.backbones import ClsHead
from fastmix.method import MixMethod
from fastmix.functional import (cutmix_box, cutmix_images, mixed_cross_entropy, mixup_images,
                                use_fused)

BASELINES = ("vanilla", "mixup", "cutmix", "manifoldmix", "saliencymix", "fmix", "resizemix",
             "gridmix", "smoothmix", "puzzlemix")
# Methods whose step depends on host decisions a CUDA graph cannot replay: ManifoldMix's stage,
# PuzzleMix's grid size and its graph cut on the host (a read-back of the unary terms).
NOT_CAPTURABLE = ("manifoldmix", "puzzlemix")
# Methods whose partner weight is a per-batch pixel mask drawn on the host.
MASK_METHODS = ("fmix", "gridmix", "smoothmix")
# ManifoldMix: Mixup of the hidden features after a random stage in [0, 3) (0 = the input).
MANIFOLD_LAYERS = (0, 3)


class MixupClassifier(MixMethod):
    """One backbone and one linear head trained with ``method`` (see ``BASELINES``).

    ``graph_capturable``: False for ManifoldMix (its stage is a host draw that changes the
    step's work) and PuzzleMix (its grid size too, and its graph cut reads the device)."""

    def __init__(self, backbone, num_classes, method="mixup", alpha=1.0, label_smoothing=0.0,
                 seed=None, fused=None):
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        super().__init__(num_classes, alpha=alpha, label_smoothing=label_smoothing, seed=seed,
                         fused=fused)
        if method not in ("vanilla", "smoothmix") and alpha <= 0:
            raise ValueError(f"{method} draws λ ~ Beta(α, α): alpha must be positive, got {alpha}")
        if method == "manifoldmix" and "mix_at" not in backbone.forward.__code__.co_varnames:
            raise ValueError("ManifoldMix mixes hidden features, so the backbone's forward must "
                             "take mix_at/mix_fn (fastmix's ResNets and WideResNets do); a timm "
                             "or FeatureTap backbone would need a hook after each stage")
        self.method = method
        self.backbone = backbone
        self.head = ClsHead(backbone.out_channels[1], num_classes)
        self.graph_capturable = method not in NOT_CAPTURABLE
        if method == "puzzlemix":
            from fastmix import puzzlemix
            puzzlemix._gco()             # a clear ImportError now, not at the first step

    def logits(self, x, mix_at=None, mix_fn=None):
        if mix_at is None:
            return self.head(self.backbone(x)[-1])
        return self.head(self.backbone(x, mix_at=mix_at, mix_fn=mix_fn)[-1])

    def draw(self, x):
        """The host draws of one step: λ, the permutation (on ``x``'s device) and the method's
        box, mask (a CPU tensor, pinned on CUDA) or stage; nothing for vanilla."""
        m = self.method
        if m == "vanilla":
            return {}
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        index = self.permutation(n, x.device)
        if m == "resizemix":
            tau = mixes.resizemix_tau(self.rng, self.alpha)
            *box, lam = mixes.resizemix_box(h, w, tau, self.rng)
            return {"lam": lam, "index": index, "box": tuple(box)}
        if m == "smoothmix":
            mask, lam = mixes.smoothmix_mask(h, w, self.rng)
            return {"lam": lam, "index": index, "mask": self._host_mask(mask, x)}
        lam = self.sample_lam()
        if m == "mixup":
            return {"lam": lam, "index": index}
        if m == "manifoldmix":
            return {"lam": lam, "index": index,
                    "layer": int(self.rng.integers(*MANIFOLD_LAYERS))}
        if m == "cutmix":
            *box, lam = cutmix_box(h, w, lam, self.rng)
            return {"lam": lam, "index": index, "box": tuple(box)}
        if m == "saliencymix":   # the box follows the partner's pixels: made on the device
            return {"lam": lam, "index": index}
        if m == "puzzlemix":     # λ is the graph cut's prior; the grid size 2^k
            from fastmix.puzzlemix import DEFAULTS, block_choices
            if h != w:
                raise ValueError(f"PuzzleMix needs square images, got {h} x {w}")
            return {"lam": lam, "index": index,
                    "block_num": int(self.rng.choice(block_choices(w, DEFAULTS["block_num"])))}
        mask, lam = (mixes.fmix_mask if m == "fmix" else mixes.gridmix_mask)(h, w, lam, self.rng)
        return {"lam": lam, "index": index, "mask": self._host_mask(mask, x)}

    @staticmethod
    def _host_mask(mask, x):
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return t.pin_memory() if x.is_cuda else t

    def mix_with(self, x, y, draw):
        """``(mixed images, y_a, y_b, λ)`` for this batch and ``draw`` (ManifoldMix: the
        images unmixed, its mixing happens inside the backbone)."""
        if not draw:
            return x, y, None, 1.0
        index, lam, m = draw["index"], draw["lam"], self.method
        if m in ("mixup", "manifoldmix"):
            x_mix = x if m == "manifoldmix" else mixup_images(x, index, lam, fused=self.fused)
        elif m == "cutmix":
            x_mix = cutmix_images(x, index, draw["box"])
        elif m == "resizemix":
            x_mix = mixes.resizemix_images(x, index, draw["box"])
        elif m == "saliencymix":
            # One box for the batch, centred on the saliency peak of the first partner image
            # (SaliencyMix's and OpenMixup's choice); index_select keeps the index on the device.
            source = x.index_select(0, index[:1])[0]
            box, lam = mixes.saliency_box(mixes.spectral_residual_saliency(source), lam)
            x_mix = cutmix_images(x, index, box)
        else:
            mask = draw["mask"].to(x.device, non_blocking=True).to(x.dtype)
            x_mix = torch.lerp(x, x[index], mask)
        return x_mix, y, y[index], lam

    def mix(self, x, y):
        """``(mixed images, y_a, y_b, λ)`` for this batch, with a fresh draw."""
        return self.mix_with(x, y, self.draw(x))

    def losses(self, x, y, draw):
        if self.method == "puzzlemix" and draw:
            return self._puzzlemix_losses(x, y, draw)
        x_mix, y_a, y_b, lam = self.mix_with(x, y, draw)
        if self.method == "manifoldmix" and draw:
            index = draw["index"]
            logits = self.logits(x_mix, mix_at=draw["layer"],
                                 mix_fn=lambda h: mixup_images(h, index, lam, fused=False))
        else:
            logits = self.logits(x_mix)
        loss = mixed_cross_entropy(logits, y_a, y_b, lam, self.label_smoothing, fused=self.fused)
        return loss, {"loss_cls": loss.detach()}

    def puzzle(self, x, y, draw):
        """PuzzleMix's ``(mixed images, per-sample λ [N])``: the input-gradient saliency (an
        extra forward and backward in eval mode), the graph-cut masks, the transport."""
        from fastmix.puzzlemix import DEFAULTS, input_saliency, puzzle_mix
        saliency = input_saliency(self.logits, [self.backbone, self.head], x, y)
        kw = {k: v for k, v in DEFAULTS.items() if k != "block_num"}
        with torch.no_grad():
            return puzzle_mix(x, draw["index"], saliency, draw["lam"], draw["block_num"], **kw)

    def _puzzlemix_losses(self, x, y, draw):
        x_mix, lam = self.puzzle(x, y, draw)
        logits = self.logits(x_mix).float()
        ls = self.label_smoothing
        ce_a = F.cross_entropy(logits, y, reduction="none", label_smoothing=ls)
        ce_b = F.cross_entropy(logits, y[draw["index"]], reduction="none", label_smoothing=ls)
        loss = (lam * ce_a + (1 - lam) * ce_b).mean()   # the soft target λ_i y + (1 - λ_i) y'
        return loss, {"loss_cls": loss.detach()}

    @torch.no_grad()
    def predict(self, x):
        return {"cls": self.logits(x)}

    def inference_model(self):
        return self.backbone, self.head

    def extra_repr(self):
        return f"method={self.method}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"


__all__ = ["MixupClassifier", "BASELINES", "use_fused"]
