"""AutoMix (spec §2: OpenMixup's ``AutoMixup`` as the headline configs use it).

Per training step, with x [N, C, H, W] and labels y:

1. two independent draws (λ_mb, index_mb) and (λ_bb, index_bb), λ ~ Beta(α, α);
2. z = the momentum encoder's features on clean x at the tapped stage (``mask_layer``: stage 3,
   stage 2 for WRN), with no parameter gradients;
3. the Mix Block runs twice on the same z: the MB mask keeps its graph, the BB mask is
   detached; if λ_bb is within ``lam_margin`` of 0 or 1 the BB sample is plain Mixup;
4. loss_mix_k: momentum encoder + frozen EMA mix head on the MB-mixed images -> the gradient
   reaches only the Mix Block (through the images);
   loss_one_q: online encoder + one-hot head on clean images;
   loss_mix_q: online encoder + mix head on the BB-mixed images;
   loss_mask: the Mix Block's mask loss on the MB mask, weight 0.1;
   total = loss_mix_q + loss_one_q + loss_mix_k + loss_mask (one backward, one step);
5. after the optimizer step, ``after_step`` moves the momentum encoder and its two heads
   towards the online ones (parameters only, not BN buffers) with the cosine EMA schedule.

The official ViT options ``switch_off`` and ``mask_adjust`` are constructor arguments (off by
default, as in every CNN config). Not implemented (unused by every config of the spec):
``head_one_mix``, ``head_ensemble``, the SAMix options, the legacy ``pre_*`` losses.
A NaN mask loss is not dropped on the host (that would sync); NaN steps are the trainer's job.
"""
import copy
from typing import Optional

import torch
import torch.nn as nn

from fastmix.backbones import ClsHead
from fastmix.methods.base import MixMethod, ema_update_
from fastmix.functional import mix_images, mix_images_pair, mixed_cross_entropy, upsample_mask
from fastmix.methods.mixblock import MixBlock
from fastmix import schedules

HEADS = ("one_k", "mix_k", "one_q", "mix_q")


def _select_mixup(fallback, lam, logits):
    """Mask logits whose sigmoid is the constant 1 - λ where ``fallback`` (a device flag) is
    set: the Mixup blend ``λ x + (1 - λ) x[index]`` as a mask (equal up to fp32 rounding)."""
    return torch.where(fallback, torch.logit(1 - lam.float()), logits)


class AutoMix(MixMethod):
    """AutoMix (ECCV 2022; see the module doc): an online encoder with two heads, its momentum
    (EMA) encoder with two frozen heads, and the Mix Block that learns how to mix.

    The model is an ``nn.Module``:

    - ``model(x, y)`` (= ``forward_train(x, y)``) -> ``(loss, logs)``: one training step's
      scalar loss (backward it, step the optimizer) and a dict of 0-d tensors to log;
    - ``model.after_step(step, total_steps)`` after each optimizer step: moves the momentum
      encoder and its heads towards the online ones (the EMA);
    - ``model(x)`` -> the inference logits (the ``one_k`` head: momentum encoder + one-hot
      head, the official inference model); ``predict(x)`` -> all four heads' logits
      ``{one_k, mix_k, one_q, mix_q}``; ``inference_model(head)`` -> a standalone classifier;
    - ``mix(x, y)`` -> ``(mixed images, y_a, y_b, λ)``: a batch mixed by the Mix Block.

    Args:
        backbone: the encoder, an ``nn.Module`` whose forward returns ``[tap, final]`` feature
            maps and whose ``out_channels`` is ``(tap channels, final channels)``
            (``fastmix.build_backbone``, ``FeatureTap``, ``TimmBackbone``). It is trained as
            the online encoder; a deep copy becomes the momentum encoder.
        num_classes: the number of classes (at least 2) of the four linear heads.
        alpha: λ ~ Beta(alpha, alpha) for both draws of a step (the Mix Block's λ_mb and the
            backbone's λ_bb); 0: no mixing (λ = 1).
        ema_momentum: the momentum encoder's EMA momentum at the start, held for the first
            ``ema_warmup`` fraction of training.
        ema_end: the final EMA momentum, reached by a cosine (``fastmix.schedules``).
        ema_warmup: the fraction of training (0-1) the momentum stays at ``ema_momentum``.
        mask_loss_weight: the weight of the Mix Block's mask loss (at step 0).
        mask_loss_schedule: the mask-loss weight over training: ``"constant"``,
            ``"official-cosine"`` (the official hook's compounding cosine, a warm-up) or
            ``"cosine"`` (a clean decay to 0); see ``fastmix.schedules.MaskLossWeight``.
        mask_loss_mode: ``"L1"`` or ``"L1+Variance"`` (``MixBlock.mask_loss``).
        mask_loss_margin: the L1 mask loss's margin: ``relu(|1 - mean(m) - λ| - margin)``.
        lam_margin: when λ_bb is within this of 0 or 1, the backbone's sample is plain Mixup
            instead of the Mix Block's mask.
        lam_concat: feed λ to the Mix Block as an extra input channel (the ImageNet, CUB,
            Aircraft and ViT configs).
        reduction: the Mix Block's query/key width is ``tap channels // reduction``.
        upsample: how the mask is upsampled to the image: ``"nearest"`` or ``"bilinear"``.
        mix_shuffle_no_repeat: draw partner permutations without fixed points (no image is
            mixed with itself; a batch of one sample then raises ``ValueError``).
        label_smoothing: label smoothing (0-1) of every cross-entropy loss.
        head_weights: weights of the three classification losses, a dict over ``"mix_q"``,
            ``"one_q"``, ``"mix_k"`` (default 1 each; the mask loss has ``mask_loss_weight``).
        k_early_exit: the momentum encoder's clean pass stops at the tapped stage (a speed-up
            that changes its later stages' BN statistics; needs a backbone whose forward
            takes ``tap_only``).
        switch_off: the official ViT option, a probability p in [0, 1]: with 0 < p < 1 the
            Mix Block's classification loss (the momentum encoder's pass on its mixed batch)
            is computed in a step with probability p only; 0 or 1: every step.
        mask_adjust: the official option, a probability q in [0, 1]: with probability q a
            step rescales the backbone's mask so its mean is the Mix Block's λ.
        seed: the seed of the host numpy generator (λ and the other host draws); None: fresh
            entropy.
        fused: True: the fused Triton kernels; False: their eager PyTorch twins; None (the
            default): fused on CUDA when Triton imports, eager elsewhere.

    Raises:
        ValueError: a backbone without ``out_channels = (tap, final)``, EMA momenta or
            probabilities outside [0, 1], ``k_early_exit`` with a backbone that cannot stop
            early, ``num_classes < 2``, a negative ``alpha``, ``label_smoothing`` outside
            [0, 1), or an unknown ``mask_loss_schedule``, ``mask_loss_mode`` or ``upsample``.
    """
    name = "automix"
    default_alpha = 2.0
    needs = ("tap",)
    recipe = "automix"
    default_head = "one_k"      # the official inference model: momentum encoder + one-hot head
    head_names = HEADS

    @classmethod
    def config_problems(cls, cfg) -> list:
        """``--mix-shuffle-no-repeat true`` with ``--batch-size 1``: no permutation of one
        sample without fixed points exists (it would be mixed with itself)."""
        problems = []
        if cfg.cuda_graphs and (0 < cfg.switch_off < 1 or cfg.mask_adjust > 0):
            problems.append("--switch-off below 1 and --mask-adjust change the step's work with "
                            "host draws; --cuda-graphs replays one recorded step: run them "
                            "without --cuda-graphs")
        if cfg.mix_shuffle_no_repeat and cfg.batch_size < 2:
            problems.append(f"--mix-shuffle-no-repeat true needs --batch-size of at least 2 (got "
                            f"{cfg.batch_size}): a permutation of one sample without fixed "
                            f"points does not exist, so each sample would be mixed with itself")
        return problems

    @classmethod
    def build(cls, cfg, backbone, num_classes, alpha, seed=None, fused=None) -> "AutoMix":
        """The trainer's AutoMix from a ``fastmix.config.Config`` (``ValueError`` for settings
        it cannot run with, :meth:`config_problems`)."""
        problems = cls.config_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(backbone, num_classes, alpha=alpha, ema_momentum=cfg.ema_momentum,
                   ema_end=cfg.ema_end, ema_warmup=cfg.ema_warmup,
                   mask_loss_weight=cfg.mask_loss_weight,
                   mask_loss_schedule=cfg.mask_loss_schedule,
                   mask_loss_mode=cfg.mask_loss_mode, lam_margin=cfg.lam_margin,
                   lam_concat=cfg.lam_concat, upsample=cfg.upsample,
                   mix_shuffle_no_repeat=cfg.mix_shuffle_no_repeat,
                   label_smoothing=cfg.label_smoothing, k_early_exit=cfg.k_early_exit,
                   switch_off=cfg.switch_off, mask_adjust=cfg.mask_adjust,
                   seed=seed, fused=fused)

    @torch.no_grad()
    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """``(mixed images, y_a, y_b, λ)``: one batch mixed by the Mix Block's mask (the
        momentum encoder's features, a fresh draw), as the online encoder trains on it."""
        lam = self.sample_lam()
        index = self.permutation(x.shape[0], x.device, self.mix_shuffle_no_repeat)
        z = _tap_and_final(self.backbone_k(x))[0]
        logits = self.mix_block.mask_logits(z, lam, index, fused=self.fused)
        x_mix = mix_images(x, index, logits, mode=self.mix_block.upsample, fused=self.fused)
        m = self.mix_block.mask_from_logits(logits, x.shape[-2:])[:, 1]
        return x_mix, y, y[index], 1.0 - m.flatten(1).mean(1)

    def __init__(self, backbone: nn.Module, num_classes: int, alpha: float = 2.0,
                 ema_momentum: float = 0.999, ema_end: float = 0.999999,
                 ema_warmup: float = 0.1, mask_loss_weight: float = 0.1,
                 mask_loss_schedule: str = "constant", mask_loss_mode: str = "L1",
                 mask_loss_margin: float = 0.1, lam_margin: float = 0.08,
                 lam_concat: bool = False, reduction: int = 2, upsample: str = "nearest",
                 mix_shuffle_no_repeat: bool = False, label_smoothing: float = 0.0,
                 head_weights: Optional[dict] = None, k_early_exit: bool = False,
                 switch_off: float = 0.0, mask_adjust: float = 0.0, seed: Optional[int] = None,
                 fused: Optional[bool] = None) -> None:
        super().__init__(num_classes, alpha=alpha, label_smoothing=label_smoothing, seed=seed,
                         fused=fused)
        if not isinstance(getattr(backbone, "out_channels", None), (tuple, list)) or \
                len(backbone.out_channels) != 2:
            raise ValueError("the backbone must expose out_channels = (tap C, final C) and "
                             "return [tap, final] features (see fastmix.backbones)")
        if not 0 <= ema_momentum <= 1 or not 0 <= ema_end <= 1:
            raise ValueError("EMA momentum values must lie in [0, 1]")
        c3, c_final = backbone.out_channels
        self.ema_momentum, self.ema_end, self.ema_warmup = ema_momentum, ema_end, ema_warmup
        self.mask_loss_weight = mask_loss_weight
        self.mask_loss_schedule = mask_loss_schedule
        self.mask_loss_weight_at = schedules.MaskLossWeight(mask_loss_weight, mask_loss_schedule)
        self.lam_margin = max(lam_margin, 0.0)
        self.mix_shuffle_no_repeat = mix_shuffle_no_repeat
        # Opt-in deviation: the momentum encoder's clean pass stops at the tapped stage (its
        # only use). The later stages' BN running statistics then see only mixed images.
        self.k_early_exit = k_early_exit
        if k_early_exit and "tap_only" not in backbone.forward.__code__.co_varnames:
            raise ValueError("k_early_exit needs a backbone whose forward takes tap_only "
                             "(fastmix's ResNets and WideResNets, the torchvision and timm backbones)")
        if not 0 <= switch_off <= 1 or not 0 <= mask_adjust <= 1:
            raise ValueError(f"switch_off and mask_adjust are probabilities in [0, 1], got "
                             f"{switch_off} and {mask_adjust}")
        # The official ViT options (spec §2.1): ``switch_off`` p in (0, 1) trains the Mix Block
        # (its classification loss through the momentum encoder) in a step with probability p
        # only (0 and 1: every step, as the official code); ``mask_adjust`` q rescales the BB
        # mask with probability q so its mean is λ_mb. Both are host draws (no sync).
        self.switch_off, self.mask_adjust = float(switch_off), float(mask_adjust)
        self.head_weights = dict(mix_q=1.0, one_q=1.0, mix_k=1.0)
        self.head_weights.update(head_weights or {})

        self.backbone_q = backbone
        self.head_mix_q = ClsHead(c_final, num_classes)
        self.head_one_q = ClsHead(c_final, num_classes)
        self.mix_block = MixBlock(c3, reduction=reduction, lam_concat=lam_concat, upsample=upsample,
                                  mask_loss_mode=mask_loss_mode, mask_loss_margin=mask_loss_margin)
        # The momentum encoder and its heads start as copies and are never trained by SGD.
        self.backbone_k = copy.deepcopy(backbone)
        self.head_mix_k = copy.deepcopy(self.head_mix_q)
        self.head_one_k = copy.deepcopy(self.head_one_q)
        for module in (self.backbone_k, self.head_mix_k, self.head_one_k):
            module.requires_grad_(False)
        self._ema_pairs = None

    # ---- the training step -------------------------------------------------------------
    def draw(self, x: torch.Tensor) -> dict:
        """Two independent draws: (λ_mb, index_mb) for the Mix Block, (λ_bb, index_bb) for
        the backbone; λ from the host generator, the permutations on ``x``'s device."""
        n, device = x.shape[0], x.device
        lam_mb, lam_bb = self.sample_lam(2)
        draw = {"lam_mb": lam_mb, "lam_bb": lam_bb,
                "index_mb": self.permutation(n, device, self.mix_shuffle_no_repeat),
                "index_bb": self.permutation(n, device, self.mix_shuffle_no_repeat)}
        if self.mask_loss_schedule != "constant":   # this step's weight (set_progress)
            draw["mask_loss_weight"] = self.mask_loss_weight_at(*self.progress)
        # Drawn only when on, so runs without them keep their random streams; in the official
        # step's order (the mask adjustment in the mixing, then the switch at the MB loss).
        if self.mask_adjust > 0:
            draw["mask_adjust"] = bool(self.mask_adjust > self.rng.random())
        if 0 < self.switch_off < 1:
            draw["train_mb"] = bool(self.rng.random() <= self.switch_off)
        return draw

    def losses(self, x: torch.Tensor, y: torch.Tensor, draw: dict) -> tuple:
        """``(loss, logs)`` of one step given ``draw`` (see the module doc, steps 2-4)."""
        lam_mb, lam_bb = draw["lam_mb"], draw["lam_bb"]
        index_mb, index_bb = draw["index_mb"], draw["index_bb"]
        # The BB sample falls back to Mixup when λ_bb is within lam_margin of 0 or 1: a host
        # branch for a float λ, a device flag (both branches computed, one selected) for a
        # tensor λ, as in a CUDA graph.
        mixup_fallback = (lam_bb <= self.lam_margin) | (lam_bb >= 1 - self.lam_margin)

        with torch.no_grad():
            z = (self.backbone_k(x, tap_only=True)[0] if self.k_early_exit
                 else _tap_and_final(self.backbone_k(x))[0])
        x_mb, x_bb, m_mb = self._mix(x, z, lam_mb, index_mb, lam_bb, index_bb, mixup_fallback,
                                     self.fused,
                                     **({"adjust": True} if draw.get("mask_adjust") else {}))
        w_mask = draw.get("mask_loss_weight", self.mask_loss_weight)
        loss_mask = w_mask * self.mix_block.mask_loss(m_mb, lam_mb)

        ce = self._mixed_ce
        final = lambda enc, img: _tap_and_final(enc(img))[1]  # noqa: E731
        train_mb = draw.get("train_mb", True)
        # switch_off: a step without the MB loss skips the momentum encoder's pass on x_mb (the
        # saving); the mask loss stays, as in the official step
        loss_mix_k = (ce(self.head_mix_k(final(self.backbone_k, x_mb)), y, y[index_mb], lam_mb)
                      if train_mb else None)
        loss_one_q = ce(self.head_one_q(final(self.backbone_q, x)), y, None, 1.0)
        loss_mix_q = ce(self.head_mix_q(final(self.backbone_q, x_bb)), y, y[index_bb], lam_bb)
        w = self.head_weights
        loss = w["mix_q"] * loss_mix_q + w["one_q"] * loss_one_q + loss_mask
        if loss_mix_k is not None:
            loss = loss + w["mix_k"] * loss_mix_k
        else:
            loss_mix_k = torch.zeros((), device=x.device)
        m = m_mb.detach()
        area = 1 - m.float().mean()
        logs = {"loss_mix_q": loss_mix_q.detach(), "loss_one_q": loss_one_q.detach(),
                "loss_mix_k": loss_mix_k.detach(), "loss_mask": loss_mask.detach(),
                "mask_area_mb": area, "lam_mb": lam_mb,
                # diagnostics of what the Mix Block learned: how far the kept area is from λ,
                # and how soft the mask is (mean 4m(1-m): 1 = a flat 0.5 blend, 0 = binary)
                "mask_area_err": (area - lam_mb).abs(),
                "mask_softness": 4 * (m.float() * (1 - m.float())).mean()}
        if 0 < self.switch_off < 1:     # the share of steps whose loss_mix_k is real
            logs["mb_trained"] = torch.tensor(float(train_mb), device=x.device)
        return loss, logs

    def _mixed_ce(self, logits, y_a, y_b, lam):
        return mixed_cross_entropy(logits, y_a, y_b, lam, self.label_smoothing, fused=self.fused)

    def _mix(self, x, z, lam_mb, index_mb, lam_bb, index_bb, mixup_fallback, fused,
             adjust=False):
        """Both mixed batches and the MB mask: the Mix Block projects z once, attends twice
        (the BB mask without a graph) and one mix makes both batches (``fused``: the Triton
        kernels, else their eager twins, which upsample the masks to full resolution; None:
        each op's own default, see ``fastmix.functional.use_fused``)."""
        mb, hw, size = self.mix_block, z.shape[-2:], x.shape[-2:]
        qk, v = mb.project(z)
        logits_mb = mb.mask_logits(z, lam_mb, index_mb, projected=(qk, v), fused=fused)
        mask_b = {"lam_b": lam_bb}
        if isinstance(mixup_fallback, torch.Tensor) or not mixup_fallback:
            with torch.no_grad():
                logits_bb = mb.mask_logits(z, lam_bb, index_bb, (qk.detach(), v.detach()), fused)
                if isinstance(mixup_fallback, torch.Tensor):
                    logits_bb = _select_mixup(mixup_fallback, lam_bb, logits_bb)
            mask_b = {"mask_logits_b": logits_bb}
        if adjust and "mask_logits_b" in mask_b and not isinstance(mixup_fallback, torch.Tensor):
            # mask_adjust: the BB mask rescaled at full resolution (an eager mix; off in the
            # official CNN and ViT configs, so not fused)
            x_mb = mix_images(x, index_mb, logits_mb, mode=mb.upsample, fused=fused)
            s = adjust_mask(torch.sigmoid(upsample_mask(logits_bb.float(), size, mb.upsample)),
                            lam_mb)
            xf = x.float()
            x_bb = (xf * (1 - s) + xf[index_bb] * s).to(x.dtype)
        else:
            x_mb, x_bb = mix_images_pair(x, index_mb, logits_mb, index_bb, mode=mb.upsample,
                                         fused=fused, **mask_b)
        if mb.upsample == "nearest" and size[0] % hw[0] == 0 and size[1] % hw[1] == 0:
            # Each low-res cell is repeated an equal number of times: the mean and variance of
            # the upsampled mask equal those of the low-res one, so skip the full-res tensor.
            m_mb = torch.sigmoid(logits_mb)[:, 0]
        else:
            m_mb = torch.sigmoid(upsample_mask(logits_mb, size, mb.upsample))[:, 0]
        return x_mb, x_bb, m_mb

    # ---- the EMA ------------------------------------------------------------------------
    def _pairs(self):
        if self._ema_pairs is None:
            k, q = [], []
            for mk, mq in ((self.backbone_k, self.backbone_q), (self.head_one_k, self.head_one_q),
                           (self.head_mix_k, self.head_mix_q)):
                k += list(mk.parameters())
                q += list(mq.parameters())
            self._ema_pairs = (k, q)
        return self._ema_pairs

    def ema_update(self, weight, finite=None) -> None:
        """θ_k <- θ_k + w (θ_q - θ_k), w = 1 - m, as multi-tensor ops (``ema_update_``, the
        update every method's ``--ema`` shares); ``finite`` False: a no-op, on the device."""
        ema_update_(*self._pairs(), weight, finite)

    def ema_momentum_at(self, step: int, total_steps: int) -> float:
        """The EMA momentum after optimizer step ``step`` (spec §2.3's cosine schedule)."""
        return schedules.ema_momentum(step, total_steps, self.ema_momentum, self.ema_end,
                                      self.ema_warmup)

    def step_scalars(self, step: int, total_steps: int) -> dict:
        """``{"ema_weight": 1 - momentum}`` after optimizer step ``step``."""
        return {"ema_weight": 1.0 - self.ema_momentum_at(step, total_steps)}

    def apply_step_scalars(self, scalars: dict, finite=None) -> None:
        """The momentum encoder's EMA update with ``step_scalars``' weight."""
        self.ema_update(scalars["ema_weight"], finite)

    def _apply(self, fn, *args, **kwargs):
        self._ema_pairs = None  # .to()/.cuda() may replace parameter tensors
        return super()._apply(fn, *args, **kwargs)

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict:
        """Logits of all four heads: {one_k, mix_k, one_q, mix_q} (spec §2.4)."""
        f_k = _tap_and_final(self.backbone_k(x))[1]
        f_q = _tap_and_final(self.backbone_q(x))[1]
        return {"one_k": self.head_one_k(f_k), "mix_k": self.head_mix_k(f_k),
                "one_q": self.head_one_q(f_q), "mix_q": self.head_mix_q(f_q)}

    def head_modules(self, head: Optional[str] = None) -> tuple:
        """``(encoder, head module)`` of ``head`` (default ``one_k``): the momentum encoder for
        the ``_k`` heads, the online one for the ``_q`` heads."""
        head = self._check_head(head)
        backbone = self.backbone_k if head.endswith("_k") else self.backbone_q
        return backbone, getattr(self, "head_" + head)


def adjust_mask(s: torch.Tensor, lam, eps: float = 1e-8) -> torch.Tensor:
    """``mask_adjust``'s rescale (spec §2.1): ``s`` [N, 1, H, W] the partner's weight, so
    ``1 - s`` is each image's; where an image's mean weight is above ``lam`` (+eps) its weight
    is scaled by ``lam / mean``, where below (−eps) the partner's weight ``1 − w`` is scaled by
    ``(1 − lam) / (1 − mean)``, on the weight clamped to [eps, 1 − eps]; the other samples keep
    their mask. As the official code, ``lam`` is the Mix Block's λ (not the backbone's)."""
    w = (1 - s).clamp(eps, 1 - eps)
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    larger, smaller = mean > lam + eps, mean < lam - eps
    s_larger = 1 - w * (lam / mean)
    s_smaller = (1 - w) * ((1 - lam) / (1 - mean))
    return torch.where(larger, s_larger, torch.where(smaller, s_smaller, s))


def _tap_and_final(features):
    """A backbone's output, checked: AutoMix needs exactly two maps, [tap, final]."""
    if not isinstance(features, (list, tuple)) or len(features) != 2:
        what = (f"{len(features)} feature map(s)" if isinstance(features, (list, tuple))
                else f"a {type(features).__name__}")
        raise ValueError(f"AutoMix's backbone must return [Mix Block tap, final features] "
                         f"(two maps), got {what}; wrap the network in FeatureTap or build it "
                         f"with build_backbone")
    return features
