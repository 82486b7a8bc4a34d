"""The one source of a run's settings: defaults, help texts, presets, validation.

``Config`` holds every setting with its default and its help (``train.py`` builds its flags
from these fields, so a default or a help text is written once); ``PRESETS`` are the spec's
recipes (§3); ``resolve`` applies defaults <- preset <- flags; ``validate_config`` checks every
setting once, before any work, and names the flag it refuses.
"""
import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass, field, fields

from fastmix.methods import METHODS as _METHOD_CLASSES

# The method list and each method's facts come from the method classes (fastmix.methods).
METHODS = tuple(_METHOD_CLASSES)
# α per method: spec §4.2's CIFAR-100 R-18 table (GridMix has no α there: 0.2 as the other
# cutting methods; SmoothMix draws no λ, its α is unused).
DEFAULT_ALPHA = {name: cls.default_alpha for name, cls in _METHOD_CLASSES.items()}
HEADS = _METHOD_CLASSES["automix"].head_names + ("cls", "ema")


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
                       choices=("fashion-mnist", "fashion-mnist-offcentre", "cifar10", "cifar100", "synthetic",
                                "imagefolder"))
    data_dir: str = opt(None, "dataset folder (Fashion-MNIST: the four IDX .gz files, default "
                        "/usr/share/datasets/fashion-mnist; CIFAR: the folder of the pickle "
                        "batches; imagefolder: ROOT)")
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(100, "batch size per device")
    devices: int = opt(1, "the recipe's device count: its total batch is batch-size x devices "
                       "(a run on another count warns; the learning rates assume the total)")
    init_weights: str = opt(None, "start the backbone from a torchvision ImageNet state dict "
                            "(ImageNet-stem ResNets; fc is dropped; never downloaded); 'none': "
                            "from scratch where a preset asks for weights", metavar="PATH")
    # optimisation (SGD, per-epoch cosine; spec §2.3)
    optimizer: str = opt("sgd", "sgd (the CNN recipes: weight decay on every parameter) or adamw "
                         "(the official ViT recipes: betas 0.9/0.999, eps 1e-8, no weight decay "
                         "on norms, biases, class/position tokens and relative position tables)",
                         choices=("sgd", "adamw"))
    lr_schedule: str = opt("epoch", "cosine per epoch (mmcv by_epoch, the CNN recipes) or per "
                           "step (the ViT recipes)", choices=("epoch", "step"))
    warmup_epochs: float = opt(0.0, "linear warm-up of the main group's lr over this many epochs, "
                               "from --warmup-ratio of it (mmcv's linear warm-up; per step); the "
                               "Mix Block's own cosine has none, as officially")
    warmup_ratio: float = opt(1e-5, "the warm-up's starting fraction of the lr")
    clip_grad: float = opt(None, "clip the gradients to this global L2 norm before each step "
                           "(the ViT recipes: 10 on CIFAR, 5 on ImageNet)", metavar="NORM")
    lr: float = opt(0.1, "initial learning rate of the main group")
    min_lr: float = opt(0.0, "final learning rate of the cosine schedule")
    mb_lr: float = opt(None, "Mix Block initial lr (default: --lr)")
    mb_min_lr: float = opt(None, "Mix Block final lr (default: --min-lr)")
    mb_momentum: float = opt(None, "Mix Block SGD momentum (default: --momentum)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "weight decay (every trainable parameter, as officially)")
    alpha: float = opt(None, "Beta(alpha, alpha) of λ (default per method, spec §4.2: automix 2, "
                       "mixup 1, cutmix 0.2, manifoldmix 2, saliencymix 0.2, fmix 0.2, resizemix "
                       "1, gridmix 0.2, puzzlemix 1; smoothmix draws no λ)")
    label_smoothing: float = opt(0.0, "label smoothing of every CE loss")
    mix_mode: str = opt("batch", "λ per batch, or per sample (mixup, cutmix): pair (sample and "
                        "partner share λ, timm's pair mode) or elem (each sample its own λ; "
                        "the per-sample loss and mix run eager)",
                        choices=("batch", "pair", "elem"))
    # The EMA: AutoMix's momentum encoder; with --ema, an EMA head for every other method
    ema: bool = opt(False, "keep an EMA copy of the backbone and head (methods other than "
                    "AutoMix, whose momentum encoder is one): evaluated as the head 'ema' and "
                    "the default inference head, on AutoMix's schedule (--ema-momentum, "
                    "--ema-end, --ema-warmup)", kind="pair")
    ema_momentum: float = opt(0.999, "EMA start momentum (AutoMix's momentum encoder; --ema)")
    ema_end: float = opt(0.999999, "EMA final momentum, cosine from --ema-warmup of training")
    ema_warmup: float = opt(0.1, "fraction of training the EMA momentum stays at "
                            "--ema-momentum")
    mask_layer: int = opt(None, "AutoMix: the 0-based backbone stage feeding the Mix Block "
                          "(default: 2 for ResNets, 1 for WideResNets; timm:<name>: an index "
                          "into its feature_info, default the second-last: a ViT's blocks, so "
                          "5 taps DeiT's sixth block as the official ViT configs)")
    mask_tap: str = opt(None, "timm:<name>: tap the Mix Block at this module's output rather "
                        "than at a feature_info stage; '+ln' appends a LayerNorm without "
                        "parameters (the official Swin tap: layers.3.downsample+ln, the stage-3 "
                        "patch merging with the output norm that never trains)", metavar="MODULE")
    timm_kwargs: str = opt(None, "timm:<name>: extra timm.create_model keywords, e.g. "
                           "img_size=32,patch_size=4,depth=4 (values read as literals)")
    mask_loss_weight: float = opt(0.1, "AutoMix mask loss weight (at step 0)")
    mask_loss_schedule: str = opt("constant", "AutoMix mask-loss weight over training: constant; "
                                  "official-cosine (the official hook's compounding cosine: w_t = "
                                  "w_{t-1}(cos(pi t/T)+1)/2, a warm-up that vanishes within ~4%% "
                                  "of training); cosine (a clean decay to 0)",
                                  choices=("constant", "official-cosine", "cosine"))
    mask_loss_mode: str = opt("L1", "AutoMix mask loss", choices=("L1", "L1+Variance"))
    lam_margin: float = opt(0.08, "AutoMix: plain Mixup for the backbone when λ_bb is this close "
                            "to 0 or 1")
    lam_concat: bool = opt(False, "AutoMix: append the λ channel in the Mix Block (ImageNet "
                           "configs)", kind="bool")
    upsample: str = opt("nearest", "Mix Block mask upsampling", choices=("nearest", "bilinear"))
    mix_shuffle_no_repeat: bool = opt(False, "AutoMix: permutations without fixed points",
                                      kind="bool")
    switch_off: float = opt(0.0, "AutoMix (the official ViT option): train the Mix Block in a "
                            "step with this probability only, skipping the momentum encoder's "
                            "pass on its mixed batch otherwise (0 or 1: every step; ImageNet "
                            "DeiT-S: 0.8)")
    mask_adjust: float = opt(0.0, "AutoMix: with this probability, rescale the backbone's mask "
                             "so its mean is the Mix Block's λ (official option; 0 in every "
                             "official AutoMix config)")
    k_early_exit: bool = opt(False, "AutoMix: the momentum encoder's clean pass stops at stage 3 "
                             "(changes its stage-4 BN statistics; see README)", kind="switch")
    # data
    loader: str = opt("auto", "imagefolder loader: DALI (nvJPEG on CUDA) or the PIL fallback; "
                      "auto = DALI when it imports", choices=("auto", "dali", "torchvision"))
    decoder: str = opt("auto", "--loader torchvision: decode with torchvision.io (nvJPEG on "
                       "CUDA) or PIL; auto = torchvision.io when torchvision imports",
                       choices=("auto", "pil", "torchvision"))
    image_size: int = opt(224, "imagefolder crop size")
    data_pipeline: str = opt("imagenet", "imagefolder augmentation: imagenet (RandomResizedCrop "
                             "0.08-1 bicubic + flip; test resize 256/224 + centre crop), "
                             "tiny-imagenet (the same crop; test resize to the size, no crop), "
                             "fine-grained (resize 256/224, RandomResizedCrop 0.5-1 bilinear + "
                             "flip; test as imagenet), cifar-vit (RandomResizedCrop 0.8-1 "
                             "bicubic + flip + RandAugment m7 mstd0.5; test resize, no crop: "
                             "the official CIFAR ViT recipe), deit (imagenet + RandAugment m9 "
                             "mstd0.5 inc1); the RandAugment pipelines load with --loader "
                             "torchvision",
                             choices=("imagenet", "tiny-imagenet", "fine-grained", "cifar-vit",
                                      "deit"))
    workers: int = opt(None, "imagefolder: DALI threads / DataLoader workers (default min(8, "
                       "cores); 0: load in the main process, with the DataLoader (torchvision) "
                       "loader, which --loader auto then picks)")
    max_image_pixels: int = opt(89_478_485, "imagefolder pre-scan: skip images of more pixels "
                                "(width x height from the header, never decoded: decompression "
                                "bombs; with --verify-images header or full); PIL's default "
                                "limit; 0 = no limit")
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
                          "last.pt, metrics.jsonl, summary.json, metrics.csv, tb/, mix grids "
                          "and best checkpoints)", kind="switch")
    checkpoint_every: int = opt(0, "also write OUT/last.pt every N steps inside an epoch (0: at "
                                "the end of each epoch only)")
    grid_every: int = opt(0, "AutoMix: save a mixed-sample PNG grid every N epochs (0: never)")
    export: str = opt(None, "after training, write the classifier (encoder + head) as a plain "
                      "state dict", metavar="PATH")
    save_best: bool = opt(False, "keep OUT/best.pt: the weights and settings of the epoch with "
                          "the highest --best-metric (with its epoch, metric and value; "
                          "summary.json names it); --evaluate takes it as it takes last.pt (it "
                          "holds no optimizer state: resume from last.pt)", kind="switch")
    keep_top_k: int = opt(1, "--save-best: also keep the K best epochs as OUT/best-<epoch>.pt "
                          "(1: best.pt only)", metavar="K")
    best_metric: str = opt(None, "--save-best's metric, highest wins (the earliest epoch on a "
                           "tie): val_top1 or top1, optionally /HEAD (default: val_top1 with "
                           "--val-split, else top1; HEAD: --export-head, else the inference "
                           "head). top1 chooses on the test split, which then overstates the "
                           "chosen epoch's accuracy", metavar="METRIC")
    log: str = opt(None, "also log each epoch's metrics.jsonl scalars (losses, lr, top-1 per "
                   "head, val_top1, images/s) to tensorboard (OUT/tb/, with the mix grid image "
                   "when --grid-every draws one) and/or csv (OUT/metrics.csv, one column per "
                   "key, e.g. losses/loss, top1/one_k); a comma list, e.g. tensorboard,csv",
                   metavar="LOGGERS")
    evaluate: str = opt(None, "evaluate a checkpoint (OUT/last.pt or OUT/best.pt) and exit: the "
                        "model and data settings are the checkpoint's (--device, --data-dir, "
                        "--workers, --loader, --decoder, --eager, --verify-images still apply); "
                        "every head's top-1 on the test split (and the validation split if "
                        "the run had one), printed as one JSON line and a table; nothing is "
                        "trained or written", metavar="CKPT")
    export_head: str = opt(None, "head to export: AutoMix's one_k (default), mix_k, one_q, "
                           "mix_q; with --ema, cls or ema (default)", choices=HEADS)
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
    optimizer_impl: str = opt("torch", "torch SGD (fused=True) or apex FusedSGD (needs apex; it "
                              "ignores found_inf, so a NaN/Inf step is skipped with one host read "
                              "a step, and --cuda-graphs refuses it)", choices=("torch", "apex"))


def config_from_dict(values):
    """A Config from a saved ``asdict`` (a checkpoint's ``config``); settings this version no
    longer has (e.g. ``extra``) are dropped."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


# The spec's recipes (§3), one preset per row; a flag given on the command line overrides them.
# Every preset states the whole recipe (the values the plain defaults already have included),
# so `--print-config` shows it and the defaults can change without changing a recipe.
# (α is left to the method's default -- 2 for AutoMix -- so `--method mixup` keeps its own.)
_AUTOMIX = dict(ema_momentum=0.999, ema_warmup=0.1,
                mask_loss_weight=0.1, mask_loss_mode="L1", lam_margin=0.08, upsample="nearest",
                momentum=0.9, mix_shuffle_no_repeat=False, k_early_exit=False)
# CIFAR (ResNet_CIFAR / ResNeXt_CIFAR): one group, lr 0.1 -> 0.05 for everything (the Mix Block
# too), EMA end 0.999999, constant mask loss, no λ-concat, batch 100 on 1 GPU, 400 epochs.
_CIFAR = dict(_AUTOMIX, epochs=400, batch_size=100, devices=1, lr=0.1, min_lr=0.05, mb_lr=None,
              mb_min_lr=None, mb_momentum=None, weight_decay=1e-4, ema_end=0.999999,
              mask_loss_schedule="constant", lam_concat=False, mask_layer=2)
# Tiny-ImageNet: backbone 0.2 -> 0.05, Mix Block 0.1 -> 1e-3 (its own cosine), 64 px bicubic RRC.
_TINY = dict(_CIFAR, dataset="imagefolder", data_pipeline="tiny-imagenet", image_size=64,
             lr=0.2, min_lr=0.05, mb_lr=0.1, mb_min_lr=1e-3)
# ImageNet: λ-concat, backbone 0.1 -> 0, Mix Block 0.1 -> 1e-3 momentum 0.9, EMA end 0.99999, the
# official compounding mask-loss cosine, 4 GPUs x 64, 100 epochs, RRC 224 bicubic.
_IMAGENET = dict(_AUTOMIX, dataset="imagefolder", data_pipeline="imagenet", image_size=224,
                 epochs=100, batch_size=64, devices=4, lr=0.1, min_lr=0.0, mb_lr=0.1,
                 mb_min_lr=1e-3, mb_momentum=0.9, weight_decay=1e-4, ema_end=0.99999,
                 mask_loss_schedule="official-cosine", lam_concat=True, mask_layer=2)
# CUB-200 / FGVC-Aircraft: fine-tuning ImageNet weights (--init-weights), lr 0.001 -> 0, wd 5e-4,
# Mix Block 0.01 -> 5e-4, batch 16 on 1 GPU, 200 epochs, fixed-point-free permutations,
# Resize 256 + RRC 224 (scale 0.5-1).
_FINE = dict(_IMAGENET, data_pipeline="fine-grained", epochs=200, batch_size=16, devices=1,
             lr=1e-3, min_lr=0.0, mb_lr=0.01, mb_min_lr=5e-4, mb_momentum=0.9, weight_decay=5e-4,
             mix_shuffle_no_repeat=True, init_weights="required")

# The official ViT recipes (OpenMixup 37e1372, docs/official-vit-configs.md): timm's DeiT-S and
# Swin-T at 224 px, AdamW (wd 0.05, none on norms, biases and tokens), per-step cosine with a
# linear warm-up (5 epochs DeiT, 20 Swin, from 1e-5 of the lr), gradient clipping, label smoothing
# 0.1, λ-concat, the compounding mask-loss cosine, the EMA from 0.999 held for the first quarter
# (adjust_scope [0.25, 1]), the Mix Block at 1e-3 -> 1e-4 with no warm-up.
_VIT = dict(_AUTOMIX, dataset="imagefolder", image_size=224, optimizer="adamw",
            lr_schedule="step", warmup_ratio=1e-5, weight_decay=0.05, mb_lr=1e-3, mb_min_lr=1e-4,
            mb_momentum=None, label_smoothing=0.1, lam_concat=True, ema_warmup=0.25,
            mask_loss_schedule="official-cosine", k_early_exit=False)
# CIFAR-100 at 224 (export CIFAR-100 as an image folder: docs/vit.md): 200 epochs of batch 100,
# lr 5e-4 -> 1e-4, clip 10, EMA end 0.99996, switch_off 1.0 (the Mix Block trains every step).
_VIT_CIFAR = dict(_VIT, data_pipeline="cifar-vit", epochs=200, batch_size=100, devices=1,
                  lr=5e-4, min_lr=1e-4, clip_grad=10.0, ema_end=0.99996, switch_off=1.0)
_DEIT_S = dict(arch="timm:deit_small_patch16_224", timm_kwargs="drop_path_rate=0.1",
               mask_layer=5, mask_tap=None, warmup_epochs=5)

PRESETS = {
    "cifar100-r18": dict(_CIFAR, dataset="cifar100", arch="resnet18_cifar"),
    "cifar100-rx50": dict(_CIFAR, dataset="cifar100", arch="resnext50_cifar"),
    "cifar100-wrn28-8": dict(_CIFAR, dataset="cifar100", arch="wrn28_8", mask_layer=1, lr=0.03,
                             min_lr=1e-3, weight_decay=1e-3, mb_lr=0.03, mb_min_lr=1e-3,
                             mb_momentum=0.0),
    # CIFAR-10: the repository has no AutoMix config; the CIFAR-100 recipe (spec §3).
    "cifar10-r18": dict(_CIFAR, dataset="cifar10", arch="resnet18_cifar"),
    "cifar10-rx50": dict(_CIFAR, dataset="cifar10", arch="resnext50_cifar"),
    "tinyimagenet-r18": dict(_TINY, arch="resnet18_cifar"),
    "tinyimagenet-rx50": dict(_TINY, arch="resnext50_cifar", batch_size=50, devices=2),
    "imagenet-r18": dict(_IMAGENET, arch="resnet18"),
    "imagenet-r34": dict(_IMAGENET, arch="resnet34"),
    "imagenet-r50": dict(_IMAGENET, arch="resnet50"),
    "imagenet-r101": dict(_IMAGENET, arch="resnet101"),
    "imagenet-rx101": dict(_IMAGENET, arch="resnext101_32x4d"),
    "imagenet-r50-m0-ep100": dict(_IMAGENET, arch="resnet50", mb_momentum=0.0),
    "imagenet-r50-m09-ep300": dict(_IMAGENET, arch="resnet50", mb_momentum=0.9, epochs=300),
    # "AutoMix+": bilinear mask upsampling and the L1+Variance mask loss (SAMix's tricks).
    "imagenet-r50-plus": dict(_IMAGENET, arch="resnet50", upsample="bilinear",
                              mask_loss_mode="L1+Variance"),
    "cub-r18": dict(_FINE, arch="resnet18"),
    "cub-rx50": dict(_FINE, arch="resnext50_32x4d", mask_loss_mode="L1+Variance"),
    "aircraft-r18": dict(_FINE, arch="resnet18"),
    # The official Aircraft RX-50 config inherits CUB's dataset and num_classes=200 (a copy-paste
    # bug, spec §3); fastmix takes the class count from the data (100 for Aircraft).
    "aircraft-rx50": dict(_FINE, arch="resnext50_32x4d", mask_loss_mode="L1+Variance"),
    # ViTs (docs/official-vit-configs.md): DeiT-S tapped after its sixth block (patch tokens,
    # no norm: [N, 384, 14, 14]); Swin-T after stage 3's patch merging with a parameter-free
    # LayerNorm ([N, 768, 7, 7]); ImageNet DeiT-S: 8 x 128, lr 1e-3 -> 1e-5, clip 5, EMA end
    # 0.99999, switch_off 0.8, 300 epochs.
    "cifar100-deit-s": dict(_VIT_CIFAR, **_DEIT_S),
    "cifar100-swin-t": dict(_VIT_CIFAR, arch="timm:swin_tiny_patch4_window7_224",
                            timm_kwargs="drop_path_rate=0.2", mask_layer=None,
                            mask_tap="layers.3.downsample+ln", warmup_epochs=20),
    "imagenet-deit-s": dict(_VIT, **_DEIT_S, data_pipeline="deit", epochs=300, batch_size=128,
                            devices=8, lr=1e-3, min_lr=1e-5, clip_grad=5.0, ema_end=0.99999,
                            switch_off=0.8),
    # Not rows of the spec: the default GPU run and the short CPU run.
    "fashion-mnist-r18": dict(dataset="fashion-mnist", arch="resnet18_cifar", epochs=100,
                              batch_size=100, lr=0.1, min_lr=0.05, weight_decay=1e-4,
                              ema_end=0.999999),
    # A short CPU run (2 cores, < 10 min): a quarter-width ResNet-10, 3 epochs of Fashion-MNIST.
    # Short-run deviations from the 400-epoch recipe: cosine to 0 (not 0.05), and an EMA from
    # 0.99 to 0.999 so the momentum encoder keeps up within 1.8k steps.
    "cpu-small": dict(dataset="fashion-mnist", arch="resnet_small", epochs=3, batch_size=100,
                      lr=0.1, min_lr=0.0, weight_decay=1e-4, ema_momentum=0.99, ema_end=0.999),
}


# "For ResNeXt-50, the cutting-based methods use wd 5e-4" (spec §4.2, CIFAR-100).
CUTTING_METHODS = tuple(n for n, c in _METHOD_CLASSES.items() if c.recipe == "cutting")


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
    method = flags.get("method", values.get("method", "automix"))
    recipe = getattr(_METHOD_CLASSES.get(method), "recipe", "automix")
    if preset and recipe != "automix" and values.get("optimizer", "sgd") == "sgd":
        # The presets are AutoMix's recipes; the comparison methods' own (spec §3 "Baseline
        # recipes", §4.2): cosine to 0 (AutoMix's CIFAR floor is 0.05), and weight decay 5e-4
        # for the cutting methods on CIFAR-100 ResNeXt-50. A flag still overrides both.
        values["min_lr"] = 0.0
        if recipe == "cutting" and values.get("arch") == "resnext50_cifar" \
                and values.get("dataset") == "cifar100":
            values["weight_decay"] = 5e-4
    note = dataset_override_warning(preset, values, flags)
    if note:
        print(note, file=sys.stderr, flush=True)
    values.update(flags)
    return Config(**values), preset, why


def _images_of(values):
    """How a resolved (partial) setting dict gets its images, in words."""
    if values.get("dataset", Config.dataset) == "imagefolder":
        return (f"--image-size {values.get('image_size', Config.image_size)}, --data-pipeline "
                f"{values.get('data_pipeline', Config.data_pipeline)}")
    return "its own image size and augmentation; --image-size and --data-pipeline do not apply"


def dataset_override_warning(preset, values, flags):
    """One warning line when ``--dataset`` replaces the dataset a preset was written for
    (``values``: the preset's settings; ``flags``: those given), naming what the preset set
    and what the run uses; None otherwise."""
    if not preset or "dataset" not in flags or flags["dataset"] == values.get("dataset"):
        return None
    used = {**values, **flags}
    return (f"warning: --preset {preset} is a recipe for --dataset {values.get('dataset')} "
            f"({_images_of(values)}); this run uses --dataset {used['dataset']} "
            f"({_images_of(used)}) with the rest of the recipe (arch, learning rates, epochs, "
            f"batch size)")


def _bool(v):
    try:
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[v.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false (or yes/no, 1/0), got {v!r}") from None


# train.py --help's sections, in declaration order: (the first Config field of the section, its
# title). A field belongs to the section of the nearest start at or above it, so a field added
# inside a section lands in it; a section is renamed or split here, next to Config's headers.
SECTIONS = [
    ("method", "what to train"),
    ("optimizer", "optimisation (optimizer, learning rates, schedule, λ)"),
    ("ema", "the EMA and AutoMix (its momentum encoder, Mix Block and mask loss)"),
    ("loader", "data"),
    ("device", "the run (outputs, checkpoints, logging, evaluation)"),
    ("eager", "speed"),
]


def add_flags(parser):
    """One flag per Config field, its help and default from the field (every flag defaults to
    None, so ``resolve`` can tell what was given), in one argument group per ``SECTIONS`` entry
    (a ``--no-x`` flag beside its ``--x``)."""
    starts = dict(SECTIONS)
    groups = {}
    group = None
    for f in fields(Config):
        if f.name in starts:
            group = groups.setdefault(starts[f.name], parser.add_argument_group(starts[f.name]))
        elif group is None:     # fields above the first section's start (none today)
            group = groups.setdefault("settings", parser.add_argument_group("settings"))
        m, name = f.metadata, "--" + f.name.replace("_", "-")
        default = "" if f.default is None or m["kind"] in ("switch", "off") else f" (default {f.default})"
        kw = dict(help=m["help"] + default)
        if m["kind"] == "bool":
            group.add_argument(name, type=_bool, metavar="BOOL", **kw)
        elif m["kind"] == "switch":
            group.add_argument(name, action="store_true", default=None, **kw)
        elif m["kind"] == "off":
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_false", default=None, **kw)
        elif m["kind"] == "pair":
            group.add_argument(name, dest=f.name, action="store_true", default=None, **kw)
            group.add_argument("--no-" + f.name, dest=f.name, action="store_false",
                               help=f"do not {f.name}")
        elif m["kind"] == "optional":
            group.add_argument(name, nargs="?", const="auto", **kw)
        else:
            typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            group.add_argument(name, type=typ, choices=m["choices"], metavar=m["metavar"], **kw)
    return parser


def given(args):
    """The Config settings an argparse namespace from ``add_flags`` names (not None)."""
    return {f.name: getattr(args, f.name) for f in fields(Config)
            if getattr(args, f.name, None) is not None}


_FINITE = ("lr", "min_lr", "mb_lr", "mb_min_lr", "mb_momentum", "momentum", "weight_decay",
           "alpha", "label_smoothing", "ema_momentum", "ema_end", "ema_warmup", "mask_loss_weight",
           "lam_margin", "warmup_epochs", "warmup_ratio", "clip_grad")


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
    for name in ("epochs", "batch_size", "max_bad_steps", "eval_every", "log_every", "image_size",
                 "devices"):
        need(getattr(cfg, name) > 0, f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "grid_every", "val_split"):
        need(getattr(cfg, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset"):
        v = getattr(cfg, name)
        need(v is None or v > 0, f"{flag(name)} must be positive, got {v}")
    need(cfg.workers is None or cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    need(not (cfg.workers == 0 and cfg.loader == "dali"),
         "--workers 0 loads the images in the main process, which --loader torchvision does; "
         "DALI needs at least one CPU thread: give --workers 1 or more, or --loader torchvision")
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
    need(0 <= cfg.ema_warmup <= 1, f"--ema-warmup must lie in [0, 1], got {cfg.ema_warmup}")
    stages = 3 if str(cfg.arch).startswith("wrn") else 4
    timm_arch = str(cfg.arch).startswith("timm:")
    need(cfg.mask_layer is None or timm_arch or cfg.mask_layer in range(stages),
         f"--mask-layer must be a stage index 0-{stages - 1} of --arch {cfg.arch}, got "
         f"{cfg.mask_layer}")
    need(cfg.mask_layer is None or not timm_arch or cfg.mask_layer >= 0,
         f"--mask-layer must be >= 0 (an index into the timm model's feature_info), got "
         f"{cfg.mask_layer}")
    need(not cfg.timm_kwargs or timm_arch, "--timm-kwargs applies to --arch timm:<name>")
    if cfg.timm_kwargs:
        from fastmix.backbones import parse_timm_kwargs
        try:
            parse_timm_kwargs(cfg.timm_kwargs)
        except ValueError as e:
            problems.append(str(e))
    need(not cfg.mask_tap or timm_arch, "--mask-tap applies to --arch timm:<name>")
    need(not (cfg.mask_tap and cfg.k_early_exit),
         "--k-early-exit stops at a feature_info stage; --mask-tap taps a module by name: "
         "give one of them")
    need(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.warmup_epochs == 0 or cfg.lr_schedule == "step",
         "--warmup-epochs warms the lr up step by step: give --lr-schedule step")
    need(0 < cfg.warmup_ratio <= 1, f"--warmup-ratio must lie in (0, 1], got {cfg.warmup_ratio}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0,
         f"--clip-grad must be positive, got {cfg.clip_grad}")
    need(not (cfg.optimizer == "adamw" and cfg.optimizer_impl == "apex"),
         "--optimizer adamw is torch's fused AdamW; --optimizer-impl apex is apex's FusedSGD")
    need(not (cfg.clip_grad and cfg.optimizer_impl == "apex"),
         "--clip-grad needs --optimizer-impl torch")
    need(cfg.lam_margin < 0.5, f"--lam-margin must be below 0.5, got {cfg.lam_margin}")
    cls = _METHOD_CLASSES.get(cfg.method)
    need(cls is not None, f"--method {cfg.method!r} is unknown; choose from {', '.join(METHODS)}")
    cls = cls or _METHOD_CLASSES["automix"]
    # α = 0 is meaningful only for a method that draws no λ (vanilla, smoothmix: α is unused)
    need(cfg.alpha is None or cfg.alpha > 0 or (cfg.alpha == 0 and not cls.draws_lam),
         f"--alpha must be positive, got {cfg.alpha}" if cls.draws_lam else
         f"--alpha must be >= 0 (--method {cfg.method} draws no λ: it is unused), got {cfg.alpha}")
    need(not (cfg.cuda_graphs and not cls.capturable),
         f"--cuda-graphs replays one recorded step, but {cfg.method} changes the step's work "
         f"with host draws (ManifoldMix's stage, PuzzleMix's grid and its host graph cut): run "
         f"it without --cuda-graphs")
    need(not (cfg.cuda_graphs and cfg.optimizer_impl == "apex"),
         "--cuda-graphs needs --optimizer-impl torch: apex's FusedSGD ignores found_inf (a "
         "captured step could not skip a NaN/Inf step) and takes the learning rate as a host "
         "float, where a captured step holds it in a device tensor")
    need(cfg.mix_mode in cls.modes,
         f"--mix-mode {cfg.mix_mode}: --method {cfg.method} draws λ per batch only (per-sample "
         f"λ: mixup, cutmix)")
    need(not ("mix_at" in cls.needs and str(cfg.arch).startswith("timm:")),
         f"--method {cfg.method} mixes hidden features after a stage: it needs fastmix's "
         f"ResNets or WideResNets (their forward takes mix_at), not a timm backbone")
    heads = (cls.head_names if cls.recipe == "automix" else
             ("cls", "ema") if cfg.ema else ("cls",))
    need(not cfg.export_head or cfg.export_head in heads,
         f"--export-head {cfg.export_head} is not a head of this run (--method {cfg.method}"
         f"{' --ema' if cfg.ema else ''} has {', '.join(heads)})")
    need(not (cfg.ema and cls.recipe == "automix"),
         "--ema: AutoMix's momentum encoder is its EMA (set it with --ema-momentum, --ema-end, "
         "--ema-warmup); --ema is for the other methods")
    for name in ("switch_off", "mask_adjust"):
        need(0 <= getattr(cfg, name) <= 1,
             f"{flag(name)} is a probability in [0, 1], got {getattr(cfg, name)}")
    need(cls.recipe == "automix" or (cfg.switch_off == 0 and cfg.mask_adjust == 0),
         "--switch-off and --mask-adjust are AutoMix options")
    need(cfg.max_image_pixels >= 0,
         f"--max-image-pixels must be >= 0 (0: no limit), got {cfg.max_image_pixels}")
    problems += cls.config_problems(cfg)
    need(cfg.keep_top_k > 0, f"--keep-top-k must be positive, got {cfg.keep_top_k}")
    need(cfg.save_best or (cfg.best_metric is None and cfg.keep_top_k == 1),
         "--best-metric and --keep-top-k choose what --save-best keeps: add --save-best")
    if cfg.best_metric is not None:
        split, _, head = str(cfg.best_metric).partition("/")
        need(split in BEST_SPLITS, f"--best-metric must be val_top1 or top1, optionally /HEAD, "
                                   f"got {cfg.best_metric!r}")
        need(split != "val_top1" or cfg.val_split > 0,
             "--best-metric val_top1 needs a validation split: give --val-split N (or choose on "
             "the test split with --best-metric top1)")
        need(not head or head in heads, f"--best-metric {cfg.best_metric}: {head!r} is not a "
                                        f"head of this run ({', '.join(heads)})")
    for name in log_targets(cfg.log):
        need(name in LOGGERS, f"--log: unknown logger {name!r}; choose from "
                              f"{', '.join(LOGGERS)} (a comma list)")
        need(name != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
             "--log tensorboard needs the tensorboard package, which is not installed here "
             "(pip install tensorboard, or pip install -e .[tensorboard])")
    if problems:
        raise ValueError("; ".join(problems))


BEST_SPLITS = ("val_top1", "top1")
LOGGERS = ("tensorboard", "csv")


def log_targets(value):
    """The loggers a ``--log`` value names (a comma list), in order, without repeats."""
    names = [s.strip() for s in str(value or "").split(",") if s.strip()]
    return list(dict.fromkeys(names))


def best_metric(cfg: Config, default_head):
    """``(split, head)`` that ``--save-best`` maximises: ``--best-metric`` (``split[/head]``),
    by default ``val_top1`` with a validation split, else ``top1`` (the test split); the head
    defaults to ``--export-head``, else ``default_head`` (the model's inference head)."""
    split, _, head = str(cfg.best_metric or "").partition("/")
    split = split or ("val_top1" if cfg.val_split > 0 else "top1")
    return split, head or cfg.export_head or default_head


def setting_warnings(cfg: Config):
    """Harmless settings that will do nothing in this run, in words (one line each)."""
    out = []
    if cfg.grid_every:
        cls = _METHOD_CLASSES.get(cfg.method)
        automix = getattr(cls, "recipe", None) == "automix"
        why = (f"--method {cfg.method} has no Mix Block" if not automix
               else "--dataset imagefolder keeps no test images in memory"
               if cfg.dataset == "imagefolder" else None)
        if why:
            out.append(f"warning: --grid-every {cfg.grid_every} draws AutoMix's Mix Block masks "
                       f"on a tensor dataset's test images; this run writes no grid ({why})")
    return out
