"""Moved to ``fastmix.methods.base``; this import path keeps working (the same module)."""
import sys

from fastmix.methods import base as _moved

sys.modules[__name__] = _moved
