"""The AutoMix Mix Block (spec §1: OpenMixup's ``PixelMixBlock`` as the AutoMix configs use it).

Given the momentum encoder's stage-3 features ``z`` [N, C, h, w], a λ and a permutation
``index``, it predicts a per-pixel mask for the shuffled partner ``z[index]``::

    q = W_qk [z; λ]            (shared 1x1 conv C(+1) -> C // reduction, bias, no norm/act)
    k = W_qk [z[index]; 1 - λ] (the same conv: W_q = W_k)
    v = W_v  [z[index]; 1 - λ] (1x1 conv C(+1) -> 1, bias), computed from the partner only
    P = softmax(q^T k / sqrt(C // reduction), dim=-1)   over the partner's positions, fp32
    m = sigmoid(upsample(P v))                          matmul, then upsample, then sigmoid
    mask = [1 - m, m]                                   ch0 weights x (label y, λ),
                                                        ch1 weights x[index] (y[index], 1-λ)

The λ channels exist only with ``lam_concat=True`` (ImageNet and fine-grained configs).
``inter_channels = C // reduction`` is computed before the λ channel is added.

The 1x1 convs are applied once per step (``project``): the partner's key and value are rows
of the same projection gathered through ``index``, and the λ channel is a per-call bias
(``lam_biases``), which is the same function as the official conv of the concatenated input.
The attention is ``fastmix.functional.mixblock_attention``: the flash-style Triton kernel or
its eager twin, which materialises P.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmix.checks import check_lam, describe, scalar_tensor
from fastmix.functional import mixblock_attention, upsample_mask

MASK_LOSS_MODES = ("L1", "L1+Variance")


class MixBlock(nn.Module):
    """AutoMix's Mix Block: cross-attention from each sample's features to its partner's,
    giving a per-pixel mask that blends the two images (see the module doc for the math).

    ``mask = block(z, lam, index, size)`` -> ``[N, 2, H, W]``: channel 0 weights ``x`` (label
    ``y``, weight λ), channel 1 weights the partner ``x[index]``; ``block.mask_loss(m, lam)``
    is the loss that keeps the partner's mask area near ``1 - λ``. AutoMix builds one from its
    constructor arguments; the weights start at N(0, 0.01), zero bias, so the first masks are
    about 0.5 everywhere.

    Args:
        in_channels: the channels C of the features ``z`` [N, C, h, w] it reads (the
            momentum encoder's tapped stage).
        reduction: the query/key width is ``inter_channels = max(C // reduction, 1)``.
        use_scale: scale the attention logits by ``1 / sqrt(inter_channels)``.
        lam_concat: append λ (and ``1 - λ`` for the partner) as an extra input channel of the
            1x1 convs (the ImageNet and fine-grained configs).
        upsample: how the low-resolution mask reaches the image size: ``"nearest"`` or
            ``"bilinear"``.
        mask_loss_mode: ``"L1"`` (``relu(|1 - mean(m) - λ| - margin)``) or ``"L1+Variance"``
            (minus twice the mask's variance: favours masks far from a flat blend).
        mask_loss_margin: the margin of the L1 term.

    Raises:
        ValueError: ``in_channels < 1``, or an unknown ``upsample`` or ``mask_loss_mode``.
    """

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True,
                 lam_concat: bool = False, upsample: str = "nearest",
                 mask_loss_mode: str = "L1", mask_loss_margin: float = 0.1) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        if mask_loss_mode not in MASK_LOSS_MODES:
            raise ValueError(f"mask_loss_mode must be one of {MASK_LOSS_MODES}, got {mask_loss_mode!r}")
        self.in_channels = in_channels
        self.inter_channels = max(in_channels // reduction, 1)
        self.use_scale = use_scale
        self.lam_concat = lam_concat
        self.upsample = upsample
        self.mask_loss_mode = mask_loss_mode
        self.mask_loss_margin = mask_loss_margin
        cin = in_channels + (1 if lam_concat else 0)
        self.query = nn.Conv2d(cin, self.inter_channels, 1, bias=True)  # also the key conv
        self.value = nn.Conv2d(cin, 1, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.01) weights and zero biases for both 1x1 convs."""
        # N(0, 0.01) weights, zero bias: at step 0 q.k ~ 0 and v ~ 0, so the mask is ~0.5.
        for conv in (self.query, self.value):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    @property
    def scale(self) -> float:
        """The attention logits' scale: ``1 / sqrt(inter_channels)``, or 1 without
        ``use_scale``."""
        return 1.0 / math.sqrt(self.inter_channels) if self.use_scale else 1.0

    def _check_features(self, z):
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"MixBlock expects features [N, C, h, w], got {describe(z)}")
        if z.shape[1] != self.in_channels:
            raise ValueError(f"MixBlock built for {self.in_channels} channels, got {z.shape[1]}")
        if not z.is_floating_point():
            raise TypeError(f"MixBlock features must be floating point, got {z.dtype}")

    def project(self, z: torch.Tensor) -> tuple:
        """The shared projections ``qk`` [N, hw, d] and ``v`` [N, hw] of features ``z``.

        Both Mix Block calls of a step (MB and BB branch) reuse them. The λ channel is not
        part of the projection: [z; λ] through a 1x1 conv is W_z z + b + λ w_λ, so the λ
        column becomes a per-call bias (``lam_biases``).
        """
        self._check_features(z)
        c = self.in_channels
        feats = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, c)  # free for channels_last
        qk = F.linear(feats, self.query.weight[:, :c, 0, 0], self.query.bias)
        v = F.linear(feats, self.value.weight[:, :c, 0, 0], self.value.bias).squeeze(-1)
        return qk, v

    def lam_biases(self, lam, ref: torch.Tensor) -> tuple:
        """``(q_bias, k_bias, v_bias)`` of the λ channel (all None without ``lam_concat``):
        the query sees λ, the partner's key and value see 1 - λ."""
        check_lam(lam, ref.device, "the features")
        if not self.lam_concat:
            return None, None, None
        lam_t = scalar_tensor(lam, ref.device)
        w_lam = self.query.weight[:, -1, 0, 0].float()
        return lam_t * w_lam, (1 - lam_t) * w_lam, (1 - lam_t) * self.value.weight[0, -1, 0, 0].float()

    def mask_logits(self, z: torch.Tensor, lam, index: torch.Tensor,
                    projected: Optional[tuple] = None, fused: Optional[bool] = False
                    ) -> torch.Tensor:
        """Low-resolution mask logits ``P v`` for the partner ``z[index]``, [N, 1, h, w] fp32.

        ``projected``: ``project(z)``'s output, to share it between the calls of a step;
        ``fused`` picks the Triton attention or its eager twin (``fastmix.functional``)."""
        qk, v = self.project(z) if projected is None else projected
        biases = self.lam_biases(lam, qk)
        out = mixblock_attention(qk, v, index, *biases, scale=self.scale, fused=fused)
        return out.view(qk.shape[0], 1, z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor, lam, index: torch.Tensor, size,
                mode: Optional[str] = None) -> torch.Tensor:
        """The full mask ``[N, 2, H, W]`` at image ``size`` (H, W) for features ``z``, λ
        ``lam`` (a float or 0-d tensor) and partners ``index`` ([N] permutation): channel 1
        weights ``x[index]``; ``mode`` overrides ``upsample``."""
        return self.mask_from_logits(self.mask_logits(z, lam, index), size, mode)

    def mask_from_logits(self, logits: torch.Tensor, size, mode: Optional[str] = None
                         ) -> torch.Tensor:
        """``[1 - m, m]`` with ``m = sigmoid(upsample(logits))`` at image ``size``."""
        m = torch.sigmoid(upsample_mask(logits, size, mode or self.upsample).float())
        return torch.cat([1 - m, m], dim=1)

    # ---- the mask loss ----------------------------------------------------------------
    def mask_loss(self, m: torch.Tensor, lam) -> torch.Tensor:
        """Spec §1.3 on the partner's mask ``m`` ([N, H, W] or [N, 1, H, W], values in (0, 1)).

        One batch mean ``m_mean`` (not per sample); L1: ``relu(|1 - m_mean - λ| - margin)``;
        L1+Variance subtracts ``2 * mean((m - m_mean)^2)``. With nearest upsampling by an
        integer factor the same numbers come out of the low-resolution sigmoid.
        """
        m = m.float()
        m_mean = m.mean()
        loss = F.relu((1 - m_mean - lam).abs() - self.mask_loss_margin)
        if self.mask_loss_mode == "L1+Variance":
            loss = loss - 2 * F.relu(((m - m_mean) ** 2).mean())
        return loss
