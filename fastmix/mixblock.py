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

Two paths compute the same function. ``forward`` is the faithful eager reference, one
conv per call as in the official code. ``mask_logits_fused`` projects once per step
(``project``) and runs the flash-style Triton attention, which reads the partner rows through
``index`` and folds the λ channel into per-call biases.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmix.functional import _check_lam, upsample_mask

MASK_LOSS_MODES = ("L1", "L1+Variance")


def _shape(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _as_lam(lam, ref):
    """λ as a 0-d fp32 tensor on ``ref``'s device (a Python float becomes a fill, no sync)."""
    if isinstance(lam, torch.Tensor):
        return lam.to(device=ref.device, dtype=torch.float32)
    return torch.full((), float(lam), dtype=torch.float32, device=ref.device)


class MixBlock(nn.Module):
    def __init__(self, in_channels, reduction=2, use_scale=True, lam_concat=False,
                 upsample="nearest", mask_loss_mode="L1", mask_loss_margin=0.1):
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

    def reset_parameters(self):
        # N(0, 0.01) weights, zero bias: at step 0 q.k ~ 0 and v ~ 0, so the mask is ~0.5.
        for conv in (self.query, self.value):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    @property
    def scale(self):
        return 1.0 / math.sqrt(self.inter_channels) if self.use_scale else 1.0

    def _check_features(self, z):
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"MixBlock expects features [N, C, h, w], got {_shape(z)}")
        if z.shape[1] != self.in_channels:
            raise ValueError(f"MixBlock built for {self.in_channels} channels, got {z.shape[1]}")
        if not z.is_floating_point():
            raise TypeError(f"MixBlock features must be floating point, got {z.dtype}")

    @staticmethod
    def _check_index(index, n, device):
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.shape[0] != n:
            raise ValueError(f"index must be a 1-d tensor of length N={n}, got {_shape(index)}")
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index must be an integer tensor, got {index.dtype}")
        if index.device != device:
            raise ValueError(f"index is on {index.device} but the features are on {device}")

    # ---- the faithful eager reference -------------------------------------------------
    def mask_logits(self, z, lam, index):
        """Low-resolution mask logits ``P v`` for the partner, [N, 1, h, w], fp32."""
        self._check_features(z)
        self._check_index(index, z.shape[0], z.device)
        _check_lam(lam)
        n, _, h, w = z.shape
        z_i, z_j = z, z[index]
        if self.lam_concat:
            lam_t = _as_lam(lam, z).to(z.dtype)
            z_i = torch.cat([z_i, lam_t.expand(n, 1, h, w)], dim=1)
            z_j = torch.cat([z_j, (1 - lam_t).expand(n, 1, h, w)], dim=1)
        v = self.value(z_j).flatten(2).transpose(1, 2)          # [N, hw, 1]
        q = self.query(z_i).flatten(2).transpose(1, 2)          # [N, hw, d]
        k = self.query(z_j).flatten(2)                          # [N, d, hw]
        attn = torch.bmm(q.float(), k.float()) * self.scale     # [N, hw_i, hw_j], fp32
        attn = attn.softmax(dim=-1)                             # over the partner's positions
        return torch.bmm(attn, v.float()).transpose(1, 2).reshape(n, 1, h, w)

    def forward(self, z, lam, index, size, mode=None):
        """The full mask ``[N, 2, H, W]`` at image ``size``: channel 1 weights ``x[index]``."""
        return self.mask_from_logits(self.mask_logits(z, lam, index), size, mode)

    def mask_from_logits(self, logits, size, mode=None):
        """``[1 - m, m]`` with ``m = sigmoid(upsample(logits))`` at image ``size``."""
        m = torch.sigmoid(upsample_mask(logits, size, mode or self.upsample).float())
        return torch.cat([1 - m, m], dim=1)

    # ---- the fused path ---------------------------------------------------------------
    def project(self, z):
        """The shared projections of a step, once: ``qk`` [N, hw, d] and ``v`` [N, hw].

        Both Mix Block calls of a step (MB and BB branch) reuse them; the λ channel is not
        part of the projection (see ``mask_logits_fused``).
        """
        self._check_features(z)
        c = self.in_channels
        feats = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, c)  # free for channels_last
        qk = F.linear(feats, self.query.weight[:, :c, 0, 0], self.query.bias)
        v = F.linear(feats, self.value.weight[:, :c, 0, 0], self.value.bias).squeeze(-1)
        return qk, v

    def mask_logits_fused(self, projected, lam, index, hw):
        """Same as ``mask_logits`` from ``project``'s output, via the Triton attention."""
        from fastmix.kernels.mixblock_attn import mixblock_attention
        qk, v = projected
        self._check_index(index, qk.shape[0], qk.device)
        _check_lam(lam)
        q_bias = k_bias = v_bias = None
        if self.lam_concat:
            # [z; λ] through a 1x1 conv = W_z z + b + λ w_λ: the λ column becomes a bias.
            lam_t = _as_lam(lam, qk)
            w_lam = self.query.weight[:, -1, 0, 0].float()
            q_bias, k_bias = lam_t * w_lam, (1 - lam_t) * w_lam
            v_bias = (1 - lam_t) * self.value.weight[0, -1, 0, 0].float()
        out = mixblock_attention(qk, v, index, q_bias, k_bias, v_bias, scale=self.scale)
        return out.view(qk.shape[0], 1, hw[0], hw[1])

    # ---- the mask loss ----------------------------------------------------------------
    def mask_loss(self, m, lam):
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
