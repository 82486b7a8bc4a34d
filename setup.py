"""fastmix's package layout; the metadata (name, version, dependencies, extras, entry points)
is in pyproject.toml.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and
install as ``fastmix.kernels`` (a top-level ``kernels`` module would clash with an
unrelated PyPI package).
"""
from setuptools import setup

setup(
    packages=["fastmix", "fastmix.data", "fastmix.methods", "fastmix.kernels"],
    package_dir={"fastmix": "fastmix", "fastmix.kernels": "kernels"},
    package_data={"fastmix.kernels": ["autotune_spills.json"]},
)
