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

No host synchronisation: ``lam`` reaches the kernel as a pointer to a 0-d fp32 tensor; an
index outside [0, N) raises IndexError on the CPU and trips a device-side assert on CUDA
(``fastmix.checks.check_index``), as the eager twin's gather does.

Public API:
    mix_images(x, index, mask_logits=None, lam=None, mode="nearest")
    mix_images_pair(x, index_a, mask_logits_a, index_b, mask_logits_b=None, lam_b=None,
                    mode="nearest")
    fastmix.functional.mix_images_eager(...), mix_images_pair_eager(...)   # the eager twins
"""
import functools

import numpy as np
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmix.checks import check_mix, check_mix_pair, scalar_tensor
from fastmix.functional import is_channels_last
from fastmix.kernels import _common

__all__ = ["mix_images", "mix_images_pair"]


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


@triton.jit
def _partner_index(i_ptr, n, N):
    """index[n] and 0, or (index outside [0, N): the launcher refuses one, this is defence in
    depth) n and NaN, which poisons what the sample computes."""
    i = tl.load(i_ptr + n).to(tl.int64)
    ok = (i >= 0) & (i < N)
    return tl.where(ok, i, n.to(tl.int64)), tl.where(ok, 0.0, float("nan"))


@triton.jit
def _partner(i_ptr, p_ptr, p_sn, p_sh, p_sw, n, N, Y, X, mask, hh, ww, sc_h, sc_w,
             MASK: tl.constexpr, BILINEAR: tl.constexpr):
    """Sample n's partner and weights: ``(i, bad, keep, share)`` with the mixed value
    ``x[n] * keep + x[i] * share + bad``. keep, share = 1 - s, s (s the upsampled sigmoid
    mask) or lam, 1 - lam (lam read from the 0-d p_ptr)."""
    n64 = n.to(tl.int64)
    i, bad = _partner_index(i_ptr, n, N)
    if MASK:
        share = _sigmoid(_upsampled_logit(p_ptr + n64 * p_sn, Y[:, None], X[None, :], mask,
                                          hh, ww, sc_h, sc_w, p_sh, p_sw, BILINEAR))
        keep = 1.0 - share
    else:
        keep = tl.load(p_ptr).to(tl.float32)
        share = 1.0 - keep
    return i, bad, keep, share


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

    ia, bad_a, ka, sa = _partner(ia_ptr, pa_ptr, pa_sn, pa_sh, pa_sw, n, N, Y, X, mask,
                                 ha, wa, sc_ha, sc_wa, MASK_A, BILINEAR)
    x_n = x_ptr + n64 * sample
    x_a = x_ptr + ia * sample
    o_a = out_a_ptr + n64 * sample

    if HAS_B:
        ib, bad_b, kb, sb = _partner(ib_ptr, pb_ptr, pb_sn, pb_sh, pb_sw, n, N, Y, X, mask,
                                     hb, wb, sc_hb, sc_wb, MASK_B, BILINEAR)
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
def _tap_weights(d, keep, cells, scale, size_in, BILINEAR: tl.constexpr):
    """[len(cells), len(d)] weights of low-res ``cells`` in the upsampled values at
    destination indices ``d`` (0 where not ``keep``): the transpose of the upsampling."""
    if BILINEAR:
        c0, c1, w0, w1 = _taps(d, scale, size_in)
        wt = (tl.where(cells[:, None] == c0[None, :], w0[None, :], 0.0)
              + tl.where(cells[:, None] == c1[None, :], w1[None, :], 0.0))
    else:
        c = _lower_tap(d, scale, size_in, False)
        wt = tl.where(cells[:, None] == c[None, :], 1.0, 0.0)
    return tl.where(keep[None, :], wt, 0.0)


@triton.jit
def _block_window(i0, j0, h, w, H, W, sc_h, sc_w, BI: tl.constexpr, BJ: tl.constexpr,
                  BILINEAR: tl.constexpr):
    """The hi-res window [ys, ye) x [xs, xe) of the low-res block at (i0, j0): nearest, the
    pixels whose source is in the block; bilinear, those whose lower tap is in
    [block start - 1, block end)."""
    lo = 1 if BILINEAR else 0
    ys = _first_dst(i0 - lo, h, H, sc_h, BILINEAR)
    xs = _first_dst(j0 - lo, w, W, sc_w, BILINEAR)
    ye = _first_dst(i0 + BI, h, H, sc_h, BILINEAR)
    xe = _first_dst(j0 + BJ, w, W, sc_w, BILINEAR)
    return ys, ye, xs, xe


@triton.jit
def _gate_grad(p_g, p_x, p_i, sg_c, sx_c, tile, C: tl.constexpr):
    """sum over channels of grad_out * (x[index] - x): d out / d s on an [RY, BX] tile."""
    gs = tl.zeros(tile.shape, dtype=tl.float32)
    for c in tl.static_range(C):
        g = tl.load(p_g + c * sg_c, mask=tile, other=0.0).to(tl.float32)
        a = tl.load(p_x + c * sx_c, mask=tile, other=0.0).to(tl.float32)
        b = tl.load(p_i + c * sx_c, mask=tile, other=0.0).to(tl.float32)
        gs += g * (b - a)
    return gs


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
    i0 = ib * BI
    j0 = (r - ib * n_jb) * BJ
    iv = i0 + tl.arange(0, BI)
    jv = j0 + tl.arange(0, BJ)
    ys, ye, xs, xe = _block_window(i0, j0, h, w, H, W, sc_h, sc_w, BI, BJ, BILINEAR)
    n64 = n.to(tl.int64)
    idx, bad = _partner_index(idx_ptr, n, N)
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
        wx = _tap_weights(X, xm, jv, sc_w, w, BILINEAR)             # [BJ, BX], every row
        for y0 in range(ys, ye, RY):
            Y = y0 + tl.arange(0, RY)
            ym = Y < ye
            tile = ym[:, None] & xin[None, :]
            wy = _tap_weights(Y, ym, iv, sc_h, h, BILINEAR)         # [BI, RY]
            s = _sigmoid(_upsampled_logit(m_n, Y[:, None], X[None, :], tile, h, w, sc_h, sc_w,
                                          m_sh, m_sw, BILINEAR))
            gs = _gate_grad(g_n + (Y * sg_h)[:, None] + (X * sg_w)[None, :],
                            x_n + (Y * sx_h)[:, None] + (X * sx_w)[None, :],
                            x_i + (Y * sx_h)[:, None] + (X * sx_w)[None, :], sg_c, sx_c, tile, C)
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


# The GPU the launch configuration is chosen for: "sm_90" etc. (bench/gpu_aot.py sets it to
# compile each architecture's own configuration); None: the current CUDA device.
TARGET_ARCH = None
# Per-architecture floors on the bilinear backward's warps, by triton version, measured with
# bench/gpu_aot.py: under triton 3.8 its 2-warp tile (224 px images, 14x14 masks) spills 8 B
# on sm_90, 4 warps spill nothing there, and 2 warps spill nothing on sm_80; under triton
# 3.7 2 warps spill nothing on sm_90 and 4 do.
BWD_MIN_WARPS_BILINEAR = {"3.8": {"sm_90": 4}}


@functools.lru_cache(maxsize=None)
def _device_arch(index):
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _arch():
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    if torch.cuda.is_available():
        return _device_arch(torch.cuda.current_device())
    return None


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
    if bilinear:
        floors = BWD_MIN_WARPS_BILINEAR.get(".".join(triton.__version__.split(".")[:2]), {})
        num_warps = max(num_warps, floors.get(_arch(), 0))
    return bi, bj, ry, bx, num_warps


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _launch_forward(x, index_a, logits_a, lam_a, index_b, logits_b, lam_b, bilinear):
    """Launch the forward kernel; returns out_a or (out_a, out_b)."""
    n, c, height, width = x.shape
    cl = is_channels_last(x)
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
        return scalar_tensor(lam, x.device), (0, 0, 0), (1, 1, 1.0, 1.0), False

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
        # No zero-filled gradient for out_b (an image-sized buffer and a launch per step,
        # bench/counts.py): the unused gradients arrive as None.
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, *unused):
        if grad_a is None:                     # out_a did not reach the loss
            return None, None, None, None, None, None, None
        x, index_a, logits_a = ctx.saved_tensors
        grad = _launch_backward(x, index_a, logits_a, grad_a, ctx.bilinear)
        return None, None, grad, None, None, None, None


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
            necessarily a permutation; a value outside [0, N) raises on the CPU and trips
            a device-side assert on CUDA, with no host sync).
        mask_logits: [N, 1, h, w] float logits with h <= H, w <= W. The mixed image is
            ``x * (1 - s) + x[index] * s`` with ``s = sigmoid(F.interpolate(mask_logits,
            (H, W), mode))`` in fp32: s is the weight of the shuffled sample. Differentiable.
        lam: instead of a mask, a constant: ``lam * x + (1 - lam) * x[index]`` (lam is the
            weight of x). Python float or 0-d tensor, never read on the host; no gradient.
        mode: "nearest" or "bilinear" (align_corners=False), as ``F.interpolate``.
    """
    check_mix(x, index, mask_logits, lam, mode)
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
    check_mix_pair(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b, mode)
    _check_fused(x)
    bilinear = mode == "bilinear"
    if mask_logits_b is not None:
        mask_logits_b = mask_logits_b.detach()
    if mask_logits_a.requires_grad and torch.is_grad_enabled():
        return _MixImages.apply(x, index_a, mask_logits_a, index_b, mask_logits_b, lam_b,
                                bilinear)
    return _launch_forward(x, index_a, mask_logits_a, None, index_b, mask_logits_b, lam_b,
                           bilinear)
