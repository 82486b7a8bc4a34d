#!/usr/bin/env python
"""Train a classifier with AutoMix (or the Mixup, CutMix and vanilla baselines).

    python train.py                                   # the default job: AutoMix on Fashion-MNIST
    python train.py --preset cifar100-r18 --data-dir ~/data
    python train.py --method mixup --arch resnet18_cifar --epochs 10 --print-config

A preset fills in a recipe (spec §3); any flag given on the command line overrides it.
Without --preset: `fashion-mnist-r18` on a GPU, `cpu-small` on the CPU (unless --dataset or
--arch is given: then the plain defaults). Every flag, its default and its check live in
fastmix/config.py. Outputs: OUT/metrics.jsonl (one JSON object per epoch), OUT/summary.json.
"""
import argparse
import dataclasses
import json
import sys

from fastmix.config import PRESETS, add_flags, given, resolve, validate_config
from fastmix.data import DatasetError
from fastmix.engine import CheckpointError, NonFiniteLossError, check_run_settings, train
from fastmix.runtime import resolve_device


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a recipe from the spec's configs (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return add_flags(p)


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    try:
        cuda = resolve_device(args.device or "auto").type == "cuda"
        cfg, preset, why = resolve(given(args), args.preset, cuda)
        validate_config(cfg)
        if args.print_config:   # the recipe as resolved; what only a run needs is not checked
            print(json.dumps({"preset": preset, **dataclasses.asdict(cfg)}, indent=2))
            return 0
        check_run_settings(cfg)
    except ValueError as e:
        p.error(str(e))
    print(f"fastmix: {cfg.method} on {cfg.dataset}, arch {cfg.arch}, {cfg.epochs} epochs of "
          f"batch {cfg.batch_size}; preset {preset or 'none'} ({why}); out {cfg.out}",
          file=sys.stderr, flush=True)
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
