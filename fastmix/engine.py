"""The training engine behind ``train.py``: build, train, evaluate, log.

Reads top to bottom: ``build_model`` -> ``build_optimizer`` -> ``train`` (epochs of
``train_one_epoch`` and ``evaluate``), writing ``OUT/metrics.jsonl`` (one JSON object per
epoch) and ``OUT/summary.json``.
"""
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.data import TensorLoader, load_dataset
from fastmix.mixup import BASELINES, MixupClassifier
from fastmix.schedules import cosine
from fastmix.step import (CUDAGraphStep, NonFiniteLossError, StepGuard, TrainStep,  # noqa: F401
                          autocast_context)

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
    loader: str = "auto"          # --dataset imagefolder: auto | dali | torchvision
    image_size: int = 224         # --dataset imagefolder: train crop / val centre-crop size
    workers: int = None           # --dataset imagefolder: DALI threads / DataLoader workers
    verify_images: str = "header"  # --dataset imagefolder pre-scan: header (cheap) | full (decode all) | none
    train_subset: int = None      # a class-balanced subset of the training images (fixed by data_seed)
    test_subset: int = None
    val_split: int = 0            # hold out this many training images (class-balanced) as a validation set
    data_seed: int = 0            # fixes the subsets and the validation split, whatever the seed
    eval_every: int = 1           # evaluate (validation and test) every N epochs and each of the last 10
    device: str = "auto"
    seed: int = 0
    out: str = "runs/default"
    eager: bool = False
    amp: str = "auto"             # bf16 | fp16 | none | auto (bf16 on CUDA, none on CPU)
    channels_last: bool = True    # channels-last end to end (also faster on the CPU: 1.25x, bench/train_step.py)
    compile: bool = None          # torch.compile the backbones; None: on for CUDA
    cuda_graphs: bool = False     # capture the whole step in a CUDA graph and replay it
    optimizer_impl: str = "torch"  # torch (fused=True on CUDA) | apex (FusedSGD)
    k_early_exit: bool = False
    resume: str = None            # a checkpoint path, or "auto" for OUT/last.pt
    overwrite: bool = False       # start afresh in an OUT that holds an earlier run (deletes it)
    checkpoint_every: int = 0     # also checkpoint every N steps inside an epoch (0: epochs only)
    grid_every: int = 0           # save a mixed-sample PNG grid every N epochs (AutoMix)
    export: str = None            # write the chosen classifier as a plain state dict here
    export_head: str = None       # AutoMix head to export (default one_k)
    max_bad_steps: int = 10       # stop after this many consecutive non-finite losses
    progress: bool = True
    log_every: int = 50
    extra: dict = field(default_factory=dict)


DEFAULT_ALPHA = {"automix": 2.0, "mixup": 1.0, "cutmix": 0.2, "vanilla": 0.0}


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: fastmix runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_model(cfg: Config, in_chans, num_classes, seed=None):
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
                       label_smoothing=cfg.label_smoothing, k_early_exit=cfg.k_early_exit,
                       seed=cfg.seed if seed is None else seed, fused=fused)
    return MixupClassifier(backbone, num_classes, method=cfg.method, alpha=alpha,
                           label_smoothing=cfg.label_smoothing,
                           seed=cfg.seed if seed is None else seed, fused=fused)


def build_optimizer(cfg: Config, model, fused=False):
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
    if cfg.optimizer_impl == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError as e:
            raise ValueError("--optimizer-impl apex needs NVIDIA apex, which is not importable "
                             "here; use --optimizer-impl torch (fused=True on CUDA)") from e
        return FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer_impl != "torch":
        raise ValueError(f"optimizer_impl must be torch or apex, got {cfg.optimizer_impl!r}")
    # fused=True: one multi-tensor kernel for the whole update; it also honours ``found_inf``,
    # which is how a non-finite step is skipped without a host sync (CPU and CUDA alike).
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=fused)


def set_epoch_lr(optimizer, epoch, epochs):
    """mmcv ``CosineAnnealing(by_epoch=True)``: each group from base_lr to its own min_lr."""
    for g in optimizer.param_groups:
        g["lr"] = cosine(g["base_lr"], g["min_lr"], epoch / epochs)


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


# "RANK:STEP": raise in that rank after that step (the fault-injection tests use it)
_INJECT_FAULT = os.environ.get("FASTMIX_INJECT_FAULT")


def _maybe_inject_fault(step):
    if not _INJECT_FAULT:
        return
    rank, at = (int(v) for v in _INJECT_FAULT.split(":"))
    import torch.distributed as dist
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if me == rank and step == at:
        raise RuntimeError(f"injected fault (FASTMIX_INJECT_FAULT={_INJECT_FAULT})")


def _merge(sums, keys, vec):
    """Add a stacked vector of logged values (in ``keys`` order) into the per-key device sums."""
    for k, v in zip(keys, vec.unbind()):
        sums[k] = sums[k] + v if k in sums else v
    return sums


def train_one_epoch(step_fn, model, loader, step, total_steps, cfg, device, progress=None,
                    skip=0, partial=None, checkpoint=None, guard=None, ckpt_hint="OUT/last.pt"):
    """One epoch; returns (next step, mean of every logged value over finite steps, images/s).

    ``step_fn(x, y, step, total_steps) -> (loss, logs, finite)`` is a ``TrainStep`` or a
    ``CUDAGraphStep``; ``guard`` is its ``StepGuard``. Nothing is read from the device inside the
    step: logged values are summed on the device and read at the end of the epoch (and every
    ``cfg.log_every`` steps for the progress bar and the bad-step check). On resume, the first
    ``skip`` batches are drawn (so the loader's random streams advance exactly as before) but not
    trained on. Steps with a non-finite loss are skipped (``StepGuard``) and left out of the means.
    """
    model.train()
    guard = guard or StepGuard(model, device, enabled=False)
    sums = {k: v.to(device) for k, v in partial["sums"].items()} if partial else {}
    count = partial["count"] if partial else 0
    images, elapsed, start, acc, keys = 0, 0.0, time.perf_counter(), None, []
    for batch, (x, y) in enumerate(loader):
        if batch < skip:
            continue
        loss, logs, ok = step_fn(x, y, step, total_steps)
        step += 1
        count += 1
        images += x.shape[0]
        _maybe_inject_fault(step)
        logs = dict(logs, loss=loss, finite_steps=ok)
        # One stacked vector per step: host floats (λ) become device scalars (a fill, not a
        # sync); a skipped step adds nothing.
        keys = list(logs)
        vec = torch.stack([v.detach().float() if isinstance(v, torch.Tensor)
                           else torch.full((), float(v), device=device) for v in logs.values()])
        vec = torch.where(ok, vec, torch.zeros_like(vec))
        acc = vec if acc is None else acc + vec
        if count % cfg.log_every == 0:
            sums, acc = _merge(sums, keys, acc), None
            guard.check(cfg.max_bad_steps, step, ckpt_hint)
            if progress is not None:
                progress.set_postfix(loss=f"{float(sums['loss'] / sums['finite_steps'].clamp_min(1)):.3f}")
        if progress is not None:
            progress.update(1)
        if checkpoint is not None and step % cfg.checkpoint_every == 0 and batch + 1 < len(loader):
            elapsed += time.perf_counter() - start
            if acc is not None:
                sums, acc = _merge(sums, keys, acc), None
            checkpoint(batch + 1, step, {"sums": {k: v.detach().cpu() for k, v in sums.items()},
                                         "count": count})
            start = time.perf_counter()
    if acc is not None:
        sums = _merge(sums, keys, acc)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed += time.perf_counter() - start
    guard.check(cfg.max_bad_steps, step, ckpt_hint)
    good = max(float(sums.pop("finite_steps", torch.tensor(0.0))), 1.0) if sums else 1.0
    means = {k: float(v) / good for k, v in sums.items()}
    means["skipped_steps"] = count - good if sums else 0
    return step, means, images / max(elapsed, 1e-9)


def eval_due(epoch, cfg):
    """Whether epoch ``epoch`` (0-based) is evaluated (validation and test splits): every
    ``eval_every`` epochs and each of the last 10 (the median window of ``summarize``)."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch >= cfg.epochs - 10


def summarize(history, model, cfg, wall_time):
    """Final and median-of-last-10 top-1 per head, and the head reported with its rule."""
    heads = list(model.head_names)
    last = [r for r in history if "top1" in r][-10:]
    median = {h: statistics.median(r["top1"][h] for r in last) for h in heads}
    final = dict(history[-1]["top1"])
    if len(heads) == 1:
        reported, rule = heads[0], "the only head"
    else:
        reported = max(heads, key=lambda h: median[h])
        rule = ("best median-of-last-10 top-1 over the four heads (the authors' rule, "
                "find_automix_val_median.py); inference model: one_k")
    val = [r["val_top1"] for r in history if "val_top1" in r][-10:]
    extra = {}
    if val:
        extra["median_last10_val_top1"] = {h: statistics.median(v[h] for v in val) for h in heads}
    return {**extra, "method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset, "epochs": cfg.epochs,
            "seed": cfg.seed, "final_top1": final, "median_last10_top1": median,
            "reported_head": reported, "reported_rule": rule,
            "reported_top1_final": final[reported], "reported_top1_median_last10": median[reported],
            "wall_time_s": wall_time, "config": asdict(cfg)}


# ---- runtime: devices, precision, distributed ------------------------------------------------
def init_distributed():
    """``(rank, world, local_rank)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


def resolve_runtime(cfg: Config, device):
    """Fill the ``auto`` switches: bf16 and torch.compile on CUDA; fp32, eager on the CPU."""
    cuda = device.type == "cuda"
    if cfg.amp == "auto":
        cfg.amp = "bf16" if cuda else "none"
    if cfg.compile is None:
        cfg.compile = cuda
    if cfg.amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be bf16, fp16, none or auto, got {cfg.amp!r}")
    if cfg.amp == "fp16" and not cuda:
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")
    if cfg.cuda_graphs:
        if not cuda:
            raise ValueError("--cuda-graphs needs a CUDA device")
        if cfg.amp == "fp16":
            raise ValueError("--cuda-graphs works with --amp bf16 or none (the fp16 GradScaler's "
                             "update is not captured)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--cuda-graphs runs in one process; under torchrun leave it off")
    return cfg


# ---- checkpoints ---------------------------------------------------------------------------
TMP_PREFIX = ".tmp-"


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
                     "workers", "compile", "eager", "cuda_graphs", "optimizer_impl"}


def load_training_checkpoint(path, cfg: "Config", world):
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


def _rng_states(model):
    state = {"torch": torch.get_rng_state(), "method": model.rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(model, state):
    torch.set_rng_state(state["torch"])
    model.load_rng_state(state["method"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_classifier(model, path, head=None):
    """Write the chosen encoder + head as a plain state dict (backbone keys + ``fc.*``), loadable
    into the matching ResNet (torchvision's for the ImageNet-stem archs) without fastmix."""
    head = head or model.default_head
    backbone, cls_head = (model.inference_model(head) if isinstance(model, AutoMix)
                          else model.inference_model())
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    state.update({"fc." + k: v.detach().cpu().clone() for k, v in cls_head.fc.state_dict().items()})
    atomic_save(state, path)
    return head


# ---- run folder and settings ------------------------------------------------------------------
RUN_FILES = ("last.pt", "metrics.jsonl", "summary.json")


def state_path(cfg):
    return os.path.join(cfg.out, "last.pt") if cfg.resume == "auto" else cfg.resume


_FINITE = ("lr", "min_lr", "mb_lr", "mb_min_lr", "mb_momentum", "momentum", "weight_decay",
           "alpha", "label_smoothing", "ema_momentum", "ema_end", "mask_loss_weight", "lam_margin")


def validate_config(cfg: Config):
    """Every setting checked once, before any work: a ``ValueError`` that names the flag."""
    from fastmix.backbones import ARCH_NAMES
    problems = []
    for name in _FINITE:
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            problems.append(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
    if problems:
        raise ValueError("; ".join(problems))

    def need(ok, msg):
        if not ok:
            problems.append(msg)
    need(cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    need(cfg.arch in ARCH_NAMES or str(cfg.arch).startswith("timm:"),
         f"--arch {cfg.arch!r} is unknown; choose from {', '.join(ARCH_NAMES)}")
    for name in ("epochs", "batch_size", "max_bad_steps", "eval_every", "log_every", "image_size"):
        need(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "grid_every", "val_split"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset", "workers"):
        v = getattr(cfg, name)
        need(v is None or v > 0, f"--{name.replace('_', '-')} must be positive, got {v}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.mb_lr is None or cfg.mb_lr > 0, f"--mb-lr must be positive, got {cfg.mb_lr}")
    for name in ("min_lr", "mb_min_lr", "weight_decay", "mask_loss_weight"):
        v = getattr(cfg, name)
        need(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    for name in ("momentum", "mb_momentum", "label_smoothing"):
        v = getattr(cfg, name)
        need(v is None or 0 <= v < 1, f"--{name.replace('_', '-')} must lie in [0, 1), got {v}")
    for name in ("ema_momentum", "ema_end"):
        need(0 <= getattr(cfg, name) <= 1, f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, name)}")
    need(cfg.alpha is None or cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}")
    need(cfg.lam_margin < 0.5, f"--lam-margin must be below 0.5, got {cfg.lam_margin}")
    need(cfg.verify_images in ("header", "full", "none"),
         f"--verify-images must be header, full or none, got {cfg.verify_images!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_run_settings(cfg: Config):
    """Settings that only fail at the end of a run (the export), checked at its start."""
    if cfg.export_head and cfg.method != "automix":
        raise ValueError(f"--export-head names one of AutoMix's four heads; --method "
                         f"{cfg.method} has a single head (leave --export-head out)")
    if cfg.export:
        folder = os.path.dirname(os.path.abspath(cfg.export))
        if os.path.isdir(cfg.export):
            raise ValueError(f"--export {cfg.export} is a folder; give a file path")
        if not os.path.isdir(folder):
            raise ValueError(f"--export {cfg.export}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"--export {cfg.export}: the folder {folder} is not writable")


def claim_out(cfg: Config, rank=0):
    """Make OUT, refuse to start afresh over an earlier run unless ``overwrite`` (which deletes
    its files, so no later message can point at the old checkpoint), and delete temporary files
    that an interrupted checkpoint write left behind."""
    os.makedirs(cfg.out, exist_ok=True)
    if not os.access(cfg.out, os.W_OK):
        raise PermissionError(f"output folder {cfg.out} is not writable")
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if earlier and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} holds an earlier run ({', '.join(earlier)}): continue "
                             f"it with --resume, start afresh with --overwrite (deletes those "
                             f"files), or choose another --out")
        if rank == 0:
            for f in earlier:
                os.unlink(os.path.join(cfg.out, f))
    if rank == 0:
        for path in remove_stale_temporaries(cfg.out, "last.pt"):
            print(f"removed {path}, left by an interrupted checkpoint write", file=sys.stderr)


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


# ---- the loop --------------------------------------------------------------------------------
def train(cfg: Config):
    """Train ``cfg`` end to end; returns the summary dict (also written to OUT/summary.json)."""
    validate_config(cfg)
    rank, world, local = init_distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    cfg = resolve_runtime(cfg, device)
    # Everything a run can refuse is checked before any data is read or any step is taken.
    check_run_settings(cfg)
    ckpt_path = os.path.join(cfg.out, "last.pt")
    state = None
    if cfg.resume:
        state = load_training_checkpoint(ckpt_path if cfg.resume == "auto" else cfg.resume,
                                         cfg, world)
    claim_out(cfg, rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(cfg.seed + rank)  # per-rank permutations and λ, as on the official DDP
    val_loader = None
    if cfg.dataset == "imagefolder":
        if cfg.val_split:
            raise ValueError("--val-split carves a validation set out of a tensor dataset; for "
                             "--dataset imagefolder hold one out on disk instead")
        from fastmix.data.imagefolder import build_imagefolder_loader, split_overlap
        kw = dict(loader=cfg.loader, device=device, size=cfg.image_size, seed=cfg.seed,
                  shard=(rank, world), channels_last=cfg.channels_last,
                  num_workers=cfg.workers, quiet=rank != 0,
                  verify={"none": False}.get(cfg.verify_images, cfg.verify_images))
        train_loader = build_imagefolder_loader(cfg.data_dir, "train", cfg.batch_size, True,
                                                subset=cfg.train_subset, **kw)
        test_loader = build_imagefolder_loader(cfg.data_dir, "val", max(cfg.batch_size, 256), False,
                                               subset=cfg.test_subset, classes=train_loader.classes, **kw)
        in_channels, num_classes, test_set = 3, train_loader.num_classes, None
        common = split_overlap(train_loader.files, test_loader.files)
        if common and rank == 0:
            print(f"warning: {len(common)} file(s) of {cfg.data_dir}/val are also in train (the "
                  f"same file through links), e.g. {common[0]}: the validation accuracy is then "
                  f"not measured on unseen images", file=sys.stderr)
    else:
        train_set, val_set = load_dataset(cfg.dataset, cfg.data_dir, train=True).split(
            cfg.val_split, cfg.train_subset, cfg.data_seed)
        test_set = load_dataset(cfg.dataset, cfg.data_dir, train=False).subset(cfg.test_subset, cfg.data_seed)
        train_loader = TensorLoader(train_set, cfg.batch_size, device, train=True, seed=cfg.seed,
                                    channels_last=cfg.channels_last, shard=(rank, world))
        test_loader = TensorLoader(test_set, max(cfg.batch_size, 256), device, train=False,
                                   channels_last=cfg.channels_last, shard=(rank, world))
        if val_set is not None:
            val_loader = TensorLoader(val_set, max(cfg.batch_size, 256), device, train=False,
                                      channels_last=cfg.channels_last, shard=(rank, world))
        in_channels, num_classes = train_set.images.shape[1], train_set.num_classes
    model = build_model(cfg, in_channels, num_classes, seed=cfg.seed + rank)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    total_steps = cfg.epochs * len(train_loader)

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    start_epoch, skip_batches, step, history, partial = 0, 0, 0, [], None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {state_path(cfg)} does not fit this "
                                  f"configuration (method/arch/dataset changed?): "
                                  f"{str(e)[:300]}") from e
        start_epoch, skip_batches, step = state["epoch"], state["batch"], state["step"]
        history, partial = state["history"], state["partial"]
        _set_rng_states(model, state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    if rank == 0:
        with open(metrics_path, "w") as f:  # rewritten from the checkpoint's history on resume
            f.writelines(json_line(r) for r in history)

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

    def save(epoch, batch, step, sums):
        rng = _rng_states(model)
        if world > 1:
            import torch.distributed as dist
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "step": step,
                 "history": history, "partial": sums, "rng": rng, "world": world,
                 "config": asdict(cfg)}
        try:
            atomic_save(state, ckpt_path)
        except OSError as e:  # disk full, quota, I/O error: keep training, keep the old file
            print(f"warning: could not write checkpoint {ckpt_path} ({e}); the previous "
                  f"checkpoint, if any, is intact", file=sys.stderr)

    guard = StepGuard(model, device)
    if cfg.cuda_graphs:
        step_fn = CUDAGraphStep(model, optimizer, guard, lambda: autocast_context(cfg, device, False),
                                device)
    else:
        step_fn = TrainStep(model, optimizer, guard, lambda: autocast_context(cfg, device), scaler,
                            step_model)
    progress = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch_lr(optimizer, epoch, cfg.epochs)
        train_loader.set_epoch(epoch)
        step, losses, ips = train_one_epoch(
            step_fn, model, train_loader, step, total_steps, cfg, device,
            progress, skip=skip_batches, partial=partial,
            checkpoint=(lambda b, st, sums, e=epoch: save(e, b, st, sums)) if cfg.checkpoint_every else None,
            guard=guard, ckpt_hint=ckpt_path)
        skip_batches, partial = 0, None
        record = {"epoch": epoch + 1, "step": step,
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "losses": losses, "images_per_s": ips * world}
        top1 = None
        if eval_due(epoch, cfg):
            if val_loader is not None:
                record["val_top1"] = evaluate(model, val_loader, world)
            top1 = record["top1"] = evaluate(model, test_loader, world)
        record["elapsed_s"] = time.perf_counter() - t0
        if isinstance(model, AutoMix):
            record["ema_momentum"] = model.ema_momentum(step - 1, total_steps)
        history.append(record)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json_line(record))
            if progress is not None:
                progress.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {losses['loss']:.3f}  " +
                               "  ".join(f"{k} {v:.2f}" for k, v in (top1 or {}).items()) +
                               f"  {ips * world:.0f} img/s")
            if (cfg.grid_every and (epoch + 1) % cfg.grid_every == 0 and isinstance(model, AutoMix)
                    and test_set is not None):
                from fastmix.visualize import save_mix_grid
                save_mix_grid(model, test_set, os.path.join(cfg.out, f"mix_epoch{epoch + 1:04d}.png"),
                              device, channels_last=cfg.channels_last)
        save(epoch + 1, 0, step, None)
    if progress is not None:
        progress.close()
    summary = summarize(history, model, cfg, time.perf_counter() - t0)
    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
        if cfg.export:
            summary["exported_head"] = export_classifier(model, cfg.export, cfg.export_head)
    if world > 1:
        # Leave together and tear the process group down: a gloo group alive at interpreter
        # exit can abort a rank ("terminate called without an active exception").
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return summary
