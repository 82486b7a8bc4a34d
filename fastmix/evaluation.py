"""``train.py --evaluate CKPT``: a checkpoint's top-1 per head, without training.

The model and the data are rebuilt from the settings the checkpoint was written with (its
``config``); only where the evaluation runs may be set on the command line
(``EVALUATE_MAY_SET``). Nothing is written: no run folder is claimed, no self-check report.
"""
import dataclasses
import json
import sys

import torch

from fastmix.checkpoint import CheckpointError, load_checkpoint
from fastmix.config import config_from_dict, validate_config

# Where and how the evaluation runs, not what it measures: the flags --evaluate takes.
EVALUATE_MAY_SET = ("device", "data_dir", "workers", "loader", "decoder", "eager",
                    "verify_images")


def load_for_evaluation(path):
    """``(state, Config)`` of a checkpoint that ``train.py`` wrote (OUT/last.pt, OUT/best.pt):
    a ``CheckpointError`` naming the file when it is missing, unreadable, or holds no model
    with its settings."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("config"), dict):
        what = (f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise CheckpointError(f"{path} is not a fastmix checkpoint with a model and its settings "
                              f"(it holds {what}); --evaluate takes the OUT/last.pt or "
                              f"OUT/best.pt that train.py writes")
    try:
        cfg = config_from_dict(state["config"])
    except TypeError as e:
        raise CheckpointError(f"{path}: its settings do not make a configuration ({e})") from None
    return state, cfg


def evaluate_checkpoint(path, flags=None):
    """Evaluate every head of the checkpoint at ``path`` on its run's test split (and
    validation split, if it had one); ``flags``: settings given on the command line, of
    which those in ``EVALUATE_MAY_SET`` apply. Returns ``{"checkpoint", "epoch", "method",
    "arch", "dataset", "inference_head", "top1": {head: %}[, "val_top1": {head: %}]}``."""
    from fastmix.engine import build_data, build_model, evaluate
    from fastmix.runtime import resolve_device
    flags = flags or {}
    state, cfg = load_for_evaluation(path)    # before any data is read
    # the checkpoint's device is where it trained: here it is --device, else auto
    cfg = dataclasses.replace(cfg, **{"device": "auto", **{k: flags[k] for k in EVALUATE_MAY_SET
                                                          if k in flags}},
                              init_weights=None, resume=None, export=None, evaluate=None,
                              progress=False)
    validate_config(cfg)
    device = resolve_device(cfg.device)
    _, val_loader, test_loader, _, in_chans, num_classes = build_data(cfg, device)
    model = build_model(cfg, in_chans, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model its settings build on "
                              f"this data ({num_classes} classes, {in_chans} channels): "
                              f"{str(e)[:300]}") from None
    result = {"checkpoint": path, "epoch": state.get("epoch"), "method": cfg.method,
              "arch": cfg.arch, "dataset": cfg.dataset, "inference_head": model.default_head,
              "top1": evaluate(model, test_loader)}
    if val_loader is not None:
        result["val_top1"] = evaluate(model, val_loader)
    return result


def eval_table(result):
    """The result of ``evaluate_checkpoint`` as a readable table (one row per head)."""
    splits = [("top1", "test top-1 %")] + ([("val_top1", "val top-1 %")]
                                           if "val_top1" in result else [])
    heads = list(result["top1"])
    names = [h + (" (inference)" if h == result["inference_head"] and len(heads) > 1 else "")
             for h in heads]
    width = max(len("head"), *map(len, names))
    lines = [f"{result['checkpoint']}: {result['method']}, {result['arch']} on "
             f"{result['dataset']}, after epoch {result['epoch']}",
             f"{'head':<{width}}" + "".join(f"  {title:>13}" for _, title in splits)]
    for head, name in zip(heads, names):
        lines.append(f"{name:<{width}}" + "".join(f"  {result[key][head]:>13.2f}"
                                                  for key, _ in splits))
    return "\n".join(lines)


def evaluate_main(path, flags):
    """``train.py --evaluate``: the JSON line on stdout (``{"top1": {head: %}, ...}``, see
    ``evaluate_checkpoint``), the table on stderr; 0, or 2 with one error line for a
    missing, corrupt or unfitting checkpoint or unusable data."""
    from fastmix.data import DatasetError
    ignored = sorted(k for k in flags if k not in EVALUATE_MAY_SET + ("evaluate", "progress"))
    if ignored:
        print(f"warning: --evaluate uses the checkpoint's settings; ignored: "
              f"{', '.join('--' + k.replace('_', '-') for k in ignored)}", file=sys.stderr)
    try:
        result = evaluate_checkpoint(path, flags)
    except (CheckpointError, DatasetError, ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(eval_table(result), file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0
