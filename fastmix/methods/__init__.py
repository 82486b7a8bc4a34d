"""The training methods, one family per module, behind one interface.

- ``base``: ``MixMethod`` (what the trainer drives), ``Mixer`` (a model-free mixing policy,
  callable as ``mixer(x, y) -> (x_mixed, soft targets)``), ``Classifier`` (a backbone + head
  trained with a mixer, with an optional EMA), ``InferenceModel`` (one trained head as a
  plain module, ``inference_model()``), ``ema_update_``;
- ``mixup``: ``Vanilla``, ``Mixup``, ``CutMix``;
- ``cutting``: ``SaliencyMix``, ``FMix``, ``ResizeMix``, ``GridMix``, ``SmoothMix``;
- ``manifoldmix``: ``ManifoldMix``; ``puzzlemix``: ``PuzzleMix``;
- ``automix`` + ``mixblock``: ``AutoMix`` and its ``MixBlock``.

``METHODS`` maps each method's ``name`` to its class, derived from the classes; each class
carries its facts (``default_alpha``, ``capturable``, ``needs``, ``recipe``, ``draws_lam``),
which ``fastmix.config`` and ``fastmix.engine`` read.
"""
from fastmix.methods.base import (Classifier, InferenceModel, MixMethod, Mixer, ema_update_,
                                  soft_targets)
from fastmix.methods.mixup import CutMix, Mixup, Vanilla
from fastmix.methods.cutting import FMix, GridMix, ResizeMix, SaliencyMix, SmoothMix
from fastmix.methods.manifoldmix import ManifoldMix
from fastmix.methods.puzzlemix import PuzzleMix
from fastmix.methods.automix import AutoMix
from fastmix.methods.mixblock import MixBlock

# The order of train.py's --method choices: AutoMix first, then the paper's table order.
METHODS = {cls.name: cls for cls in (AutoMix, Vanilla, Mixup, CutMix, ManifoldMix, SaliencyMix,
                                     FMix, ResizeMix, GridMix, SmoothMix, PuzzleMix)}
# The methods that need no model: their classes are mixers for any training loop.
MIXERS = {name: cls for name, cls in METHODS.items()
          if issubclass(cls, Mixer) and not set(cls.needs) & {"model", "mix_at"}}


def method_class(name):
    """The class of the method called ``name`` (a clear error for an unknown one)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def facts(name):
    """``{name, default_alpha, capturable, needs, recipe, draws_lam, modes}`` of a method."""
    cls = method_class(name)
    return {k: getattr(cls, k) for k in ("name", "default_alpha", "capturable", "needs",
                                         "recipe", "draws_lam", "modes")}


__all__ = ["METHODS", "MIXERS", "method_class", "facts", "MixMethod", "Mixer", "Classifier",
           "InferenceModel",
           "ema_update_", "soft_targets", "AutoMix", "MixBlock", "Vanilla", "Mixup", "CutMix",
           "ManifoldMix", "SaliencyMix", "FMix", "ResizeMix", "GridMix", "SmoothMix",
           "PuzzleMix"]
