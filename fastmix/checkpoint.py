"""Checkpoints: atomic writes, safe loads, the resume checks, RNG state, export.

A checkpoint is written to a temporary file in the same folder, fsync'ed and renamed over the
old one, so a crash leaves either the old or the new file; it is loaded with
``torch.load(weights_only=True)``, so it can hold tensors and plain data, never code.
"""
import os
import tempfile
from dataclasses import asdict

import torch

from fastmix.backbones import classifier_state_dict

TMP_PREFIX = ".tmp-"


def unwritable_reason(folder):
    """None if ``folder`` exists and is writable, or can be made: its nearest existing ancestor
    is a writable folder; else why not (checked before any work, never by writing)."""
    nearest = os.path.abspath(folder)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        return f"{nearest} is a file"
    if not os.access(nearest, os.W_OK):
        return f"{nearest} is not writable"
    return None


def remove_stale_temporaries(folder, name):
    """Delete the temporary files an interrupted ``atomic_save`` of ``folder/name`` left behind
    (a kill -9 mid-write cannot clean up after itself); returns their paths."""
    gone = []
    for entry in os.scandir(folder):
        if entry.name.startswith(TMP_PREFIX + name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            gone.append(entry.path)
    return gone


def atomic_save(obj, path):
    """Write ``path`` so that a crash at any moment leaves either the old or the new file:
    a temporary file in the same folder, flushed and fsync'ed, then renamed over the target."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch.save's zip writer reports a failed write (ENOSPC, EFBIG, EIO) as a
                # RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ...")
                raise OSError(f"writing {tmp} failed: {str(e).splitlines()[0]}") from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or from another configuration."""


def load_checkpoint(path):
    """``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain data only,
    never code. Any read failure names the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message for a refused object advises weights_only=False, i.e. to run the
        # file's code: keep only the reason.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()
                 and "weights_only" not in line and not line.startswith("Check the documentation")]
        reason = (lines or ["refused by torch.load(weights_only=True)"])[0][:300]
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, corrupt, or not a "
                              f"checkpoint of plain tensors and data): {type(e).__name__}: "
                              f"{reason}") from None


TRAINING_KEYS = ("model", "optimizer", "scaler", "epoch", "batch", "step", "history", "partial",
                 "rng", "world", "config")
# Settings a resumed run may change: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "data_dir", "device", "progress", "log_every",
                     "checkpoint_every", "grid_every", "export", "export_head", "max_bad_steps",
                     "workers", "compile", "eager", "selfcheck", "cuda_graphs", "optimizer_impl"}


def load_training_checkpoint(path, cfg, world):
    """A training checkpoint for resuming ``cfg``: refused, naming the file, when it is not a
    fastmix training checkpoint, was written by another number of processes, or by another
    configuration (any setting outside ``RESUME_MAY_CHANGE``)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or any(k not in state for k in TRAINING_KEYS):
        what = (f"a dict with keys {sorted(state)[:8]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise CheckpointError(f"{path} is not a fastmix training checkpoint (it holds {what}); "
                              f"--resume takes the OUT/last.pt that train.py writes")
    if state["world"] != world:
        raise CheckpointError(f"checkpoint {path} was written by a run of {state['world']} "
                              f"process(es); this run has {world}")
    saved, now = state["config"], asdict(cfg)
    diff = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now
            if k not in RESUME_MAY_CHANGE and saved.get(k, now[k]) != now[k]]
    if diff:
        raise CheckpointError(f"checkpoint {path} does not fit this configuration: "
                              f"{'; '.join(diff)}. Resume with the settings it was written with, "
                              f"or start afresh in another --out")
    return state


def rng_states(model):
    state = {"torch": torch.get_rng_state(), "method": model.rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(model, state):
    torch.set_rng_state(state["torch"])
    model.load_rng_state(state["method"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_classifier(model, path, head=None):
    """Write the chosen encoder + head as the state dict of the plain classifier it is
    (``fastmix.backbones.classifier_state_dict``), loadable with ``strict=True`` and no key
    renamed, without fastmix, giving the same logits as ``model.predict(x)[head]``:
    ``timm.create_model(name, num_classes=K)`` for ``timm:<name>`` (the head under timm's
    classifier name), ``torchvision.models.<arch>(num_classes=K)`` for the ImageNet-stem
    ResNets, the wrapped model for a ``FeatureTap`` (the head under its ``classifier`` name),
    and for fastmix's CIFAR ResNets and WideResNets the backbone keys + ``fc.*``
    (``fastmix.backbones.PlainClassifier``). Returns the head's name."""
    head = head or model.default_head
    backbone, cls_head = (model.inference_model(head) if len(model.head_names) > 1
                          else model.inference_model())
    atomic_save(classifier_state_dict(backbone, cls_head), path)
    return head
