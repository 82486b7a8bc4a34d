"""Fused mixed-label cross-entropy (the AutoMix / mixup classification loss).

    loss = lam * CE(logits, target_a) + (1 - lam) * CE(logits, target_b)

with each CE exactly ``F.cross_entropy(logits.float(), t, label_smoothing=eps)`` (mean over
the batch). One pass, Liger-style: the forward kernel computes every row's loss and, when
``logits`` needs a gradient, also writes ``softmax(z) - target_dist`` for the row, where

    target_dist = lam * ((1-eps) * onehot(a) + eps/K) + (1-lam) * ((1-eps) * onehot(b) + eps/K).

The backward is then one elementwise pass: ``grad_logits = stored * grad_output / N``. The
1/N is folded into that pass rather than into the stored values, so fp16 gradients round once
(at the end) instead of underflowing twice; the result is d loss / d logits in logits' dtype.

No host synchronisation anywhere: ``lam`` (a Python float or a 0-d tensor, possibly on the
device) reaches the kernel as a pointer to a 0-d fp32 tensor, the batch mean is a device-side
``sum() / N`` of a per-row fp32 buffer, and ``grad_output`` is read by the backward kernel
from device memory. The training step stays CUDA-graph capturable.

Public API:
    mixed_cross_entropy(logits, target_a, target_b=None, lam=1.0, label_smoothing=0.0)
    fastmix.functional.mixed_cross_entropy_eager(...)   # the eager twin (same signature)
    cross_entropy(logits, target, label_smoothing=0.0)
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmix.checks import check_cross_entropy, scalar_tensor
from fastmix.kernels import _common

__all__ = ["mixed_cross_entropy", "cross_entropy"]


# Launch configuration (module globals so tests can force the chunked path on small K).
MAX_BLOCK_K = 4096   # widest class chunk one program holds; K above it loops over chunks
ROW_TILE = 1024      # small K: pack rows into one program up to this many elements
SCALE_BLOCK = 2048   # elements per program of the backward scaling kernel


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _targets(x_row, ta_ptr, tb_ptr, lam_ptr, rows64, K, eps, HAS_B: tl.constexpr):
    """The labels of a tile of rows and what the loss needs of them: ``(a, b, x_t, w_a, w_b,
    poison)`` with x_t the λ-weighted target logit, w_* the one-hot weights of the target
    distribution, poison 0 (or NaN for a label outside [0, K): the launcher refuses one, this
    is defence in depth; such a label gathers column 0)."""
    a = tl.load(ta_ptr + rows64).to(tl.int64)
    a_ok = (a >= 0) & (a < K)
    x_a = tl.load(x_row + tl.where(a_ok, a, 0)).to(tl.float32)
    if HAS_B:
        b = tl.load(tb_ptr + rows64).to(tl.int64)
        b_ok = (b >= 0) & (b < K)
        x_b = tl.load(x_row + tl.where(b_ok, b, 0)).to(tl.float32)
        lam = tl.load(lam_ptr).to(tl.float32)
        x_t = lam * x_a + (1.0 - lam) * x_b               # target logit, lam-weighted
        w_a = lam * (1.0 - eps)
        w_b = (1.0 - lam) * (1.0 - eps)
        lbl_ok = a_ok & b_ok
    else:
        b = a
        x_t = x_a
        w_a = 1.0 - eps
        w_b = 0.0
        lbl_ok = a_ok
    return a, b, x_t, w_a, w_b, tl.where(lbl_ok, 0.0, float("nan"))


@triton.jit
def _store_grad(grad_ptr, g_row, cols, col_ok, row_ok, p, a, b, w_a, w_b, eps_over_k, poison):
    """softmax ``p`` minus the target distribution on one [ROWS, BLOCK_K] tile, stored in the
    gradient buffer's dtype."""
    g = p - eps_over_k
    g = g - tl.where(cols[None, :] == a[:, None], w_a, 0.0)
    g = g - tl.where(cols[None, :] == b[:, None], w_b, 0.0)
    g = g + poison[:, None]
    tl.store(g_row[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mixed_ce_fwd_kernel(
    logits_ptr, stride_row, ta_ptr, tb_ptr, lam_ptr, loss_ptr, grad_ptr,
    N, K, eps, eps_over_k, inv_k,
    HAS_B: tl.constexpr, WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ROWS rows per program. SINGLE: the whole row fits one BLOCK_K chunk (one HBM read);
    otherwise pass 1 loops over chunks with an online max / sum-exp, pass 2 re-reads the row
    and writes the gradient."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    # Tail rows of the last program re-read row N-1 (always valid data) and store nothing.
    rows64 = tl.minimum(rows, N - 1).to(tl.int64)
    x_row = logits_ptr + rows64 * stride_row            # [ROWS] row pointers
    cols = tl.arange(0, BLOCK_K)

    a, b, x_t, w_a, w_b, poison = _targets(x_row, ta_ptr, tb_ptr, lam_ptr, rows64, K, eps, HAS_B)

    g_row = grad_ptr + rows64 * K                       # gradient buffer is contiguous
    if SINGLE:
        col_ok = cols < K
        x = tl.load(x_row[:, None] + cols[None, :], mask=col_ok[None, :],
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, axis=1)
        sum_x = tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
        lse = m + tl.log(s)
        if WRITE_GRAD:
            _store_grad(grad_ptr, g_row, cols, col_ok, row_ok, e * (1.0 / s)[:, None],
                        a, b, w_a, w_b, eps_over_k, poison)
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], tl.float32)
        sum_x = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            col_ok = c < K
            x = tl.load(x_row[:, None] + c[None, :], mask=col_ok[None, :],
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            sum_x += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
            m = m_new
        lse = m + tl.log(s)
        if WRITE_GRAD:
            for k0 in range(0, K, BLOCK_K):
                c = k0 + cols
                col_ok = c < K
                x = tl.load(x_row[:, None] + c[None, :], mask=col_ok[None, :],
                            other=float("-inf")).to(tl.float32)
                _store_grad(grad_ptr, g_row, c, col_ok, row_ok, tl.exp(x - lse[:, None]),
                            a, b, w_a, w_b, eps_over_k, poison)

    # Per row: (1-eps) * (lse - x_t) + eps * (lse - mean_k z_k), lam already folded into x_t.
    loss = lse - (1.0 - eps) * x_t - eps * (sum_x * inv_k) + poison
    tl.store(loss_ptr + rows, loss, mask=row_ok)


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, go_ptr, inv_n, numel, BLOCK: tl.constexpr):
    """dst = src * (grad_output / N), computed in fp32, rounded once to dst's dtype."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(go_ptr).to(tl.float32) * inv_n
    g = tl.load(src_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dst_ptr + offs, (g * scale).to(dst_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _config(n, k):
    """(BLOCK_K, SINGLE, ROWS, num_warps) for an [n, k] problem."""
    block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
    single = block_k >= k
    rows = 1
    if single:
        rows = max(1, min(ROW_TILE // block_k, triton.next_power_of_2(n)))
    elems = rows * block_k
    num_warps = 2 if elems <= 256 else 4 if elems <= 1024 else 8 if elems <= 4096 else 16
    return block_k, single, rows, num_warps


def _launch_forward(logits, target_a, target_b, lam_t, eps, write_grad):
    """Per-row losses [N] fp32 and, with write_grad, the unscaled gradient [N, K]."""
    n, k = logits.shape
    device = logits.device
    loss_rows = _common.empty((n,), torch.float32, device)
    grad = _common.empty((n, k), logits.dtype, device) if write_grad else loss_rows
    has_b = target_b is not None
    block_k, single, rows, num_warps = _config(n, k)
    grid = (triton.cdiv(n, rows),)
    _mixed_ce_fwd_kernel[grid](
        logits, logits.stride(0), target_a, target_b if has_b else target_a,
        lam_t if has_b else loss_rows, loss_rows, grad,
        n, k, float(eps), float(eps) / k, 1.0 / k,
        HAS_B=has_b, WRITE_GRAD=write_grad, SINGLE=single, ROWS=rows, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return loss_rows, (grad if write_grad else None)


def _launch_scale(grad, grad_output, inv_n):
    out = _common.empty(grad.shape, grad.dtype, grad.device)
    numel = grad.numel()
    go = grad_output
    if go.dtype != torch.float32:
        go = go.float()
    block = SCALE_BLOCK if not _common.interpreting() else 16384
    _scale_kernel[(triton.cdiv(numel, block),)](
        grad, out, go, float(inv_n), numel, BLOCK=block, num_warps=4)
    return out


class _MixedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_a, target_b, lam_t, eps):
        loss_rows, grad = _launch_forward(logits, target_a, target_b, lam_t, eps,
                                          write_grad=True)
        ctx.save_for_backward(grad)
        ctx.n = logits.shape[0]
        return loss_rows.sum() / ctx.n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # Out of place: a retained graph can run the backward again.
        return _launch_scale(grad, grad_output, 1.0 / ctx.n), None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def mixed_cross_entropy(logits, target_a, target_b=None, lam=1.0, label_smoothing=0.0):
    """Fused ``lam * CE(logits, target_a) + (1 - lam) * CE(logits, target_b)``; 0-d fp32.

    Args:
        logits: [N, K] float32 / float16 / bfloat16, CUDA (or CPU under TRITON_INTERPRET=1).
            A strided view is fine as long as the last dim is contiguous (else it is copied).
        target_a, target_b: [N] int64 (or int32) class indices on logits' device.
            ``target_b=None`` means plain cross-entropy on ``target_a`` (``lam`` is unused).
        lam: Python float or 0-d tensor (any device placement that needs no sync: it is
            never read on the host). It gets no gradient; a lam requiring grad is refused.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.

    Each CE matches ``F.cross_entropy(logits.float(), t, label_smoothing=eps)`` with mean
    reduction. The gradient w.r.t. logits is written by the forward kernel (only when logits
    requires grad and grad mode is on) and scaled by grad_output in the backward.

    Out-of-range labels (outside [0, K), including -100: there is no ignore_index) raise
    IndexError on the CPU and trip a device-side assert on CUDA (no host sync), as the eager
    twin does.
    """
    check_cross_entropy(logits, target_a, target_b, lam, label_smoothing)
    if logits.device.type != "cuda" and not _common.interpreting():
        raise ValueError(f"mixed_cross_entropy runs Triton kernels: logits must be on a CUDA "
                         f"device (got {logits.device}; set TRITON_INTERPRET=1 for CPU)")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    eps = float(label_smoothing)
    lam_t = scalar_tensor(lam, logits.device) if target_b is not None else None
    if logits.requires_grad and torch.is_grad_enabled():
        return _MixedCrossEntropy.apply(logits, target_a, target_b, lam_t, eps)
    loss_rows, _ = _launch_forward(logits, target_a, target_b, lam_t, eps, write_grad=False)
    return loss_rows.sum() / logits.shape[0]


def cross_entropy(logits, target, label_smoothing=0.0):
    """Plain (optionally label-smoothed) cross-entropy through the fused kernel; 0-d fp32."""
    return mixed_cross_entropy(logits, target, None, 1.0, label_smoothing)
