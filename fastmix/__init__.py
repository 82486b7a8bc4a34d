"""fastmix: a fast, faithful AutoMix for PyTorch.

The public API (``__all__``):

- ``AutoMix``: the AutoMix model (online and momentum encoders, four heads, the Mix Block);
  ``MixBlock``: its mask generator;
- ``Classifier``: a backbone and a linear head trained with a mixer (every other method);
  ``MixupClassifier``: the same, the method chosen by name; ``METHODS``: every method's class
  by its ``--method`` name (``fastmix.methods``);
- ``Mixup``: timm's ``Mixup`` / CutMix, draw for draw, mixing on the device; ``soft_targets``:
  timm's mixed soft targets; ``mixed_cross_entropy``: the mixed-label loss (fused on CUDA);
- backbones: ``build_backbone`` (by name, or ``timm:<model>``), ``ResNet``, ``WideResNet``,
  ``TimmBackbone``, ``FeatureTap`` (tap any CNN), ``ClsHead``, ``load_torchvision_weights``;
- the modules ``methods`` and ``mixers``.

The commands ``fastmix-train`` (``train.py``), ``fastmix-selfcheck`` and ``fastmix-study``
(``bench/accuracy.py``) come with the package. ``__version__`` is the package's version (the
one source: pyproject.toml reads it from here).
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _alias_source_kernels():
    # Installed, the kernels are the subpackage fastmix/kernels. In a source checkout
    # (running from the repository root) they sit in ../kernels: register that folder
    # under the same name so `import fastmix.kernels.x` works either way.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if "fastmix.kernels" in _sys.modules:
        globals()["kernels"] = _sys.modules["fastmix.kernels"]
        return
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location("fastmix.kernels", init,
                                        submodule_search_locations=[_os.path.dirname(init)])
    if spec is None or spec.loader is None:
        return
    module = _ilu.module_from_spec(spec)
    _sys.modules["fastmix.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module   # as an import of the subpackage would bind it


_alias_source_kernels()

__version__ = "0.1.0"

from fastmix.methods import AutoMix  # noqa: E402
from fastmix.backbones import (ClsHead, FeatureTap, ResNet, TimmBackbone, WideResNet,  # noqa: E402
                               build_backbone, load_torchvision_weights)
from fastmix.functional import mixed_cross_entropy  # noqa: E402
from fastmix import methods, mixers  # noqa: E402
from fastmix.methods import METHODS, Classifier, MixBlock  # noqa: E402
from fastmix.mixers import Mixup, soft_targets  # noqa: E402
from fastmix.mixup import MixupClassifier  # noqa: E402

__all__ = ["AutoMix", "MixBlock", "Classifier", "METHODS", "Mixup", "MixupClassifier",
           "ClsHead", "FeatureTap", "ResNet", "TimmBackbone", "WideResNet", "build_backbone",
           "load_torchvision_weights", "mixed_cross_entropy", "soft_targets", "methods",
           "mixers"]
