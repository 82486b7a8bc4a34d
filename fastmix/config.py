"""The one source of a run's settings: defaults, help texts, presets, validation.

``Config`` holds every setting with its default and its help (``train.py`` builds its flags
from these fields, so a default or a help text is written once); ``PRESETS`` are the spec's
recipes (§3); ``resolve`` applies defaults <- preset <- flags; ``validate_config`` checks every
setting once, before any work, and names the flag it refuses.
"""
import argparse
import math
from dataclasses import dataclass, field, fields

from fastmix.mixup import BASELINES

METHODS = ("automix",) + BASELINES
DEFAULT_ALPHA = {"automix": 2.0, "mixup": 1.0, "cutmix": 0.2, "vanilla": 0.0}
HEADS = ("one_k", "mix_k", "one_q", "mix_q")


def opt(default, help, kind=None, choices=None, metavar=None):
    """A Config field: its default, its help text, and how train.py spells its flag (``kind``:
    None = a typed value, "bool" = true/false, "switch" = a flag without a value, "pair" =
    --x/--no-x, "off" = --no-x only, "optional" = a value that may be left out)."""
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices,
                                                metavar=metavar))


@dataclass
class Config:
    # what to train
    method: str = opt("automix", "training method", choices=METHODS)
    arch: str = opt("resnet18_cifar", "backbone (see fastmix.backbones.ARCH_NAMES) or timm:<name>")
    dataset: str = opt("fashion-mnist", "dataset; imagefolder: --data-dir ROOT with "
                       "ROOT/train/<class>/*, ROOT/val/<class>/*",
                       choices=("fashion-mnist", "cifar10", "cifar100", "synthetic", "imagefolder"))
    data_dir: str = opt(None, "dataset folder (Fashion-MNIST: the four IDX .gz files, default "
                        "/usr/share/datasets/fashion-mnist; CIFAR: the folder of the pickle "
                        "batches; imagefolder: ROOT)")
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(100, "batch size per device")
    # optimisation (SGD, per-epoch cosine; spec §2.3)
    lr: float = opt(0.1, "initial learning rate of the main group")
    min_lr: float = opt(0.0, "final learning rate of the cosine schedule")
    mb_lr: float = opt(None, "Mix Block initial lr (default: --lr)")
    mb_min_lr: float = opt(None, "Mix Block final lr (default: --min-lr)")
    mb_momentum: float = opt(None, "Mix Block SGD momentum (default: --momentum)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "weight decay (every trainable parameter, as officially)")
    alpha: float = opt(None, "Beta(alpha, alpha) of λ (default: automix 2, mixup 1, cutmix 0.2)")
    label_smoothing: float = opt(0.0, "label smoothing of every CE loss")
    # AutoMix (spec §1-§2)
    ema_momentum: float = opt(0.999, "AutoMix EMA start momentum")
    ema_end: float = opt(0.999999, "AutoMix EMA final momentum, cosine from 10%% of training")
    mask_loss_weight: float = opt(0.1, "AutoMix mask loss weight")
    mask_loss_mode: str = opt("L1", "AutoMix mask loss", choices=("L1", "L1+Variance"))
    lam_margin: float = opt(0.08, "AutoMix: plain Mixup for the backbone when λ_bb is this close "
                            "to 0 or 1")
    lam_concat: bool = opt(False, "AutoMix: append the λ channel in the Mix Block (ImageNet "
                           "configs)", kind="bool")
    upsample: str = opt("nearest", "Mix Block mask upsampling", choices=("nearest", "bilinear"))
    mix_shuffle_no_repeat: bool = opt(False, "AutoMix: permutations without fixed points",
                                      kind="bool")
    k_early_exit: bool = opt(False, "AutoMix: the momentum encoder's clean pass stops at stage 3 "
                             "(changes its stage-4 BN statistics; see README)", kind="switch")
    # data
    loader: str = opt("auto", "imagefolder loader: DALI (nvJPEG on CUDA) or the PIL fallback; "
                      "auto = DALI when it imports", choices=("auto", "dali", "torchvision"))
    decoder: str = opt("auto", "--loader torchvision: decode with torchvision.io (nvJPEG on "
                       "CUDA) or PIL; auto = torchvision.io when torchvision imports",
                       choices=("auto", "pil", "torchvision"))
    image_size: int = opt(224, "imagefolder crop size")
    workers: int = opt(None, "imagefolder: DALI threads / DataLoader workers (default min(8, cores))")
    verify_images: str = opt("header", "imagefolder pre-scan: header (signature and end marker, "
                             "cheap), full (decode every file with PIL, skip the unreadable), "
                             "none", choices=("header", "full", "none"))
    train_subset: int = opt(None, "train on a class-balanced subset of this many images")
    test_subset: int = opt(None, "evaluate on a class-balanced subset of this many test images")
    val_split: int = opt(0, "hold out this many training images (class-balanced) as a "
                         "validation set, evaluated with the test split (0: none)")
    data_seed: int = opt(0, "seed of the subsets and the validation split, independent of --seed")
    eval_every: int = opt(1, "evaluate (validation and test splits) every N epochs and at each of "
                          "the last 10")
    # the run
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    seed: int = opt(0, "random seed")
    out: str = opt("runs/default", "output folder (metrics.jsonl, summary.json, last.pt)")
    resume: str = opt(None, "resume from a checkpoint (no value: OUT/last.pt)", kind="optional")
    overwrite: bool = opt(False, "start afresh in an --out that holds an earlier run (deletes its "
                          "last.pt, metrics.jsonl, summary.json)", kind="switch")
    checkpoint_every: int = opt(0, "also write OUT/last.pt every N steps inside an epoch (0: at "
                                "the end of each epoch only)")
    grid_every: int = opt(0, "AutoMix: save a mixed-sample PNG grid every N epochs (0: never)")
    export: str = opt(None, "after training, write the classifier (encoder + head) as a plain "
                      "state dict", metavar="PATH")
    export_head: str = opt(None, "AutoMix head to export (default one_k)", choices=HEADS)
    max_bad_steps: int = opt(10, "stop after this many consecutive NaN/Inf losses (skipped steps)")
    progress: bool = opt(True, "no progress bar", kind="off")
    log_every: int = opt(50, "read the logged sums (progress bar, bad-step check) every N steps")
    # speed
    eager: bool = opt(False, "eager PyTorch ops instead of the fused Triton kernels", kind="switch")
    selfcheck: bool = opt(None, "check each fused kernel against its eager twin at start and run "
                          "the ones that fail eager, with a warning (default: on CUDA; on the "
                          "CPU it needs TRITON_INTERPRET=1)", kind="pair")
    amp: str = opt("auto", "autocast precision (auto: bf16 on CUDA, none on CPU; fp16 adds a "
                   "GradScaler)", choices=("auto", "bf16", "fp16", "none"))
    channels_last: bool = opt(True, "channels-last memory format end to end", kind="bool")
    compile: bool = opt(None, "torch.compile the backbones (default: on CUDA)", kind="pair")
    cuda_graphs: bool = opt(False, "capture the whole training step in one CUDA graph and replay "
                            "it (CUDA, one process, bf16 or fp32)", kind="switch")
    optimizer_impl: str = opt("torch", "torch SGD (fused=True on CUDA) or apex FusedSGD (needs "
                              "apex)", choices=("torch", "apex"))


def config_from_dict(values):
    """A Config from a saved ``asdict`` (a checkpoint's ``config``); settings this version no
    longer has (e.g. ``extra``) are dropped."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


# Recipes from the spec's configs (§3); a flag given on the command line overrides them.
PRESETS = {
    # AutoMix on CIFAR: lr 0.1 -> 0.05 for everything, EMA 0.999 -> 0.999999 (baselines: 0).
    "cifar100-r18": dict(dataset="cifar100", arch="resnet18_cifar", epochs=400, batch_size=100,
                         lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    "cifar10-r18": dict(dataset="cifar10", arch="resnet18_cifar", epochs=400, batch_size=100,
                        lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    "cifar100-rx50": dict(dataset="cifar100", arch="resnext50_cifar", epochs=400, batch_size=100,
                          lr=0.1, min_lr=0.05, weight_decay=1e-4, ema_end=0.999999),
    # ImageFolder recipes (--data-dir ROOT with train/ and val/). Tiny-ImageNet: ResNet_CIFAR at
    # 64 px, backbone 0.2 -> 0.05, Mix Block 0.1 -> 1e-3. ImageNet: λ-concat, backbone 0.1 -> 0,
    # Mix Block 0.1 -> 1e-3, EMA end 0.99999, batch 256 in all (per GPU: divide by the GPUs).
    "tinyimagenet-r18": dict(dataset="imagefolder", arch="resnet18_cifar", image_size=64,
                             epochs=400, batch_size=100, lr=0.2, min_lr=0.05, mb_lr=0.1,
                             mb_min_lr=1e-3, weight_decay=1e-4, ema_end=0.999999),
    "imagenet-r50": dict(dataset="imagefolder", arch="resnet50", image_size=224, epochs=100,
                         batch_size=64, lr=0.1, min_lr=0.0, mb_lr=0.1, mb_min_lr=1e-3,
                         mb_momentum=0.9, weight_decay=1e-4, ema_end=0.99999, lam_concat=True),
    "fashion-mnist-r18": dict(dataset="fashion-mnist", arch="resnet18_cifar", epochs=100,
                              batch_size=100, lr=0.1, min_lr=0.05, weight_decay=1e-4,
                              ema_end=0.999999),
    # A short CPU run (2 cores, < 10 min): a quarter-width ResNet-10, 3 epochs of Fashion-MNIST.
    # Short-run deviations from the 400-epoch recipe: cosine to 0 (not 0.05), and an EMA from
    # 0.99 to 0.999 so the momentum encoder keeps up within 1.8k steps.
    "cpu-small": dict(dataset="fashion-mnist", arch="resnet_small", epochs=3, batch_size=100,
                      lr=0.1, min_lr=0.0, weight_decay=1e-4, ema_momentum=0.99, ema_end=0.999),
}


def resolve(flags, preset=None, cuda=False):
    """``(Config, preset, why)``: defaults <- preset <- ``flags`` (the settings given, a dict).

    Without a preset: ``fashion-mnist-r18`` on CUDA, ``cpu-small`` otherwise, unless ``flags``
    name a dataset or an arch (a hand-built run starts from the plain defaults)."""
    why = "--preset"
    if preset is None:
        preset, why = ("fashion-mnist-r18" if cuda else "cpu-small"), "the default for this device"
        if {"dataset", "arch"} & set(flags):
            preset, why = None, "--dataset/--arch given without --preset: the plain defaults"
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is unknown; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset]) if preset else {}
    values.update(flags)
    return Config(**values), preset, why


def _bool(v):
    try:
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[v.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false (or yes/no, 1/0), got {v!r}") from None


def add_flags(parser):
    """One flag per Config field, its help and default from the field (every flag defaults to
    None, so ``resolve`` can tell what was given)."""
    for f in fields(Config):
        m, name = f.metadata, "--" + f.name.replace("_", "-")
        default = "" if f.default is None or m["kind"] in ("switch", "off") else f" (default {f.default})"
        kw = dict(help=m["help"] + default)
        if m["kind"] == "bool":
            parser.add_argument(name, type=_bool, metavar="BOOL", **kw)
        elif m["kind"] == "switch":
            parser.add_argument(name, action="store_true", default=None, **kw)
        elif m["kind"] == "off":
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                action="store_false", default=None, **kw)
        elif m["kind"] == "pair":
            parser.add_argument(name, dest=f.name, action="store_true", default=None, **kw)
            parser.add_argument("--no-" + f.name, dest=f.name, action="store_false",
                                help=f"do not {f.name}")
        elif m["kind"] == "optional":
            parser.add_argument(name, nargs="?", const="auto", **kw)
        else:
            typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(name, type=typ, choices=m["choices"], metavar=m["metavar"], **kw)
    return parser


def given(args):
    """The Config settings an argparse namespace from ``add_flags`` names (not None)."""
    return {f.name: getattr(args, f.name) for f in fields(Config)
            if getattr(args, f.name, None) is not None}


_FINITE = ("lr", "min_lr", "mb_lr", "mb_min_lr", "mb_momentum", "momentum", "weight_decay",
           "alpha", "label_smoothing", "ema_momentum", "ema_end", "mask_loss_weight", "lam_margin")


def validate_config(cfg: Config):
    """Every setting checked once, before any work: a ``ValueError`` that names the flag."""
    from fastmix.backbones import ARCH_NAMES
    problems = []

    def flag(name):
        return "--" + name.replace("_", "-")

    for name in _FINITE:
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            problems.append(f"{flag(name)} must be a finite number, got {v!r}")
    if problems:
        raise ValueError("; ".join(problems))

    def need(ok, msg):
        if not ok:
            problems.append(msg)
    for f in fields(Config):
        choices = f.metadata["choices"]
        v = getattr(cfg, f.name)
        need(choices is None or v is None or v in choices,
             f"{flag(f.name)} must be one of {', '.join(choices or ())}, got {v!r}")
    need(cfg.arch in ARCH_NAMES or str(cfg.arch).startswith("timm:"),
         f"--arch {cfg.arch!r} is unknown; choose from {', '.join(ARCH_NAMES)}")
    for name in ("epochs", "batch_size", "max_bad_steps", "eval_every", "log_every", "image_size"):
        need(getattr(cfg, name) > 0, f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "grid_every", "val_split"):
        need(getattr(cfg, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset", "workers"):
        v = getattr(cfg, name)
        need(v is None or v > 0, f"{flag(name)} must be positive, got {v}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.mb_lr is None or cfg.mb_lr > 0, f"--mb-lr must be positive, got {cfg.mb_lr}")
    for name in ("min_lr", "mb_min_lr", "weight_decay", "mask_loss_weight"):
        v = getattr(cfg, name)
        need(v is None or v >= 0, f"{flag(name)} must be >= 0, got {v}")
    for name in ("momentum", "mb_momentum", "label_smoothing"):
        v = getattr(cfg, name)
        need(v is None or 0 <= v < 1, f"{flag(name)} must lie in [0, 1), got {v}")
    for name in ("ema_momentum", "ema_end"):
        need(0 <= getattr(cfg, name) <= 1, f"{flag(name)} must lie in [0, 1], got {getattr(cfg, name)}")
    need(cfg.alpha is None or cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}")
    need(cfg.lam_margin < 0.5, f"--lam-margin must be below 0.5, got {cfg.lam_margin}")
    need(not (cfg.export_head and cfg.method != "automix"),
         f"--export-head names one of AutoMix's four heads; --method {cfg.method} has a single "
         f"head (leave --export-head out)")
    if problems:
        raise ValueError("; ".join(problems))
