"""Moved to ``fastmix.methods.automix``; this import path keeps working (the same module)."""
import sys

from fastmix.methods import automix as _moved

sys.modules[__name__] = _moved
