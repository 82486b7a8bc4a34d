"""Moved to ``fastmix.methods.puzzlemix``; this import path keeps working (the same module)."""
import sys

from fastmix.methods import puzzlemix as _moved

sys.modules[__name__] = _moved
