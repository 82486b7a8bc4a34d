"""Fused Mix Block cross attention (AutoMix, ECCV 2022) with a value of width 1.

Per sample n, with partner p = index[n] (any values in [0, N), not necessarily a permutation):

    q[n]  = qk[n] + q_bias                          [L, D]
    k[n]  = qk[p] + k_bias                          [L, D]
    vv[n] = v[p]  + v_bias                          [L]
    P     = softmax(q[n] @ k[n]^T * scale, dim=-1)  [L, L]   (over the partner's positions)
    out[n] = P @ vv[n]                              [L]      float32

everything in fp32 whatever the input dtype. ``qk`` is the shared query/key 1x1 conv of the
features laid out [N, L = h*w, D = C // 2], ``v`` the value conv [N, L]; the optional λ
channel of the original model is folded into the three biases by the caller.

Kernels (flash-style: no N x L x L tensor and no gathered copy of qk / v in device memory;
the partner's rows are read through ``index``):

* forward: grid (N, query tiles). A program holds BLOCK_M queries of sample n and loops over
  key tiles of sample index[n] (BLOCK_N keys; S = q k^T accumulated over D in BLOCK_D
  chunks), keeping an online running max and sum in base 2 and the value reduction as a row
  sum (the value has width 1, so P @ v is no dot). It writes ``out`` and the natural-log
  log-sum-exp ``lse`` [N, L] fp32 for the backward. Since L = h*w <= 256 in practice,
  for fp16 / bf16 BLOCK_N covers the whole key row on a GPU (one key tile: a plain,
  non-online softmax in effect); fp32 (IEEE dots on the FMA units, register-hungry) caps
  the key tile at 64, and longer rows loop.
* backward, dq: grid (N, query tiles). Recomputes S and P = exp(S - lse) per key tile, forms
  dS = P * (dO_i vv_j - Delta_i) (Delta_i = dO_i out_i), and adds scale * dS @ k to dq
  chunk by chunk over D (BLOCK_D columns at a time, so D up to 1024 never needs a
  [BLOCK_M, D] register accumulator). With a whole-row key tile each dq chunk is written
  once; with several key tiles the program read-modify-writes its own, exclusively owned,
  dq tile (a barrier orders the CTA's stores before the next tile's loads).
* backward, dk / dvv: grid (N, key tiles), the transpose: loops over query tiles (whole
  column on a GPU), dvv_j = sum_i P_ij dO_i, dk chunks = scale * dS^T @ q.

dq, dk and dvv live in the frame of sample n; the autograd Function maps them back:
grad_qk = dq + index_add(index, dk), grad_v = index_add(index, dvv) (``index_add_``, so a
non-permutation index is right too), bias grads are sums. fp32 inputs use IEEE fp32 dots;
fp16 / bf16 inputs use dots in the input dtype with fp32 accumulation on a GPU (LOWP: q and k
rows with their biases, and dS, rounded to the input dtype; fp16's dS tiles scaled by a power
of two into its range, ``_dscores``). Under the Triton interpreter they take the fp32 path, or
with ``INTERP_LOWP_EMULATE`` the LOWP path with the same roundings and its dots done in fp32.

Public API:
    mixblock_attention(qk, v, index, q_bias=None, k_bias=None, v_bias=None, scale=None)
    fastmix.functional.mixblock_attention_eager(...)   # the eager twin (same signature)
"""

import json
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmix.checks import attention_scale, check_attention, scalar_tensor
from fastmix.functional import mixblock_attention_eager
from fastmix.kernels import _common

__all__ = ["mixblock_attention"]


# Launch configuration (module globals so tests can force the multi-tile paths).
MAX_ROW_BLOCK = 256          # GPU, fp16 / bf16: widest key row (forward, dq) / query column
                             # (dk) in one tile: L = h * w <= 256 takes the whole-row path
MAX_ROW_BLOCK_FP32 = 64      # GPU, fp32: IEEE dots are register-hungry, longer rows loop
INTERP_MAX_ROW_BLOCK = 64    # interpreter: smaller, so h = w = 14 (L = 196) loops over tiles
INTERP_BLOCK_M = 32          # interpreter: fixed tile sizes (>= 16 for every tl.dot dim);
INTERP_BLOCK_D = (16, 32)    # BLOCK_D for D < 64 / D >= 64: D = 24 takes two chunks (masked
                             # tail), D = 128 four
# GPU autotune pruning: per-thread element budgets (see _prune)
SCORE_REGS_LOWP, OPERAND_REGS_LOWP = 48, 48
SCORE_REGS_FP32, OPERAND_REGS_FP32 = 16, 20

_LOG2E = 1.4426950408889634

# Interpreter only: run fp16 / bf16 inputs through the LOWP path (operands rounded to the input
# dtype exactly where the GPU holds them in it: q / k rows with their biases, dS) with its dots
# emulated in fp32 (``_dot``), rather than the plain fp32 path. Off by default; the tests turn
# it on. A GPU never reads it: there LOWP is on for every fp16 / bf16 input.
INTERP_LOWP_EMULATE = False
# Read by ``_dot`` and ``_to_lowp`` at compile time: False on a GPU, so the emulation is not
# in its code.
_INTERPRETING = tl.constexpr(_common.interpreting())


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, LOWP: tl.constexpr):
    if LOWP:
        if _INTERPRETING:
            # Interpreter only (INTERP_LOWP_EMULATE): a and b hold fp16 / bf16 values, rounded
            # where the GPU rounds them; a tensor core multiplies such values exactly and
            # accumulates in fp32, which an fp32 IEEE dot of the same values reproduces up to
            # summation order (the interpreter's own bf16 dot is garbage, its fp16 one numpy's)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _to_lowp(x, like_ptr):
    """fp32 ``x`` rounded to the element type of ``like_ptr`` (fp16 / bf16), to nearest even as
    a GPU's cast does. The interpreter's fp32 -> bf16 cast truncates: under it bf16 is rounded
    here on the bits first (the cast then drops 16 zero bits)."""
    if _INTERPRETING:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _load_rows(base, bias_ptr, offs_r, r_ok, offs_d, d_ok, D,
               HAS_BIAS: tl.constexpr, LOWP: tl.constexpr):
    """Rows ``offs_r`` x columns ``offs_d`` of a contiguous [L, D] matrix plus a [D] bias.

    fp32 unless LOWP (then the input dtype, the bias added in fp32 first). Masked rows and
    columns read 0 (+ bias); callers zero their probabilities."""
    x = tl.load(base + offs_r[:, None] * D + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if LOWP:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
            x = _to_lowp(x.to(tl.float32) + b[None, :], base)
    else:
        x = x.to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
            x = x + b[None, :]
    return x


@triton.jit
def _scores(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D,
            HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, LOWP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw scores q[offs_m] @ k[offs_n]^T, [BLOCK_M, BLOCK_N] fp32, summed over D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = _load_rows(q_base, qb_ptr, offs_m, m_ok, offs_d, d_ok, D, HAS_QB, LOWP)
        k = _load_rows(k_base, kb_ptr, offs_n, n_ok, offs_d, d_ok, D, HAS_KB, LOWP)
        s = _dot(q, tl.trans(k), s, LOWP)
    return s


@triton.jit
def _sample_and_partner(qk_ptr, idx_ptr, L, D):
    """This program's sample n (grid axis 0), its partner p = index[n], and their qk rows."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.load(idx_ptr + n).to(tl.int64)              # the partner sample
    return n, p, qk_ptr + n * L * D, qk_ptr + p * L * D


@triton.jit
def _v_bias(vb_ptr, HAS_VB: tl.constexpr):
    vb = 0.0
    if HAS_VB:
        vb = tl.load(vb_ptr).to(tl.float32)
    return vb


@triton.jit
def _fwd_kernel(qk_ptr, v_ptr, idx_ptr, qb_ptr, kb_ptr, vb_ptr, out_ptr, lse_ptr,
                L, D, qk_scale,
                HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VB: tl.constexpr,
                LOWP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(1)
    n, p, q_base, k_base = _sample_and_partner(qk_ptr, idx_ptr, L, D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    vb = _v_bias(vb_ptr, HAS_VB)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2 * vv
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        s = _scores(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D,
                    HAS_QB, HAS_KB, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))     # finite: every tile has a valid key
        alpha = tl.exp2(m_i - m_new)
        e = tl.exp2(s - m_new[:, None])
        vv = tl.load(v_ptr + p * L + offs_n, mask=n_ok, other=0.0).to(tl.float32) + vb
        l_i = l_i * alpha + tl.sum(e, axis=1)
        acc = acc * alpha + tl.sum(e * vv[None, :], axis=1)
        m_i = m_new
    out = acc / l_i
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453            # natural log
    tl.store(out_ptr + n * L + offs_m, out, mask=m_ok)
    tl.store(lse_ptr + n * L + offs_m, lse, mask=m_ok)


@triton.jit
def _row_terms(lse_ptr, do_ptr, out_ptr, row0, offs_m, m_ok):
    """Per query row of the backward: lse in base 2, dout, and delta = dout * out."""
    lse2 = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    do = tl.load(do_ptr + row0 + offs_m, mask=m_ok, other=0.0)
    delta = do * tl.load(out_ptr + row0 + offs_m, mask=m_ok, other=0.0)
    return lse2, do, delta


@triton.jit
def _probs(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D, qk_scale, lse2,
           HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, LOWP: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The softmax probabilities of a [BLOCK_M, BLOCK_N] tile, recomputed from the saved lse
    (0 outside the valid rows and columns)."""
    s = _scores(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D,
                HAS_QB, HAS_KB, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
    pr = tl.exp2(s * qk_scale - lse2[:, None])
    return tl.where(m_ok[:, None] & n_ok[None, :], pr, 0.0)


@triton.jit
def _pow2_scales(bound):
    """2^t and 2^-t (fp32, exact) for the integer t putting the scalar bound * 2^t in
    [2^14, 2^15): fp16's top binade but one, so nothing rounds up to inf (65520), and values
    down to 2^-28 of the bound stay normal. |t| <= 100 (bound = 0: t = 100), so 2^t times a
    scale up to 2^28 stays finite."""
    e = ((bound.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127     # floor(log2(bound))
    t = tl.minimum(tl.maximum(14 - e, -100), 100)
    return ((t + 127) << 23).to(tl.float32, bitcast=True), \
        ((127 - t) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dscores(pr, do, vv, delta, scale, qk_ptr, LOWP: tl.constexpr):
    """d loss / d scores = P * (dout vv^T - delta) * scale, in qk's dtype when LOWP, and the
    factor ``unscale`` the dot with it is to be multiplied by (``_accumulate``).

    fp16: dS is tiny in training (dout ~ 1e-4 / (N L) per element before loss scaling, P ~
    1 / L: |dS| ~ 1e-9 to 1e-5, below fp16's normal range, 6.1e-5, and mostly below its
    smallest subnormal, 6e-8: cast as is, it flushes to 0), so the tile is scaled by a power
    of two 2^t into fp16's range (exact; folded into ``scale``, no extra pass over the
    tile), t from the bound |dS_ij| <= max_i (|dout_i| max_j |vv_j| + |delta_i|) * scale
    (P <= 1; vector maxima only: a max over the tile, or a scale per row, costs registers
    that some GPU configs then spill), and ``unscale`` = 2^-t undoes it on the fp32 product.
    The bound overestimates by up to 1 / max P (<= L): elements more than ~2^28 / L below
    the tile's largest (rows of dout that far apart) lose precision to fp16 subnormals.
    bf16 has fp32's range: a plain cast (``unscale`` unused)."""
    if LOWP:
        if qk_ptr.dtype.element_ty == tl.float16:
            up, unscale = _pow2_scales(
                tl.max(tl.abs(do) * tl.max(tl.abs(vv)) + tl.abs(delta)) * scale)
            ds = pr * (do[:, None] * vv[None, :] - delta[:, None]) * (scale * up)
        else:
            ds = pr * (do[:, None] * vv[None, :] - delta[:, None]) * scale
            unscale = 1.0
        ds = _to_lowp(ds, qk_ptr)
    else:
        ds = pr * (do[:, None] * vv[None, :] - delta[:, None]) * scale
        unscale = 1.0
    return ds, unscale


@triton.jit
def _accumulate(dst_base, offs_r, r_ok, a, unscale, src_base, src_bias, offs_s, s_ok, D, add,
                HAS_BIAS: tl.constexpr, LOWP: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[offs_r, :] = a @ src[offs_s, :] (+ dst[offs_r, :] when ``add``), in D chunks; an
    fp16 ``a`` holds dS scaled by 1 / ``unscale`` (``_dscores``): its product is multiplied
    by ``unscale`` before the add.

    The calling program alone owns these dst rows: the first tile stores, later ones add to
    what it stored, after a barrier so every thread sees the CTA's writes."""
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        src = _load_rows(src_base, src_bias, offs_s, s_ok, offs_d, d_ok, D, HAS_BIAS, LOWP)
        ptrs = dst_base + offs_r[:, None] * D + offs_d[None, :]
        mask = r_ok[:, None] & d_ok[None, :]
        prev = tl.load(ptrs, mask=mask & add, other=0.0)
        if a.dtype == tl.float16:
            acc = _dot(a, src, tl.zeros_like(prev), LOWP) * unscale + prev
        else:
            acc = _dot(a, src, prev, LOWP)
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _bwd_dq_kernel(qk_ptr, v_ptr, idx_ptr, qb_ptr, kb_ptr, vb_ptr, out_ptr, do_ptr, lse_ptr,
                   dq_ptr, L, D, qk_scale, scale,
                   HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VB: tl.constexpr,
                   LOWP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(1)
    n, p, q_base, k_base = _sample_and_partner(qk_ptr, idx_ptr, L, D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    vb = _v_bias(vb_ptr, HAS_VB)
    lse2, do, delta = _row_terms(lse_ptr, do_ptr, out_ptr, n * L, offs_m, m_ok)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        pr = _probs(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D, qk_scale,
                    lse2, HAS_QB, HAS_KB, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
        vv = tl.load(v_ptr + p * L + offs_n, mask=n_ok, other=0.0).to(tl.float32) + vb
        ds, unscale = _dscores(pr, do, vv, delta, scale, qk_ptr, LOWP)
        _accumulate(dq_ptr + n * L * D, offs_m, m_ok, ds, unscale, k_base, kb_ptr, offs_n,
                    n_ok, D, n0 > 0, HAS_KB, LOWP, BLOCK_D)          # dq += dS k


@triton.jit
def _bwd_dk_kernel(qk_ptr, v_ptr, idx_ptr, qb_ptr, kb_ptr, vb_ptr, out_ptr, do_ptr, lse_ptr,
                   dk_ptr, dvv_ptr, L, D, qk_scale, scale,
                   HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VB: tl.constexpr,
                   COMPUTE_DK: tl.constexpr, LOWP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(1)
    n, p, q_base, k_base = _sample_and_partner(qk_ptr, idx_ptr, L, D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    vv = tl.load(v_ptr + p * L + offs_n, mask=n_ok, other=0.0).to(tl.float32) \
        + _v_bias(vb_ptr, HAS_VB)
    dvv = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        lse2, do, delta = _row_terms(lse_ptr, do_ptr, out_ptr, n * L, offs_m, m_ok)
        pr = _probs(q_base, k_base, qb_ptr, kb_ptr, offs_m, m_ok, offs_n, n_ok, D, qk_scale,
                    lse2, HAS_QB, HAS_KB, LOWP, BLOCK_M, BLOCK_N, BLOCK_D)
        dvv += tl.sum(pr * do[:, None], axis=0)
        if COMPUTE_DK:
            ds, unscale = _dscores(pr, do, vv, delta, scale, qk_ptr, LOWP)
            _accumulate(dk_ptr + n * L * D, offs_n, n_ok, tl.trans(ds), unscale, q_base,
                        qb_ptr, offs_m, m_ok, D, m0 > 0, HAS_QB, LOWP,
                        BLOCK_D)                                     # dk += dS^T q
    tl.store(dvv_ptr + n * L + offs_n, dvv, mask=n_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration: fixed tiles under the interpreter, a small autotune on a GPU
# --------------------------------------------------------------------------------------------
def _row_block(L, lowp):
    """The tile along the looped-over axis: the whole (padded) row when it fits."""
    if _common.interpreting():
        cap = INTERP_MAX_ROW_BLOCK
    else:
        cap = MAX_ROW_BLOCK if lowp else MAX_ROW_BLOCK_FP32
    return max(16, min(triton.next_power_of_2(L), cap))


PRUNE_ARCH = None   # "sm_90" etc.: prune for that GPU (the compile check); None: this device


def _spilling_configs():
    """``{arch: {launcher: {frozenset of (constexpr, value) incl. num_warps}}}``: the autotune
    configs ptxas spilled registers for, in any dtype, under this triton version
    (kernels/autotune_spills.json, written by ``python bench/gpu_aot.py --full --all-configs
    --spill-table``; for a triton version it does not list, the union over the listed ones)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autotune_spills.json")
    with open(path) as f:
        versions = json.load(f)["spilling_configs"]
    chosen = [versions[triton.__version__]] if triton.__version__ in versions else \
        list(versions.values())
    table = {}
    for per_arch in chosen:
        for arch, per in per_arch.items():
            for launcher, entries in per.items():
                table.setdefault(arch, {}).setdefault(launcher, set()).update(
                    frozenset(e.items()) for e in entries)
    return table


def _spilling_for(table, launcher):
    """The launcher's spilling configs on the GPU pruned for; the union over every listed
    architecture for one the table does not list (sm_86, sm_120, ...)."""
    arch = PRUNE_ARCH
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    if arch in table:
        return table[arch].get(launcher, set())
    return set().union(*(per.get(launcher, set()) for per in table.values()))


def _prune(launcher, tile_name, fixed_name):
    """Configs worth timing for this (L, D, dtype, flags).

    BLOCK_D no wider than the padded D, the tile no wider than the padded L, a per-thread
    register budget (fp32 score elements, tile x fixed / threads, and operand elements of one
    D step, (tile + fixed) x BLOCK_D / threads: fp32 IEEE dots run on the FMA units and need
    far more registers than bf16 / fp16 tensor-core dots), and none of the configs the
    ahead-of-time compile check found spilling (``_spilling_configs``): a spilling config is
    never timed, so it can never win on a spill-bound GPU."""
    table = _spilling_configs()

    def prune(configs, named_args, **kwargs):
        spilling = _spilling_for(table, launcher)
        args = {**named_args, **kwargs}
        L, D, fixed = args["L"], args["D"], args[fixed_name]
        score_budget, operand_budget = ((SCORE_REGS_LOWP, OPERAND_REGS_LOWP) if args["LOWP"]
                                        else (SCORE_REGS_FP32, OPERAND_REGS_FP32))
        d_cap = max(16, triton.next_power_of_2(D))
        tile_cap = max(16, triton.next_power_of_2(L))
        flags = {k: kwargs[k] for k in ("HAS_QB", "HAS_KB", "HAS_VB", "LOWP", "COMPUTE_DK",
                                        fixed_name) if k in kwargs}

        def spills(c):
            return frozenset({**flags, **c.kwargs, "num_warps": c.num_warps}.items()) in spilling

        keep = []
        for c in configs:
            tile, bd, threads = c.kwargs[tile_name], c.kwargs["BLOCK_D"], 32 * c.num_warps
            if bd > d_cap or tile > tile_cap or spills(c):
                continue
            if tile * fixed > score_budget * threads:
                continue
            if (tile + fixed) * bd > operand_budget * threads:
                continue
            keep.append(c)
        safe = [c for c in configs if not spills(c)] or configs
        return keep or [min(safe, key=lambda c: (c.kwargs[tile_name], c.kwargs["BLOCK_D"],
                                                 -c.num_warps))]
    return prune


def _configs(tile_name):
    return [triton.Config({tile_name: t, "BLOCK_D": bd}, num_warps=w, num_stages=2)
            for t in (16, 32, 64) for bd in (16, 32, 64) for w in (4, 8)]


if _common.interpreting():
    _fwd_launch = _fwd_kernel
    _dq_launch = _bwd_dq_kernel
    _dk_launch = _bwd_dk_kernel
else:  # pragma: no cover - GPU only
    # Every kernel writes each output element before (possibly) reading it back, so the
    # autotuner's repeated runs need no reset.
    # The key names every constexpr flag: each combination is a different kernel.
    _FLAGS = ["HAS_QB", "HAS_KB", "HAS_VB", "LOWP"]
    _fwd_launch = _common.autotune(_fwd_kernel, _configs("BLOCK_M"),
                                   ["L", "D", "BLOCK_N"] + _FLAGS,
                                   _prune("_fwd_launch", "BLOCK_M", "BLOCK_N"))
    _dq_launch = _common.autotune(_bwd_dq_kernel, _configs("BLOCK_M"),
                                  ["L", "D", "BLOCK_N"] + _FLAGS,
                                  _prune("_dq_launch", "BLOCK_M", "BLOCK_N"))
    _dk_launch = _common.autotune(_bwd_dk_kernel, _configs("BLOCK_N"),
                                  ["L", "D", "BLOCK_M", "COMPUTE_DK"] + _FLAGS,
                                  _prune("_dk_launch", "BLOCK_N", "BLOCK_M"))


def _lowp(qk):
    """The LOWP kernels (dots in the input dtype): fp16 / bf16 inputs on a GPU; under the
    interpreter only with INTERP_LOWP_EMULATE (and then emulated, see ``_dot``)."""
    return qk.dtype != torch.float32 and (not _common.interpreting() or INTERP_LOWP_EMULATE)


def _interp_meta(tile_name, D):
    return {tile_name: INTERP_BLOCK_M, "BLOCK_D": INTERP_BLOCK_D[0 if D < 64 else 1]}


def _grid(L, N, tile_name):
    """(N, tiles): the batch on grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at
    65,535), the tiles of L on axis 1."""
    if _common.interpreting():
        return (N, triton.cdiv(L, INTERP_BLOCK_M))
    return lambda meta: (N, triton.cdiv(L, meta[tile_name]))


def _launch_forward(qk, v, index, qb, kb, vb, scale):
    N, L, D = qk.shape
    dev = qk.device
    out = _common.empty((N, L), torch.float32, dev)
    lse = _common.empty((N, L), torch.float32, dev)
    lowp = _lowp(qk)
    meta = _interp_meta("BLOCK_M", D) if _common.interpreting() else {}
    _fwd_launch[_grid(L, N, "BLOCK_M")](
        qk, v, index, qb if qb is not None else out, kb if kb is not None else out,
        vb if vb is not None else out, out, lse, L, D, float(scale) * _LOG2E,
        HAS_QB=qb is not None, HAS_KB=kb is not None, HAS_VB=vb is not None, LOWP=lowp,
        BLOCK_N=_row_block(L, lowp), **meta)
    return out, lse


def _launch_backward(qk, v, index, qb, kb, vb, out, lse, dout, scale, need_dq, need_dk):
    N, L, D = qk.shape
    dev = qk.device
    lowp = _lowp(qk)
    flags = dict(HAS_QB=qb is not None, HAS_KB=kb is not None, HAS_VB=vb is not None,
                 LOWP=lowp)
    qb_, kb_, vb_ = (x if x is not None else out for x in (qb, kb, vb))
    qk_scale = float(scale) * _LOG2E
    dq = None
    if need_dq:
        dq = _common.empty((N, L, D), torch.float32, dev)
        meta = _interp_meta("BLOCK_M", D) if _common.interpreting() else {}
        _dq_launch[_grid(L, N, "BLOCK_M")](
            qk, v, index, qb_, kb_, vb_, out, dout, lse, dq, L, D, qk_scale, float(scale),
            BLOCK_N=_row_block(L, lowp), **flags, **meta)
    dvv = _common.empty((N, L), torch.float32, dev)
    dk = _common.empty((N, L, D), torch.float32, dev) if need_dk else None
    meta = _interp_meta("BLOCK_N", D) if _common.interpreting() else {}
    _dk_launch[_grid(L, N, "BLOCK_N")](
        qk, v, index, qb_, kb_, vb_, out, dout, lse, dk if need_dk else dvv, dvv,
        L, D, qk_scale, float(scale), COMPUTE_DK=need_dk,
        BLOCK_M=_row_block(L, lowp), **flags, **meta)
    return dq, dk, dvv


class _MixBlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, v, index, q_bias, k_bias, v_bias, scale):
        # The biases arrive as contiguous fp32 (v_bias: 0-d) tensors on qk's device, or None.
        out, lse = _launch_forward(qk, v, index, q_bias, k_bias, v_bias, scale)
        ctx.save_for_backward(qk, v, index, q_bias, k_bias, v_bias, out, lse)
        ctx.scale = scale
        ctx.v_dtype = v.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qk, v, index, qb, kb, vb, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dq = need[0] or need[3]
        need_dk = need[0] or need[4]
        need_dv = need[1] or need[5]
        if not (need_dq or need_dk or need_dv):
            return (None,) * 7
        dout = dout.to(torch.float32).contiguous()
        dq, dk, dvv = _launch_backward(qk, v, index, qb, kb, vb, out, lse, dout, ctx.scale,
                                       need_dq, need_dk)
        g_qk = g_v = g_qb = g_kb = g_vb = None
        if need[3]:
            g_qb = dq.sum((0, 1))
        if need[4]:
            g_kb = dk.sum((0, 1))
        if need[5]:
            g_vb = dvv.sum()
        if need[0]:
            dq.index_add_(0, index, dk)          # dq is ours: accumulate in place
            g_qk = dq.to(qk.dtype)
        if need[1]:
            g_v = _common.empty(v.shape, torch.float32, v.device).zero_()  # index_add target
            g_v.index_add_(0, index, dvv)
            g_v = g_v.to(ctx.v_dtype)
        return g_qk, g_v, None, g_qb, g_kb, g_vb, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def mixblock_attention(qk, v, index, q_bias=None, k_bias=None, v_bias=None, scale=None):
    """Fused Mix Block attention ``softmax((qk + q_bias) (qk[index] + k_bias)^T * scale)
    @ (v[index] + v_bias)`` per sample; returns [N, L] float32.

    Args:
        qk: [N, L, D] float32 / float16 / bfloat16, CUDA (or CPU under TRITON_INTERPRET=1);
            the shared query/key projection. Non-contiguous views are copied.
        v: [N, L] float (value projection, width 1), same device.
        index: [N] int64 (or int32) partner of each sample, values in [0, N) (checked on
            the CPU, a device-side assert on CUDA: no host sync). Need not be a permutation.
        q_bias, k_bias: [D] float tensors or None.
        v_bias: 0-d tensor, Python float or None.
        scale: Python float; default 1 / sqrt(D).

    Differentiable w.r.t. qk, v and the bias tensors (grads in their dtypes); index gets none.
    """
    check_attention(qk, v, index, q_bias, k_bias, v_bias, scale)
    if qk.device.type != "cuda" and not _common.interpreting():
        raise ValueError(f"mixblock_attention runs Triton kernels: qk must be on a CUDA device "
                         f"(got {qk.device}; set TRITON_INTERPRET=1 for CPU)")
    N, L, D = qk.shape
    if N == 0:
        return mixblock_attention_eager(qk, v, index, q_bias, k_bias, v_bias, scale)
    dev = qk.device
    s = attention_scale(scale, D)
    # Autograd flows through these conversions, so bias grads come back in their dtypes.
    qb = q_bias.to(torch.float32).contiguous() if q_bias is not None else None
    kb = k_bias.to(torch.float32).contiguous() if k_bias is not None else None
    vb = scalar_tensor(v_bias, dev) if v_bias is not None else None
    qk_c, v_c, idx = qk.contiguous(), v.contiguous(), index.contiguous()
    if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (qk_c, v_c, qb, kb, vb)):
        return _MixBlockAttention.apply(qk_c, v_c, idx, qb, kb, vb, s)
    out, _ = _launch_forward(qk_c, v_c, idx, qb, kb, vb, s)
    return out
