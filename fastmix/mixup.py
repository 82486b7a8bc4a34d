"""The earlier home of the comparison methods; they live in ``fastmix.methods`` now.

``MixupClassifier(backbone, num_classes, method=..., alpha, label_smoothing, seed, fused)``
keeps working: a ``fastmix.methods.Classifier`` with the method's mixer."""
from fastmix.functional import use_fused  # noqa: F401  (re-exported, as before)
from fastmix.methods import METHODS, Classifier
from fastmix.methods.manifoldmix import MANIFOLD_LAYERS  # noqa: F401

BASELINES = tuple(n for n in METHODS if n != "automix")
NOT_CAPTURABLE = tuple(n for n in BASELINES if not METHODS[n].capturable)
MASK_METHODS = ("fmix", "gridmix", "smoothmix")


class MixupClassifier(Classifier):
    """``Classifier(backbone, num_classes, METHODS[method](alpha, label_smoothing, ...))``."""

    def __init__(self, backbone, num_classes, method="mixup", alpha=1.0, label_smoothing=0.0,
                 seed=None, fused=None, ema=None):
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        mixer = METHODS[method](alpha, label_smoothing, num_classes, seed=seed, fused=fused)
        super().__init__(backbone, num_classes, mixer, ema=ema)


__all__ = ["MixupClassifier", "BASELINES", "use_fused"]
