"""Images/s and peak memory of whole training steps, configuration against configuration.

    python bench/train_step.py                 # GPU: R-18 32 px (batch 100, 256), R-50 224 px (64, 128)
    python bench/train_step.py --quick         # CPU: a tiny ResNet at 32 px; ratios only

Configurations (the same model, data and batch; synthetic data already on the device):
  faithful  fp32, NCHW, no compile, eager ops, plus the official code's per-step host syncs
            (a NaN check with .item() on the loss) -- a stand-in for the authors' code
  careful   bf16 autocast + channels-last, eager ops, no compile (on the CPU: fp32)
  compiled  careful + torch.compile of the backbones: the eager reference, compiled (GPU only)
  fastmix   compiled + fused Triton kernels + fused SGD + the NaN step guard: what train.py runs
  graphs    fastmix with the whole step captured in one CUDA graph (train.py --cuda-graphs;
            on the CPU the same static-tensor step runs uncaptured)
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

from fastmix.engine import Config, build_optimizer, build_step, build_training  # noqa: E402

CONFIGS = ("faithful", "careful", "compiled", "fastmix", "graphs")
CPU_CONFIGS = ("faithful", "careful", "fastmix", "graphs")  # no torch.compile on the CPU


def make_step(method, arch, batch, size, config, device, num_classes=100):
    cuda = device.type == "cuda"
    fast = config in ("fastmix", "graphs")
    cfg = Config(method=method, arch=arch, eager=not fast,
                 amp="bf16" if cuda and config != "faithful" else "none",
                 channels_last=config != "faithful",
                 compile=cuda and config in ("compiled", "fastmix", "graphs"),
                 cuda_graphs=config == "graphs")
    torch.manual_seed(0)
    model, opt, scaler = build_training(cfg, device, 3, num_classes)   # as train.py builds them
    if not fast:  # the eager configurations: plain (unfused) SGD
        opt = build_optimizer(cfg, model, fused=False)
    fn, _ = build_step(cfg, model, opt, scaler, device, guard=fast)
    x = torch.randn(batch, 3, size, size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    syncs = config == "faithful"
    state = {"step": 0}

    def step():
        loss, _, _ = fn(x, y, state["step"], 10 ** 6)
        if syncs and bool(torch.isnan(loss).any().item()):  # the official NaN check: a sync
            raise FloatingPointError("NaN loss")
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
    p.add_argument("--configs", default=None, help="comma-separated (default: all that apply)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", default=None, metavar="ARCH,PX,BATCH",
                   help="one shape instead of the default list (e.g. resnet18_cifar,32,32)")
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
    if args.shape:
        arch, px, batch = args.shape.split(",")
        shapes = [(arch, int(px), int(batch))]
    configs = (args.configs or ",".join(CPU_CONFIGS if device.type != "cuda" else CONFIGS)).split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
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
            for config in configs:
                if config == "graphs" and method == "manifoldmix":
                    print(f"| {arch} | {size} | {batch} | {method} | {config} | - | - | - | - | "
                          f"(not capturable: its stage is a host draw) |")
                    continue
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                step = make_step(method, arch, batch, size, config, device)
                ms = time_steps(step, device, steps, warmup, args.repeats)
                peak = f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f}" if device.type == "cuda" else "-"
                results[(arch, size, batch, method, config)] = ms
                base = results.get((arch, size, batch, method, "faithful"))
                careful = results.get((arch, size, batch, method, "careful"))
                ratio = lambda ref: f"{ref / ms:.2f}x" if ref else "-"  # noqa: E731
                print(f"| {arch} | {size} | {batch} | {method} | {config} | {ms:.2f} | "
                      f"{batch * 1000 / ms:.0f} | {peak} | {ratio(base)} | {ratio(careful)} |",
                      flush=True)
        for config in configs:
            v = results.get((arch, size, batch, "vanilla", config))
            for method in args.methods.split(","):
                a = results.get((arch, size, batch, method, config))
                if a and v and method != "vanilla":
                    print(f"| {arch} | {size} | {batch} | {method}/vanilla step time | {config} | "
                          f"{a / v:.2f}x | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
