"""What a run writes beside metrics.jsonl: ``--log tensorboard,csv`` and ``--save-best``.

``RunLoggers``: each epoch's metrics.jsonl record, flattened (``losses/loss``, ``lr/main``,
``top1/one_k``, ``val_top1/one_k``, ``images_per_s``...), as TensorBoard scalars in OUT/tb/
(``torch.utils.tensorboard.SummaryWriter``, the global step = the epoch; the mix grid as an
image when ``--grid-every`` draws one) and as the rows of OUT/metrics.csv. ``BestKeeper``:
OUT/best.pt (and the top-k OUT/best-<epoch>.pt) by the metric ``--best-metric`` names.

Both follow the run's history (the checkpoint's, on resume), as metrics.jsonl does: a resumed
run continues them without a repeated or an orphaned epoch (one that a killed run logged after
its last checkpoint, and that the resumed run trains again).
"""
import csv
import io
import math
import os
import re
import sys
from dataclasses import asdict

import torch

from fastmix.checkpoint import atomic_save, atomic_write, write_or_warn
from fastmix.config import best_metric, log_targets

CSV_NAME = "metrics.csv"
TB_DIR = "tb"
BEST_NAME = "best.pt"
_TOP_K = re.compile(r"^best-(\d+)\.pt$")


def flatten(record, prefix=""):
    """A metrics.jsonl record as ``{"losses/loss": v, "top1/one_k": v, ...}`` (nested keys
    joined with ``/``, in the record's order)."""
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = v
    return flat


def csv_text(records):
    """The CSV of ``records`` (metrics.jsonl records): a header of the flattened keys in the
    order they first appear, one row per record, an empty cell for a key a record lacks (top-1
    on an epoch that is not evaluated) or a value that is not finite (null in metrics.jsonl)."""
    rows = [flatten(r) for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(k) is None or (isinstance(row[k], float)
                                                      and not math.isfinite(row[k]))
                         else row[k] for k in columns])
    return buf.getvalue()


def grid_images(dataset, device, n=8, channels_last=False):
    """The first ``n`` test images, normalised as the model sees them (what
    ``fastmix.visualize.save_mix_grid`` draws)."""
    x = dataset.images[:n].float().to(device)
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1) * 255
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class RunLoggers:
    """``--log``: TensorBoard (OUT/tb/) and/or CSV (OUT/metrics.csv), written on rank 0.

    The CSV is rewritten whole (atomically) from the history each epoch: its columns can grow
    (a validation or EMA head, top-1 on the last epochs only) and a resumed run's file holds
    the checkpoint's epochs, each once. TensorBoard appends to a new event file: on resume it
    starts with ``purge_step`` = the first epoch not done, so readers drop what an earlier,
    killed process logged from that epoch on; an OUT/tb/ without event files (``--log
    tensorboard`` added on resume) first gets the history's epochs.
    """

    def __init__(self, cfg, rank, history):
        self.cfg = cfg
        targets = log_targets(cfg.log) if rank == 0 else []
        self.csv_path = os.path.join(cfg.out, CSV_NAME) if "csv" in targets else None
        self.rows = [dict(r) for r in history]
        self.writer = None
        if self.csv_path:
            self._write_csv()
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter
            folder = os.path.join(cfg.out, TB_DIR)
            earlier = os.path.isdir(folder) and any(f.startswith("events.out.tfevents.")
                                                    for f in os.listdir(folder))
            done = history[-1]["epoch"] if history else 0
            self.writer = SummaryWriter(folder, purge_step=done + 1 if earlier else None)
            if not earlier:
                for record in history:
                    self._scalars(record)
                self.writer.flush()

    def _write_csv(self):
        write_or_warn(self.csv_path, csv_text(self.rows), "the CSV log",
                      "the next epoch rewrites it")

    def _scalars(self, record):
        epoch = record["epoch"]
        for tag, value in flatten(record).items():
            if tag != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, epoch)

    def write(self, record, model, test_set, device):
        """Log one epoch's record (and, for TensorBoard, the mix grid of an epoch that
        ``--grid-every`` draws one for)."""
        if self.csv_path:
            self.rows.append(dict(record))
            self._write_csv()
        if self.writer is None:
            return
        cfg, epoch = self.cfg, record["epoch"]
        self._scalars(record)
        if cfg.grid_every and epoch % cfg.grid_every == 0 and hasattr(model, "mix_block") \
                and test_set is not None:
            from fastmix.visualize import mix_grid
            grid = mix_grid(model, grid_images(test_set, device, channels_last=cfg.channels_last))
            self.writer.add_image("mix_grid", grid.clip(0, 1), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class BestKeeper:
    """``--save-best``: OUT/best.pt holds the model of the epoch with the highest metric
    (``fastmix.config.best_metric``; the earliest epoch on a tie) with the run's settings and
    ``best = {metric, epoch, value}``; with ``--keep-top-k K > 1`` the K best epochs are also
    kept as OUT/best-<epoch>.pt, and a file that drops out of the K is deleted. Rank 0 writes.

    Called before the epoch's last.pt is written, so a run killed in between trains that epoch
    again on resume and rewrites the files it touched. On resume the kept epochs are those of
    the history whose files are there; a best-<epoch>.pt of an epoch not in the history (a
    killed run's) is deleted. A failed write is a warning (the run goes on, the files kept
    before stay).
    """

    def __init__(self, cfg, model, rank, history):
        self.cfg, self.model = cfg, model
        self.enabled = bool(cfg.save_best) and rank == 0
        self.split, self.head = best_metric(cfg, model.default_head)
        self.metric = f"{self.split}/{self.head}"
        self.k = cfg.keep_top_k
        self.kept = []      # [(value, epoch)], best first
        if rank != 0:
            return
        if not history and cfg.overwrite and not cfg.resume:
            # a fresh start over an earlier run: its best files go with its other files
            for name in self._files():
                os.unlink(os.path.join(cfg.out, name))
        if self.enabled:
            self._restore(history)

    def _files(self):
        return [f for f in os.listdir(self.cfg.out) if f == BEST_NAME or _TOP_K.match(f)]

    def _path(self, epoch=None):
        return os.path.join(self.cfg.out, BEST_NAME if epoch is None else f"best-{epoch}.pt")

    def value(self, record):
        """The metric of a metrics.jsonl record; None where the epoch was not evaluated or the
        value is not finite."""
        v = record.get(self.split, {}).get(self.head)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def _order(self, entries):
        return sorted(entries, key=lambda e: (-e[0], e[1]))

    def _recorded(self):
        """best.pt's ``best`` record; {} when it is absent or unreadable."""
        try:
            state = torch.load(self._path(), map_location="cpu", weights_only=True, mmap=True)
            return state.get("best", {}) if isinstance(state, dict) else {}
        except Exception:
            return {}

    def _restore(self, history):
        values = {r["epoch"]: self.value(r) for r in history}
        values = {e: v for e, v in values.items() if v is not None}
        recorded = self._recorded() if os.path.exists(self._path()) else {}
        if self.k > 1:
            found = {int(_TOP_K.match(f).group(1)) for f in self._files() if f != BEST_NAME}
            self.kept = self._order([(values[e], e) for e in found if e in values])[:self.k]
            for e in found - {e for _, e in self.kept}:
                os.unlink(self._path(e))
            top = self.kept[0][1] if self.kept else None
            if top is not None and (recorded.get("epoch"), recorded.get("metric")) \
                    != (top, self.metric):
                # best.pt is of an epoch this resume trains again: back to the best kept
                with open(self._path(top), "rb") as f:
                    atomic_write(self._path(), f.read())
        elif recorded.get("metric") == self.metric and recorded.get("epoch") in values:
            self.kept = [(values[recorded["epoch"]], recorded["epoch"])]
        # else: best.pt (if any) is of an epoch not in the history or of another metric; the
        # next evaluated epoch replaces it

    def update(self, record, step):
        """Consider the epoch of ``record`` (the epoch just trained and evaluated)."""
        if not self.enabled:
            return
        value, epoch = self.value(record), record["epoch"]
        if value is None:
            return
        kept = self._order(self.kept + [(value, epoch)])[:self.k]
        if (value, epoch) not in kept:
            return
        state = {"model": self.model.state_dict(), "config": asdict(self.cfg), "epoch": epoch,
                 "batch": 0, "step": step,
                 "best": {"metric": self.metric, "epoch": epoch, "value": value}}
        try:
            if self.k > 1:
                atomic_save(state, self._path(epoch))
            if kept[0][1] == epoch:
                atomic_save(state, self._path())
        except OSError as e:
            print(f"warning: could not write the best checkpoint of epoch {epoch} ({e}); the "
                  f"best files kept before are intact", file=sys.stderr, flush=True)
            return
        if self.k > 1:
            for _, e in set(self.kept) - set(kept):
                os.unlink(self._path(e))
        self.kept = kept

    def summary(self):
        """``{"best": {metric, epoch, value, path, top_k}}`` for summary.json ({} without
        ``--save-best`` or before any evaluated epoch)."""
        if not self.enabled or not self.kept:
            return {}
        value, epoch = self.kept[0]
        best = {"metric": self.metric, "epoch": epoch, "value": value, "path": self._path(),
                "rule": "the highest value, the earliest epoch on a tie"}
        if self.k > 1:
            best["top_k"] = [{"epoch": e, "value": v, "path": self._path(e)} for v, e in self.kept]
        return {"best": best}
