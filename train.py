#!/usr/bin/env python
"""Train a classifier with AutoMix (or the Mixup, CutMix and vanilla baselines).

    python train.py                                   # the default job: AutoMix on Fashion-MNIST
    python train.py --preset cifar100-r18 --data-dir ~/data
    python train.py --method mixup --arch resnet18_cifar --epochs 10 --print-config

A preset fills in a recipe (spec §3); any flag given on the command line overrides it.
Without --preset: `fashion-mnist-r18` on a GPU, `cpu-small` on the CPU.
Outputs: OUT/metrics.jsonl (one JSON object per epoch) and OUT/summary.json.
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile

from fastmix.backbones import ARCH_NAMES
from fastmix.data import DATASETS, DatasetError
from fastmix.engine import (METHODS, CheckpointError, Config, NonFiniteLossError,
                            check_run_settings, resolve_device, train, validate_config)

# Recipes from the spec's configs (§3). AutoMix on CIFAR: lr 0.1 -> 0.05 for everything,
# EMA 0.999 -> 0.999999; baselines would use min_lr 0 (pass --min-lr 0).
PRESETS = {
    "cifar100-r18": dict(dataset="cifar100", arch="resnet18_cifar", epochs=400, batch_size=100,
                         lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    "cifar10-r18": dict(dataset="cifar10", arch="resnet18_cifar", epochs=400, batch_size=100,
                        lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    "cifar100-rx50": dict(dataset="cifar100", arch="resnext50_cifar", epochs=400, batch_size=100,
                          lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    # ImageFolder recipes (--data-dir ROOT with train/ and val/). Tiny-ImageNet: ResNet_CIFAR at
    # 64 px, backbone 0.2 -> 0.05, Mix Block 0.1 -> 1e-3. ImageNet: λ-concat, backbone 0.1 -> 0,
    # Mix Block 0.1 -> 1e-3, EMA end 0.99999, batch 256 in all (per GPU: divide by the GPUs).
    "tinyimagenet-r18": dict(dataset="imagefolder", arch="resnet18_cifar", image_size=64,
                             epochs=400, batch_size=100, lr=0.2, min_lr=0.05, mb_lr=0.1,
                             mb_min_lr=1e-3, weight_decay=1e-4, ema_end=0.999999),
    "imagenet-r50": dict(dataset="imagefolder", arch="resnet50", image_size=224, epochs=100,
                         batch_size=64, lr=0.1, min_lr=0.0, mb_lr=0.1, mb_min_lr=1e-3,
                         mb_momentum=0.9, weight_decay=1e-4, ema_end=0.99999, lam_concat=True),
    "fashion-mnist-r18": dict(dataset="fashion-mnist", arch="resnet18_cifar", epochs=100,
                              batch_size=100, lr=0.1, min_lr=0.05, weight_decay=1e-4,
                              ema_end=0.999999),
    # A short CPU run (2 cores, < 10 min): a quarter-width ResNet-10, 3 epochs of Fashion-MNIST.
    # Short-run deviations from the 400-epoch recipe: cosine to 0 (not 0.05), and an EMA from
    # 0.99 to 0.999 so the momentum encoder keeps up within 1.8k steps.
    "cpu-small": dict(dataset="fashion-mnist", arch="resnet_small", epochs=3, batch_size=100,
                      lr=0.1, min_lr=0.0, weight_decay=1e-4, ema_momentum=0.99, ema_end=0.999),
}


def _bool(v):
    try:
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[v.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false (or yes/no, 1/0), got {v!r}") from None


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="a recipe from the spec's configs (flags override it)")
    a("--print-config", action="store_true", help="print the resolved configuration and exit")
    a("--method", choices=METHODS, help=f"training method (default {d.method})")
    a("--arch", help=f"backbone: {', '.join(ARCH_NAMES)} (default {d.arch})")
    a("--dataset", choices=DATASETS + ("imagefolder",), help=f"dataset (default {d.dataset}); imagefolder: --data-dir ROOT with ROOT/train/<class>/*, ROOT/val/<class>/*")
    a("--loader", choices=("auto", "dali", "torchvision"), help="imagefolder loader: DALI (nvJPEG on CUDA) or the PIL fallback; auto = DALI when it imports (default auto)")
    a("--image-size", type=int, help="imagefolder crop size (default 224)")
    a("--verify-images", choices=("header", "full", "none"), help="imagefolder pre-scan: header (signature and end marker, cheap; default), full (decode every file with PIL, skip the unreadable), none")
    a("--workers", type=int, help="imagefolder: DALI threads / DataLoader workers (default min(8, cores))")
    a("--data-dir", help="dataset folder (Fashion-MNIST: the four IDX .gz files, default "
                         "/usr/share/datasets/fashion-mnist; CIFAR: the folder of the pickle batches)")
    a("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    a("--batch-size", type=int, help=f"batch size per device (default {d.batch_size})")
    a("--lr", type=float, help=f"initial learning rate of the main group (default {d.lr})")
    a("--min-lr", type=float, help="final learning rate of the cosine schedule (default 0)")
    a("--mb-lr", type=float, help="Mix Block initial lr (default: --lr)")
    a("--mb-min-lr", type=float, help="Mix Block final lr (default: --min-lr)")
    a("--mb-momentum", type=float, help="Mix Block SGD momentum (default: --momentum)")
    a("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    a("--weight-decay", type=float, help=f"weight decay (default {d.weight_decay})")
    a("--alpha", type=float, help="Beta(alpha, alpha) of λ (default: automix 2, mixup 1, cutmix 0.2)")
    a("--label-smoothing", type=float, help="label smoothing of every CE loss (default 0)")
    a("--ema-momentum", type=float, help=f"AutoMix EMA start momentum (default {d.ema_momentum})")
    a("--ema-end", type=float, help=f"AutoMix EMA final momentum, cosine from 10%% of training (default {d.ema_end})")
    a("--mask-loss-weight", type=float, help=f"AutoMix mask loss weight (default {d.mask_loss_weight})")
    a("--mask-loss-mode", choices=("L1", "L1+Variance"), help="AutoMix mask loss (default L1)")
    a("--lam-margin", type=float, help=f"AutoMix: plain Mixup for the backbone when λ_bb is this close to 0 or 1 (default {d.lam_margin})")
    a("--lam-concat", type=_bool, metavar="BOOL", help="AutoMix: append the λ channel in the Mix Block (ImageNet configs)")
    a("--upsample", choices=("nearest", "bilinear"), help="Mix Block mask upsampling (default nearest)")
    a("--mix-shuffle-no-repeat", type=_bool, metavar="BOOL", help="AutoMix: permutations without fixed points")
    a("--train-subset", type=int, help="train on a random subset of this many images")
    a("--test-subset", type=int, help="evaluate on a class-balanced subset of this many test images")
    a("--val-split", type=int, help="hold out this many training images (class-balanced) as a validation set, evaluated with the test split (default 0: none)")
    a("--data-seed", type=int, help="seed of the subsets and the validation split, independent of --seed (default 0)")
    a("--eval-every", type=int, help="evaluate (validation and test splits) every N epochs and at each of the last 10 (default 1)")
    a("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    a("--seed", type=int, help=f"random seed (default {d.seed})")
    a("--out", help=f"output folder for metrics.jsonl and summary.json (default {d.out})")
    a("--eager", action="store_true", default=None, help="eager PyTorch ops instead of the fused Triton kernels")
    a("--amp", choices=("auto", "bf16", "fp16", "none"), help="autocast precision (default auto: bf16 on CUDA, none on CPU; fp16 adds a GradScaler)")
    a("--channels-last", type=_bool, metavar="BOOL", help="channels-last memory format end to end (default true)")
    a("--compile", dest="compile", action="store_true", default=None, help="torch.compile the backbones (default on CUDA)")
    a("--no-compile", dest="compile", action="store_false", help="do not torch.compile")
    a("--cuda-graphs", action="store_true", default=None, help="capture the whole training step in one CUDA graph and replay it (CUDA, one process, bf16 or fp32)")
    a("--optimizer-impl", choices=("torch", "apex"), help="torch SGD (fused=True on CUDA; default) or apex FusedSGD (needs apex)")
    a("--k-early-exit", action="store_true", default=None, help="AutoMix: the momentum encoder's clean pass stops at stage 3 (changes its stage-4 BN statistics; see README)")
    a("--resume", nargs="?", const="auto", help="resume from a checkpoint (no value: OUT/last.pt)")
    a("--overwrite", action="store_true", default=None, help="start afresh in an --out that holds an earlier run (deletes its last.pt, metrics.jsonl, summary.json)")
    a("--checkpoint-every", type=int, help="also write OUT/last.pt every N steps inside an epoch (default: end of each epoch only)")
    a("--grid-every", type=int, help="AutoMix: save a mixed-sample PNG grid every N epochs (default 0: never)")
    a("--export", metavar="PATH", help="after training, write the classifier (encoder + head) as a plain state dict")
    a("--export-head", choices=("one_k", "mix_k", "one_q", "mix_q"), help="AutoMix head to export (default one_k)")
    a("--max-bad-steps", type=int, help="stop after this many consecutive NaN/Inf losses (skipped steps; default 10)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    return p


def resolve(args):
    """Config = defaults <- preset <- command-line flags; ``(cfg, preset, why)``."""
    values = {}
    preset, why = args.preset, "--preset"
    if preset is None:
        preset = "fashion-mnist-r18" if resolve_device(args.device or "auto").type == "cuda" else "cpu-small"
        why = "the default for this device"
        explicit = {k for k, v in vars(args).items() if v is not None and k not in ("preset", "print_config")}
        if explicit & {"dataset", "arch"}:
            preset, why = None, "--dataset/--arch given without --preset: the plain defaults"
    if preset:
        values.update(PRESETS[preset])
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return Config(**values), preset, why


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    try:
        resolve_device(args.device or "auto")
    except ValueError as e:
        p.error(str(e))
    cfg, preset, why = resolve(args)
    try:
        validate_config(cfg)
        check_run_settings(cfg)
    except ValueError as e:
        p.error(str(e))
    if args.print_config:
        print(json.dumps({"preset": preset, **dataclasses.asdict(cfg)}, indent=2))
        return 0
    print(f"fastmix: {cfg.method} on {cfg.dataset}, arch {cfg.arch}, {cfg.epochs} epochs of "
          f"batch {cfg.batch_size}; preset {preset or 'none'} ({why}); out {cfg.out}",
          file=sys.stderr, flush=True)
    try:
        os.makedirs(cfg.out, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out).close()
    except OSError as e:
        p.error(f"--out {cfg.out} is not writable: {e}")
    try:
        summary = train(cfg)
    except (DatasetError, CheckpointError, PermissionError, ImportError, ValueError) as e:
        # bad input found before or while setting up: a clear message, exit code 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: summary[k] for k in ("method", "reported_head", "reported_top1_final",
                                                "reported_top1_median_last10", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
