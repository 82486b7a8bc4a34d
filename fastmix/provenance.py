"""What produced a result: the commit, the package versions and the machine.

``environment()`` is recorded in every run's ``summary.json`` (``provenance``) and in a study's
``results.json``: what regenerating the numbers needs. A CPU run regenerates bit for bit only on
the same ISA (``torch_cpu_capability``: the kernels torch dispatches to round differently on
AVX2 and AVX512) with the same thread count.
"""
import os
import platform
import subprocess


def source_root():
    """The source checkout fastmix runs from (the folder holding ``train.py`` beside the
    ``fastmix`` package), or None for an installed package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "train.py")) else None


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(root, *args):
    if root is None:
        return None
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment():
    """``{"commit", "tracked_files_modified", "versions", "machine"}`` of this process. The
    commit is that of the checkout fastmix runs from (None for an installed package);
    ``machine`` holds the CPU model, the ISA torch's CPU kernels use, torch's intra-op threads
    in this process, and the CUDA device's name where one is used."""
    import torch
    root = source_root()
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "triton", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            versions[name] = None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
               "cpu_model": cpu_model(),
               "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        machine["cuda_device"] = torch.cuda.get_device_name()
    return {"commit": _git(root, "rev-parse", "HEAD"),
            "tracked_files_modified": sorted(line.split(maxsplit=1)[1]
                                             for line in dirty.splitlines()) if dirty else [],
            "versions": versions, "machine": machine}
