"""Fused Mix Block attention (kernels/mixblock_attn.py) against its eager twin, and the eager
twin against an independent float64 einsum + softmax.

Runs under the Triton CPU interpreter when no GPU is present (conftest sets TRITON_INTERPRET);
there the interpreter uses small fixed tiles (BLOCK_N / BLOCK_M <= 64 along the looped axis,
BLOCK_D 16 or 32), so h = w = 14 (L = 196) runs the multi-key-tile online softmax and the
read-modify-write backward, D = 24 a masked D tail and D = 128 several D chunks. The GPU
tile configurations are GPU-only; the fp16 / bf16 tensor-core path (LOWP) runs under the
interpreter with its dots emulated in fp32 (``lowp`` fixture, ``M.INTERP_LOWP_EMULATE``).
"""
import math

import pytest
import torch

import fastmix  # noqa: F401  (registers fastmix.kernels in a source checkout)
from fastmix import functional as E   # the eager twins
from fastmix.kernels import _common
from fastmix.kernels import mixblock_attn as M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# Every output buffer a kernel allocates starts as NaN: an unwritten element fails.
pytestmark = pytest.mark.usefixtures("poison_outputs")


def _make(n, h, d, dtype=torch.float32, index="perm", bias=True, seed=0, vb_kind="tensor"):
    g = torch.Generator().manual_seed(seed)
    L = h * h
    qk = (torch.randn(n, L, d, generator=g) * 2).to(DEVICE, dtype)
    v = torch.randn(n, L, generator=g).to(DEVICE, dtype)
    if index == "identity":
        idx = torch.arange(n)
    elif index == "perm":
        idx = torch.randperm(n, generator=g)
    else:  # "random": not a permutation (repeats, samples nobody picks)
        idx = torch.randint(0, n, (n,), generator=g)
    idx = idx.to(DEVICE)
    qb = kb = vb = None
    if bias:
        qb = (torch.randn(d, generator=g) * 0.5).to(DEVICE)
        kb = (torch.randn(d, generator=g) * 0.5).to(DEVICE)
        vb = torch.tensor(0.37, device=DEVICE) if vb_kind == "tensor" else 0.37
    return qk, v, idx, qb, kb, vb


def _dout(n, L, seed=1):
    return torch.randn(n, L, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _run(fn, qk, v, idx, qb, kb, vb, scale=None, dout=None):
    """Forward, then (with dout) backward of <out, dout>; returns (out, grads dict)."""
    leaves = {"qk": qk, "v": v, "q_bias": qb, "k_bias": kb, "v_bias": vb}
    leaves = {k: (x.detach().clone().requires_grad_(dout is not None)
                  if isinstance(x, torch.Tensor) else x) for k, x in leaves.items()}
    out = fn(leaves["qk"], leaves["v"], idx, leaves["q_bias"], leaves["k_bias"],
             leaves["v_bias"], scale=scale)
    grads = {}
    if dout is not None:
        (out * dout).sum().backward()
        grads = {k: x.grad for k, x in leaves.items() if isinstance(x, torch.Tensor)}
    return out.detach(), grads


def _operands(qk, v, idx, qb, kb, vb, lowp=False):
    """float64 q = qk + q_bias, k = qk[index] + k_bias, vv = v[index] + v_bias; ``lowp``: q and
    k rounded to qk's dtype after an fp32 add, as the LOWP kernels hold their dot operands."""
    vv = v.double()[idx] + (float(vb) if vb is not None else 0)
    if not lowp:
        return (qk.double() + (qb.double() if qb is not None else 0),
                qk.double()[idx] + (kb.double() if kb is not None else 0), vv)
    q = qk.float() + (qb.float() if qb is not None else 0)
    k = qk.float()[idx] + (kb.float() if kb is not None else 0)
    return q.to(qk.dtype).double(), k.to(qk.dtype).double(), vv


def _error_scales(qk, v, idx, qb, kb, vb, scale, dout, lowp=False):
    """float64 magnitudes of the terms each result sums (before any cancellation).

    A computation whose every term has a relative error <= tol is off by at most
    tol * these: the right atol scale. (With the identity index, q_i . q_i dominates a row
    and the softmax saturates: the gradients are tiny differences of large terms, e.g.
    dS_ij = P_ij (dO_i vv_j - Delta_i), and an error relative to the result would be
    meaningless in any float arithmetic.)"""
    d = qk.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, vv = _operands(qk, v, idx, qb, kb, vb, lowp)
    p = torch.softmax(torch.einsum("nid,njd->nij", q, k) * s, dim=-1)
    do = dout.double()
    out = torch.einsum("nij,nj->ni", p, vv)
    b = p * (do[:, :, None] * vv[:, None, :]).abs() + p * (do * out).abs()[:, :, None]
    bq = s * torch.einsum("nij,njd->nid", b, k.abs())
    bk = s * torch.einsum("nij,nid->njd", b, q.abs())
    bv = torch.einsum("nij,ni->nj", p, do.abs())
    bqk = bq.clone().index_add_(0, idx, bk)
    bvn = torch.zeros_like(bv).index_add_(0, idx, bv)
    return {"out": torch.einsum("nij,nj->ni", p, vv.abs()).max(), "qk": bqk.max(),
            "v": bvn.max(), "q_bias": bq.sum((0, 1)).max(), "k_bias": bk.sum((0, 1)).max(),
            "v_bias": bv.sum()}


def _assert_close(a, b, tol, atol_scale, what):
    assert a.shape == b.shape, what
    assert torch.isfinite(a).all(), f"{what}: NaN/inf (an unwritten element?)"
    atol = tol * max(float(atol_scale), 1e-30)
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _compare(qk, v, idx, qb, kb, vb, scale=None):
    tol = TOL[qk.dtype]
    dout = _dout(qk.shape[0], qk.shape[1])
    of, gf = _run(M.mixblock_attention, qk, v, idx, qb, kb, vb, scale, dout)
    oe, ge = _run(E.mixblock_attention_eager, qk, v, idx, qb, kb, vb, scale, dout)
    err = _error_scales(qk, v, idx, qb, kb, vb, scale, dout)
    assert of.dtype == torch.float32 and of.shape == (qk.shape[0], qk.shape[1])
    _assert_close(of, oe, tol, err["out"], "out")
    assert set(gf) == set(ge)
    for name in gf:
        assert gf[name].dtype == ge[name].dtype, name
        # (the k_bias grad is exactly 0 in exact arithmetic: a per-query constant does not
        # change a softmax row)
        _assert_close(gf[name], ge[name], tol, err[name], f"grad {name}")


# ------------------------------------------------------------------------- fused vs eager
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", ["identity", "perm"])
@pytest.mark.parametrize("d", [16, 24, 128])
@pytest.mark.parametrize("h", [2, 7, 8])
@pytest.mark.parametrize("n", [1, 3])
def test_fp32_matches_eager(n, h, d, index, bias):
    _compare(*_make(n, h, d, index=index, bias=bias, seed=n * 100 + h * 10 + d))


@pytest.mark.parametrize("n,d,index,bias", [
    (1, 16, "identity", False),
    (3, 24, "perm", True),
    (3, 128, "perm", False),
])
def test_fp32_multi_tile_14x14(n, d, index, bias):
    # L = 196: not a power of two; several key / query tiles under the interpreter.
    _compare(*_make(n, 14, d, index=index, bias=bias, seed=7 + d))


# ViT token grids (the Mix Block's d = C // 2): DeiT-S / Swin-T stage 3 at 224 px, 14x14 tokens
# of C = 384 (d = 192); DeiT-B, 14x14 of C = 768 (d = 384); Swin-T stage 4, 7x7 of C = 768.
@pytest.mark.parametrize("h,d,bias", [(14, 192, True), (7, 384, False)])
def test_fp32_vit_token_grids(h, d, bias):
    _compare(*_make(2, h, d, index="perm", bias=bias, seed=h + d))


@pytest.mark.parametrize("d", [16, 24])
def test_fp32_large_batch(d):
    _compare(*_make(100, 2, d, index="perm", bias=True, seed=d))


@pytest.mark.parametrize("n,h,d", [(5, 7, 24), (100, 2, 16)])
def test_non_permutation_index(n, h, d):
    qk, v, idx, qb, kb, vb = _make(n, h, d, index="random", bias=True, seed=3)
    assert idx.unique().numel() < n          # repeats: index_add must accumulate
    _compare(qk, v, idx, qb, kb, vb)


@pytest.mark.parametrize("n,h,d,bias", [(3, 7, 24, True), (3, 8, 128, False),
                                        (1, 14, 16, True)])
def test_fp16_matches_eager(n, h, d, bias):
    _compare(*_make(n, h, d, dtype=torch.float16, bias=bias, seed=11))


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,d,bias", [(3, 7, 24, True), (8, 14, 512, True),
                                        (16, 16, 128, False), (100, 2, 16, True)])
def test_bf16_matches_eager(n, h, d, bias):
    _compare(*_make(n, h, d, dtype=torch.bfloat16, bias=bias, seed=13))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,d", [(14, 512), (16, 1024), (7, 8)])
def test_gpu_shapes(h, d, dtype):
    _compare(*_make(6, h, d, dtype=dtype, bias=True, seed=17))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_multi_tile(monkeypatch, dtype):
    # L = 196 over several key / query tiles: online softmax and read-modify-write backward
    monkeypatch.setattr(M, "MAX_ROW_BLOCK", 64)
    monkeypatch.setattr(M, "MAX_ROW_BLOCK_FP32", 32)
    _compare(*_make(4, 14, 96, dtype=dtype, bias=True, seed=19))


# ------------------------------------------------------------------------- LOWP (fp16 / bf16)
# Unit roundoff: the largest relative error of one rounding to the dtype (8 and 11 significant
# bits).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def lowp(monkeypatch):
    """fp16 / bf16 inputs take the LOWP kernels (dots in the input dtype, fp32 accumulation):
    on a GPU always, under the interpreter with the dots emulated in fp32 on operands rounded
    where the GPU rounds them (M.INTERP_LOWP_EMULATE)."""
    monkeypatch.setattr(M, "INTERP_LOWP_EMULATE", True)


def _lowp_reference(qk, v, idx, qb, kb, vb, scale, dout):
    """float64 output, gradients and sample-frame dq / dk of what the LOWP kernels compute:
    q = qk + q_bias and k = qk[index] + k_bias rounded to qk's dtype, everything else exact
    (dS too: its rounding is what the gradient tolerance covers). ``bound``: per element of
    dq / dk, sum_j |dS_ij| |k_j| (resp. sum_i |dS_ij| |q_i|): rounding each dS to a relative
    error u moves that element by at most u * bound."""
    s = 1.0 / math.sqrt(qk.shape[-1]) if scale is None else scale
    q, k, vv = _operands(qk, v, idx, qb, kb, vb, lowp=True)
    p = torch.softmax(torch.einsum("nid,njd->nij", q, k) * s, dim=-1)
    out = torch.einsum("nij,nj->ni", p, vv)
    do = dout.double()
    ds = p * (do[:, :, None] * vv[:, None, :] - (do * out)[:, :, None]) * s
    dq = torch.einsum("nij,njd->nid", ds, k)
    dk = torch.einsum("nij,nid->njd", ds, q)
    dvv = torch.einsum("nij,ni->nj", p, do)
    grads = {"qk": dq.clone().index_add_(0, idx, dk),
             "v": torch.zeros_like(dvv).index_add_(0, idx, dvv),
             "q_bias": dq.sum((0, 1)), "k_bias": dk.sum((0, 1)), "v_bias": dvv.sum()}
    bound = {"dq": torch.einsum("nij,njd->nid", ds.abs(), k.abs()),
             "dk": torch.einsum("nij,nid->njd", ds.abs(), q.abs())}
    return out, grads, dq, dk, bound


def _make_lowp(n, L, d, dtype, biases, seed, exact=False):
    """Random non-zero inputs [n, L, d] in ``dtype``, a random permutation, the biases named
    in ``biases`` ("q", "k", "v"). ``exact``: qk odd multiples of 2^-5 in (-4, 4) and q / k
    biases multiples of 2^-5 in (-2, 2), so every qk + bias has at most 8 significant bits and
    the kernel's rounding of q and k to bf16 / fp16 is exact."""
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(n, L, d, generator=g)
    qb, kb = (torch.randn(d, generator=g) * 0.5 for _ in range(2))
    if exact:
        qk = (torch.floor(qk * 16).clamp(-64, 63) + 0.5) / 16
        qb, kb = ((b * 32).round().clamp(-63, 63) / 32 for b in (qb, kb))
    v = torch.randn(n, L, generator=g)
    idx = torch.randperm(n, generator=g)
    while n > 1 and (idx == torch.arange(n)).any():       # every sample has another partner
        idx = torch.randperm(n, generator=g)
    return (qk.to(DEVICE, dtype), v.to(DEVICE, dtype), idx.to(DEVICE),
            qb.to(DEVICE) if "q" in biases else None, kb.to(DEVICE) if "k" in biases else None,
            torch.tensor(0.37, device=DEVICE) if "v" in biases else None)


def _set_row_block(monkeypatch, row_block):
    """The tile along the looped-over axis: 16 makes L = 35 three key / query tiles (online
    softmax, read-modify-write backward) under the interpreter and on a GPU."""
    monkeypatch.setattr(M, "INTERP_MAX_ROW_BLOCK", row_block)
    monkeypatch.setattr(M, "MAX_ROW_BLOCK", row_block)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("biases,row_block", [("", 64), ("q", 64), ("k", 64), ("v", 64),
                                              ("qkv", 64), ("", 16), ("qkv", 16)])
def test_lowp_matches_eager(lowp, monkeypatch, dtype, biases, row_block):
    """The LOWP path against the eager twin in fp32 from the same inputs, with inputs whose
    q = qk + q_bias and k = qk[index] + k_bias are exact in the dtype. Then the forward
    rounds nothing the twin does not: fp32 tolerance. The backward rounds dS to the dtype
    (relative error <= u, moving each gradient term by <= u of its magnitude: the atol
    scale) and both sides cast grad_qk / grad_v to the dtype (<= u of the result each): 3u."""
    _set_row_block(monkeypatch, row_block)
    qk, v, idx, qb, kb, vb = _make_lowp(3, 5 * 7, 24, dtype, biases, seed=41, exact=True)
    assert M._lowp(qk)
    assert (_operands(qk, v, idx, qb, kb, vb, lowp=True)[0]
            == _operands(qk, v, idx, qb, kb, vb)[0]).all()           # the rounding is exact
    dout = _dout(3, 35, seed=5)
    of, gf = _run(M.mixblock_attention, qk, v, idx, qb, kb, vb, None, dout)
    oe, ge = _run(E.mixblock_attention_eager, qk, v, idx, qb, kb, vb, None, dout)
    err = _error_scales(qk, v, idx, qb, kb, vb, None, dout)
    _assert_close(of, oe, 1e-5, err["out"], "out")
    assert set(gf) == set(ge) == {"qk", "v"} | {f"{b}_bias" for b in biases}
    for name in gf:
        assert gf[name].dtype == ge[name].dtype, name
        _assert_close(gf[name], ge[name], 3 * UNIT_ROUNDOFF[dtype], err[name], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row_block", [64, 16])
def test_lowp_rounds_q_and_k_like_the_gpu(lowp, monkeypatch, dtype, row_block):
    """Random biases: the LOWP kernels add them in fp32 and round q and k to the input dtype
    (the dot operands). Against a float64 reference rounding the same way the forward agrees
    to fp32 precision (and differs from the unrounded eager twin by far more); the gradients
    within 3u as above."""
    _set_row_block(monkeypatch, row_block)
    qk, v, idx, qb, kb, vb = _make_lowp(3, 5 * 7, 24, dtype, "qkv", seed=43)
    dout = _dout(3, 35, seed=6)
    of, gf = _run(M.mixblock_attention, qk, v, idx, qb, kb, vb, None, dout)
    oe, _ = _run(E.mixblock_attention_eager, qk, v, idx, qb, kb, vb, None)
    out_ref, g_ref, *_ = _lowp_reference(qk, v, idx, qb, kb, vb, None, dout)
    err = _error_scales(qk, v, idx, qb, kb, vb, None, dout, lowp=True)
    _assert_close(of, out_ref, 1e-5, err["out"], "out")
    assert (of - oe).abs().max() > 10 * 1e-5 * err["out"]      # q and k were rounded
    for name in gf:
        _assert_close(gf[name], g_ref[name], 3 * UNIT_ROUNDOFF[dtype], err[name],
                      f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dout_kind", ["mean_loss", "loss_scaled", "rows_2^-16_to_1"])
def test_lowp_tiny_upstream_gradients(lowp, dtype, dout_kind):
    """Training magnitudes: q, k ~ N(0, 0.3^2) as in the Mix Block, dout ~ 1e-4 / (N L) per
    element (a mean-reduced mask loss; "loss_scaled": times GradScaler's initial 2^16), so
    |dS| ~ 1e-9 .. 1e-5, below fp16's normal range (6.1e-5) and mostly below its smallest
    subnormal (6e-8): cast as is, dS flushes to 0 and so do dq, dk and the q-bias gradient.
    The kernels scale each dS tile by a power of two into fp16's range first. Every element
    of the fp32 dq / dk is within 2u * sum_j |dS_ij| |k_j| of the float64 result (u for the
    rounding of dS, the rest for fp32 sums), also with dout rows up to 2^16 apart in one
    tile, and the fp32 q-bias gradient is right end to end."""
    N, L, D = 4, 64, 32
    u = UNIT_ROUNDOFF[dtype]
    g = torch.Generator().manual_seed(47)
    qk = (torch.randn(N, L, D, generator=g) * 0.3).to(DEVICE, dtype)
    v = (torch.randn(N, L, generator=g) * 0.3).to(DEVICE, dtype)
    qb, kb = ((torch.randn(D, generator=g) * 0.1).to(DEVICE) for _ in range(2))
    vb = torch.tensor(0.2, device=DEVICE)
    idx = torch.tensor([2, 3, 1, 0], device=DEVICE)
    dout = torch.randn(N, L, generator=g) * (1e-4 / (N * L))
    if dout_kind == "loss_scaled":
        dout = dout * 2.0 ** 16
    elif dout_kind != "mean_loss":
        dout = dout * 2.0 ** -torch.randint(0, 17, (N, L), generator=g).float()
    dout = dout.to(DEVICE)
    assert M._lowp(qk)
    s = 1.0 / math.sqrt(D)
    out_ref, g_ref, dq_ref, dk_ref, bound = _lowp_reference(qk, v, idx, qb, kb, vb, None, dout)
    out, lse = M._launch_forward(qk, v, idx, qb, kb, vb, s)
    dq, dk, _ = M._launch_backward(qk, v, idx, qb, kb, vb, out, lse, dout, s, True, True)
    for name, got, want, b in (("dq", dq, dq_ref, bound["dq"]), ("dk", dk, dk_ref, bound["dk"])):
        rel = float((got.double() - want).norm() / want.norm())
        assert torch.isfinite(got).all(), name
        bad = ((got.double() - want).abs() > 2 * u * b).float().mean().item()
        assert bad == 0, f"{name}: {bad:.0%} of the elements off by > 2u * terms; " \
                         f"|{name}| relative error {rel:.2e} (u = {u:.1e})"
    # end to end: the q bias is an fp32 leaf, its gradient (a sum of dq) never touches fp16
    qbl = qb.clone().requires_grad_()
    (M.mixblock_attention(qk, v, idx, qbl, kb, vb) * dout).sum().backward()
    err = (qbl.grad.double() - g_ref["q_bias"]).abs().max() / g_ref["q_bias"].abs().max()
    assert err < 2 * u, f"grad q_bias: relative error {float(err):.2e}"


def test_grid_puts_the_batch_on_axis_0(monkeypatch):
    """CUDA's grid axis 0 takes up to 2^31 - 1 programs, axes 1 and 2 only 65,535: the batch
    N goes on axis 0 and the tiles of L on axis 1, in both grid forms."""
    N, L = 70000, 196
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    assert M._grid(L, N, "BLOCK_M") == (N, math.ceil(L / M.INTERP_BLOCK_M))
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    for tile_name in ("BLOCK_M", "BLOCK_N"):
        grid = M._grid(L, N, tile_name)
        assert callable(grid)
        assert grid({tile_name: 16, "BLOCK_D": 32}) == (N, 13)
        assert grid({tile_name: 64, "BLOCK_D": 32}) == (N, 4)


# ------------------------------------------------------------------------- variants
def test_scale_and_float_v_bias():
    qk, v, idx, qb, kb, vb = _make(3, 7, 24, bias=True, vb_kind="float", seed=21)
    assert isinstance(vb, float)
    _compare(qk, v, idx, qb, kb, vb, scale=0.37)


def test_partial_requires_grad():
    qk, v, idx, qb, kb, vb = _make(3, 7, 24, bias=True, seed=23)
    # only v (and v_bias) need grads: the dk kernel runs with COMPUTE_DK off
    vf = v.clone().requires_grad_()
    vbf = vb.clone().requires_grad_()
    ve = v.clone().requires_grad_()
    vbe = vb.clone().requires_grad_()
    dout = _dout(3, 49, seed=2)
    err = _error_scales(qk, v, idx, qb, kb, vb, None, dout)
    (M.mixblock_attention(qk, vf, idx, qb, kb, vbf) * dout).sum().backward()
    (E.mixblock_attention_eager(qk, ve, idx, qb, kb, vbe) * dout).sum().backward()
    _assert_close(vf.grad, ve.grad, 1e-5, err["v"], "grad v")
    _assert_close(vbf.grad, vbe.grad, 1e-5, err["v_bias"], "grad v_bias")
    # only the q bias: dq without dk
    qbf = qb.clone().requires_grad_()
    qbe = qb.clone().requires_grad_()
    (M.mixblock_attention(qk, v, idx, qbf, kb, vb) * dout).sum().backward()
    (E.mixblock_attention_eager(qk, v, idx, qbe, kb, vb) * dout).sum().backward()
    _assert_close(qbf.grad, qbe.grad, 1e-5, err["q_bias"], "grad q_bias")


def test_no_grad_forward():
    qk, v, idx, qb, kb, vb = _make(3, 8, 16, seed=25)
    with torch.no_grad():
        out = M.mixblock_attention(qk.requires_grad_(), v, idx, qb, kb, vb)
    assert not out.requires_grad
    ref = E.mixblock_attention_eager(qk.detach(), v, idx, qb, kb, vb)
    _assert_close(out, ref, 1e-5, ref.abs().max(), "out")


def test_non_contiguous_and_int32_index():
    n, h, d = 3, 7, 24
    L = h * h
    g = torch.Generator().manual_seed(27)
    qk = (torch.randn(n, d, L, generator=g) * 2).to(DEVICE).transpose(1, 2)   # [N, L, D] view
    v = torch.randn(n, L, 2, generator=g).to(DEVICE)[..., 1]                   # strided
    assert not qk.is_contiguous() and not v.is_contiguous()
    idx = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
    _compare(qk, v, idx, None, None, None)


def test_empty_batch():
    qk = torch.randn(0, 4, 16, device=DEVICE)
    v = torch.randn(0, 4, device=DEVICE)
    idx = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert M.mixblock_attention(qk, v, idx).shape == (0, 4)


# ------------------------------------------------------------------------- eager vs float64
@pytest.mark.parametrize("bias", [False, True])
def test_eager_matches_float64_reference(bias):
    n, h, d = 4, 7, 24
    qk, v, idx, qb, kb, vb = _make(n, h, d, index="random", bias=bias, seed=29)
    scale = 1.0 / math.sqrt(d)
    q = qk.double()
    k = qk.double()[idx]
    vv = v.double()[idx]
    if bias:
        q = q + qb.double()
        k = k + kb.double()
        vv = vv + vb.double()
    s = torch.einsum("nid,njd->nij", q, k) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    ref = torch.einsum("nij,nj->ni", p, vv)
    out = E.mixblock_attention_eager(qk, v, idx, qb, kb, vb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and with explicit per-sample loops (independent of the batched gather)
    for i in range(n):
        j = int(idx[i])
        qi = qk[i].double() + (qb.double() if bias else 0)
        kj = qk[j].double() + (kb.double() if bias else 0)
        vj = v[j].double() + (vb.double() if bias else 0)
        ri = torch.softmax(qi @ kj.T * scale, dim=-1) @ vj
        torch.testing.assert_close(out[i].double(), ri, rtol=1e-5, atol=1e-5 * ri.abs().max().item())


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [M.mixblock_attention, E.mixblock_attention_eager])
def test_errors(fn):
    qk, v, idx, qb, kb, vb = _make(3, 2, 16, seed=31)
    with pytest.raises(ValueError, match="qk must be 3-D"):
        fn(qk[0], v, idx)
    with pytest.raises(TypeError, match="qk must be a torch.Tensor"):
        fn(qk.tolist(), v, idx)
    with pytest.raises(TypeError, match="qk must be float32"):
        fn(qk.to(torch.int32), v, idx)
    with pytest.raises(ValueError, match="v must have shape"):
        fn(qk, v[:, :3], idx)
    with pytest.raises(ValueError, match="v must have shape"):
        fn(qk, v.unsqueeze(-1), idx)
    with pytest.raises(TypeError, match="v must be float32"):
        fn(qk, v.to(torch.int64), idx)
    with pytest.raises(ValueError, match="index must have shape"):
        fn(qk, v, idx[:2])
    with pytest.raises(ValueError, match="index must have shape"):
        fn(qk, v, idx.view(3, 1))
    with pytest.raises(TypeError, match="index must be an int64"):
        fn(qk, v, idx.float())
    with pytest.raises(TypeError, match="index must be a torch.Tensor"):
        fn(qk, v, [0, 1, 2])
    with pytest.raises(ValueError, match="q_bias must have shape"):
        fn(qk, v, idx, q_bias=qb[:8])
    with pytest.raises(ValueError, match="k_bias must have shape"):
        fn(qk, v, idx, k_bias=kb.view(2, 8))
    with pytest.raises(ValueError, match="v_bias must be None"):
        fn(qk, v, idx, v_bias=vb.view(1))
    with pytest.raises(TypeError, match="v_bias must be None"):
        fn(qk, v, idx, v_bias="0.5")
    with pytest.raises(TypeError, match="scale must be"):
        fn(qk, v, idx, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="L > 0 and D > 0"):
        fn(qk[:, :, :0], v, idx)
    if DEVICE == "cpu":
        meta = torch.device("meta")
        with pytest.raises(ValueError, match="index is on"):
            fn(qk, v, idx.to(meta))
        with pytest.raises(ValueError, match="v is on"):
            fn(qk, v.to(meta), idx)
        with pytest.raises(ValueError, match="q_bias is on"):
            fn(qk, v, idx, q_bias=qb.to(meta))
    else:
        with pytest.raises(ValueError, match="index is on"):
            fn(qk, v, idx.cpu())
        with pytest.raises(ValueError, match="v is on"):
            fn(qk, v.cpu(), idx)
        with pytest.raises(ValueError, match="q_bias is on"):
            fn(qk, v, idx, q_bias=qb.cpu())


def test_fused_needs_cuda_or_interpreter(monkeypatch):
    qk, v, idx, *_ = _make(2, 2, 16, seed=33)
    if DEVICE != "cpu":
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        M.mixblock_attention(qk, v, idx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_vit_token_grid(lowp, monkeypatch, dtype):
    """The LOWP path at a ViT token grid (DeiT-S / Swin-T stage 3: 14x14 tokens, d = 192),
    several row tiles: as test_lowp_matches_eager (exact operands, fp32 forward, 3u grads)."""
    _set_row_block(monkeypatch, 64)
    qk, v, idx, qb, kb, vb = _make_lowp(1, 14 * 14, 192, dtype, "qkv", seed=47, exact=True)
    dout = _dout(1, 196, seed=7)
    of, gf = _run(M.mixblock_attention, qk, v, idx, qb, kb, vb, None, dout)
    oe, ge = _run(E.mixblock_attention_eager, qk, v, idx, qb, kb, vb, None, dout)
    err = _error_scales(qk, v, idx, qb, kb, vb, None, dout)
    _assert_close(of, oe, 1e-5, err["out"], "out")
    for name in gf:
        _assert_close(gf[name], ge[name], 3 * UNIT_ROUNDOFF[dtype], err[name], f"grad {name}")
