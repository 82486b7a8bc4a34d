"""Where and how a run executes: the device, the process group (torchrun), autocast."""
import contextlib
import os

import torch


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: fastmix runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device



def init_distributed():
    """``(rank, world, local_rank)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def resolve_runtime(cfg, device):
    """Fill the ``auto`` switches: bf16 and torch.compile on CUDA; fp32, eager on the CPU."""
    cuda = device.type == "cuda"
    if cfg.amp == "auto":
        cfg.amp = "bf16" if cuda else "none"
    if cfg.compile is None:
        cfg.compile = cuda
    if cfg.amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be bf16, fp16, none or auto, got {cfg.amp!r}")
    if cfg.amp == "fp16" and not cuda:
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")
    if cfg.cuda_graphs:
        if not cuda:
            raise ValueError("--cuda-graphs needs a CUDA device")
        if cfg.amp == "fp16":
            raise ValueError("--cuda-graphs works with --amp bf16 or none (the fp16 GradScaler's "
                             "update is not captured)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--cuda-graphs runs in one process; under torchrun leave it off")
    return cfg


def autocast_context(cfg, device, cache_enabled=True):
    """bf16 / fp16 autocast per ``cfg.amp`` (``none``: no autocast). A captured step needs
    ``cache_enabled=False`` (the cast-weight cache must not outlive the capture)."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)
