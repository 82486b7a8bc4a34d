"""Images/s and peak memory of whole training steps, configuration against configuration.

    python bench/train_step.py                 # GPU: R-18 32 px (batch 100, 256), R-50 224 px (64, 128)
    python bench/train_step.py --quick         # CPU: a tiny ResNet at 32 px; ratios only

Configurations (the same model, data and batch; synthetic data already on the device):
  faithful  fp32, NCHW, no compile, eager ops, plus the official code's per-step host syncs
            (a NaN check with .item() on the loss and the mask) -- a stand-in for the authors' code
  careful   bf16 autocast + channels-last, eager ops, no compile (on the CPU: fp32)
  fastmix   bf16 + channels-last + torch.compile of the backbones + fused Triton kernels + fused SGD
Methods: automix, mixup, vanilla. Timing: CUDA events (GPU) or perf_counter (CPU) around
``--steps`` steps after ``--warmup`` steps; the median of ``--repeats`` such windows.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastmix.engine import Config, autocast_context, build_model, build_optimizer  # noqa: E402

CONFIGS = ("faithful", "careful", "fastmix")


def make_step(method, arch, batch, size, config, device, num_classes=100):
    cuda = device.type == "cuda"
    cfg = Config(method=method, arch=arch, eager=config != "fastmix",
                 amp="bf16" if cuda and config != "faithful" else "none",
                 channels_last=config != "faithful", compile=config == "fastmix" and cuda)
    torch.manual_seed(0)
    model = build_model(cfg, 3, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for name in ("backbone_q", "backbone_k", "backbone"):
            if hasattr(model, name):
                getattr(model, name).compile()
    opt = build_optimizer(cfg, model, fused=cuda and config == "fastmix")
    x = torch.randn(batch, 3, size, size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    syncs = config == "faithful"
    state = {"step": 0}

    def step():
        with autocast_context(cfg, device):
            loss, logs = model.forward_train(x, y)
        if syncs and bool(torch.isnan(loss).any().item()):  # the official NaN check: a sync
            raise FloatingPointError("NaN loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step(state["step"], 10 ** 6)
        state["step"] += 1

    return step


def time_steps(step, device, steps, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps)
        else:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t) * 1000 / steps)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (forced without a GPU)")
    p.add_argument("--methods", default="automix,mixup,vanilla")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    if quick:
        shapes = [("resnet_small", 32, 32)]
        steps, warmup = args.steps or 3, args.warmup or 2
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    else:
        shapes = [("resnet18_cifar", 32, 100), ("resnet18_cifar", 32, 256),
                  ("resnet50", 224, 64), ("resnet50", 224, 128)]
        steps, warmup = args.steps or 20, args.warmup or 10
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    print(f"# train_step: {dev_name}, torch {torch.__version__}, triton {tv}, "
          f"CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}")
    print(f"# command: python bench/{os.path.basename(__file__)} {' '.join(argv or sys.argv[1:])}")
    if device.type != "cuda":
        print("# CPU: ratios between configurations only; absolute figures are not GPU speed")
    print()
    print("| arch | px | batch | method | config | ms/step | images/s | peak MiB | vs faithful | vs careful |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for arch, size, batch in shapes:
        for method in args.methods.split(","):
            for config in args.configs.split(","):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                step = make_step(method, arch, batch, size, config, device)
                ms = time_steps(step, device, steps, warmup, args.repeats)
                peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else float("nan")
                results[(arch, size, batch, method, config)] = ms
                base = results.get((arch, size, batch, method, "faithful"))
                careful = results.get((arch, size, batch, method, "careful"))
                print(f"| {arch} | {size} | {batch} | {method} | {config} | {ms:.2f} | "
                      f"{batch * 1000 / ms:.0f} | {peak:.0f} | "
                      f"{base / ms if base else float('nan'):.2f}x | "
                      f"{careful / ms if careful else float('nan'):.2f}x |", flush=True)
        for config in args.configs.split(","):
            a, v = results.get((arch, size, batch, "automix", config)), results.get((arch, size, batch, "vanilla", config))
            if a and v:
                print(f"| {arch} | {size} | {batch} | automix/vanilla step time | {config} | {a / v:.2f}x | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
