"""What every training method in fastmix shares: host RNG for λ, device permutations,
the batch checks, and the interface the trainer drives.

A method is an ``nn.Module`` with
- ``forward_train(x, y) -> (loss, logs)``: one training step's scalar loss and a dict of
  0-d tensors to log (never read on the host inside the step); it is
  ``losses(x, y, draw(x))``: ``draw`` makes the step's random choices (host floats and
  ints from the numpy generator, device permutations) and ``losses`` is the rest. ``losses``
  also takes every drawn value as a device tensor (``fastmix.step.StaticDraw``), which is
  how a CUDA graph replays the step with new draws;
- ``predict(x) -> {head_name: logits}`` in eval mode; ``default_head`` names the one used for
  inference;
- ``set_progress(step, total_steps)``: called by the training step before ``draw``, with the
  0-based index of the step about to run; ``draw`` may turn it into host numbers (AutoMix's
  mask-loss weight schedule), so a CUDA graph gets them as tensors like every other draw;
- ``after_step(step, total_steps, finite=None)``: after every optimizer step (AutoMix's EMA);
  it is ``apply_step_scalars(step_scalars(step, total_steps), finite)``, split the same way
  (the schedule's host floats, then device work that also takes them as tensors);
- ``rng_state()`` / ``load_rng_state(state)``: the host RNG, for exact resumption.
"""
import numpy as np
import torch
import torch.nn as nn

from fastmix.functional import random_permutation


class MixMethod(nn.Module):
    default_head = "cls"
    head_names = ("cls",)

    def __init__(self, num_classes, alpha=1.0, label_smoothing=0.0, seed=None, fused=None):
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

    def set_progress(self, step, total_steps):
        """The step about to run (0-based) of ``total_steps``: see the module doc."""
        self.progress = (step, total_steps)

    @property
    def in_chans(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels  # the first conv of the (first) backbone
        return None

    def sample_lam(self, size=None):
        """λ ~ Beta(α, α) on the host (1.0 when α = 0, i.e. no mixing)."""
        if self.alpha == 0:
            return 1.0 if size is None else [1.0] * size
        lam = self.rng.beta(self.alpha, self.alpha, size)
        return float(lam) if size is None else [float(v) for v in lam]

    def permutation(self, n, device, no_fixed_points=False):
        return random_permutation(n, device, no_fixed_points=no_fixed_points)

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

    def forward_train(self, x, y):
        self.check_batch(x, y)
        return self.losses(x, y, self.draw(x))

    def forward(self, x, y):
        """``forward_train``: so DDP (which hooks ``forward``) wraps the training step."""
        return self.forward_train(x, y)

    def step_scalars(self, step, total_steps):
        """Host floats the after-step update needs at ``step`` (a dict; none by default)."""
        return {}

    def apply_step_scalars(self, scalars, finite=None):
        """The after-step update given ``step_scalars``' values (floats or 0-d tensors)."""

    def after_step(self, step, total_steps, finite=None):
        """Called after every optimizer step; ``finite`` (a 0-d bool device tensor or None)
        says whether the step was applied (False: it was skipped for a non-finite loss)."""
        self.apply_step_scalars(self.step_scalars(step, total_steps), finite)

    def rng_state(self):
        return self.rng.bit_generator.state

    def load_rng_state(self, state):
        self.rng.bit_generator.state = state

    def inference_model(self):
        """``(backbone, head)`` of the classifier to export or deploy."""
        raise NotImplementedError
