"""Fused Mix Block attention (kernels/mixblock_attn.py) against its eager twin, and the eager
twin against an independent float64 einsum + softmax.

Runs under the Triton CPU interpreter when no GPU is present (conftest sets TRITON_INTERPRET);
there the interpreter uses small fixed tiles (BLOCK_N / BLOCK_M <= 64 along the looped axis,
BLOCK_D 16 or 32), so h = w = 14 (L = 196) runs the multi-key-tile online softmax and the
read-modify-write backward, D = 24 a masked D tail and D = 128 several D chunks. bf16 and the
GPU tile configurations are GPU-only.
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


def _error_scales(qk, v, idx, qb, kb, vb, scale, dout):
    """float64 magnitudes of the terms each result sums (before any cancellation).

    A computation whose every term has a relative error <= tol is off by at most
    tol * these: the right atol scale. (With the identity index, q_i . q_i dominates a row
    and the softmax saturates: the gradients are tiny differences of large terms, e.g.
    dS_ij = P_ij (dO_i vv_j - Delta_i), and an error relative to the result would be
    meaningless in any float arithmetic.)"""
    d = qk.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    q = qk.double() + (qb.double() if qb is not None else 0)
    k = qk.double()[idx] + (kb.double() if kb is not None else 0)
    vv = v.double()[idx] + (float(vb) if vb is not None else 0)
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
