"""The official AutoMix step's data flow, written out from the spec (§1.2, §1.3, §2.2) on a
fastmix ``AutoMix``'s own modules, for ``bench/counts.py`` to count what the authors' code
moves, launches and keeps for backward. It is not the authors' code and is not used for
training; ``bench/test_counts.py`` checks that it computes fastmix's loss and gradients.

Where it differs from ``fastmix.automix.AutoMix.losses`` (the same function, more work):
  * the Mix Block runs twice in full: the query/key 1x1 conv on ``z`` and on ``z[index]`` (a
    gathered copy), the value conv on ``z[index]``, ``P = softmax(q k^T)`` materialised
    [N, hw, hw], ``P v``, nearest upsampling to [N, 1, H, W], sigmoid, ``cat([1 - m, m])``
    [N, 2, H, W] (fastmix projects once and mixes from the low-resolution logits);
  * the host checks the spec lists: NaN in P (raises), Inf in P (clamped), NaN in the mask
    (recomputed), NaN mask loss (dropped): each a read of the device;
  * the mask loss is taken over the full-resolution mask; each mixed batch is
    ``x * mask[:, 0:1] + x[index] * mask[:, 1:2]`` (two products and a sum);
  * each mixed loss is ``λ CE(logits, y) + (1 - λ) CE(logits, y[index])`` (two log-softmaxes);
  * the momentum encoder's clean pass runs the whole backbone (its stage-3 map is used);
  * the EMA is a loop over the parameters: ``θ_k = θ_k * m + θ_q * (1 - m)``.
"""
import math

import torch
import torch.nn.functional as F


def _mask(mb, z, lam, index, size):
    """PixelMixBlock.forward (spec §1.2), nearest upsampling: the mask [N, 2, H, W]."""
    n, c, h, w = z.shape
    x_lam, x_lam_ = z, z[index]
    if mb.lam_concat:
        x_lam = torch.cat([x_lam, torch.full_like(z[:, :1], lam)], dim=1)
        x_lam_ = torch.cat([x_lam_, torch.full_like(z[:, :1], 1 - lam)], dim=1)
    v_ = mb.value(x_lam_).view(n, 1, h * w).permute(0, 2, 1)             # [N, hw, 1]
    q = mb.query(x_lam).view(n, mb.inter_channels, h * w).permute(0, 2, 1)  # [N, hw, d]
    k = mb.query(x_lam_).view(n, mb.inter_channels, h * w)               # [N, d, hw]
    p = torch.matmul(q.float(), k.float())
    if mb.use_scale:
        p = p / math.sqrt(q.shape[-1])
    p = p.softmax(dim=-1)
    if bool(torch.isnan(p).any()):                                         # read-back
        raise FloatingPointError("NaN in the Mix Block attention")
    if bool(torch.isinf(p).any()):                                         # read-back
        p = p.clamp(-1e25, 1e25)
    m = torch.matmul(p, v_.float()).view(n, 1, h, w)
    if bool(torch.isnan(m).any()):                                         # read-back
        m = torch.nan_to_num(m, nan=1e-4)
    m = F.interpolate(m, scale_factor=size[0] // h, mode="nearest")
    m = torch.sigmoid(m.float())
    return torch.cat([1 - m, m], dim=1)


def _mixed_ce(logits, y, y_b, lam, smoothing=0.0):
    """λ·CE(y) + (1−λ)·CE(y_b); with ``smoothing`` each CE is LabelSmoothLoss(mode='original'):
    the soft target one_hot·(1−ε) + ε/K, which is torch's ``label_smoothing``."""
    return lam * F.cross_entropy(logits, y, label_smoothing=smoothing) + \
        (1 - lam) * F.cross_entropy(logits, y_b, label_smoothing=smoothing)


def _adjust(mask_bb, lam, eps=1e-8):
    """``mask_adjust`` (automix.py:532-547): the BB mask rescaled so its mean is ``lam`` (the
    Mix Block's λ, ``lam[0]``), written out as the official code does it, in place."""
    _mask = mask_bb[:, 0, :, :].clamp(min=eps, max=1 - eps)
    _mean = _mask.mean(dim=[1, 2]).squeeze()
    idx_larg = _mean[:] > lam + eps
    idx_less = _mean[:] < lam - eps
    if idx_larg.any():
        mask_bb[idx_larg == True, 0, :, :] = \
            _mask[idx_larg == True, :, :] * (lam / _mean[idx_larg == True].view(-1, 1, 1))  # noqa: E712
        mask_bb[idx_larg == True, 1, :, :] = 1 - mask_bb[idx_larg == True, 0, :, :]  # noqa: E712
    if idx_less.any():
        mask_bb[idx_less == True, 1, :, :] = \
            (1 - _mask[idx_less == True, :, :]) * \
            ((1 - lam) / (1 - _mean[idx_less == True].view(-1, 1, 1)))  # noqa: E712
        mask_bb[idx_less == True, 0, :, :] = 1 - mask_bb[idx_less == True, 1, :, :]  # noqa: E712
    return mask_bb


class OfficialAutoMix:
    """Wraps a fastmix ``AutoMix`` (fp32, nearest upsampling, L1 mask loss, no early exit) so
    that ``fastmix.step.TrainStep`` runs the official step on its parameters: ``losses``,
    ``set_progress`` and ``after_step`` as ``TrainStep`` calls them."""

    def __init__(self, model):
        if model.mix_block.upsample != "nearest" or model.mix_block.mask_loss_mode != "L1":
            raise ValueError("the official step here covers nearest upsampling, L1 mask loss")
        self.model = model

    def set_progress(self, step, total_steps):
        self.model.set_progress(step, total_steps)

    def losses(self, x, y, draw):
        a = self.model
        mb = a.mix_block
        lam_mb, lam_bb = float(draw["lam_mb"]), float(draw["lam_bb"])
        index_mb, index_bb = draw["index_mb"], draw["index_bb"]
        feature = a.backbone_k(x)[0]                     # k is frozen: no graph is built
        size = x.shape[-2:]
        mask_mb = _mask(mb, feature, lam_mb, index_mb, size)
        mask_bb = _mask(mb, feature, lam_bb, index_bb, size).clone().detach()
        if draw.get("mask_adjust"):                      # the official ViT option, off in CNNs
            mask_bb = _adjust(mask_bb, lam_mb)
        if a.lam_margin >= lam_bb or a.lam_margin >= 1 - lam_bb:
            mask_bb[:, 0] = lam_bb
            mask_bb[:, 1] = 1 - lam_bb
        m = mask_mb[:, 1]
        m_mean = m.sum() / m.numel()
        w_mask = draw.get("mask_loss_weight", a.mask_loss_weight)
        loss_mask = F.relu((1 - m_mean - lam_mb).abs() - mb.mask_loss_margin)
        if bool(torch.isnan(loss_mask)) or not w_mask > 0:                # read-back
            loss_mask = None
        x_mb = x * mask_mb[:, 0:1] + x[index_mb] * mask_mb[:, 1:2]
        x_bb = x * mask_bb[:, 0:1] + x[index_bb] * mask_bb[:, 1:2]
        ls = a.label_smoothing
        # switch_off (automix.py:435-443): a step whose coin says no skips forward_k
        loss_mix_k = _mixed_ce(a.head_mix_k(a.backbone_k(x_mb)[-1]).float(), y, y[index_mb],
                               lam_mb, ls) if draw.get("train_mb", True) else None
        loss_one_q = F.cross_entropy(a.head_one_q(a.backbone_q(x)[-1]).float(), y,
                                     label_smoothing=ls)
        loss_mix_q = _mixed_ce(a.head_mix_q(a.backbone_q(x_bb)[-1]).float(), y, y[index_bb],
                               lam_bb, ls)
        w = a.head_weights
        loss = w["mix_q"] * loss_mix_q + w["one_q"] * loss_one_q
        if loss_mix_k is not None:
            loss = loss + w["mix_k"] * loss_mix_k
        else:
            loss_mix_k = torch.zeros(())
        if loss_mask is not None:
            loss = loss + w_mask * loss_mask
        return loss, {"loss_mix_q": loss_mix_q.detach(), "loss_one_q": loss_one_q.detach(),
                      "loss_mix_k": loss_mix_k.detach()}

    @torch.no_grad()
    def after_step(self, step, total_steps, finite=None):
        m = self.model.ema_momentum_at(step, total_steps)
        if m >= 1:
            return
        k, q = self.model._pairs()
        for pk, pq in zip(k, q):
            pk.data = pk.data * m + pq.data * (1.0 - m)
