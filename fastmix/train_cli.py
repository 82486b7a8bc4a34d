"""Train a classifier with AutoMix (or the Mixup, CutMix and vanilla baselines).

    python train.py                                   # the default job: AutoMix on Fashion-MNIST
    python train.py --preset cifar100-r18 --data-dir ~/data
    python train.py --method mixup --arch resnet18_cifar --epochs 10 --print-config

A preset fills in a recipe (spec §3); any flag given on the command line overrides it.
Without --preset: `fashion-mnist-r18` on a GPU, `cpu-small` on the CPU (unless --dataset or
--arch is given: then the plain defaults). Every flag, its default and its check live in
fastmix/config.py. Outputs: OUT/metrics.jsonl (one JSON object per epoch), OUT/summary.json.

Exit status: 0 done; 2 bad input, OUT in use by another run, or out of memory (one line, no
traceback); 3 stopped on NaN/Inf steps; 4 trained, but an output could not be written (no
checkpoint of the run at all, the export, or summary.json); 128 + N stopped by signal N after a
step, with a checkpoint (143 SIGTERM, 130 SIGINT).

Installed, ``fastmix-train`` is the same command (``python train.py`` in a source checkout).
"""
import argparse
import dataclasses
import json
import os
import re
import shlex
import sys

from fastmix.config import PRESETS, add_flags, given, resolve, validate_config
from fastmix.data import DatasetError
from fastmix.engine import (CheckpointError, NonFiniteLossError, RunStopped, check_run_settings,
                            train)
from fastmix.evaluation import evaluate_main
from fastmix.runtime import resolve_device


def parser() -> argparse.ArgumentParser:
    """The trainer's flags: ``--preset`` and ``--print-config``, then one flag per
    ``fastmix.config.Config`` field, grouped by section (``fastmix.config.add_flags``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = p.add_argument_group("recipe", "a preset fills in the settings below; a flag given "
                                            "overrides it")
    recipe.add_argument("--preset", choices=sorted(PRESETS),
                        help="a recipe from the spec's configs (flags override it)")
    recipe.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit")
    return add_flags(p)


def main(argv=None) -> int:
    """Run the trainer on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (see
    the module doc). ``train.py`` and the ``fastmix-train`` command call it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    if args.evaluate:       # a checkpoint's top-1 per head, no training (fastmix.evaluation)
        return evaluate_main(args.evaluate, given(args))
    try:
        # the device first: a bad one is one line, before any file or data is touched
        cuda = resolve_device(args.device or "auto").type == "cuda"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg, preset, why = resolve(given(args), args.preset, cuda)
        validate_config(cfg)
    except ValueError as e:
        p.error(str(e))         # a flag's value: argparse's usage and message, exit 2
    if args.print_config:       # the recipe as resolved; what only a run needs is not checked
        print(json.dumps({"preset": preset, **dataclasses.asdict(cfg)}, indent=2))
        return 0
    try:
        check_run_settings(cfg)
    except ValueError as e:     # a file or folder (OUT, --export, --init-weights): one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fastmix: {cfg.method} on {cfg.dataset}, arch {cfg.arch}, {cfg.epochs} epochs of "
          f"batch {cfg.batch_size}; preset {preset or 'none'} ({why}); out {cfg.out}",
          file=sys.stderr, flush=True)
    try:
        summary = train(cfg)
    except (DatasetError, CheckpointError, PermissionError, ImportError, ValueError) as e:
        # bad input found before or while setting up (OUT in use too): a clear message, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:
        if e.rank == 0:         # under torchrun every rank stops at the same step: one line
            print(f"{e}; resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:   # Ctrl-C while setting up (training stops after a step instead)
        print("interrupted (SIGINT) before training started: nothing to resume",
              file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        message = out_of_memory_message(e, cfg)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("method", "reported_head", "reported_top1_final",
                                                "reported_top1_median_last10", "wall_time_s")}))
    problems = unwritten_outputs(summary, cfg)
    for line in problems:       # the results are above; what is missing is the last word
        print(f"error: {line}", file=sys.stderr)
    return 4 if problems else 0


def unwritten_outputs(summary, cfg) -> list:
    """What the finished run could not write (``fastmix.engine.finish``), one line each."""
    problems = []
    ckpt = summary.get("checkpoint")
    if ckpt and ckpt["failed"] and not ckpt["written"]:
        problems.append(f"none of this run's {ckpt['failed']} checkpoint writes succeeded "
                        f"(last: {ckpt['last_error']}): {ckpt['path']} is not this run's state "
                        f"and the run cannot be resumed")
    if "export_error" in summary:
        problems.append(f"the export {cfg.export} was not written ({summary['export_error']})")
    if "summary_error" in summary:
        problems.append(f"{os.path.join(cfg.out, 'summary.json')} was not written "
                        f"({summary['summary_error']}); the results are in the JSON line on "
                        f"stdout and in metrics.jsonl")
    return problems


# torch: "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory", "not enough memory"
_OOM = re.compile(r"out of memory|can't allocate memory|not enough memory|Cannot allocate memory",
                  re.IGNORECASE)


def out_of_memory_message(e, cfg) -> str | None:
    """The one-line error for running out of memory (a MemoryError, torch's OutOfMemoryError or
    an allocator's RuntimeError), or None if ``e`` is something else."""
    if not (isinstance(e, MemoryError) or _OOM.search(str(e))):
        return None
    # the first line, less c10's "[enforce fail at alloc_cpu.cpp:127] err == 0." preamble
    lines = [re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", line.strip())
             for line in str(e).splitlines() if line.strip()]
    reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    gpu = "CUDA" in str(e)
    more = ("; or --amp bf16 and --channels-last true; or free the GPU (another process on it?)"
            if gpu else "")
    return (f"error: out of memory ({reason}): lower --batch-size (now {cfg.batch_size}; scale "
            f"--lr with it){more}. A run with another batch size starts afresh (--resume needs "
            f"the same one)")


def resume_command(argv) -> str:
    """The command line that continues this run from OUT/last.pt: ``argv`` less any --resume
    (and its value) and --overwrite, plus --resume."""
    kept, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if a.startswith("--resume=") or a == "--overwrite":
            i += 1
            continue
        kept.append(a)
        i += 1
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    name = os.path.basename(sys.argv[0])
    if name == "fastmix-train":     # the installed command: no interpreter to name
        launcher = ["torchrun", "<the same launch options>", "--no-python"] if distributed else []
        return " ".join(launcher + [shlex.join(["fastmix-train", *kept, "--resume"])])
    if name == "train_cli.py":      # python -m fastmix.train_cli
        script = ["-m", "fastmix.train_cli"]
    else:
        script = [sys.argv[0] if name == "train.py" else "train.py"]
    launcher = ["torchrun", "<the same launch options>"] if distributed else ["python"]
    return " ".join(launcher + [shlex.join([*script, *kept, "--resume"])])


if __name__ == "__main__":
    sys.exit(main())
