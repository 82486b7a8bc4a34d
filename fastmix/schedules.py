"""Learning-rate and EMA-momentum schedules (spec §2.3)."""
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
