#!/usr/bin/env python
"""Train a classifier with AutoMix (or the Mixup, CutMix and vanilla baselines).

    python train.py --help

The trainer is ``fastmix.train_cli`` (installed as the ``fastmix-train`` command); this script
runs it from a source checkout, with the same flags, outputs and exit statuses.
"""
import sys

from fastmix.train_cli import *  # noqa: F401,F403  (train.parser, train.main, ... as before)
from fastmix.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
