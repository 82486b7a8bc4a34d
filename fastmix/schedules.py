"""Learning-rate, EMA-momentum and mask-loss-weight schedules (spec §2.3)."""
import math


def cosine(base, final, progress):
    """Cosine annealing from ``base`` (progress 0) to ``final`` (progress 1).

    mmcv's ``CosineAnnealing(min_lr=final)``; with ``by_epoch=True`` progress is epoch / epochs.
    """
    progress = min(max(progress, 0.0), 1.0)
    return final + (base - final) * (1 + math.cos(math.pi * progress)) / 2


def ema_momentum(step, total_steps, base=0.999, end=0.999999, warmup_frac=0.1, end_frac=1.0):
    """EMA coefficient m at iteration ``step`` of ``total_steps`` (``CosineScheduleHook``).

    Constant ``base`` for the first ``warmup_frac`` of training, then
    ``end - (end - base) * (cos(pi * t / T_max) + 1) / 2`` with ``T_max = end_frac * T``; ``t`` is
    not shifted by the start of the window, so at ``t = 0.1 T`` m is only ~2.4% of the way.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_frac * total_steps:
        return base
    t_max = end_frac * total_steps
    if step > t_max:
        return end
    return end - (end - base) * (math.cos(math.pi * step / t_max) + 1) / 2


MASK_LOSS_SCHEDULES = ("constant", "official-cosine", "cosine")


class MaskLossWeight:
    """The AutoMix mask-loss weight at training step ``t`` (0-based) of ``T`` (spec §2.3).

    * ``constant``: ``base`` (CIFAR, Tiny-ImageNet, WRN).
    * ``official-cosine``: what the official ``CustomCosineAnnealingHook(attr_base=0.1,
      min_attr=0, by_epoch=False)`` runs on ImageNet, CUB and Aircraft. Before every iteration
      it anneals from the *current* value, so the cosine compounds:
      ``w_t = w_{t-1} * (cos(pi t / T) + 1) / 2`` with ``w_{-1} = base`` (t = 0 leaves it at
      ``base``). The weight halves after about 1.2 epochs of a 100-epoch ImageNet run and is
      below 1e-12 after about 4% of it: the mask loss is a warm-up.
    * ``cosine``: the clean decay ``base * (cos(pi t / T) + 1) / 2`` (a deviation from the
      official runs, offered for comparison).

    The compounding product is kept incrementally (one multiply per consecutive step); a jump
    (a resume, or a query out of order) recomputes it from step 0, the same multiplications in
    the same order, so a resumed run gets the uninterrupted run's weights bit for bit.
    """

    def __init__(self, base, schedule="constant"):
        if schedule not in MASK_LOSS_SCHEDULES:
            raise ValueError(f"mask-loss schedule must be one of {', '.join(MASK_LOSS_SCHEDULES)}, "
                             f"got {schedule!r}")
        self.base, self.schedule = base, schedule
        self._cache = None   # (T, t, w_t)

    def __call__(self, step, total_steps):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if self.schedule == "constant":
            return self.base
        if self.schedule == "cosine":
            return cosine(self.base, 0.0, step / total_steps)
        T, t0, w = self._cache if self._cache is not None and self._cache[0] == total_steps \
            and self._cache[1] <= step else (total_steps, -1, self.base)
        for t in range(t0 + 1, step + 1):
            w = w * (math.cos(math.pi * t / T) + 1) / 2
        self._cache = (T, step, w)
        return w
