"""Moved to ``fastmix.methods.mixblock``; this import path keeps working (the same module)."""
import sys

from fastmix.methods import mixblock as _moved

sys.modules[__name__] = _moved
