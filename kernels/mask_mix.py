"""Fused mask mixing of an image batch with its shuffled partner (the AutoMix Mix Block output).

With low-resolution mask logits ``m`` [N, 1, h, w]:

    s   = sigmoid(F.interpolate(m, size=(H, W), mode))    (fp32; bilinear: align_corners=False)
    out = x * (1 - s) + x[index] * s                   (fp32, stored in x.dtype)

``s`` is the weight of the SHUFFLED sample ``x[index]``. Without a mask, a constant λ (the
weight of ``x``): ``out = lam * x + (1 - lam) * x[index]``, through the same kernel.

Forward: one launch, never materialises the upsampled mask. Each program owns one sample n
and a tile of image rows; it recomputes the upsampled logit of each pixel from the low-res
grid (one gather for nearest, four for bilinear, the index maps match ``F.interpolate`` bit
for bit: fp32 ``scale = h / H``, ``src = min(floor(dst * scale), h - 1)`` for nearest,
``src = max(scale * (dst + 0.5) - 0.5, 0)`` for bilinear), then blends.

  * NCHW: a [ROWS, BLOCK] tile of pixels (BLOCK contiguous along W); the mask weight is
    computed once per pixel and reused for all C channel planes (a static loop over C).
  * channels_last: a [ROWS, BLOCK] tile of each row's flattened (W, C) elements, contiguous
    along W*C; the pixel of element e is e // C (C is a compile-time constant).

``mix_images_pair`` produces the two mixed batches of an AutoMix step in one launch: each
program reads x[n], x[index_a[n]], x[index_b[n]] once and writes both outputs.

Backward (mask logits only; the images are constants): with
``g_pre = (sum_c grad_out * (x[index] - x)) * s * (1 - s)`` at full resolution, the logit
gradient is the adjoint of the upsampling applied to ``g_pre``. One program per (sample,
block of BI low-res rows, block of BJ low-res columns) walks exactly the hi-res rows and
columns whose source taps fall in its block (nearest: the cells' pixels; bilinear: the
pixels whose lower tap is in [block - 1, block end)) in [RY, BX] tiles, recomputes s and
g_pre there (a static loop over C) and reduces them in registers with the separable
interpolation weights: ``acc[BI, BJ] += wy[BI, RY] @ g_pre[RY, BX] @ wx[BX, BJ]`` (one-hot
for nearest). Every low-res cell is written by exactly one program: deterministic, no
atomics, no [N, C, H, W] (or [N, H, W]) intermediate. Nearest reads each hi-res pixel once;
bilinear re-reads the hi-res rows / columns on block edges.

No host synchronisation: ``lam`` reaches the kernel as a pointer to a 0-d fp32 tensor and
indices are never read on the host. An index outside [0, N) does not fault: that sample's
output (and its logit gradient) is NaN.

Public API:
    mix_images(x, index, mask_logits=None, lam=None, mode="nearest")
    mix_images_pair(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                    mode="nearest")
    mix_images_eager(...), mix_images_pair_eager(...)   # the PyTorch twins (same signatures)
"""
import functools
import numbers

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmix.kernels import _common

__all__ = ["mix_images", "mix_images_pair", "mix_images_eager", "mix_images_pair_eager"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MODES = ("nearest", "bilinear")

# Under TRITON_INTERPRET the launchers use big tiles (few programs: the interpreter is slow per
# program). Tests set this to True to run the GPU tiling heuristics in the interpreter.
GPU_CONFIGS = False


# --------------------------------------------------------------------------------------------
# Triton helpers: the F.interpolate index maps
# --------------------------------------------------------------------------------------------
@triton.jit
def _lower_tap(d, scale, size_in, BILINEAR: tl.constexpr):
    """Source index of destination index d (nearest), or its lower tap (bilinear)."""
    df = d.to(tl.float32)
    if BILINEAR:
        r = tl.maximum(scale * (df + 0.5) - 0.5, 0.0)
    else:
        r = df * scale
    return tl.minimum(tl.floor(r).to(tl.int32), size_in - 1)


@triton.jit
def _taps(d, scale, size_in):
    """Bilinear (align_corners=False) taps of destination index d: (i0, i1, w0, w1)."""
    r = tl.maximum(scale * (d.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(r).to(tl.int32), size_in - 1)
    w1 = tl.minimum(tl.maximum(r - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _first_dst(k, size_in, size_out, scale, BILINEAR: tl.constexpr):
    """Smallest destination index whose (lower) source tap is >= k; size_out if none.

    The taps are monotone in the destination index. The exact-arithmetic answer c is found with
    integers; the fp32 index map can move it by one, which two evaluations correct."""
    kk = tl.maximum(k, 0)
    if BILINEAR:
        c = ((2 * kk + 1) * size_out - size_in + 2 * size_in - 1) // (2 * size_in)
    else:
        c = (kk * size_out + size_in - 1) // size_in
    first = (c - 1 + (_lower_tap(c - 1, scale, size_in, BILINEAR) < kk).to(tl.int32)
             + (_lower_tap(c, scale, size_in, BILINEAR) < kk).to(tl.int32))
    first = tl.where(k <= 0, 0, first)
    first = tl.where(k >= size_in, size_out, first)
    return tl.minimum(tl.maximum(first, 0), size_out)


@triton.jit
def _upsampled_logit(m_ptr, Y, X, mask, size_h, size_w, sc_h, sc_w, s_h, s_w,
                     BILINEAR: tl.constexpr):
    """fp32 logit of F.interpolate(m) at hi-res (Y, X) (broadcastable index tensors)."""
    if BILINEAR:
        y0, y1, wy0, wy1 = _taps(Y, sc_h, size_h)
        x0, x1, wx0, wx1 = _taps(X, sc_w, size_w)
        r0 = m_ptr + y0 * s_h
        r1 = m_ptr + y1 * s_h
        v00 = tl.load(r0 + x0 * s_w, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(r0 + x1 * s_w, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(r1 + x0 * s_w, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(r1 + x1 * s_w, mask=mask, other=0.0).to(tl.float32)
        return wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
    else:
        sy = _lower_tap(Y, sc_h, size_h, False)
        sx = _lower_tap(X, sc_w, size_w, False)
        return tl.load(m_ptr + sy * s_h + sx * s_w, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _mix_fwd_kernel(
    x_ptr, out_a_ptr, out_b_ptr, ia_ptr, ib_ptr, pa_ptr, pb_ptr,
    pa_sn, pa_sh, pa_sw, pb_sn, pb_sh, pb_sw,
    N, H, W, ha, wa, sc_ha, sc_wa, hb, wb, sc_hb, sc_wb, n_row_blocks,
    C: tl.constexpr, PLANES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    MASK_A: tl.constexpr, HAS_B: tl.constexpr, MASK_B: tl.constexpr, BILINEAR: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out_a = x * ka + x[ia] * sa (and out_b likewise) on a [ROWS, BLOCK] tile of sample n.

    ka, sa = 1 - s, s with s the upsampled sigmoid mask (MASK_*), else lam, 1 - lam read
    from pa_ptr / pb_ptr (0-d fp32)."""
    pid = tl.program_id(0)
    n = pid // n_row_blocks
    rb = pid - n * n_row_blocks
    cb = tl.program_id(1)
    Y = rb * ROWS + tl.arange(0, ROWS)                     # image rows
    cols = cb * BLOCK + tl.arange(0, BLOCK)                # NCHW: X; channels_last: X * C + c
    if CHANNELS_LAST:
        row_len = W * C
        X = cols // C
    else:
        row_len = W
        X = cols
    mask = (Y < H)[:, None] & (cols < row_len)[None, :]
    offs = Y[:, None] * row_len + cols[None, :]            # in one channel plane / one sample
    plane = H * W
    sample = C * plane
    n64 = n.to(tl.int64)

    # Partner a. An index outside [0, N) reads sample n and poisons the output with NaN.
    ia = tl.load(ia_ptr + n).to(tl.int64)
    ok_a = (ia >= 0) & (ia < N)
    ia = tl.where(ok_a, ia, n64)
    bad_a = tl.where(ok_a, 0.0, float("nan"))
    if MASK_A:
        sa = _sigmoid(_upsampled_logit(pa_ptr + n64 * pa_sn, Y[:, None], X[None, :], mask,
                                       ha, wa, sc_ha, sc_wa, pa_sh, pa_sw, BILINEAR))
        ka = 1.0 - sa
    else:
        ka = tl.load(pa_ptr).to(tl.float32)
        sa = 1.0 - ka
    x_n = x_ptr + n64 * sample
    x_a = x_ptr + ia * sample
    o_a = out_a_ptr + n64 * sample

    if HAS_B:
        ib = tl.load(ib_ptr + n).to(tl.int64)
        ok_b = (ib >= 0) & (ib < N)
        ib = tl.where(ok_b, ib, n64)
        bad_b = tl.where(ok_b, 0.0, float("nan"))
        if MASK_B:
            sb = _sigmoid(_upsampled_logit(pb_ptr + n64 * pb_sn, Y[:, None], X[None, :], mask,
                                           hb, wb, sc_hb, sc_wb, pb_sh, pb_sw, BILINEAR))
            kb = 1.0 - sb
        else:
            kb = tl.load(pb_ptr).to(tl.float32)
            sb = 1.0 - kb
        x_b = x_ptr + ib * sample
        o_b = out_b_ptr + n64 * sample

    for c in tl.static_range(PLANES):                       # PLANES = C (NCHW) or 1
        o = offs + c * plane
        xv = tl.load(x_n + o, mask=mask, other=0.0).to(tl.float32)
        xa = tl.load(x_a + o, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            xb = tl.load(x_b + o, mask=mask, other=0.0).to(tl.float32)
        ya = xv * ka + xa * sa + bad_a
        tl.store(o_a + o, ya.to(out_a_ptr.dtype.element_ty), mask=mask)
        if HAS_B:
            yb = xv * kb + xb * sb + bad_b
            tl.store(o_b + o, yb.to(out_b_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _mix_bwd_kernel(
    x_ptr, go_ptr, idx_ptr, m_ptr, gm_ptr,
    sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, m_sn, m_sh, m_sw,
    N, H, W, h, w, sc_h, sc_w, n_ib, n_jb,
    C: tl.constexpr, BILINEAR: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, RY: tl.constexpr, BX: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """grad m[n, i0:i0+BI, j0:j0+BJ] = upsample^T(g_pre) over the hi-res window of the block,
    walked in [RY, BX] tiles: acc[BI, BJ] += wy[BI, RY] @ g_pre[RY, BX] @ wx[BX, BJ]."""
    pid = tl.program_id(0)
    per_n = n_ib * n_jb
    n = pid // per_n
    r = pid - n * per_n
    ib = r // n_jb
    jb = r - ib * n_jb
    i0 = ib * BI
    j0 = jb * BJ
    iv = i0 + tl.arange(0, BI)
    jv = j0 + tl.arange(0, BJ)
    # The hi-res window of the block: nearest, the pixels whose source is in the block;
    # bilinear, those whose lower tap is in [block start - 1, block end).
    if BILINEAR:
        ys = _first_dst(i0 - 1, h, H, sc_h, True)
        xs = _first_dst(j0 - 1, w, W, sc_w, True)
    else:
        ys = _first_dst(i0, h, H, sc_h, False)
        xs = _first_dst(j0, w, W, sc_w, False)
    ye = _first_dst(i0 + BI, h, H, sc_h, BILINEAR)
    xe = _first_dst(j0 + BJ, w, W, sc_w, BILINEAR)

    n64 = n.to(tl.int64)
    idx = tl.load(idx_ptr + n).to(tl.int64)
    ok = (idx >= 0) & (idx < N)
    idx = tl.where(ok, idx, n64)
    bad = tl.where(ok, 0.0, float("nan"))
    x_n = x_ptr + n64 * sx_n
    x_i = x_ptr + idx * sx_n
    g_n = go_ptr + n64 * sg_n
    m_n = m_ptr + n64 * m_sn

    acc = tl.zeros([BI, BJ], dtype=tl.float32)
    # Chunks start ALIGN-aligned and loads are masked by the image width only (columns left of
    # the window are read, then dropped by a select): vectorisable loads along a unit stride.
    for x0 in range((xs // ALIGN) * ALIGN, xe, BX):       # (the compiler sees the alignment)
        X = x0 + tl.arange(0, BX)
        xin = X < W
        xm = (X >= xs) & (X < xe)
        # Column weights wx[j, X] of this chunk: the same for every row.
        if BILINEAR:
            cx0, cx1, wx0, wx1 = _taps(X, sc_w, w)
            wx = (tl.where(cx0[None, :] == jv[:, None], wx0[None, :], 0.0)
                  + tl.where(cx1[None, :] == jv[:, None], wx1[None, :], 0.0))
        else:
            cx = _lower_tap(X, sc_w, w, False)
            wx = tl.where(cx[None, :] == jv[:, None], 1.0, 0.0)
        wx = tl.where(xm[None, :], wx, 0.0)                         # [BJ, BX]
        ox_x = X * sx_w
        ox_g = X * sg_w
        for y0 in range(ys, ye, RY):
            Y = y0 + tl.arange(0, RY)
            ym = Y < ye
            tile = ym[:, None] & xin[None, :]
            if BILINEAR:
                cy0, cy1, wy0, wy1 = _taps(Y, sc_h, h)
                wy = (tl.where(iv[:, None] == cy0[None, :], wy0[None, :], 0.0)
                      + tl.where(iv[:, None] == cy1[None, :], wy1[None, :], 0.0))
                r0 = m_n + cy0[:, None] * m_sh
                r1 = m_n + cy1[:, None] * m_sh
                v00 = tl.load(r0 + cx0[None, :] * m_sw, mask=tile, other=0.0).to(tl.float32)
                v01 = tl.load(r0 + cx1[None, :] * m_sw, mask=tile, other=0.0).to(tl.float32)
                v10 = tl.load(r1 + cx0[None, :] * m_sw, mask=tile, other=0.0).to(tl.float32)
                v11 = tl.load(r1 + cx1[None, :] * m_sw, mask=tile, other=0.0).to(tl.float32)
                z = (wy0[:, None] * (wx0[None, :] * v00 + wx1[None, :] * v01)
                     + wy1[:, None] * (wx0[None, :] * v10 + wx1[None, :] * v11))
            else:
                cy = _lower_tap(Y, sc_h, h, False)
                wy = tl.where(iv[:, None] == cy[None, :], 1.0, 0.0)
                z = tl.load(m_n + cy[:, None] * m_sh + cx[None, :] * m_sw, mask=tile,
                            other=0.0).to(tl.float32)
            wy = tl.where(ym[None, :], wy, 0.0)                     # [BI, RY]
            s = _sigmoid(z)
            p_x = x_n + (Y * sx_h)[:, None] + ox_x[None, :]
            p_i = x_i + (Y * sx_h)[:, None] + ox_x[None, :]
            p_g = g_n + (Y * sg_h)[:, None] + ox_g[None, :]
            gs = tl.zeros([RY, BX], dtype=tl.float32)
            for c in tl.static_range(C):
                g = tl.load(p_g + c * sg_c, mask=tile, other=0.0).to(tl.float32)
                a = tl.load(p_x + c * sx_c, mask=tile, other=0.0).to(tl.float32)
                b = tl.load(p_i + c * sx_c, mask=tile, other=0.0).to(tl.float32)
                gs += g * (b - a)
            gp = tl.where(xm[None, :], gs * s * (1.0 - s), 0.0)       # [RY, BX]
            t = tl.sum(gp[:, None, :] * wx[None, :, :], axis=2)      # [RY, BJ]
            acc += tl.sum(wy[:, :, None] * t[None, :, :], axis=1)    # [BI, BJ]
    acc = acc + bad
    out_mask = (iv < h)[:, None] & (jv < w)[None, :]
    tl.store(gm_ptr + n64 * (h * w) + iv[:, None] * w + jv[None, :],
             acc.to(gm_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------
# Host-side configuration (shapes only: never reads device memory)
# --------------------------------------------------------------------------------------------
def _scale(size_in, size_out):
    """PyTorch's fp32 ``scale = (float)input_size / output_size``, as a Python float."""
    return float(np.float32(size_in) / np.float32(size_out))


@functools.lru_cache(maxsize=256)
def _max_window(size_out, size_in, block, bilinear, align=1):
    """Widest hi-res window (in destination indices) of a block of ``block`` low-res cells,
    its start rounded down to a multiple of ``align`` (as the backward kernel walks it)."""
    scale = np.float32(_scale(size_in, size_out))
    d = np.arange(size_out, dtype=np.float32)
    if bilinear:
        src = np.maximum(scale * (d + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    else:
        src = d * scale
    src = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    widest = 0
    for k0 in range(0, size_in, block):
        lo = k0 - 1 if bilinear else k0
        start = int(np.searchsorted(src, lo, side="left")) if lo > 0 else 0
        end = int(np.searchsorted(src, k0 + block, side="left"))
        widest = max(widest, end - (start - start % align))
    return widest


def _small_tiles():
    return _common.interpreting() and not GPU_CONFIGS


def _fwd_config(n, c, height, width, channels_last):
    """(ROWS, BLOCK, num_warps) of the forward tile."""
    row_len = width * c if channels_last else width
    if _small_tiles():
        block = triton.next_power_of_2(row_len)
        rows = max(1, min(triton.next_power_of_2(height), 16384 // block))
        return rows, block, 4
    block = min(triton.next_power_of_2(row_len), 256)
    target = 2048 if channels_last else 1024        # elements (channels_last) / pixels (NCHW)
    rows = max(1, min(triton.next_power_of_2(height), target // block))
    # Small images (CIFAR): keep enough programs in flight to fill the GPU.
    while rows > 1 and n * triton.cdiv(height, rows) * triton.cdiv(row_len, block) < 2048:
        rows //= 2
    elems = rows * block
    num_warps = 2 if elems <= 256 else 4 if elems <= 2048 else 8
    return rows, block, num_warps


def _bwd_config(height, width, h, w, bilinear):
    """(BI, BJ, RY, BX, num_warps): low-res cell block BI x BJ, hi-res tile RY x BX."""
    if _small_tiles():
        # Interpreter: one program per sample, one tile per program.
        bi = triton.next_power_of_2(h)
        bj = triton.next_power_of_2(w)
        ry = triton.next_power_of_2(max(_max_window(height, h, bi, bilinear), 1))
        bx = triton.next_power_of_2(max(_max_window(width, w, bj, bilinear), 1))
        if bx >= 16:      # the kernel then starts chunks 16-aligned
            bx = triton.next_power_of_2(_max_window(width, w, bj, bilinear, 16))
        return bi, bj, min(ry, 256), min(bx, 256), 4
    # Nearest: a hi-res row feeds one low-res row, BI = 1 reads it once. Bilinear: it feeds
    # two; blocks of 4 rows re-read one hi-res row per block edge only. Columns: as many
    # cells as keep the (16-aligned) hi-res window within 128 and the one-hot column weights
    # wx[BJ, BX] within 2048 (each pixel costs BJ multiply-adds).
    bi = min(4, triton.next_power_of_2(h)) if bilinear else 1
    bj = 1
    while bj < triton.next_power_of_2(w):
        win = _max_window(width, w, 2 * bj, bilinear, 16)
        if win > 128 or 2 * bj * triton.next_power_of_2(max(win, 16)) > 2048:
            break
        bj *= 2
    bx = triton.next_power_of_2(max(_max_window(width, w, bj, bilinear, 16), 16))
    bx = min(bx, 256)
    rows = triton.next_power_of_2(max(_max_window(height, h, bi, bilinear), 1))
    tile = 256 if bilinear else 512       # bilinear holds four taps per pixel: fewer rows
    ry = 1
    while ry < rows and 2 * ry * bx <= tile and 2 * ry * bj * bx <= 4096:
        ry *= 2
    num_warps = 4 if ry * bx >= 512 or ry * bj * bx >= 2048 else 2
    return bi, bj, ry, bx, num_warps


def _channels_last(x):
    """True when x is laid out channels_last (ambiguous size-1 cases follow the strides)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not x.is_contiguous():
        return True
    # Both formats describe the same memory (C == 1 or H * W == 1): keep x's own flavour.
    n, c, height, width = x.shape
    if c == 1:
        return height * width > 1 and x.stride(1) == 1
    return height * width == 1 and x.stride(3) == c


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _launch_forward(x, index_a, logits_a, lam_a, index_b, logits_b, lam_b, bilinear):
    """Launch the forward kernel; returns out_a or (out_a, out_b)."""
    n, c, height, width = x.shape
    cl = _channels_last(x)
    if not cl and not x.is_contiguous():
        x = x.contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    kernel_cl = cl and not x.is_contiguous()      # ambiguous layouts use the NCHW path
    out_a = _common.empty(x.shape, x.dtype, x.device, memory_format=fmt)
    has_b = index_b is not None
    out_b = _common.empty(x.shape, x.dtype, x.device, memory_format=fmt) if has_b else out_a

    def _mask_args(logits, lam):
        if logits is not None:
            h, w = logits.shape[-2:]
            return (logits, (logits.stride(0), logits.stride(2), logits.stride(3)),
                    (h, w, _scale(h, height), _scale(w, width)), True)
        return _common.scalar_tensor(lam, x.device), (0, 0, 0), (1, 1, 1.0, 1.0), False

    pa, sa, geo_a, mask_a = _mask_args(logits_a, lam_a)
    if has_b:
        pb, sb, geo_b, mask_b = _mask_args(logits_b, lam_b)
    else:
        pb, sb, geo_b, mask_b = pa, sa, geo_a, False

    rows, block, num_warps = _fwd_config(n, c, height, width, kernel_cl)
    row_len = width * c if kernel_cl else width
    n_row_blocks = triton.cdiv(height, rows)
    grid = (n * n_row_blocks, triton.cdiv(row_len, block))
    _mix_fwd_kernel[grid](
        x, out_a, out_b, index_a, index_b if has_b else index_a, pa, pb,
        *sa, *sb,
        n, height, width, *geo_a, *geo_b, n_row_blocks,
        C=c, PLANES=1 if kernel_cl else c, CHANNELS_LAST=kernel_cl,
        MASK_A=mask_a, HAS_B=has_b, MASK_B=mask_b, BILINEAR=bilinear,
        ROWS=rows, BLOCK=block, num_warps=num_warps,
    )
    return (out_a, out_b) if has_b else out_a


def _launch_backward(x, index, logits, grad_out, bilinear):
    """d loss / d logits [N, 1, h, w] in logits' dtype."""
    n, c, height, width = x.shape
    h, w = logits.shape[-2:]
    grad = _common.empty(logits.shape, logits.dtype, logits.device)   # contiguous [N, 1, h, w]
    bi, bj, ry, bx, num_warps = _bwd_config(height, width, h, w, bilinear)
    n_ib, n_jb = triton.cdiv(h, bi), triton.cdiv(w, bj)
    _mix_bwd_kernel[(n * n_ib * n_jb,)](
        x, grad_out, index, logits, grad,
        *x.stride(), *grad_out.stride(), logits.stride(0), logits.stride(2), logits.stride(3),
        n, height, width, h, w, _scale(h, height), _scale(w, width), n_ib, n_jb,
        C=c, BILINEAR=bilinear, BI=bi, BJ=bj, RY=ry, BX=bx, ALIGN=16 if bx % 16 == 0 else 1,
        num_warps=num_warps,
    )
    return grad


class _MixImages(torch.autograd.Function):
    """Single (index_b None) or pair op; only mask_logits_a receives a gradient."""

    @staticmethod
    def forward(ctx, x, index_a, logits_a, index_b, logits_b, lam_b, bilinear):
        outs = _launch_forward(x, index_a, logits_a, None, index_b, logits_b, lam_b, bilinear)
        ctx.save_for_backward(x, index_a, logits_a)
        ctx.bilinear = bilinear
        if index_b is not None:
            ctx.mark_non_differentiable(outs[1])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, *unused):
        x, index_a, logits_a = ctx.saved_tensors
        grad = _launch_backward(x, index_a, logits_a, grad_a, ctx.bilinear)
        return None, None, grad, None, None, None, None


# --------------------------------------------------------------------------------------------
# Argument checks (host metadata only: never reads tensor values)
# --------------------------------------------------------------------------------------------
def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D image batch [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    per_image = x.numel() // x.shape[0]
    if per_image >= 2 ** 31:
        raise ValueError(f"one image of x has {per_image} elements; at most 2**31 - 1")


def _check_index(name, index, x):
    _common.check_index(name, index, x.shape[0], x.device, "x")


def _check_mask(name, m, x):
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, 1, h, w], got shape {tuple(m.shape)}")
    if m.dtype not in _MASK_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
    if m.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has {m.shape[0]} samples but x has {x.shape[0]}")
    if m.shape[1] != 1:
        raise ValueError(f"{name} must have one channel [N, 1, h, w], got {m.shape[1]}")
    h, w = m.shape[2:]
    height, width = x.shape[2:]
    if h == 0 or w == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(m.shape)}")
    if h > height or w > width:
        raise ValueError(f"{name} ({h}x{w}) must not be larger than the images "
                         f"({height}x{width}): the mask is upsampled, never downsampled")
    if m.device != x.device:
        raise ValueError(f"{name} is on {m.device} but x is on {x.device}")


def _check_lam(name, lam, x):
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, "
                             f"got a tensor of shape {tuple(lam.shape)}")
        if not (lam.is_floating_point() or lam.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} tensor must be floating point, got {lam.dtype}")
        if lam.requires_grad:
            raise ValueError(f"{name} must not require grad: the mix treats it as a constant "
                             f"(pass {name}.detach())")
        if lam.device != x.device and lam.device.type != "cpu":
            raise ValueError(f"{name} is on {lam.device} but x is on {x.device}")
    elif isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, "
                        f"got {type(lam).__name__}")


def _check_source(mask_name, m, lam_name, lam, x):
    if (m is None) == (lam is None):
        raise ValueError(f"pass exactly one of {mask_name} (a mask) or {lam_name} "
                         f"(a constant mix), got {'both' if m is not None else 'neither'}")
    if m is not None:
        _check_mask(mask_name, m, x)
    else:
        _check_lam(lam_name, lam, x)


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def _check_single(x, index, mask_logits, lam, mode):
    _check_x(x)
    _check_index("index", index, x)
    _check_source("mask_logits", mask_logits, "lam", lam, x)
    _check_mode(mode)


def _check_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode):
    _check_x(x)
    _check_index("index_a", index_a, x)
    if mask_logits_a is None:
        raise ValueError("mix_images_pair needs mask_logits_a (the first mix is always masked)")
    _check_mask("mask_logits_a", mask_logits_a, x)
    _check_index("index_b", index_b, x)
    _check_source("mask_logits_b", mask_logits_b, "lam_b", lam_b, x)
    _check_mode(mode)


def _check_fused(x):
    if x.device.type != "cuda" and not _common.interpreting():
        raise ValueError(f"the fused mask mix runs Triton kernels: x must be on a CUDA device "
                         f"(got {x.device}; set TRITON_INTERPRET=1 for CPU)")
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("the fused mask mix gives no gradient to the images: pass "
                                  "x.detach() (only the mask logits are differentiable)")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def mix_images(x, index, mask_logits=None, lam=None, mode="nearest"):
    """Mix each image with its partner ``x[index]``; returns a tensor like ``x``.

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16 images, contiguous or channels_last
            (other strides are copied first). The output has x's dtype and memory format.
            x gets no gradient: if it requires grad (in grad mode), NotImplementedError.
        index: [N] int64 (or int32) partner of each sample, on x's device (any mapping, not
            necessarily a permutation; values are not checked on the host: one outside
            [0, N) makes that sample's output NaN).
        mask_logits: [N, 1, h, w] float logits with h <= H, w <= W. The mixed image is
            ``x * (1 - s) + x[index] * s`` with ``s = sigmoid(F.interpolate(mask_logits,
            (H, W), mode))`` in fp32: s is the weight of the shuffled sample. Differentiable.
        lam: instead of a mask, a constant: ``lam * x + (1 - lam) * x[index]`` (lam is the
            weight of x). Python float or 0-d tensor, never read on the host; no gradient.
        mode: "nearest" or "bilinear" (align_corners=False), as ``F.interpolate``.
    """
    _check_single(x, index, mask_logits, lam, mode)
    _check_fused(x)
    bilinear = mode == "bilinear"
    if mask_logits is not None and mask_logits.requires_grad and torch.is_grad_enabled():
        return _MixImages.apply(x, index, mask_logits, None, None, None, bilinear)
    return _launch_forward(x, index, mask_logits, lam, None, None, None, bilinear)


def mix_images_pair(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                    mode="nearest"):
    """Both mixed batches of an AutoMix step in one launch; returns ``(out_a, out_b)``.

    ``out_a = mix_images(x, index_a, mask_logits_a, mode=mode)`` (mask_logits_a receives the
    gradient) and ``out_b = mix_images(x, index_b, mask_logits_b, lam_b, mode)`` with exactly
    one of ``mask_logits_b`` / ``lam_b``; out_b has no gradient (mask_logits_b is treated as
    detached). Each program reads x[n], x[index_a[n]] and x[index_b[n]] once.
    """
    _check_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    _check_fused(x)
    bilinear = mode == "bilinear"
    if mask_logits_b is not None:
        mask_logits_b = mask_logits_b.detach()
    if mask_logits_a.requires_grad and torch.is_grad_enabled():
        return _MixImages.apply(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b,
                                bilinear)
    return _launch_forward(x, index_a, mask_logits_a, None, index_b, mask_logits_b, lam_b,
                           bilinear)


# --------------------------------------------------------------------------------------------
# Eager twins
# --------------------------------------------------------------------------------------------
def _format_of(x):
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _mix_eager(x, index, mask_logits, lam, mode):
    xf = x.float()
    xi = xf[index]
    if mask_logits is not None:
        size = tuple(x.shape[-2:])
        m = mask_logits.float()
        if mode == "nearest":
            up = F.interpolate(m, size=size, mode="nearest")
        else:
            up = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        s = torch.sigmoid(up)
        out = xf * (1.0 - s) + xi * s
    else:
        if isinstance(lam, torch.Tensor):
            lam = lam.to(device=x.device, dtype=torch.float32)
        out = lam * xf + (1.0 - lam) * xi
    return out.to(dtype=x.dtype, memory_format=_format_of(x))


def mix_images_eager(x, index, mask_logits=None, lam=None, mode="nearest"):
    """The PyTorch twin of ``mix_images`` (same checks and semantics; F.interpolate in fp32).

    Unlike the fused op, it differentiates through x too, and an out-of-range index raises.
    """
    _check_single(x, index, mask_logits, lam, mode)
    return _mix_eager(x, index, mask_logits, lam, mode)


def mix_images_pair_eager(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                          mode="nearest"):
    """The PyTorch twin of ``mix_images_pair``: two eager mixes (mask_logits_b detached)."""
    _check_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    out_a = _mix_eager(x, index_a, mask_logits_a, None, mode)
    mb = mask_logits_b.detach() if mask_logits_b is not None else None
    out_b = _mix_eager(x, index_b, mb, lam_b, mode)
    return out_a, out_b
