"""The training loop behind ``train.py``, top to bottom.

``train(cfg)``: check the settings -> lock OUT -> (load the checkpoint to resume) -> claim OUT ->
data -> model and optimizer -> (restore) -> the step -> for each epoch: train steps, evaluate,
log, checkpoint -> summary. Every file of the run is written atomically (``fastmix.checkpoint.
atomic_write``); a failed write is a warning and the run goes on. SIGTERM/SIGINT stop the run
after the current step with a checkpoint (``StopSignals``, ``RunStopped``). Settings live in
``fastmix.config``, devices and processes in ``fastmix.runtime``, checkpoints in
``fastmix.checkpoint``, the step in ``fastmix.step``.
"""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict

import torch

from fastmix.backbones import build_backbone, load_torchvision_weights, parse_timm_kwargs
from fastmix.checkpoint import (CheckpointError, OutInUseError, atomic_save,  # noqa: F401
                                export_classifier, load_checkpoint, load_training_checkpoint,
                                lock_out, os_error_text, remove_stale_temporaries, rng_states,
                                set_rng_states, unwritable_reason, write_or_warn)
from fastmix.config import DEFAULT_ALPHA, METHODS, Config, validate_config  # noqa: F401
from fastmix.config import setting_warnings
from fastmix.data import TensorLoader, load_dataset
from fastmix.functional import FUSED_OPS, set_op_paths, use_fused
from fastmix.loggers import CSV_NAME, TB_DIR, BestKeeper, RunLoggers
from fastmix.provenance import environment
from fastmix.methods import method_class
from fastmix.runtime import autocast_context, init_distributed, resolve_device, resolve_runtime
from fastmix.schedules import cosine
from fastmix.step import (CUDAGraphStep, NonFiniteLossError, StepGuard, TrainStep,  # noqa: F401
                          init_momentum_buffers)


# ---- building ----------------------------------------------------------------------------------
def build_model(cfg: Config, in_chans, num_classes, seed=None):
    """The method's model (``fastmix.methods``: each class builds itself from the settings)."""
    cls = method_class(cfg.method)
    alpha = cls.default_alpha if cfg.alpha is None else cfg.alpha
    backbone = build_backbone(cfg.arch, in_chans=in_chans, mask_layer=cfg.mask_layer,
                              timm_kwargs=parse_timm_kwargs(cfg.timm_kwargs),
                              mask_tap=cfg.mask_tap)
    if cfg.init_weights not in (None, "none"):
        # before AutoMix copies the backbone into its momentum encoder: both start from them
        load_torchvision_weights(backbone, cfg.init_weights)
    fused = False if cfg.eager else None
    seed = cfg.seed if seed is None else seed
    return cls.build(cfg, backbone, num_classes, alpha, seed=seed, fused=fused)


def no_weight_decay_names(model):
    """Full names of the parameters the official ViT recipes keep out of weight decay beyond
    norms and biases: whatever each timm network's ``no_weight_decay()`` names (a ViT's
    ``cls_token``/``pos_embed``, Swin's relative position tables), found at any depth."""
    names = set()
    for prefix, module in model.named_modules():
        nwd = getattr(module, "no_weight_decay", None)
        if callable(nwd) and isinstance(module, torch.nn.Module):
            names.update(f"{prefix}.{n}" if prefix else n for n in nwd())
    return names


def build_optimizer(cfg: Config, model, fused=False):
    """SGD (or AdamW) with two parameter groups: the Mix Block (its own lr schedule, spec
    §2.3) and the rest.

    Frozen parameters (the momentum encoder and its heads) are left out. With SGD, weight decay
    applies to every trainable parameter, BN and biases included, as in the official CNN
    configs. With ``--optimizer adamw`` (the official ViT configs) each group splits in two:
    norms, biases (every parameter of at most one dimension) and the tokens and tables timm's
    ``no_weight_decay()`` names get no weight decay; the Mix Block's conv weights keep it.
    Each group carries ``base_lr``, ``min_lr`` and ``warmup`` (the main group's lr warms up,
    the Mix Block's does not).
    """
    mix_block = getattr(model, "mix_block", None)
    mb = set(id(p) for p in mix_block.parameters()) if mix_block is not None else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [(n, p) for n, p in named if id(p) not in mb]
    groups = [dict(params=main, name="main", base_lr=cfg.lr, lr=cfg.lr, min_lr=cfg.min_lr,
                   momentum=cfg.momentum, warmup=True)]
    if mb:
        mb_lr = cfg.lr if cfg.mb_lr is None else cfg.mb_lr
        groups.append(dict(params=[(n, p) for n, p in named if id(p) in mb],
                           name="mix_block", base_lr=mb_lr, lr=mb_lr,
                           min_lr=cfg.min_lr if cfg.mb_min_lr is None else cfg.mb_min_lr,
                           momentum=cfg.momentum if cfg.mb_momentum is None else cfg.mb_momentum,
                           warmup=False))
    if cfg.optimizer == "adamw":
        skip = no_weight_decay_names(model)
        split = []
        for g in groups:
            decay = [p for n, p in g["params"] if p.ndim > 1 and n not in skip]
            no_decay = [p for n, p in g["params"] if p.ndim <= 1 or n in skip]
            del g["momentum"]
            split += [dict(g, params=ps, weight_decay=wd)
                      for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
        if cfg.optimizer_impl != "torch":
            raise ValueError("--optimizer adamw is torch's fused AdamW (--optimizer-impl torch)")
        # fused: one multi-tensor update that honours found_inf (a skipped step leaves the
        # moments and the step count as they were)
        return torch.optim.AdamW(split, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=fused)
    for g in groups:
        g["params"] = [p for _, p in g["params"]]
    if cfg.optimizer_impl == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError as e:
            raise ValueError("--optimizer-impl apex needs NVIDIA apex, which is not importable "
                             "here; use --optimizer-impl torch (fused=True on CUDA)") from e
        # apex's FusedSGD ignores found_inf: TrainStep skips a NaN/Inf step on the host (one
        # read of the finite flag a step) and --cuda-graphs refuses it (fastmix.config).
        return init_momentum_buffers(FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay))
    if cfg.optimizer_impl != "torch":
        raise ValueError(f"optimizer_impl must be torch or apex, got {cfg.optimizer_impl!r}")
    # fused=True: one multi-tensor kernel for the whole update; it also honours ``found_inf``,
    # which is how a non-finite step is skipped without a host sync (CPU and CUDA alike).
    # The momentum buffers start as zeros: a skipped first step must not leave them
    # uninitialised (fastmix.step.init_momentum_buffers).
    return init_momentum_buffers(torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                 weight_decay=cfg.weight_decay, fused=fused))


def build_training(cfg: Config, device, in_chans, num_classes, rank=0):
    """The model (on ``device``, channels-last if asked) with its optimizer and grad scaler."""
    model = build_model(cfg, in_chans, num_classes, seed=cfg.seed + rank).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    return model, optimizer, scaler


def build_step(cfg: Config, model, optimizer, scaler, device, world=1, local=0, guard=True):
    """``(step_fn, guard)``: the training step ``train.py`` runs (``bench/train_step.py`` too).

    Compiles the backbones if ``cfg.compile``; wraps the model in DDP when ``world > 1``;
    ``--cuda-graphs`` gives a ``CUDAGraphStep``, otherwise the eager ``TrainStep``;
    ``guard=False`` leaves out the non-finite-step guard (the bench's stand-in for the
    official code)."""
    if cfg.compile:
        for name in ("backbone_q", "backbone_k", "backbone"):
            if hasattr(model, name):
                getattr(model, name).compile()
    step_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Per-GPU BatchNorm statistics (no SyncBN, no buffer broadcast), spec §6.11.
        step_model = DDP(model, device_ids=[local] if device.type == "cuda" else None,
                         broadcast_buffers=False)
    guard = StepGuard(model, device, enabled=guard)
    if cfg.cuda_graphs:
        return CUDAGraphStep(model, optimizer, guard,
                             lambda: autocast_context(cfg, device, False), device,
                             clip=cfg.clip_grad), guard
    return TrainStep(model, optimizer, guard, lambda: autocast_context(cfg, device), scaler,
                     step_model, clip=cfg.clip_grad), guard


def build_data(cfg: Config, device, rank=0, world=1):
    """``(train, val or None, test, test_set or None, in_channels, num_classes)``."""
    if cfg.dataset == "imagefolder":
        return _imagefolder_data(cfg, device, rank, world)
    train_set, val_set = load_dataset(cfg.dataset, cfg.data_dir, train=True).split(
        cfg.val_split, cfg.train_subset, cfg.data_seed)
    test_set = load_dataset(cfg.dataset, cfg.data_dir, train=False).subset(cfg.test_subset,
                                                                          cfg.data_seed)
    kw = dict(device=device, channels_last=cfg.channels_last, shard=(rank, world))
    train = TensorLoader(train_set, cfg.batch_size, train=True, seed=cfg.seed, **kw)
    evaluation = [None if s is None else TensorLoader(s, max(cfg.batch_size, 256), train=False, **kw)
                  for s in (val_set, test_set)]
    return (train, *evaluation, test_set, train_set.images.shape[1], train_set.num_classes)


def _imagefolder_data(cfg, device, rank, world):
    if cfg.val_split:
        raise ValueError("--val-split carves a validation set out of a tensor dataset; for "
                         "--dataset imagefolder hold one out on disk instead")
    from fastmix.data.imagefolder import build_imagefolder_loader, split_overlap
    # --workers 0: the main process loads the images, which the DataLoader loader does (not DALI)
    loader = "torchvision" if cfg.workers == 0 and cfg.loader == "auto" else cfg.loader
    kw = dict(loader=loader, decoder=cfg.decoder, pipeline=cfg.data_pipeline, device=device, size=cfg.image_size, seed=cfg.seed,
              shard=(rank, world), channels_last=cfg.channels_last, num_workers=cfg.workers,
              quiet=rank != 0, verify={"none": False}.get(cfg.verify_images, cfg.verify_images),
              max_image_pixels=cfg.max_image_pixels)
    train = build_imagefolder_loader(cfg.data_dir, "train", cfg.batch_size, True,
                                     subset=cfg.train_subset, **kw)
    test = build_imagefolder_loader(cfg.data_dir, "val", max(cfg.batch_size, 256), False,
                                    subset=cfg.test_subset, classes=train.classes, **kw)
    common = split_overlap(train.files, test.files)
    if common and rank == 0:
        print(f"warning: {len(common)} file(s) of {cfg.data_dir}/val are also in train (the same "
              f"file through links), e.g. {common[0]}: the validation accuracy is then not "
              f"measured on unseen images", file=sys.stderr)
    return train, None, test, None, 3, train.num_classes


# ---- the run folder ----------------------------------------------------------------------------
RUN_FILES = ("last.pt", "metrics.jsonl", "summary.json")


def check_run_settings(cfg: Config):
    """What would fail only once the run is under way (OUT, the export), checked at its start."""
    why = unwritable_reason(cfg.out)
    if why:
        raise ValueError(f"--out {cfg.out} is not writable ({why})")
    if cfg.export:
        folder = os.path.dirname(os.path.abspath(cfg.export))
        if os.path.isdir(cfg.export):
            raise ValueError(f"--export {cfg.export} is a folder; give a file path")
        in_new_out = folder == os.path.abspath(cfg.out)   # made by claim_out, checked above
        if not os.path.isdir(folder) and not in_new_out:
            raise ValueError(f"--export {cfg.export}: the folder {folder} does not exist")
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise ValueError(f"--export {cfg.export}: the folder {folder} is not writable")
    if cfg.init_weights == "required":
        raise ValueError(
            "this preset fine-tunes from ImageNet weights: pass --init-weights PATH (the "
            "torchvision state dict of the same architecture, e.g. torch.save(torchvision.models."
            "resnet18(weights='IMAGENET1K_V1').state_dict(), PATH) on a machine that can download "
            "it; fastmix never downloads), or --init-weights none to train from scratch (not the "
            "paper's recipe)")
    if cfg.init_weights not in (None, "none"):
        # the whole fit check (names and shapes) on a scratch backbone, before any data is read
        load_torchvision_weights(build_backbone(cfg.arch, mask_layer=cfg.mask_layer),
                                 cfg.init_weights)


def check_devices(cfg: Config, world, rank=0):
    """A preset's batch is per device for ``cfg.devices`` devices: say so when the run has
    another number (the learning rates were set for the recipe's total batch)."""
    if world != cfg.devices and rank == 0:
        print(f"warning: this recipe trains on {cfg.devices} device(s) x {cfg.batch_size} = "
              f"{cfg.devices * cfg.batch_size} images per step; this run has {world} x "
              f"{cfg.batch_size} = {world * cfg.batch_size} (the learning rates are the recipe's: "
              f"scale --lr/--mb-lr or --batch-size to match, or set --devices {world} to silence "
              f"this)", file=sys.stderr)


def warn_settings(cfg: Config, rank=0):
    """One warning line (rank 0) per setting that will do nothing in this run
    (``fastmix.config.setting_warnings``: --grid-every without a Mix Block or test images)."""
    if rank == 0:
        for line in setting_warnings(cfg):
            print(line, file=sys.stderr, flush=True)


def plan_epochs_change(state, cfg: Config, path, rank=0):
    """``--resume`` with another ``--epochs`` than the checkpoint's (a running or a finished
    run, extended or shortened): refused, naming the file, unless more epochs than those done;
    otherwise one line says so. Nothing else is needed: the cosine learning rate
    (``set_epoch_lr``), the EMA momentum and the mask-loss weight are functions of the epoch
    or step and the total, so they follow the new total from the first epoch trained on."""
    if state is None:
        return
    before, done = state["config"].get("epochs", cfg.epochs), state["epoch"]
    if before == cfg.epochs:
        return
    if cfg.epochs <= done:
        raise CheckpointError(f"--epochs {cfg.epochs}: the run in {path} has done {done} of "
                              f"{before} epochs; to extend it, give --epochs larger than {done}")
    if rank == 0:
        print(f"fastmix: {'extending' if cfg.epochs > before else 'shortening'} from {before} to "
              f"{cfg.epochs} epochs; the cosine schedule is re-planned from epoch {done + 1} on "
              f"(the EMA momentum and mask-loss weight schedules too, over the new number of "
              f"steps)", file=sys.stderr, flush=True)


def earlier_run_logs(out):
    """What an earlier run in OUT logged beside its RUN_FILES and --overwrite deletes with them,
    so that no log of that run is read as this one's: metrics.csv, tb/ (``--log``) and its mix
    grids (``--grid-every``). Its best checkpoints go in ``BestKeeper``."""
    return sorted(f for f in os.listdir(out)
                  if f in (CSV_NAME, TB_DIR) or re.fullmatch(r"mix_epoch\d{4,}\.png", f))


def claim_out(cfg: Config, rank=0):
    """Make OUT, refuse to start afresh over an earlier run unless ``overwrite`` (which deletes
    its files, so no later message can point at the old checkpoint), and delete temporary files
    that an interrupted write left behind (OUT is locked: no other run is writing them)."""
    os.makedirs(cfg.out, exist_ok=True)   # writable: check_run_settings made sure
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if earlier and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} holds an earlier run ({', '.join(earlier)}): continue "
                             f"it with --resume, start afresh with --overwrite (deletes those "
                             f"files), or choose another --out")
        if rank == 0:
            for f in earlier + earlier_run_logs(cfg.out):
                path = os.path.join(cfg.out, f)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    if rank == 0:
        for path in remove_stale_temporaries(cfg.out):
            print(f"removed {path}, left by an interrupted write", file=sys.stderr)


def json_safe(obj):
    """NaN and ±Inf (not JSON) become None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_line(record):
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


class Checkpointer:
    """Writes OUT/last.pt (rank 0; every rank's RNG state gathered under DDP). A failed write
    (disk full, quota, I/O error) is a warning naming the cause: training goes on and the old
    file stays. ``report()``: how many writes succeeded and failed (summary.json; a run none of
    whose checkpoints could be written cannot be resumed, and train.py exits 4)."""

    def __init__(self, cfg, model, optimizer, scaler, rank=0, world=1):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.rank, self.world = rank, world
        self.path = os.path.join(cfg.out, "last.pt")
        self.written, self.failed, self.last_error, self.last_ok = 0, 0, None, None

    def report(self):
        return {"path": self.path, "written": self.written, "failed": self.failed,
                "last_error": self.last_error}

    def save(self, epoch, batch, step, history, partial=None):
        rng = rng_states(self.model)
        if self.world > 1:
            import torch.distributed as dist
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if self.rank != 0:
            self.last_ok = True     # rank 0 writes it (and reports)
            return True
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epoch, "batch": batch,
                 "step": step, "history": history, "partial": partial, "rng": rng,
                 "world": self.world, "config": asdict(self.cfg)}
        try:
            atomic_save(state, self.path)
            self.written += 1
            self.last_ok = True
        except OSError as e:
            self.failed, self.last_error, self.last_ok = self.failed + 1, os_error_text(e), False
            print(f"warning: could not write checkpoint {self.path} ({self.last_error}); the "
                  f"previous checkpoint, if any, is intact", file=sys.stderr, flush=True)
        return self.last_ok


def restore(state, model, optimizer, scaler, rank, path):
    """Load a training checkpoint into the run; ``(epoch, batch, step, history, partial)``."""
    if state is None:
        return 0, 0, 0, [], None
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this configuration "
                              f"(method/arch/dataset changed?): {str(e)[:300]}") from e
    set_rng_states(model, state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    return state["epoch"], state["batch"], state["step"], state["history"], state["partial"]


# ---- one epoch, evaluation, summary ----------------------------------------------------------
def set_epoch_lr(optimizer, epoch, epochs):
    """mmcv ``CosineAnnealing(by_epoch=True)``: each group from base_lr to its own min_lr."""
    for g in optimizer.param_groups:
        g["lr"] = cosine(g["base_lr"], g["min_lr"], epoch / epochs)


def step_lr(base, final, step, total_steps, warmup_steps=0, warmup_ratio=1e-5):
    """mmcv ``CosineAnnealing(by_epoch=False)`` with its linear warm-up: the cosine from
    ``base`` to ``final`` at ``step / total_steps``, times ``1 - (1 - step / W)(1 - ratio)``
    while ``step < W`` (the official ViT recipes; the Mix Block's scheduler has no warm-up)."""
    lr = cosine(base, final, step / total_steps)
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


class StepLR:
    """``--lr-schedule step``: every group's lr set before each step (host floats only: no
    sync; a captured step copies them into its static lr tensors)."""

    def __init__(self, optimizer, cfg: Config, steps_per_epoch):
        self.optimizer, self.ratio = optimizer, cfg.warmup_ratio
        self.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def __call__(self, step, total_steps):
        for g in self.optimizer.param_groups:
            g["lr"] = step_lr(g["base_lr"], g["min_lr"], step, total_steps,
                              self.warmup if g.get("warmup", True) else 0, self.ratio)


@torch.no_grad()
def evaluate(model, loader, world=1):
    """Top-1 accuracy (%) of every head of ``model`` on ``loader`` (summed over ranks)."""
    model.eval()
    correct, total, names = None, 0, None
    for x, y in loader:
        logits = model.predict(x)
        names = list(logits)
        hits = torch.stack([(v.argmax(1) == y).sum() for v in logits.values()])
        correct = hits if correct is None else correct + hits
        total += y.shape[0]
    model.train()
    if world > 1:
        import torch.distributed as dist
        counts = torch.cat([correct.double(), torch.tensor([total], dtype=torch.float64,
                                                            device=correct.device)])
        dist.all_reduce(counts)
        correct, total = counts[:-1], counts[-1].item()
    return {k: 100.0 * float(c) / total for k, c in zip(names, correct.tolist())}


def eval_due(epoch, cfg):
    """Whether epoch ``epoch`` (0-based) is evaluated (validation and test splits): every
    ``eval_every`` epochs and each of the last 10 (the median window of ``summarize``)."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch >= cfg.epochs - 10


class LoggedSums:
    """Logged values summed on the device, one running vector to which each step's values are
    added in step order (host floats become device scalars: a fill, not a sync; a skipped step
    adds nothing). Reading the sums (``merged``) or saving them mid-epoch (``partial``) does not
    regroup the additions, so a run resumed from a mid-epoch checkpoint, or one that writes
    them, logs the very same means, bit for bit, as one that did neither."""

    def __init__(self, device, partial=None):
        self.device, self.keys, self.total = device, [], None
        self.sums = {k: v.to(device) for k, v in partial["sums"].items()} if partial else {}
        self.count = partial["count"] if partial else 0

    def add(self, logs, ok):
        vec = torch.stack([v.detach().float() if isinstance(v, torch.Tensor)
                           else torch.full((), float(v), device=self.device) for v in logs.values()])
        vec = torch.where(ok, vec, torch.zeros_like(vec))
        if list(logs) != self.keys:      # the first step (or other keys): go on from the sums
            self.sums, self.keys = self.merged(), list(logs)
            zero = torch.zeros((), device=self.device)
            self.total = torch.stack([self.sums.get(k, zero).float() for k in self.keys])
        self.total = self.total + vec
        self.count += 1

    def merged(self):
        if self.total is None:
            return dict(self.sums)
        return {**self.sums, **dict(zip(self.keys, self.total.unbind()))}

    def partial(self):
        return {"sums": {k: v.detach().cpu() for k, v in self.merged().items()}, "count": self.count}

    def means(self):
        """Mean of every logged value over finite steps (one host read), and the skip count."""
        sums = self.merged()
        good = max(float(sums.pop("finite_steps", torch.tensor(0.0))), 1.0) if sums else 1.0
        means = {k: float(v) / good for k, v in sums.items()}
        means["skipped_steps"] = self.count - good if sums else 0
        return means


def train_one_epoch(step_fn, loader, cfg, step, total_steps, guard, progress=None, save=None,
                    skip=0, partial=None, stop=None, set_lr=None):
    """One epoch; returns ``(next step, means of the logged values, images/s)``.

    Nothing is read from the device inside the step: the logged sums are read every
    ``cfg.log_every`` steps (progress bar, bad-step check) and at the end. On resume the first
    ``skip`` batches are drawn (the loader's random streams advance as before) but not trained
    on. ``save(batch, step, partial)`` writes a mid-epoch checkpoint every ``checkpoint_every``
    (if set). ``stop`` (``StopSignals``): once a signal came, the epoch ends after the current
    step with a checkpoint of it (``stop.stopped_at`` is set: the epoch is not complete).
    ``set_lr(step, total_steps)`` (``--lr-schedule step``) sets the learning rates before each
    step.
    """
    device = guard.device
    logged = LoggedSums(device, partial)
    images, elapsed, start = 0, 0.0, time.perf_counter()
    for batch, (x, y) in enumerate(loader):
        if batch < skip:
            continue
        if set_lr is not None:
            set_lr(step, total_steps)
        loss, logs, ok = step_fn(x, y, step, total_steps)
        step, images = step + 1, images + x.shape[0]
        logged.add(dict(logs, loss=loss, finite_steps=ok), ok)
        if logged.count % cfg.log_every == 0:
            sums = logged.merged()
            guard.check(cfg.max_bad_steps, step, os.path.join(cfg.out, "last.pt"))
            if progress is not None:
                progress.set_postfix(loss=f"{float(sums['loss'] / sums['finite_steps'].clamp_min(1)):.3f}")
        if progress is not None:
            progress.update(1)
        saved = False
        if save is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                and batch + 1 < len(loader):
            elapsed += time.perf_counter() - start
            save(batch + 1, step, logged.partial())
            start, saved = time.perf_counter(), True
        if stop is not None and stop.check(step):
            # even after the epoch's last batch: the resumed run then draws the epoch's batches
            # without training on them, and evaluates and logs it as this run would have
            stop.stopped_at, stop.saved = step, saved or (save is not None and
                                                          save(batch + 1, step, logged.partial()))
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed += time.perf_counter() - start
    guard.check(cfg.max_bad_steps, step, os.path.join(cfg.out, "last.pt"))
    return step, logged.means(), images / max(elapsed, 1e-9)


def summarize(history, model, cfg, wall_time):
    """Final and median-of-last-10 top-1 per head, and the head reported with its rule."""
    heads = list(model.head_names)
    last = [r for r in history if "top1" in r][-10:]
    median = {h: statistics.median(r["top1"][h] for r in last) for h in heads}
    final = dict(history[-1]["top1"])
    extra = {}
    if len(heads) == 1:
        reported, rule = heads[0], "the only head"
    else:
        # The head reported is the head exported and deployed (--export-head, else the
        # model's inference head); the best head on the test split is shown apart, labelled.
        reported = cfg.export_head or model.default_head
        rule = (f"the inference head, the one --export writes (--export-head, default "
                f"{model.default_head})")
        best = max(heads, key=lambda h: median[h])
        extra["best_test_head"] = {
            "head": best, "median_last10_top1": median[best],
            "rule": "best median-of-last-10 test top-1 over the heads (the AutoMix authors' "
                    "rule, find_automix_val_median.py): chosen on the test split"}
    val = [r["val_top1"] for r in history if "val_top1" in r][-10:]
    if val:
        extra["median_last10_val_top1"] = {h: statistics.median(v[h] for v in val) for h in heads}
    return {**extra, "method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset,
            "epochs": cfg.epochs, "seed": cfg.seed, "final_top1": final,
            "median_last10_top1": median, "reported_head": reported, "reported_rule": rule,
            "reported_top1_final": final[reported], "reported_top1_median_last10": median[reported],
            "wall_time_s": wall_time, "config": asdict(cfg)}


def batch_description(loader, in_chans):
    """``(shape, dtype, channels_last)`` of the loader's training batches."""
    if isinstance(loader, TensorLoader):
        hw = tuple(loader.images.shape[-2:])
    else:
        hw = (loader.size, loader.size) if isinstance(loader.size, int) else tuple(loader.size)
    return ((loader.batch_size, in_chans) + hw, getattr(loader, "dtype", torch.float32),
            bool(getattr(loader, "channels_last", False)))


def select_op_paths(cfg, device, rank, model=None, batch=None, num_classes=None):
    """The path each fused op takes in this run and why: ``{op: {"path", "reason"}}``.

    With the self-check (on CUDA unless ``--no-selfcheck``; on the CPU with ``--selfcheck``,
    under the interpreter) each fused op is first compared with its eager twin on the calls
    this run's step makes (variants, shapes, dtypes: ``selfcheck.record_op_calls`` of
    ``model`` on a ``batch = (shape, dtype, channels_last)``), in a child process
    (``selfcheck.check_ops_isolated``; report in OUT/selfcheck.json); one that raises, crashes
    the child, hangs or disagrees runs as its eager twin for the whole run, with one
    warning. Without a model, the self-check's own fixed cases."""
    if cfg.eager:
        return {op: {"path": "eager", "reason": "--eager"} for op in FUSED_OPS}
    if not (device.type == "cuda" if cfg.selfcheck is None else cfg.selfcheck):
        path = "fused" if use_fused(torch.empty(0, device=device)) else "eager"
        reason = "--no-selfcheck" if cfg.selfcheck is False else "no CUDA device: the eager twins"
        return {op: {"path": path, "reason": reason} for op in FUSED_OPS}
    from fastmix import selfcheck
    report = os.path.join(cfg.out, "selfcheck.json" if rank == 0 else f"selfcheck.rank{rank}.json")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    dtypes = (torch.float32,) + ((amp,) if amp is not None else ())
    calls, recorded = None, False
    if model is not None:
        shape, dtype, channels_last = batch
        try:
            calls = selfcheck.record_op_calls(model, shape, num_classes,
                                              lambda: autocast_context(cfg, device), dtype,
                                              channels_last)
            recorded = True
        except Exception as e:     # draws that read values (PuzzleMix): the fixed cases
            warnings.warn(f"fastmix: the self-check could not record this run's op calls "
                          f"({type(e).__name__}: {e}); it checks its own cases instead",
                          RuntimeWarning, stacklevel=2)
    if calls is None:
        calls = selfcheck.fixed_calls(device, dtypes)
    ops = selfcheck.check_ops_isolated(device, calls)
    selfcheck.write_report({"environment": selfcheck.environment(device), "ops": ops,
                            "calls": calls, "calls_recorded_from_the_run": recorded}, report)
    paths = {}
    for op, r in ops.items():
        if r["ok"]:
            paths[op] = {"path": "fused", "reason": "self-check passed"}
            continue
        warnings.warn(f"fastmix: the fused {op} failed its self-check against the eager twin "
                      f"({r['error']}); this run uses the eager {op}. Details: {report}",
                      RuntimeWarning, stacklevel=2)
        paths[op] = {"path": "eager", "reason": f"self-check failed: {r['error']}",
                     "report": report}
    set_op_paths({op: p["path"] == "fused" for op, p in paths.items()})
    return paths


# ---- the loop ----------------------------------------------------------------------------------
class RunStopped(Exception):
    """The run stopped on a signal (``StopSignals``) after a step, with a checkpoint if one could
    be written; ``exit_code``: 128 + the signal's number, the shell's convention."""

    def __init__(self, signum, step, total_steps, checkpoint, why=None, rank=0):
        self.signum, self.step, self.total_steps = signum, step, total_steps
        self.checkpoint, self.exit_code, self.rank = checkpoint, 128 + signum, rank
        where = (f"checkpoint {checkpoint}" if checkpoint else
                 f"the checkpoint could not be written ({why}): a resumed run starts from the "
                 f"last one written, if any")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of "
                         f"{total_steps}; {where}")


class StopSignals:
    """SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) ask the run to stop after the
    current step: the handler only sets ``signum`` (a step is never cut in half, and no
    KeyboardInterrupt surfaces from inside torch); ``train_one_epoch`` checks it after each step,
    writes a checkpoint and ends. The handler then puts the default action back, so a second
    signal ends the process at once (the kernel releases OUT's lock). Installed only in the main
    thread (Python allows no other); the previous handlers come back on exit.

    Under DDP every rank must stop at the same step: the flag is agreed on (an all-reduce)
    every ``every`` steps, at the same steps on every rank.

    Under torchrun a worker can get one stop request twice: a scheduler that signals every
    process of the job (Slurm) reaches the worker and torchrun's agent, and the agent passes its
    signal on to the worker at once. A second signal within ``FORWARD_WINDOW_S`` of the first is
    taken for that copy, not for "stop at once" (the agent itself ends a worker that has not
    stopped 30 s after its signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    FORWARD_WINDOW_S = 2.0

    def __init__(self, world=1, device=None, every=1):
        self.world, self.device, self.every = world, device, every
        self.signum, self.stopped_at, self.saved, self.previous = None, None, None, {}
        self.first_at = None
        # launched by torchrun (its agent forwards the signals it gets)
        self.forwarded = "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.first_at is not None:
            # only under torchrun does a second signal reach this handler: within the window, the
            # agent's copy of the first; after it, a second request, which stops at once
            if now - self.first_at < self.FORWARD_WINDOW_S:
                return
            for s in self.previous:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self.first_at = signum, now
        if not self.forwarded:
            for s in self.previous:
                signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        # os.write: print() could re-enter a stderr write the signal interrupted
        again = (f"another signal after {self.FORWARD_WINDOW_S:g} s" if self.forwarded
                 else "another signal")
        os.write(2, f"\n{name}: stopping after the current step, with a checkpoint ({again} "
                    f"stops at once, without one)\n".encode())

    def check(self, step=None):
        """Whether to stop now (``step`` None: at the end of an epoch, on every rank)."""
        if self.world == 1:
            return self.signum is not None
        if step is not None and step % self.every:
            return False
        import torch.distributed as dist
        flag = torch.tensor([self.signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None


def train(cfg: Config):
    """Train ``cfg`` end to end; returns the summary dict (also written to OUT/summary.json).
    Raises ``RunStopped`` when a SIGTERM/SIGINT stopped it (after a checkpoint)."""
    previous = set_op_paths({})
    try:
        # OUT's lock and the signal handlers, held by _train: released on every way out
        with contextlib.ExitStack() as held:
            return _train(cfg, held)
    finally:
        set_op_paths(previous)      # the self-check's choices hold for this run only


def _train(cfg, held):
    validate_config(cfg)
    rank, world, local = init_distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    cfg = resolve_runtime(cfg, device)
    check_run_settings(cfg)      # all a run can refuse, before any data is read
    if rank == 0:
        # one run at a time in OUT (DDP ranks share it: rank 0 holds it for them), taken before
        # the checkpoint to resume is read (another run could still be writing it) and before
        # --overwrite deletes anything
        held.enter_context(lock_out(cfg.out))
    resume_path = os.path.join(cfg.out, "last.pt") if cfg.resume == "auto" else cfg.resume
    state = load_training_checkpoint(resume_path, cfg, world) if cfg.resume else None
    plan_epochs_change(state, cfg, resume_path, rank)      # --resume --epochs N
    check_devices(cfg, world, rank)
    warn_settings(cfg, rank)
    claim_out(cfg, rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(cfg.seed + rank)  # per-rank permutations and λ, as on the official DDP
    train_loader, val_loader, test_loader, test_set, in_chans, num_classes = build_data(
        cfg, device, rank, world)
    model, optimizer, scaler = build_training(cfg, device, in_chans, num_classes, rank)
    op_paths = select_op_paths(cfg, device, rank, model,
                               batch_description(train_loader, in_chans), num_classes)
    start_epoch, skip, step, history, partial = restore(state, model, optimizer, scaler, rank,
                                                        resume_path)
    metrics = MetricsLog(cfg, rank, history)
    loggers, best = RunLoggers(cfg, rank, history), BestKeeper(cfg, model, rank, history)
    step_fn, guard = build_step(cfg, model, optimizer, scaler, device, world, local)
    ckpt = Checkpointer(cfg, model, optimizer, scaler, rank, world)
    stop = held.enter_context(StopSignals(world, device, cfg.log_every))
    total_steps = cfg.epochs * len(train_loader)
    progress = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    set_lr = StepLR(optimizer, cfg, len(train_loader)) if cfg.lr_schedule == "step" else None
    for epoch in range(start_epoch, cfg.epochs):
        if set_lr is None:
            set_epoch_lr(optimizer, epoch, cfg.epochs)
        train_loader.set_epoch(epoch)
        model.train()
        save = lambda b, s, p, e=epoch: ckpt.save(e, b, s, history, p)  # noqa: E731
        step, losses, ips = train_one_epoch(step_fn, train_loader, cfg, step, total_steps, guard,
                                            progress, save, skip, partial, stop, set_lr)
        if stop.stopped_at is not None:
            break
        skip, partial = 0, None
        record = {"epoch": epoch + 1, "step": step,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "losses": losses, "images_per_s": ips * world}
        if hasattr(train_loader, "cpu_fallbacks"):
            # JPEGs the device decoder refused and the CPU decoded, so far in the run
            record["decode_cpu_fallbacks"] = train_loader.cpu_fallbacks
        if eval_due(epoch, cfg):
            if val_loader is not None:
                record["val_top1"] = evaluate(model, val_loader, world)
            record["top1"] = evaluate(model, test_loader, world)
        record["elapsed_s"] = time.perf_counter() - t0
        momentum = model.ema_momentum_at(step - 1, total_steps)
        if momentum is not None:       # the run has an EMA (AutoMix's encoder, --ema)
            record["ema_momentum"] = momentum
        history.append(record)
        metrics.write(record, progress, model, test_set, device)
        loggers.write(record, model, test_set, device)     # --log
        best.update(record, step)       # --save-best; before last.pt: a resume redoes both
        ckpt.save(epoch + 1, 0, step, history)
        if epoch + 1 < cfg.epochs and stop.check():    # a signal during evaluation or logging
            stop.stopped_at, stop.saved = step, ckpt.last_ok
            break
    if progress is not None:
        progress.close()
    loggers.close()
    if stop.stopped_at is not None:
        leave_group(world)
        raise RunStopped(stop.signum, stop.stopped_at, total_steps,
                         ckpt.path if stop.saved else None, ckpt.last_error, rank)
    return finish(cfg, model, history, time.perf_counter() - t0, rank, world, op_paths, ckpt,
                  best.summary())


class MetricsLog:
    """OUT/metrics.jsonl (rank 0): one JSON line per epoch, the file rewritten whole and
    atomically each epoch (from the checkpoint's history on resume), so that a full disk or a
    kill never leaves a truncated line: a failed write is a warning, the previous version stays
    and the next epoch writes the whole history again. The progress bar's epoch line; the mix
    grid every ``grid_every``."""

    def __init__(self, cfg, rank, history):
        self.cfg, self.rank, self.records = cfg, rank, list(history)
        self.path = os.path.join(cfg.out, "metrics.jsonl")
        if rank == 0:
            self._rewrite()

    def _rewrite(self):
        write_or_warn(self.path, "".join(json_line(r) for r in self.records), "metrics",
                      "the previous version, if any, is intact; the next epoch's write includes "
                      "this one")

    def write(self, record, progress, model, test_set, device):
        if self.rank != 0:
            return
        cfg, epoch = self.cfg, record["epoch"]
        self.records.append(record)
        self._rewrite()
        line = (f"epoch {epoch}/{cfg.epochs}  loss {record['losses']['loss']:.3f}  " +
                "  ".join(f"{k} {v:.2f}" for k, v in record.get("top1", {}).items()) +
                f"  {record['images_per_s']:.0f} img/s")
        if progress is not None:
            progress.write(line)
        else:       # --no-progress: the same line, on stderr as the bar's
            print(line, file=sys.stderr, flush=True)
        if cfg.grid_every and epoch % cfg.grid_every == 0 and hasattr(model, "mix_block") \
                and test_set is not None:
            from fastmix.visualize import save_mix_grid
            path = os.path.join(cfg.out, f"mix_epoch{epoch:04d}.png")
            try:
                save_mix_grid(model, test_set, path, device, channels_last=cfg.channels_last)
            except OSError as e:
                print(f"warning: could not write the mix grid {path} ({os_error_text(e)}); "
                      f"training goes on", file=sys.stderr, flush=True)


def finish(cfg, model, history, wall_time, rank, world, op_paths, ckpt=None, extra=None):
    """summary.json and the export (rank 0); under DDP, leave the process group together.

    Both are written atomically; a failed write is a warning and is recorded in the summary
    returned (``export_error``; ``summary_error``: summary.json is then absent, or the earlier
    run's), as is how many checkpoint writes of the run succeeded and failed (``checkpoint``):
    train.py exits 4 when the run's outputs are not all on disk."""
    summary = {**summarize(history, model, cfg, wall_time), "op_paths": op_paths,
               **(extra or {})}     # extra: --save-best's best epoch (BestKeeper.summary)
    if rank == 0:
        # the commit, versions, CPU ISA and threads of the process that finished the run
        summary["provenance"] = environment()
        if ckpt is not None:
            summary["checkpoint"] = ckpt.report()
        if cfg.export:
            try:
                summary["exported_head"] = export_classifier(model, cfg.export, cfg.export_head)
            except OSError as e:
                summary["export_error"] = os_error_text(e)
                print(f"warning: could not write the export {cfg.export} "
                      f"({summary['export_error']})", file=sys.stderr, flush=True)
        path = os.path.join(cfg.out, "summary.json")
        why = write_or_warn(path, json.dumps(json_safe(summary), indent=2, allow_nan=False),
                            "the summary", "the run's results are in metrics.jsonl")
        if why:
            summary["summary_error"] = why
    leave_group(world)
    return summary


def leave_group(world):
    """Under DDP, leave the process group together (every rank calls it)."""
    if world > 1:
        # A gloo group alive at interpreter exit can abort a rank ("terminate called without an
        # active exception"): barrier, then tear it down.
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
