#!/usr/bin/env python
"""Accuracy study: AutoMix against Mixup, CutMix and vanilla on one trainer, over seeds.

    python bench/accuracy.py --help

The study driver is ``fastmix.study`` (installed as the ``fastmix-study`` command); this script
runs it from a source checkout with the same flags and outputs, and results.json records the
command as ``python bench/accuracy.py ...``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastmix import study as _study  # noqa: E402
from fastmix.study import *  # noqa: E402,F401,F403  (parse_args, run_argv, aggregate, ...)
from fastmix.study import (_die_with_parent, _online_ema_groups, _pm, _portable,  # noqa: E402,F401
                           _write_json)

COMMAND = "python bench/accuracy.py"   # how results.json records this script's runs


def main(argv=None):
    """``fastmix.study.main`` with this script's command in the results' provenance."""
    return _study.main(argv, command=COMMAND)


if __name__ == "__main__":
    main()
