#!/usr/bin/env python
"""The CPU main job with and without ``--compile``, end to end, in one run.

Runs ``train.py`` twice with the same arguments (default: the main job, ``make train``'s
``cpu-small`` preset on Fashion-MNIST), once with ``--no-compile`` and once with ``--compile``
(Inductor's C++ backend), and reports wall time (including compile time and evaluation),
training images/s (median epoch) and top-1, as a markdown table. Run it alone: two heavy jobs on
two cores slow each other several times over.

    python bench/compile_cpu.py [--epochs N] [--out runs/compile-cpu] [-- extra train.py flags]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(flag, out, extra, epochs):
    cmd = [sys.executable, "train.py", "--preset", "cpu-small", "--device", "cpu", "--out", out,
           "--overwrite", "--no-progress", flag] + (["--epochs", str(epochs)] if epochs else []) \
        + extra
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    summary = json.load(open(os.path.join(out, "summary.json")))
    epochs_log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"flag": flag, "command": " ".join(cmd[1:]), "process_wall_s": wall,
            "train_wall_s": summary["wall_time_s"],
            "images_per_s_median_epoch": statistics.median(r["images_per_s"] for r in epochs_log),
            "images_per_s_first_epoch": epochs_log[0]["images_per_s"],
            "top1": summary["reported_top1_final"], "head": summary["reported_head"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--out", default="runs/compile-cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra train.py flags")
    args = ap.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    rows = [run(flag, os.path.join(args.out, flag.strip("-")), extra, args.epochs)
            for flag in ("--no-compile", "--compile")]
    print("| train.py | process wall (s) | training wall (s) | img/s, median epoch | "
          "img/s, first epoch | top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['flag']}` | {r['process_wall_s']:.0f} | {r['train_wall_s']:.0f} | "
              f"{r['images_per_s_median_epoch']:.0f} | {r['images_per_s_first_epoch']:.0f} | "
              f"{r['top1']:.2f} ({r['head']}) |")
    ratio = rows[0]["process_wall_s"] / rows[1]["process_wall_s"]
    print(f"\nend-to-end speed-up of --compile: {ratio:.2f}x (>1: compile is faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "speedup_end_to_end": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
