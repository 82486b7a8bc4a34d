"""What every training method in fastmix shares: the interface the trainer drives
(``MixMethod``), the model-free mixing policy (``Mixer``: draws and mix, a callable
``(x, y) -> (x_mixed, soft targets)``), one backbone + head trained with a mixer
(``Classifier``, with an optional EMA copy), and the sync-free EMA update (``ema_update_``)
that AutoMix's momentum encoder and every method's ``--ema`` share.

Each method class carries its own facts as class attributes, which ``fastmix.config`` and
``fastmix.engine`` read (no ``method == "..."`` outside a method's own file):
``name``, ``default_alpha`` (spec §4.2's CIFAR-100 R-18 table), ``capturable`` (a CUDA graph
can replay its step), ``needs`` (what it needs beyond images and labels: ``"model"``: the
classifier itself, ``"mix_at"``: a backbone whose forward mixes after a stage, ``"tap"``: a
backbone that returns [tap, final] features), ``recipe`` (``"automix"``, ``"baseline"`` or
``"cutting"``: the presets' recipe family, spec §3/§4.2) and ``draws_lam``.

A method is an ``nn.Module`` with
- ``forward_train(x, y) -> (loss, logs)``: one training step's scalar loss and a dict of
  0-d tensors to log (never read on the host inside the step); it is
  ``losses(x, y, draw(x))``: ``draw`` makes the step's random choices (host floats and
  ints from the numpy generator, device permutations) and ``losses`` is the rest. ``losses``
  also takes every drawn value as a device tensor (``fastmix.step.StaticDraw``), which is
  how a CUDA graph replays the step with new draws;
- ``predict(x) -> {head_name: logits}`` in eval mode; ``default_head`` names the one used for
  inference; ``model(x)`` (no labels) is that head's logits, ``inference_model(head)`` a
  standalone ``nn.Module`` of it (``InferenceModel``: encoder + head, ``forward(x) -> logits``);
- ``set_progress(step, total_steps)``: called by the training step before ``draw``, with the
  0-based index of the step about to run; ``draw`` may turn it into host numbers (AutoMix's
  mask-loss weight schedule), so a CUDA graph gets them as tensors like every other draw;
- ``after_step(step, total_steps, finite=None)``: after every optimizer step (AutoMix's EMA);
  it is ``apply_step_scalars(step_scalars(step, total_steps), finite)``, split the same way
  (the schedule's host floats, then device work that also takes them as tensors);
- ``rng_state()`` / ``load_rng_state(state)``: the host RNG, for exact resumption.
"""
import copy
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fastmix import schedules
from fastmix.backbones import ClsHead
from fastmix.checks import check_index, is_lam_vector
from fastmix.functional import mixed_cross_entropy, random_permutation


@torch.no_grad()
def ema_update_(ema, online, weight, finite=None):
    """``θ_ema <- θ_ema + w (θ_online - θ_ema)`` over two lists of tensors, multi-tensor ops.

    ``weight`` (``w = 1 - momentum``) is a float (computed in float64 on the host: 1 - 0.999999
    would lose 1% in fp32) or a 0-d device tensor; ``finite`` (0-d bool tensor): when False the
    update is a no-op, decided on the device. A tensor weight goes through the foreach
    ``.Tensor`` overloads (the formula ``lerp`` uses for w < 0.5): ``_foreach_lerp_`` takes
    only a Python-scalar weight, and handing it a tensor reads the device (a host sync)."""
    tensor_w = isinstance(weight, torch.Tensor)
    if not ema or (not tensor_w and weight <= 0):
        return
    online = [p.detach() for p in online]
    if finite is None and not tensor_w:
        torch._foreach_lerp_(ema, online, weight)
        return
    w = weight if tensor_w else torch.full((), weight, dtype=ema[0].dtype, device=ema[0].device)
    if finite is not None:
        w = finite.to(w.dtype) * w
    delta = torch._foreach_sub(online, ema)
    torch._foreach_mul_(delta, w.to(ema[0].dtype))
    torch._foreach_add_(ema, delta)


class MethodFacts:
    """The facts a method class declares (see the module doc)."""
    name = None
    default_alpha = 1.0
    capturable = True
    needs = ()
    recipe = "baseline"
    draws_lam = True
    modes = ("batch",)          # λ per batch; Mixup and CutMix also per sample (pair, elem)

    @classmethod
    def config_problems(cls, cfg):
        """What this method cannot run with in ``cfg`` (a ``fastmix.config.Config``): a list of
        messages naming the flags, empty when none. Reads only settings, so it can run before
        any work (``build`` raises ``ValueError`` with them)."""
        return []


class HostDraws:
    """λ and the partners, drawn without reading the device: ``self.alpha``, ``self.rng``."""

    def sample_lam(self, size=None):
        """λ ~ Beta(α, α) on the host (1.0 when α = 0, i.e. no mixing)."""
        if self.alpha == 0:
            return 1.0 if size is None else [1.0] * size
        lam = self.rng.beta(self.alpha, self.alpha, size)
        return float(lam) if size is None else [float(v) for v in lam]

    def permutation(self, n, device, no_fixed_points=False):
        return random_permutation(n, device, no_fixed_points=no_fixed_points)


class MixMethod(MethodFacts, HostDraws, nn.Module):
    """The interface the trainer drives (see the module doc): ``model(x, y)`` -> ``(loss,
    logs)``, ``model(x)`` -> logits, ``predict``, ``after_step``, ``inference_model``.

    Args:
        num_classes: the number of classes (at least 2).
        alpha: λ ~ Beta(alpha, alpha) (0: no mixing).
        label_smoothing: label smoothing (0-1) of the cross-entropy losses.
        seed: the seed of the host numpy generator of the draws.
        fused: True / False / None: the Triton kernels, their eager twins, or fused on CUDA.
    """
    default_head = "cls"
    head_names = ("cls",)

    def __init__(self, num_classes: int, alpha: float = 1.0, label_smoothing: float = 0.0,
                 seed: Optional[int] = None, fused: Optional[bool] = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.fused = fused
        # λ comes from the host: a numpy generator that never reads device memory (no sync).
        self.rng = np.random.default_rng(seed)
        self.progress = (0, 1)

    def set_progress(self, step: int, total_steps: int) -> None:
        """The step about to run (0-based) of ``total_steps``: see the module doc."""
        self.progress = (step, total_steps)

    @property
    def in_chans(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels  # the first conv of the (first) backbone
        return None

    def check_batch(self, x, y):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point (normalised), got {x.dtype}")
        expected = getattr(self, "in_chans", None)
        if expected is not None and x.shape[1] != expected:
            raise ValueError(f"images have {x.shape[1]} channels but the backbone takes {expected}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be a 1-d tensor of length N={x.shape[0]}")
        if y.dtype != torch.int64:
            raise TypeError(f"labels must be int64 class indices, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"labels are on {y.device} but images are on {x.device}")

    def draw(self, x):
        """The random choices of one step for batch ``x`` (a dict; see the module doc). Only
        ``x``'s shape and device are used."""
        raise NotImplementedError

    def losses(self, x, y, draw):
        """``(loss, logs)`` of one step given ``draw`` (host values or device tensors)."""
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """``(loss, logs)`` of one training step on images ``x`` [N, C, H, W] and int64
        labels ``y`` [N]: ``losses(x, y, draw(x))`` after checking the batch."""
        self.check_batch(x, y)
        return self.losses(x, y, self.draw(x))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None
                ) -> "torch.Tensor | tuple":
        """``model(x, y)``: ``forward_train`` (one step's ``(loss, logs)``), so DDP (which hooks
        ``forward``) wraps the training step. ``model(x)``: the inference head's logits
        (``default_head``: the values of ``predict(x)[default_head]`` in the same mode), with
        autograd as the caller's context has it."""
        if y is None:
            return self.head_logits(x)
        return self.forward_train(x, y)

    def head_modules(self, head=None):
        """``(encoder, head module)`` computing ``head`` (default: ``default_head``): the
        model's own modules, shared with training. ``ValueError`` for an unknown head."""
        raise NotImplementedError

    def _check_head(self, head):
        head = head or self.default_head
        if head not in self.head_names:
            raise ValueError(f"head must be one of {self.head_names}, got {head!r}")
        return head

    def head_logits(self, x: torch.Tensor, head: Optional[str] = None) -> torch.Tensor:
        """Logits of ``head`` (default: ``default_head``) for images ``x``."""
        encoder, module = self.head_modules(head)
        return module(final_features(encoder(x)))

    def step_scalars(self, step, total_steps):
        """Host floats the after-step update needs at ``step`` (a dict; none by default)."""
        return {}

    def apply_step_scalars(self, scalars, finite=None):
        """The after-step update given ``step_scalars``' values (floats or 0-d tensors)."""

    def after_step(self, step: int, total_steps: int, finite=None) -> None:
        """Called after every optimizer step; ``finite`` (a 0-d bool device tensor or None)
        says whether the step was applied (False: it was skipped for a non-finite loss)."""
        self.apply_step_scalars(self.step_scalars(step, total_steps), finite)

    def ema_momentum_at(self, step, total_steps):
        """The EMA momentum after optimizer step ``step``; None for a method without an EMA."""
        return None

    def rng_state(self) -> dict:
        """The host generator's state (saved in checkpoints, for exact resumption)."""
        return self.rng.bit_generator.state

    def load_rng_state(self, state: dict) -> None:
        """Restore the host generator from ``rng_state()``'s value."""
        self.rng.bit_generator.state = state

    def inference_model(self, head: Optional[str] = None) -> "InferenceModel":
        """The classifier of ``head`` (default: ``default_head``) to export or deploy: an
        :class:`InferenceModel` in eval mode holding copies of its encoder and head module, so
        neither its mode nor later training changes the other. ``model.inference_model()(x)``
        equals ``model.predict(x)[head]`` of the eval-mode model (and ``model(x)`` for the
        default head)."""
        head = self._check_head(head)
        encoder, module = self.head_modules(head)
        return InferenceModel(copy.deepcopy(encoder), copy.deepcopy(module), head).eval()


def final_features(features):
    """A backbone's output as the feature map its heads read: the last of a ``[tap, final]``
    list (fastmix's backbones), or the output itself."""
    return features[-1] if isinstance(features, (list, tuple)) else features


class InferenceModel(nn.Module):
    """One trained classifier of a method: ``head(final features of backbone(x))``.

    ``forward(x) -> logits [N, K]``; ``head_name`` says which of the method's heads it is
    (``"cls"``, ``"ema"``, AutoMix's ``"one_k"``...). Built by ``MixMethod.inference_model``
    (copies, in eval mode). For callers written when ``inference_model`` returned a tuple,
    ``backbone, head = model.inference_model()`` still unpacks to the two modules.
    """

    def __init__(self, backbone, head, head_name):
        super().__init__()
        self.backbone, self.head, self.head_name = backbone, head, head_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(final_features(self.backbone(x)))

    def __iter__(self):
        # the tuple the earlier ``inference_model()`` returned: ``backbone, head = ...``
        return iter((self.backbone, self.head))

    def extra_repr(self):
        return f"head_name={self.head_name!r}"


def soft_targets(y_a: torch.Tensor, y_b: Optional[torch.Tensor], lam, num_classes: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """timm's ``mixup_target``: ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)`` with each
    one-hot smoothed to ``1 - eps + eps / K`` on the class and ``eps / K`` elsewhere; float32
    [N, K] on the labels' device.

    ``lam``: a Python float, a 0-d tensor or a float [N] tensor (one λ per sample, as timm's
    ``pair`` / ``elem`` modes); ``y_b=None`` gives the smoothed one-hot of ``y_a``. The
    computation is timm's op for op, so the values are bit for bit its targets.
    ``mixed_cross_entropy(logits, targets)`` equals ``mixed_cross_entropy(logits, y_a, y_b,
    lam, label_smoothing)`` (``tests/test_mixers.py``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    _check_smoothing(label_smoothing)
    if not isinstance(y_a, torch.Tensor) or y_a.dim() != 1:
        got = tuple(y_a.shape) if isinstance(y_a, torch.Tensor) else type(y_a).__name__
        raise ValueError(f"y_a must be a 1-d tensor of class indices [N], got {got}")
    n = y_a.shape[0]
    check_index("y_a", y_a, n, y_a.device, "y_a", high=num_classes)
    off_value = label_smoothing / num_classes
    on_value = 1. - label_smoothing + off_value
    y1 = _one_hot(y_a, num_classes, on_value, off_value)
    if y_b is None:
        return y1
    check_index("y_b", y_b, n, y_a.device, "y_a", high=num_classes)
    if is_lam_vector(lam):
        if lam.shape[0] != n or not lam.is_floating_point() or lam.device != y_a.device:
            raise ValueError(f"a per-sample lam must be a float [N] = [{n}] tensor on "
                             f"{y_a.device}, got {lam.dtype} {tuple(lam.shape)} on {lam.device}")
        lam = lam.to(torch.float32).view(-1, 1)
    elif isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a float, a 0-d tensor or an [N] tensor, "
                             f"got shape {tuple(lam.shape)}")
    elif isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a float or a tensor, got {type(lam).__name__}")
    y2 = _one_hot(y_b, num_classes, on_value, off_value)
    return y1 * lam + y2 * (1. - lam)


def _one_hot(y, num_classes, on_value, off_value):
    """timm's ``one_hot``: a fill of ``off_value`` with ``on_value`` scattered at the labels."""
    y = y.long().view(-1, 1)
    return torch.full((y.size()[0], num_classes), off_value,
                      device=y.device).scatter_(1, y, on_value)


def _check_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")



MODES = ("batch", "pair", "elem")


def _check_batch(x, y, even=False):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty image batch [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a 1-d tensor of N={x.shape[0]} labels, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must be int64 (or int32) class indices, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if even and x.shape[0] % 2:
        raise ValueError(f"the batch size must be even (timm's Mixup pairs sample i with "
                         f"N - 1 - i), got {x.shape[0]}")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _to_device(host, device):
    """One host-to-device copy of a float32 host array (pinned and non-blocking on CUDA: the
    host does not wait for the stream)."""
    t = torch.from_numpy(np.ascontiguousarray(host, dtype=np.float32))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Mixer(MethodFacts, HostDraws):
    """A mixing policy that needs no model: ``draw`` (the step's random choices: host numbers
    from a numpy generator, device permutations, never a read of device memory) and
    ``mix_with`` (device work only).

    - ``mixer(x, y) -> (x_mixed, soft_targets)``, as timm's ``Mixup`` and torchvision's
      ``v2.MixUp`` / ``v2.CutMix`` (``num_classes`` needed; label smoothing included);
    - ``mixer.mix(x, y) -> (x_mixed, y_a, y_b, lam)`` for ``mixed_cross_entropy(logits, y_a,
      y_b, lam, label_smoothing)`` (the fused loss path: no [N, K] target is built).

    The partner of sample i is ``x[index[i]]`` for a random permutation ``index``; ``λ`` is the
    weight of ``y_a`` and equals the share of ``x``'s own pixels in the mixed image (computed
    from the box or mask actually used). ``Classifier`` trains a backbone with a mixer."""

    def __init__(self, alpha=None, label_smoothing=0.0, num_classes=None, seed=None, fused=None,
                 rng=None):
        alpha = self.default_alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha < 0 or (
                self.draws_lam and alpha == 0):
            raise ValueError(f"{self.name} draws λ ~ Beta(α, α): alpha must be positive, got "
                             f"{alpha!r}" if self.draws_lam else
                             f"alpha must be a non-negative number, got {alpha!r}")
        _check_smoothing(label_smoothing)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
                num_classes, numbers.Integral) or num_classes < 2):
            raise ValueError(f"num_classes must be None or an int >= 2, got {num_classes!r}")
        self.alpha, self.label_smoothing, self.num_classes = alpha, label_smoothing, num_classes
        self.fused = fused
        self.rng = np.random.default_rng(seed) if rng is None else rng

    @classmethod
    def build(cls, cfg, backbone, num_classes, alpha, seed=None, fused=None):
        """The trainer's model for this method (``fastmix.engine.build_model``): a
        ``Classifier`` with this mixer and, with ``cfg.ema``, an EMA head."""
        ema = (dict(momentum=cfg.ema_momentum, end=cfg.ema_end, warmup=cfg.ema_warmup)
               if cfg.ema else None)
        mode = {} if cfg.mix_mode == "batch" else {"mode": cfg.mix_mode}
        mixer = cls(alpha, cfg.label_smoothing, num_classes, seed=seed, fused=fused, **mode)
        return Classifier(backbone, num_classes, mixer, ema=ema)

    def check_backbone(self, backbone):
        """Raise if ``backbone`` lacks what this method needs (``needs``)."""

    # ---- draws ------------------------------------------------------------------------------
    @staticmethod
    def host_mask(mask, x):
        """A numpy mask as a float32 CPU tensor (pinned when ``x`` is on CUDA, so the copy to
        the device is asynchronous)."""
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return t.pin_memory() if x.is_cuda else t

    def draw(self, x):
        """The random choices of one step for batch ``x`` (only its shape and device are
        read): a dict of host numbers, host masks and device permutations."""
        raise NotImplementedError

    # ---- mixing -----------------------------------------------------------------------------
    def mix_with(self, x, y, draw, model=None):
        """``(mixed images, y_a, y_b, λ)`` for batch ``(x, y)`` and ``draw``."""
        raise NotImplementedError

    def mix(self, x, y, model=None):
        """``(mixed images, y_a, y_b, λ)`` with a fresh draw."""
        _check_batch(x, y)
        return self.mix_with(x, y, self.draw(x), model)

    def __call__(self, x, y, model=None):
        """``(mixed images, soft targets [N, K])``, as timm's and torchvision's mixers."""
        if self.num_classes is None:
            raise ValueError(f"{type(self).__name__}(num_classes=None) gives no soft targets: "
                             f"pass num_classes, or use .mix(x, y) and mixed_cross_entropy")
        x_mix, y_a, y_b, lam = self.mix(x, y, model)
        return x_mix, soft_targets(y_a, y_b, lam, self.num_classes, self.label_smoothing)

    # ---- the training loss --------------------------------------------------------------------
    def losses(self, model, x, y, draw):
        """``(loss, logs)`` of one training step of ``model`` (a ``Classifier``): the mixed
        cross-entropy of its logits on the mixed images."""
        x_mix, y_a, y_b, lam = self.mix_with(x, y, draw, model)
        loss = mixed_cross_entropy(model.logits(x_mix), y_a, y_b, lam, self.label_smoothing,
                                   fused=self.fused)
        return loss, {"loss_cls": loss.detach()}

    def __repr__(self):
        return (f"{type(self).__name__}(alpha={self.alpha}, label_smoothing="
                f"{self.label_smoothing}, num_classes={self.num_classes})")


class Classifier(MixMethod):
    """One backbone and one linear head trained with a ``Mixer`` (every method but AutoMix).

    ``Classifier(build_backbone("resnet18_cifar"), 100, fastmix.methods.CutMix(alpha=0.2))``:
    ``model(x, y)`` -> ``(loss, logs)`` (the mixer's mixed images and its mixed
    cross-entropy), ``model.after_step(step, total_steps)`` after each optimizer step (the
    EMA, if any), ``model(x)`` -> the inference head's logits, ``predict(x)`` -> every head's.

    Args:
        backbone: an ``nn.Module`` returning a list of feature maps whose last is the final
            one, with ``out_channels[1]`` its channels (``fastmix.build_backbone``,
            ``FeatureTap``, ``TimmBackbone``); the methods that need it check more
            (``Mixer.check_backbone``: ManifoldMix's ``mix_at``).
        num_classes: the number of classes (at least 2) of the linear head (``ClsHead``);
            also the mixer's, when it was built without one.
        mixer: the method, a ``fastmix.methods.Mixer`` (``Mixup``, ``CutMix``, ``FMix``,
            ...; ``fastmix.methods.METHODS[name](alpha, label_smoothing, ...)``).
        ema: None, or ``dict(momentum, end, warmup)`` (defaults 0.999, 0.999999, 0.1) to keep
            an EMA copy of the backbone and head (``ema_backbone``, ``ema_head``: parameters
            and floating-point buffers, BN statistics included, as timm's ``ModelEmaV3``) on
            AutoMix's momentum schedule (``fastmix.schedules.ema_momentum``) with the same
            sync-free update (``ema_update_``); it is evaluated as the head ``"ema"`` beside
            ``"cls"`` and is the default inference head.

    Raises:
        ValueError: ``num_classes < 2``, unknown ``ema`` keys or momenta outside [0, 1], or a
            backbone the mixer cannot use. TypeError: ``mixer`` is not a ``Mixer``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mixer: "Mixer",
                 ema: Optional[dict] = None) -> None:
        nn.Module.__init__(self)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not isinstance(mixer, Mixer):
            raise TypeError(f"mixer must be a fastmix Mixer, got {type(mixer).__name__}")
        mixer.check_backbone(backbone)
        if mixer.num_classes is None:
            mixer.num_classes = num_classes
        self.mixer = mixer
        self.num_classes = num_classes
        self.progress = (0, 1)
        self.backbone = backbone
        self.head = ClsHead(backbone.out_channels[1], num_classes)
        self.ema = None
        self._ema_pairs = None
        if ema:
            unknown = set(ema) - {"momentum", "end", "warmup"}
            if unknown:
                raise ValueError(f"ema takes momentum, end and warmup, got {sorted(unknown)}")
            self.ema = {**dict(momentum=0.999, end=0.999999, warmup=0.1), **ema}
            if not 0 <= self.ema["momentum"] <= 1 or not 0 <= self.ema["end"] <= 1:
                raise ValueError("EMA momentum values must lie in [0, 1]")
            self.ema_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.ema_head = copy.deepcopy(self.head).requires_grad_(False)
            self.head_names = ("cls", "ema")
            self.default_head = "ema"

    # the mixer's settings and facts, read through the model
    name = property(lambda self: self.mixer.name)
    method = name
    capturable = property(lambda self: self.mixer.capturable)
    graph_capturable = capturable
    needs = property(lambda self: self.mixer.needs)
    alpha = property(lambda self: self.mixer.alpha)
    label_smoothing = property(lambda self: self.mixer.label_smoothing)

    @property
    def rng(self):
        return self.mixer.rng

    @rng.setter
    def rng(self, value):
        self.mixer.rng = value

    @property
    def fused(self):
        return self.mixer.fused

    @fused.setter
    def fused(self, value):
        self.mixer.fused = value

    def logits(self, x: torch.Tensor, mix_at=None, mix_fn=None) -> torch.Tensor:
        """The ``cls`` head's logits (``mix_at``/``mix_fn``: ManifoldMix's hidden mix)."""
        if mix_at is None:
            return self.head(self.backbone(x)[-1])
        return self.head(self.backbone(x, mix_at=mix_at, mix_fn=mix_fn)[-1])

    def draw(self, x: torch.Tensor) -> dict:
        """The mixer's draws for batch ``x``."""
        return self.mixer.draw(x)

    def mix_with(self, x: torch.Tensor, y: torch.Tensor, draw: dict) -> tuple:
        """``(mixed images, y_a, y_b, λ)`` for this batch and ``draw`` (this model is handed to
        the methods that need it: PuzzleMix's saliency)."""
        return self.mixer.mix_with(x, y, draw, self)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """``(mixed images, y_a, y_b, λ)`` for this batch, with a fresh draw."""
        return self.mix_with(x, y, self.draw(x))

    def losses(self, x: torch.Tensor, y: torch.Tensor, draw: dict) -> tuple:
        """``(loss, logs)`` of one step given ``draw`` (the mixer's loss)."""
        return self.mixer.losses(self, x, y, draw)

    # ---- the EMA ----------------------------------------------------------------------------
    def _pairs(self):
        if self._ema_pairs is None:
            def tensors(*modules):
                out = []
                for m in modules:
                    out += list(m.parameters())
                    out += [b for b in m.buffers() if b.is_floating_point()]
                return out
            self._ema_pairs = (tensors(self.ema_backbone, self.ema_head),
                               tensors(self.backbone, self.head))
        return self._ema_pairs

    def ema_momentum_at(self, step: int, total_steps: int) -> Optional[float]:
        """The EMA momentum after optimizer step ``step`` (AutoMix's cosine schedule); None
        without an EMA."""
        e = self.ema
        if e is None:
            return None
        return schedules.ema_momentum(step, total_steps, e["momentum"], e["end"], e["warmup"])

    def step_scalars(self, step: int, total_steps: int) -> dict:
        """``{"ema_weight": 1 - momentum}`` with an EMA, else ``{}``."""
        if self.ema is None:
            return {}
        return {"ema_weight": 1.0 - self.ema_momentum_at(step, total_steps)}

    def apply_step_scalars(self, scalars: dict, finite=None) -> None:
        """The EMA update with ``step_scalars``' weight (nothing without an EMA)."""
        if self.ema is not None:
            ema_update_(*self._pairs(), scalars["ema_weight"], finite)

    def _apply(self, fn, *args, **kwargs):
        self._ema_pairs = None  # .to()/.cuda() may replace the tensors
        return super()._apply(fn, *args, **kwargs)

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict:
        """Logits of every head: ``{"cls"}``, plus ``"ema"`` with an EMA."""
        out = {"cls": self.logits(x)}
        if self.ema is not None:
            out["ema"] = self.ema_head(self.ema_backbone(x)[-1])
        return out

    def head_modules(self, head: Optional[str] = None) -> tuple:
        """``(backbone, head)`` of ``"cls"`` or ``(ema_backbone, ema_head)`` of ``"ema"``."""
        head = self._check_head(head)
        return (self.ema_backbone, self.ema_head) if head == "ema" else (self.backbone, self.head)

    def extra_repr(self) -> str:
        """The mixer and the EMA settings, in the module's repr."""
        return f"mixer={self.mixer!r}" + (f", ema={self.ema}" if self.ema else "")
