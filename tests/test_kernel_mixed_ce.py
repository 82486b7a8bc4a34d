"""Fused mixed cross-entropy (kernels/mixed_ce.py) against its eager twin and a float64 reference.

Runs under the Triton CPU interpreter when no GPU is present (conftest sets TRITON_INTERPRET);
bf16 numerics, ImageNet-21k K and CUDA-graph capture are GPU-only.
"""
import pytest
import torch
import torch.nn.functional as F

import fastmix  # noqa: F401  (registers fastmix.kernels in a source checkout)
from fastmix import functional as F_eager
from fastmix.kernels import _common
from fastmix.kernels import mixed_ce as M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_SCALE = 1.7   # a non-unit upstream gradient


# Every output buffer a kernel allocates starts as NaN: an unwritten element fails.
pytestmark = pytest.mark.usefixtures("poison_outputs")


def _make(n, k, dtype=torch.float32, seed=0, wide=0, device=DEVICE):
    """Random logits (randn * 3) and two label vectors; ``wide`` > 0 makes logits a column
    slice of an [n, k + wide] tensor (row stride k + wide)."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(n, k + wide, generator=g) * 3).to(device=device, dtype=dtype)
    z = full[:, wide // 2: wide // 2 + k] if wide else full
    a = torch.randint(0, k, (n,), generator=g).to(device)
    b = torch.randint(0, k, (n,), generator=g).to(device)
    return z, a, b


def _loss_and_grad(fn, z, *args, **kwargs):
    z = z.detach().requires_grad_()
    loss = fn(z, *args, **kwargs)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), z.grad


def _compare(z, a, tb, lam, eps, dtype):
    lf, gf = _loss_and_grad(M.mixed_cross_entropy, z, a, tb, lam, eps)
    le, ge = _loss_and_grad(F_eager.mixed_cross_entropy_eager, z, a, tb, lam, eps)
    tol = TOL[dtype]
    assert lf.dtype == torch.float32 and lf.dim() == 0
    assert gf.dtype == z.dtype and gf.shape == z.shape
    assert torch.isfinite(gf).all(), "gradient has NaN (unwritten element?)"
    torch.testing.assert_close(lf, le, rtol=tol, atol=tol * 1e-2)
    scale = ge.float().abs().max().item()
    torch.testing.assert_close(gf.float(), ge.float(), rtol=tol, atol=tol * scale)


def _targets(mode, a, b):
    """(target_b, lam) for a target mode: target_b None / equal to a / different, and lam as
    a Python float or a 0-d tensor."""
    lam_t = torch.tensor(0.7, device=a.device)
    return {
        "none": (None, 0.37),
        "equal": (a.clone(), lam_t),
        "diff_float": (b, 0.3),
        "diff_tensor": (b, lam_t),
    }[mode]


MODES = ["none", "equal", "diff_float", "diff_tensor"]


# ---------------------------------------------------------------------------- fused vs eager
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("k", [10, 100, 1000])
@pytest.mark.parametrize("n", [1, 3, 100])
def test_fp32_matches_eager(n, k, eps, mode):
    z, a, b = _make(n, k, seed=n * 1000 + k)
    tb, lam = _targets(mode, a, b)
    _compare(z, a, tb, lam, eps, torch.float32)


@pytest.mark.parametrize("mode", ["none", "diff_tensor"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n,k", [(3, 10), (100, 100), (100, 1000)])
def test_fp16_matches_eager(n, k, eps, mode):
    z, a, b = _make(n, k, dtype=torch.float16, seed=7)
    tb, lam = _targets(mode, a, b)
    _compare(z, a, tb, lam, eps, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 10), (3, 100), (100, 1000)])
def test_column_slice_logits(n, k, dtype):
    z, a, b = _make(n, k, dtype=dtype, seed=3, wide=37)
    assert z.stride() == (k + 37, 1)
    _compare(z, a, b, torch.tensor(0.4, device=z.device), 0.1, dtype)


def test_transposed_logits():
    # last dim not contiguous: the op copies it
    z, a, b = _make(12, 100, seed=4)
    zt = z.t().contiguous().t()
    assert zt.stride(-1) != 1
    _compare(zt, a, b, 0.25, 0.1, torch.float32)


@pytest.mark.parametrize("mode", ["none", "diff_tensor"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n,k,block", [(3, 1000, 256), (20, 1000, 256), (5, 100, 32), (2, 33, 32)])
def test_chunked_path(monkeypatch, n, k, block, eps, mode):
    # Force the multi-chunk online-LSE path (ragged last chunk) on small K.
    monkeypatch.setattr(M, "MAX_BLOCK_K", block)
    assert not M._config(n, k)[1]
    z, a, b = _make(n, k, seed=11)
    tb, lam = _targets(mode, a, b)
    _compare(z, a, tb, lam, eps, torch.float32)


@pytest.mark.parametrize("row_tile", [16, 4096])
def test_row_packing(monkeypatch, row_tile):
    # Several rows per program with a partial last program, and one row per program.
    monkeypatch.setattr(M, "ROW_TILE", row_tile)
    z, a, b = _make(37, 10, seed=5)
    _compare(z, a, b, 0.6, 0.1, torch.float32)


def test_cross_entropy_is_plain_ce():
    z, a, _ = _make(50, 100, seed=9)
    for eps in (0.0, 0.2):
        lf, gf = _loss_and_grad(M.cross_entropy, z, a, label_smoothing=eps)
        lr, gr = _loss_and_grad(lambda x, t, label_smoothing: F.cross_entropy(
            x, t, label_smoothing=label_smoothing), z, a, label_smoothing=eps)
        torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_lam_forms_and_int32_targets():
    z, a, b = _make(16, 100, seed=2)
    ref = F_eager.mixed_cross_entropy_eager(z, a, b, 0.75, 0.1)
    for lam in (0.75, torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64)):
        out = M.mixed_cross_entropy(z, a.int(), b.int(), lam, 0.1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    # lam = 1 and lam = 0 select one target
    torch.testing.assert_close(M.mixed_cross_entropy(z, a, b, 1, 0.0),
                               F.cross_entropy(z, a), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(M.mixed_cross_entropy(z, a, b, 0.0, 0.0),
                               F.cross_entropy(z, b), rtol=1e-5, atol=1e-7)


def test_backward_twice_with_retained_graph():
    z, a, b = _make(8, 100, seed=6)
    z.requires_grad_()
    loss = M.mixed_cross_entropy(z, a, b, 0.3, 0.1)
    (g1,) = torch.autograd.grad(loss, z, torch.tensor(2.0), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z, torch.tensor(2.0))
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


# ---------------------------------------------------------------------------- reference check
def _reference_f64(z, a, b, lam, eps):
    """Direct float64 loss and d loss / d logits from log_softmax and the smoothed target."""
    z = z.detach().double().cpu()
    n, k = z.shape
    lam = float(lam)
    b = a if b is None else b
    onehot_a = F.one_hot(a.cpu(), k).double()
    onehot_b = F.one_hot(b.cpu(), k).double()
    q = lam * ((1 - eps) * onehot_a + eps / k) + (1 - lam) * ((1 - eps) * onehot_b + eps / k)
    logp = torch.log_softmax(z, dim=1)
    loss = -(q * logp).sum(1).mean()
    grad = (logp.exp() - q) / n
    return loss, grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["none", "equal", "diff_float"])
@pytest.mark.parametrize("n,k", [(1, 10), (30, 100), (20, 1000)])
def test_eager_and_fused_match_float64(n, k, mode, eps):
    z, a, b = _make(n, k, seed=21)
    tb, lam = _targets(mode, a, b)
    lam_f = 1.0 if tb is None else float(lam)
    ref_loss, ref_grad = _reference_f64(z, a, tb, lam_f, eps)
    for fn in (F_eager.mixed_cross_entropy_eager, M.mixed_cross_entropy):
        loss, grad = _loss_and_grad(fn, z, a, tb, lam, eps)
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad.double().cpu(), ref_grad * GRAD_SCALE, rtol=1e-4,
                                   atol=1e-5 * ref_grad.abs().max().item())


# ---------------------------------------------------------------------------- bad labels
@pytest.mark.parametrize("bad", [-1, -100, 10, 2 ** 40])
@pytest.mark.parametrize("which", ["a", "b", "a_only"])
def test_out_of_range_label_raises_like_eager(bad, which):
    """A label outside [0, K) is an error, in the kernel as in eager PyTorch (IndexError), not
    a NaN loss that a trainer would skip silently."""
    n, k = 6, 10
    z, a, b = _make(n, k, seed=13)
    tb = b
    if which == "a":
        a[2] = bad
    elif which == "b":
        b[2] = bad
    else:
        a[2] = bad
        tb = None
    with pytest.raises(IndexError, match=r"values must lie in \[0, 10\)"):
        M.mixed_cross_entropy(z, a, tb, 0.5, 0.1)
    with pytest.raises(IndexError):
        F_eager.mixed_cross_entropy(z, a, tb, 0.5, 0.1, fused=False)


# ---------------------------------------------------------------------------- forward only
def test_forward_only_writes_no_gradient(monkeypatch):
    z, a, b = _make(40, 100, seed=17)
    shapes = []
    real_empty = _common.empty

    def spy(shape, dtype, device, *args, **kwargs):
        shapes.append(tuple(shape))
        return real_empty(shape, dtype, device, *args, **kwargs)

    monkeypatch.setattr(_common, "empty", spy)
    ref = F_eager.mixed_cross_entropy_eager(z, a, b, 0.2, 0.1)
    out = M.mixed_cross_entropy(z, a, b, 0.2, 0.1)
    assert not out.requires_grad and out.grad_fn is None
    assert shapes == [(40,)], f"forward-only allocated {shapes}"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)

    shapes.clear()
    zg = z.clone().requires_grad_()
    with torch.no_grad():
        out = M.mixed_cross_entropy(zg, a, b, 0.2, 0.1)
    assert shapes == [(40,)] and out.grad_fn is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)

    shapes.clear()
    out = M.mixed_cross_entropy(zg, a, b, 0.2, 0.1)
    assert shapes == [(40,), (40, 100)] and out.requires_grad


# ---------------------------------------------------------------------------- errors
def test_errors(monkeypatch):
    z, a, b = _make(4, 10, seed=1)
    f = M.mixed_cross_entropy
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        f([[1.0]], a)
    with pytest.raises(ValueError, match="2-D"):
        f(z[0], a)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        f(z.double(), a)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        f(z.long(), a)
    with pytest.raises(ValueError, match="non-empty"):
        f(z[:0], a[:0])
    with pytest.raises(TypeError, match="target_a must be an int64"):
        f(z, a.float())
    with pytest.raises(ValueError, match=r"target_a must have shape \[N\]"):
        f(z, a[:3])
    with pytest.raises(ValueError, match=r"target_b must have shape \[N\]"):
        f(z, a, b[:, None])
    with pytest.raises(TypeError, match="target_b must be an int64"):
        f(z, a, b.to(torch.int16))
    with pytest.raises(ValueError, match="target_b is on meta"):
        f(z, a, torch.empty(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="0-d tensor"):
        f(z, a, b, torch.full((1,), 0.5))
    with pytest.raises(TypeError, match="lam must be a Python float"):
        f(z, a, b, "0.5")
    with pytest.raises(ValueError, match="must not require grad"):
        f(z, a, b, torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        f(z, a, b, 0.5, 1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a Python float"):
        f(z, a, b, 0.5, torch.tensor(0.1))
    with pytest.raises(ValueError, match="label_smoothing"):
        F_eager.mixed_cross_entropy_eager(z, a, b, 0.5, -0.1)
    if DEVICE == "cpu":
        monkeypatch.setattr(_common, "interpreting", lambda: False)
        with pytest.raises(ValueError, match="CUDA device"):
            f(z, a, b)


# ---------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "diff_tensor"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n,k", [(3, 10), (100, 100), (128, 1000), (64, 21843)])
def test_bf16_matches_eager_gpu(n, k, eps, mode):
    z, a, b = _make(n, k, dtype=torch.bfloat16, seed=31)
    tb, lam = _targets(mode, a, b)
    _compare(z, a, tb, lam, eps, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(256, 21843), (4096, 1000)])
def test_large_k_gpu(n, k, dtype):
    z, a, b = _make(n, k, dtype=dtype, seed=41)
    _compare(z, a, b, torch.tensor(0.35, device=z.device), 0.1, dtype)


@pytest.mark.gpu
def test_cuda_graph_capture_gpu():
    n, k = 64, 1000
    z, a, b = _make(n, k, seed=51)
    z.requires_grad_()
    lam = torch.tensor(0.3, device=z.device)

    def step():
        z.grad = None
        loss = M.mixed_cross_entropy(z, a, b, lam, 0.1)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):   # warm up (Triton compiles outside the capture)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    with torch.cuda.graph(graph):
        static_loss = M.mixed_cross_entropy(z, a, b, lam, 0.1)
        static_loss.backward()
    for value in (0.3, 0.9):
        lam.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        le, ge = _loss_and_grad(F_eager.mixed_cross_entropy_eager, z, a, b, value, 0.1)
        torch.testing.assert_close(static_loss, le, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(z.grad, ge / GRAD_SCALE, rtol=1e-5,
                                   atol=1e-5 * ge.abs().max().item())
