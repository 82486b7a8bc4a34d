"""The earlier home of the comparison methods; they live in ``fastmix.methods`` now.

``MixupClassifier(backbone, num_classes, method=..., alpha, label_smoothing, seed, fused)``
keeps working: a ``fastmix.methods.Classifier`` with the method's mixer."""
from typing import Optional

import torch.nn as nn

from fastmix.functional import use_fused  # noqa: F401  (re-exported, as before)
from fastmix.methods import METHODS, Classifier
from fastmix.methods.manifoldmix import MANIFOLD_LAYERS  # noqa: F401

BASELINES = tuple(n for n in METHODS if n != "automix")
NOT_CAPTURABLE = tuple(n for n in BASELINES if not METHODS[n].capturable)
MASK_METHODS = ("fmix", "gridmix", "smoothmix")


class MixupClassifier(Classifier):
    """``Classifier(backbone, num_classes, METHODS[method](alpha, label_smoothing, ...))``: one
    of the comparison methods by name (the interface of ``Classifier``).

    Args:
        backbone: the encoder (as ``Classifier``'s).
        num_classes: the number of classes (at least 2).
        method: a method other than AutoMix, by its ``--method`` name (``BASELINES``:
            ``"mixup"``, ``"cutmix"``, ``"vanilla"``, ``"manifoldmix"``, ...).
        alpha: λ ~ Beta(alpha, alpha).
        label_smoothing: label smoothing (0-1) of the cross-entropy.
        seed: the seed of the mixer's numpy generator.
        fused: True / False / None: the Triton kernels, their eager twins, or fused on CUDA.
        ema: None, or ``dict(momentum, end, warmup)``: an EMA head (``Classifier``'s).

    Raises:
        ValueError: ``method`` is not one of ``BASELINES`` (or ``Classifier``'s checks).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, method: str = "mixup",
                 alpha: float = 1.0, label_smoothing: float = 0.0, seed: Optional[int] = None,
                 fused: Optional[bool] = None, ema: Optional[dict] = None) -> None:
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        mixer = METHODS[method](alpha, label_smoothing, num_classes, seed=seed, fused=fused)
        super().__init__(backbone, num_classes, mixer, ema=ema)


__all__ = ["MixupClassifier", "BASELINES", "use_fused"]
