"""Smoke test of bench/train_step.py: every configuration runs a step and prints its row."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402


def test_train_step_bench_prints_every_configuration(capsys):
    assert train_step.main(["--quick", "--steps", "1", "--warmup", "1", "--repeats", "1",
                            "--methods", "automix,cutmix"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| resnet_small")]
    timed = {(r[3].strip(), r[4].strip()): float(r[5]) for r in rows if "step time" not in r[3]}
    assert set(timed) == {(m, c) for m in ("automix", "cutmix") for c in train_step.CPU_CONFIGS}
    assert all(math.isfinite(ms) and ms > 0 for ms in timed.values())
