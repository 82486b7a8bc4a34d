"""The training engine behind ``train.py``: build, train, evaluate, log.

Reads top to bottom: ``build_model`` -> ``build_optimizer`` -> ``train`` (epochs of
``train_one_epoch`` and ``evaluate``), writing ``OUT/metrics.jsonl`` (one JSON object per
epoch) and ``OUT/summary.json``.
"""
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.data import TensorLoader, load_dataset
from fastmix.mixup import BASELINES, MixupClassifier
from fastmix.schedules import cosine

METHODS = ("automix",) + BASELINES


@dataclass
class Config:
    method: str = "automix"
    arch: str = "resnet18_cifar"
    dataset: str = "fashion-mnist"
    data_dir: str = None
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.1
    min_lr: float = 0.0
    mb_lr: float = None           # Mix Block group; None: same as lr
    mb_min_lr: float = None       # None: same as min_lr
    mb_momentum: float = None     # None: same as momentum
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha: float = None           # None: 2.0 for AutoMix, 1.0 for Mixup, 0.2 for CutMix
    label_smoothing: float = 0.0
    ema_momentum: float = 0.999
    ema_end: float = 0.999999
    mask_loss_weight: float = 0.1
    mask_loss_mode: str = "L1"
    lam_margin: float = 0.08
    lam_concat: bool = False
    upsample: str = "nearest"
    mix_shuffle_no_repeat: bool = False
    train_subset: int = None
    test_subset: int = None
    device: str = "auto"
    seed: int = 0
    out: str = "runs/default"
    eager: bool = False
    progress: bool = True
    log_every: int = 50
    extra: dict = field(default_factory=dict)


DEFAULT_ALPHA = {"automix": 2.0, "mixup": 1.0, "cutmix": 0.2, "vanilla": 0.0}


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


def build_model(cfg: Config, in_chans, num_classes):
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    alpha = DEFAULT_ALPHA[cfg.method] if cfg.alpha is None else cfg.alpha
    backbone = build_backbone(cfg.arch, in_chans=in_chans)
    fused = False if cfg.eager else None
    if cfg.method == "automix":
        return AutoMix(backbone, num_classes, alpha=alpha, momentum=cfg.ema_momentum,
                       momentum_end=cfg.ema_end, mask_loss_weight=cfg.mask_loss_weight,
                       mask_loss_mode=cfg.mask_loss_mode, lam_margin=cfg.lam_margin,
                       lam_concat=cfg.lam_concat, upsample=cfg.upsample,
                       mix_shuffle_no_repeat=cfg.mix_shuffle_no_repeat,
                       label_smoothing=cfg.label_smoothing, seed=cfg.seed, fused=fused)
    return MixupClassifier(backbone, num_classes, method=cfg.method, alpha=alpha,
                           label_smoothing=cfg.label_smoothing, seed=cfg.seed, fused=fused)


def build_optimizer(cfg: Config, model):
    """SGD with two parameter groups: the Mix Block (its own lr schedule, spec §2.3) and the rest.

    Frozen parameters (the momentum encoder and its heads) are left out. Weight decay applies
    to every trainable parameter, BN and biases included, as in the official configs.
    """
    mb = set(id(p) for p in model.mix_block.parameters()) if isinstance(model, AutoMix) else set()
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in mb]
    groups = [dict(params=main, name="main", base_lr=cfg.lr, min_lr=cfg.min_lr,
                   momentum=cfg.momentum)]
    if mb:
        groups.append(dict(params=[p for p in model.mix_block.parameters() if p.requires_grad],
                           name="mix_block",
                           base_lr=cfg.lr if cfg.mb_lr is None else cfg.mb_lr,
                           min_lr=cfg.min_lr if cfg.mb_min_lr is None else cfg.mb_min_lr,
                           momentum=cfg.momentum if cfg.mb_momentum is None else cfg.mb_momentum))
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_epoch_lr(optimizer, epoch, epochs):
    """mmcv ``CosineAnnealing(by_epoch=True)``: each group from base_lr to its own min_lr."""
    for g in optimizer.param_groups:
        g["lr"] = cosine(g["base_lr"], g["min_lr"], epoch / epochs)


@torch.no_grad()
def evaluate(model, loader):
    """Top-1 accuracy (%) of every head of ``model`` on ``loader``."""
    model.eval()
    correct, total, names = None, 0, None
    for x, y in loader:
        logits = model.predict(x)
        names = list(logits)
        hits = torch.stack([(v.argmax(1) == y).sum() for v in logits.values()])
        correct = hits if correct is None else correct + hits
        total += y.shape[0]
    model.train()
    return {k: 100.0 * float(c) / total for k, c in zip(names, correct.tolist())}


def train_one_epoch(model, optimizer, loader, step, total_steps, progress=None, log_every=50):
    """One epoch; returns (next step, mean of every logged value, images/s).

    Nothing is read from the device inside the step: logged values are summed on the device
    and read at the end of the epoch (and every ``log_every`` steps for the progress bar).
    """
    model.train()
    sums, count, images = {}, 0, 0
    start = time.perf_counter()
    for x, y in loader:
        loss, logs = model.forward_train(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step(step, total_steps)
        step += 1
        count += 1
        images += x.shape[0]
        for k, v in logs.items():
            sums[k] = sums[k] + v if k in sums else v
        sums["loss"] = sums["loss"] + loss.detach() if "loss" in sums else loss.detach()
        if progress is not None:
            progress.update(1)
            if count % log_every == 0:
                progress.set_postfix(loss=f"{float(sums['loss']) / count:.3f}")
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    means = {k: float(v) / max(count, 1) for k, v in sums.items()}
    return step, means, images / max(elapsed, 1e-9)


def summarize(history, model, cfg, wall_time):
    """Final and median-of-last-10 top-1 per head, and the head reported with its rule."""
    heads = list(model.head_names)
    last = history[-10:]
    median = {h: statistics.median(r["top1"][h] for r in last) for h in heads}
    final = dict(history[-1]["top1"])
    if len(heads) == 1:
        reported, rule = heads[0], "the only head"
    else:
        reported = max(heads, key=lambda h: median[h])
        rule = ("best median-of-last-10 top-1 over the four heads (the authors' rule, "
                "find_automix_val_median.py); inference model: one_k")
    return {"method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset, "epochs": cfg.epochs,
            "seed": cfg.seed, "final_top1": final, "median_last10_top1": median,
            "reported_head": reported, "reported_rule": rule,
            "reported_top1_final": final[reported], "reported_top1_median_last10": median[reported],
            "wall_time_s": wall_time, "config": asdict(cfg)}


def train(cfg: Config):
    """Train ``cfg`` end to end; returns the summary dict (also written to OUT/summary.json)."""
    if cfg.epochs <= 0:
        raise ValueError(f"epochs must be positive, got {cfg.epochs}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_set = load_dataset(cfg.dataset, cfg.data_dir, train=True).subset(cfg.train_subset, cfg.seed)
    test_set = load_dataset(cfg.dataset, cfg.data_dir, train=False).subset(cfg.test_subset, cfg.seed)
    train_loader = TensorLoader(train_set, cfg.batch_size, device, train=True, seed=cfg.seed)
    test_loader = TensorLoader(test_set, max(cfg.batch_size, 256), device, train=False)
    model = build_model(cfg, train_set.images.shape[1], train_set.num_classes).to(device)
    optimizer = build_optimizer(cfg, model)

    os.makedirs(cfg.out, exist_ok=True)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    open(metrics_path, "w").close()
    total_steps = cfg.epochs * len(train_loader)
    step, history, t0 = 0, [], time.perf_counter()
    progress = None
    if cfg.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        set_epoch_lr(optimizer, epoch, cfg.epochs)
        train_loader.set_epoch(epoch)
        step, losses, ips = train_one_epoch(model, optimizer, train_loader, step, total_steps,
                                            progress, cfg.log_every)
        top1 = evaluate(model, test_loader)
        record = {"epoch": epoch + 1, "step": step,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "losses": losses, "top1": top1, "images_per_s": ips,
                  "elapsed_s": time.perf_counter() - t0}
        if isinstance(model, AutoMix):
            record["ema_momentum"] = model.ema_momentum(step - 1, total_steps)
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if progress is not None:
            progress.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {losses['loss']:.3f}  " +
                           "  ".join(f"{k} {v:.2f}" for k, v in top1.items()) +
                           f"  {ips:.0f} img/s")
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}: {losses}")
    if progress is not None:
        progress.close()
    summary = summarize(history, model, cfg, time.perf_counter() - t0)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
