"""ManifoldMix (Verma et al. 2019): Mixup of the hidden features after a stage drawn per
step in [0, 3) (0 = the input), inside the backbone. It needs the classifier: the backbone's
forward must take ``mix_at`` / ``mix_fn`` (fastmix's ResNets and WideResNets do)."""
from fastmix.functional import mixed_cross_entropy, mixup_images
from fastmix.methods.base import Mixer

MANIFOLD_LAYERS = (0, 3)


class ManifoldMix(Mixer):
    name = "manifoldmix"
    default_alpha = 2.0
    capturable = False          # the stage is a host draw that changes the step's work
    needs = ("mix_at",)

    def check_backbone(self, backbone):
        if "mix_at" not in backbone.forward.__code__.co_varnames:
            raise ValueError("ManifoldMix mixes hidden features, so the backbone's forward must "
                             "take mix_at/mix_fn (fastmix's ResNets and WideResNets do); a timm "
                             "or FeatureTap backbone would need a hook after each stage")

    def draw(self, x):
        index = self.permutation(x.shape[0], x.device)
        return {"lam": self.sample_lam(), "index": index,
                "layer": int(self.rng.integers(*MANIFOLD_LAYERS))}

    def mix_with(self, x, y, draw, model=None):
        """The images unmixed (the mixing happens inside the backbone, in ``losses``), the
        labels and λ."""
        return x, y, y[draw["index"]], draw["lam"]

    def losses(self, model, x, y, draw):
        index, lam = draw["index"], draw["lam"]
        logits = model.logits(x, mix_at=draw["layer"],
                              mix_fn=lambda h: mixup_images(h, index, lam, fused=False))
        loss = mixed_cross_entropy(logits, y, y[index], lam, self.label_smoothing,
                                   fused=self.fused)
        return loss, {"loss_cls": loss.detach()}


__all__ = ["ManifoldMix", "MANIFOLD_LAYERS"]
