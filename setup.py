"""fastmix: a fast, faithful AutoMix (ECCV 2022) for PyTorch.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and
install as ``fastmix.kernels`` (a top-level ``kernels`` module would clash with an
unrelated PyPI package).
"""
from setuptools import setup

setup(
    name="fastmix",
    version="0.1.0",
    description="Fast, faithful AutoMix: fused Triton kernels, a lean trainer, DALI data",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmix", "fastmix.data", "fastmix.methods", "fastmix.kernels"],
    package_dir={"fastmix": "fastmix", "fastmix.kernels": "kernels"},
    package_data={"fastmix.kernels": ["autotune_spills.json"]},
    py_modules=[],
    install_requires=["torch>=2.4", "torchvision", "timm", "numpy", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark", "triton>=3.6,<3.9", "numpy", "pillow",
                 "matplotlib", "gco-wrapper", "timm", "torchvision", "tensorboard"],
        "puzzlemix": ["gco-wrapper"],   # the graph cut of --method puzzlemix
        "study": ["matplotlib"],
        "dali": ["nvidia-dali-cuda130"],
        "models": ["timm", "torchvision"],
        "tensorboard": ["tensorboard"],   # train.py --log tensorboard
    },
)
