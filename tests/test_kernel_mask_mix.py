"""Fused mask mixing (kernels/mask_mix.py) against its eager twin and a direct computation.

Runs under the Triton CPU interpreter when no GPU is present (conftest sets TRITON_INTERPRET);
bf16 numerics and the ImageNet-sized shapes are GPU-only.
"""
import pytest
import torch
import torch.nn.functional as F

import fastmix  # noqa: F401  (registers fastmix.kernels in a source checkout)
from fastmix import functional as E   # the eager twins
from fastmix.kernels import _common
from fastmix.kernels import mask_mix as M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CL = torch.channels_last


# Every output buffer a kernel allocates starts as NaN: an unwritten element fails.
pytestmark = pytest.mark.usefixtures("poison_outputs")


def _inputs(n, c, size, msize, dtype=torch.float32, channels_last=False, perm="random",
            mask_dtype=torch.float32, seed=0):
    """Images randn, mask logits randn * 2, an index (random permutation / identity)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=g).to(device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=CL)
    m = (torch.randn(n, 1, *msize, generator=g) * 2).to(device=DEVICE, dtype=mask_dtype)
    if perm == "identity":
        index = torch.arange(n)
    elif n > 1:
        index = torch.randperm(n, generator=g)
        if torch.equal(index, torch.arange(n)):
            index = torch.roll(index, 1)
    else:
        index = torch.zeros(1, dtype=torch.long)
    return x, index.to(DEVICE), m


def _run(fn, x, index, m, go, **kwargs):
    m = m.detach().requires_grad_()
    out = fn(x, index, m, **kwargs)
    out.backward(go)
    return out.detach(), m.grad


def _check_close(got, ref, tol, name):
    assert got.dtype == ref.dtype, name
    assert torch.isfinite(got).all(), f"{name}: NaN (an element the kernel did not write?)"
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda s: f"{name}: {s}")


def _compare(n, c, size, msize, mode, dtype=torch.float32, channels_last=False,
             perm="random", mask_dtype=torch.float32):
    x, index, m = _inputs(n, c, size, msize, dtype, channels_last, perm, mask_dtype)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out_f, g_f = _run(M.mix_images, x, index, m, go, mode=mode)
    out_e, g_e = _run(E.mix_images_eager, x, index, m, go, mode=mode)
    tol = max(TOL[dtype], TOL[mask_dtype])
    assert out_f.shape == x.shape
    assert out_f.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    _check_close(out_f, out_e, tol, "output")
    assert g_f.shape == m.shape and g_f.dtype == mask_dtype
    _check_close(g_f, g_e, tol, "mask-logit gradient")
    return out_f, g_f


# (N, C, (H, W), (h, w)): h = w in {2, 7, 8, 14}, H = 2h / 4h, non-integer ratios (30 / 7 and
# 46 / 14, where PyTorch's fp32 index map differs from exact floor(Y * h / H)), N = 100 tiny.
SHAPES = [
    (1, 3, (8, 8), (2, 2)),
    (3, 3, (28, 28), (7, 7)),
    (3, 1, (16, 16), (8, 8)),
    (3, 3, (28, 28), (14, 14)),
    (100, 3, (8, 8), (2, 2)),
    (3, 3, (30, 30), (7, 7)),
    (2, 1, (46, 30), (14, 7)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("n,c,size,msize", SHAPES,
                         ids=[f"N{s[0]}C{s[1]}-{s[2][0]}x{s[2][1]}from{s[3][0]}x{s[3][1]}"
                              for s in SHAPES])
def test_fp32_matches_eager(n, c, size, msize, mode, channels_last):
    _compare(n, c, size, msize, mode, torch.float32, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("size,msize", [((28, 28), (7, 7)), ((30, 30), (7, 7))])
def test_fp16_matches_eager(size, msize, mode, channels_last):
    _compare(3, 3, size, msize, mode, torch.float16, channels_last)


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_mask_logits(mask_dtype):
    # The gradient comes back in the logits' dtype; bf16 logits are only loaded and stored.
    _compare(3, 3, (16, 16), (8, 8), "bilinear", mask_dtype=mask_dtype)


def test_bf16_images_load_store():
    # Identity partner and lam = 1: out == x exactly, through bf16 load, fp32 cast and store.
    x, _, _ = _inputs(3, 3, (16, 16), (4, 4), torch.bfloat16, channels_last=True)
    out = M.mix_images(x, torch.arange(3, device=DEVICE), lam=1.0)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    assert torch.equal(out, x)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_bf16_matches_eager_gpu(mode, channels_last):
    for n, c, size, msize in [(8, 3, (32, 32), (8, 8)), (16, 3, (224, 224), (14, 14)),
                              (4, 3, (30, 30), (7, 7))]:
        _compare(n, c, size, msize, mode, torch.bfloat16, channels_last)


@pytest.mark.gpu
def test_fp32_imagenet_shape_gpu():
    for mode in ("nearest", "bilinear"):
        for cl in (False, True):
            _compare(32, 3, (224, 224), (14, 14), mode, torch.float32, cl)


@pytest.mark.gpu
def test_no_host_sync_and_cuda_graph_gpu():
    x, ia, ma, ib, mb = _pair_inputs(dtype=torch.bfloat16, size=(64, 64), msize=(8, 8))
    lam = torch.tensor(0.3, device=DEVICE)
    go = torch.randn(x.shape, device=DEVICE, dtype=x.dtype)
    a = ma.detach().requires_grad_()
    M.mix_images_pair(x, ia, a, ib, lam_b=lam)[0].backward(go)    # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_a, _ = M.mix_images_pair(x, ia, a, ib, lam_b=lam)
        out_a.backward(go)
        M.mix_images(x, ia, lam=0.25)
        M.mix_images_pair(x, ia, a.detach(), ib, mb, mode="bilinear")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        M.mix_images_pair(x, ia, ma, ib, lam_b=lam)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_a, g_b = M.mix_images_pair(x, ia, ma, ib, lam_b=lam)
    lam.fill_(0.8)
    graph.replay()
    e_a, e_b = E.mix_images_pair_eager(x, ia, ma, ib, lam_b=0.8)
    _check_close(g_a, e_a, 1e-2, "graph replay out_a")
    _check_close(g_b, e_b, 1e-2, "graph replay out_b (lam read on the device)")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_identity_permutation(mode):
    # x[index] == x: the output is x and the logit gradient is exactly zero.
    out, g = _compare(3, 3, (28, 28), (7, 7), mode, perm="identity")
    x, _, _ = _inputs(3, 3, (28, 28), (7, 7), perm="identity")
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("size,msize", [((30, 30), (7, 7)), ((46, 30), (14, 7))])
def test_gpu_tiling_heuristics(size, msize, mode, channels_last, monkeypatch):
    # The launch heuristics used on a GPU (several row blocks, column chunks, cell blocks).
    monkeypatch.setattr(M, "GPU_CONFIGS", True)
    _compare(2, 3, size, msize, mode, channels_last=channels_last)


@pytest.mark.parametrize("mode,channels_last,n,c,size,msize", [
    ("nearest", False, 2, 3, (30, 30), (7, 7)),
    ("bilinear", True, 2, 3, (30, 30), (7, 7)),
    ("nearest", True, 1, 1, (46, 30), (14, 7)),
    ("bilinear", False, 1, 1, (46, 30), (14, 7)),
], ids=["nearest-nchw-30", "bilinear-cl-30", "nearest-cl-46x30", "bilinear-nchw-46x30"])
def test_forced_small_tiles(mode, channels_last, n, c, size, msize, monkeypatch):
    # Tiles much smaller than the image: many row blocks and column chunks in the forward;
    # 2 x 2 cell blocks and a hi-res window walked in 2 x 8 tiles in the backward.
    monkeypatch.setattr(M, "_fwd_config", lambda *a: (2, 16, 4))
    monkeypatch.setattr(M, "_bwd_config", lambda *a: (2, 2, 2, 8, 4))
    _compare(n, c, size, msize, mode, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("lam_kind", ["float", "tensor"])
def test_constant_lambda(lam_kind, channels_last):
    x, index, _ = _inputs(3, 3, (16, 16), (4, 4), channels_last=channels_last)
    lam = 0.3 if lam_kind == "float" else torch.tensor(0.3, device=DEVICE)
    out = M.mix_images(x, index, lam=lam)
    ref = E.mix_images_eager(x, index, lam=lam)
    direct = 0.3 * x + 0.7 * x[index]
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    _check_close(out, ref, 1e-5, "constant mix vs eager")
    _check_close(out, direct, 1e-5, "constant mix vs direct")


def test_constant_lambda_fp16():
    x, index, _ = _inputs(3, 3, (16, 16), (4, 4), dtype=torch.float16)
    lam = torch.tensor(0.65, device=DEVICE, dtype=torch.float64)
    _check_close(M.mix_images(x, index, lam=lam), E.mix_images_eager(x, index, lam=lam),
                 1e-2, "fp16 constant mix")


def _pair_inputs(channels_last=False, dtype=torch.float32, size=(28, 28), msize=(7, 7)):
    x, ia, ma = _inputs(3, 3, size, msize, dtype, channels_last, seed=2)
    _, ib, mb = _inputs(3, 3, size, msize, dtype, channels_last, seed=3)
    ib = torch.roll(ia, 1)
    return x, ia, ma, ib, mb


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("b_kind", ["mask", "lam_float", "lam_tensor"])
def test_pair_matches_eager(b_kind, mode, channels_last):
    x, ia, ma, ib, mb = _pair_inputs(channels_last)
    if b_kind == "mask":
        kw = {"mask_logits_b": mb}
    else:
        kw = {"lam_b": 0.4 if b_kind == "lam_float" else torch.tensor(0.4, device=DEVICE)}
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    res = {}
    for name, fn in (("fused", M.mix_images_pair), ("eager", E.mix_images_pair_eager)):
        a = ma.detach().requires_grad_()
        b = kw.get("mask_logits_b")
        kw_run = dict(kw, mask_logits_b=b.detach().requires_grad_()) if b is not None else kw
        out_a, out_b = fn(x, ia, a, ib, mode=mode, **kw_run)
        (out_a * go).sum().backward()
        res[name] = (out_a.detach(), out_b.detach(), a.grad)
        if b is not None:
            assert kw_run["mask_logits_b"].grad is None      # b is treated as detached
    fmt = CL if channels_last else torch.contiguous_format
    assert res["fused"][0].is_contiguous(memory_format=fmt)
    assert res["fused"][1].is_contiguous(memory_format=fmt)
    _check_close(res["fused"][0], res["eager"][0], 1e-5, "pair out_a")
    _check_close(res["fused"][1], res["eager"][1], 1e-5, "pair out_b")
    _check_close(res["fused"][2], res["eager"][2], 1e-5, "pair grad of mask_logits_a")
    # Each output equals the corresponding single op.
    with torch.no_grad():
        single_b = (M.mix_images(x, ib, mb, mode=mode) if b_kind == "mask"
                    else M.mix_images(x, ib, lam=kw["lam_b"]))
    assert torch.equal(res["fused"][1], single_b)


def test_pair_is_one_launch(monkeypatch):
    calls = []
    kernel = M._mix_fwd_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(M, "_mix_fwd_kernel", Counting())
    x, ia, ma, ib, mb = _pair_inputs(size=(8, 8), msize=(2, 2))
    M.mix_images_pair(x, ia, ma, ib, mb)
    M.mix_images_pair(x, ia, ma, ib, lam_b=0.5)
    assert len(calls) == 2


def test_pair_fp16_bilinear():
    x, ia, ma, ib, mb = _pair_inputs(dtype=torch.float16, size=(30, 30))
    fa, fb = M.mix_images_pair(x, ia, ma, ib, mb, mode="bilinear")
    ea, eb = E.mix_images_pair_eager(x, ia, ma, ib, mb, mode="bilinear")
    _check_close(fa, ea, 1e-2, "fp16 pair out_a")
    _check_close(fb, eb, 1e-2, "fp16 pair out_b")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_eager_matches_direct_computation(mode):
    x, index, m = _inputs(3, 3, (30, 30), (7, 7), channels_last=True)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    s = torch.sigmoid(F.interpolate(m, size=(30, 30), mode=mode, **kw))
    direct = x * (1 - s) + x[index] * s
    _check_close(E.mix_images_eager(x, index, m, mode=mode), direct, 1e-6, "eager twin")
    a, b = E.mix_images_pair_eager(x, index, m, torch.roll(index, 1), lam_b=0.25, mode=mode)
    _check_close(a, direct, 1e-6, "eager pair a")
    _check_close(b, 0.25 * x + 0.75 * x[torch.roll(index, 1)], 1e-6, "eager pair b")


def test_nearest_index_map_is_pytorchs():
    # 46 -> 14 is a size pair where the fp32 index map differs from exact integer floor.
    h, height = 14, 46
    rows = (torch.arange(h, dtype=torch.float32, device=DEVICE) - 7) * 0.5   # logits in [-3.5, 3]
    m = rows.view(1, 1, h, 1).expand(1, 1, h, 2)
    x = torch.zeros(1, 1, height, 2, device=DEVICE)
    ones = torch.ones_like(x)
    # out = x * (1 - s) + 1 * s = s: recover which source row each output row used.
    out = M.mix_images(torch.cat([x, ones]), torch.tensor([1, 0], device=DEVICE),
                       torch.cat([m, m]).contiguous(), mode="nearest")[0, 0, :, 0]
    src = (torch.logit(out.double()) * 2 + 7).round().long()
    ref = F.interpolate(m.contiguous(), size=(height, 2), mode="nearest")[0, 0, :, 0]
    ref = (ref * 2 + 7).round().long()
    exact = torch.arange(height, device=DEVICE) * h // height
    assert torch.equal(src, ref)
    assert not torch.equal(ref, exact)


def test_strided_mask_logits():
    # Logits sliced out of a 2-channel tensor (non-contiguous): read through strides.
    x, index, _ = _inputs(3, 3, (16, 16), (4, 4))
    both = (torch.randn(3, 2, 4, 4) * 2).to(DEVICE).requires_grad_()
    go = torch.randn(x.shape).to(DEVICE)
    M.mix_images(x, index, both[:, 1:2], mode="bilinear").backward(go)
    g_f = both.grad.clone()
    both.grad = None
    E.mix_images_eager(x, index, both[:, 1:2], mode="bilinear").backward(go)
    _check_close(g_f, both.grad, 1e-5, "strided logits gradient")


def test_no_grad_and_non_contiguous_images():
    x, index, m = _inputs(3, 3, (16, 16), (4, 4))
    xs = x.transpose(2, 3)          # neither NCHW- nor channels_last-contiguous: copied
    with torch.no_grad():
        out = M.mix_images(xs, index, m.requires_grad_())
    assert not out.requires_grad
    _check_close(out, E.mix_images_eager(xs, index, m.detach()), 1e-5, "non-contiguous x")


def test_int32_index():
    x, index, m = _inputs(3, 3, (16, 16), (4, 4))
    go = torch.randn(x.shape).to(DEVICE)
    out_f, g_f = _run(M.mix_images, x, index.int(), m, go, mode="bilinear")
    out_e, g_e = _run(E.mix_images_eager, x, index, m, go, mode="bilinear")
    _check_close(out_f, out_e, 1e-5, "int32 index output")
    _check_close(g_f, g_e, 1e-5, "int32 index gradient")


def test_out_of_range_index_raises_like_eager():
    """An index outside [0, N) is an IndexError in the kernel as in the eager twin, not a NaN
    sample that a trainer would skip silently."""
    x, _, m = _inputs(3, 3, (8, 8), (2, 2))
    for bad in ([1, 3, 0], [1, -1, 0]):
        index = torch.tensor(bad, device=DEVICE)
        with pytest.raises(IndexError, match=r"values must lie in \[0, 3\)"):
            M.mix_images(x, index, m)
        with pytest.raises(IndexError):
            E.mix_images_eager(x, index, m)


def test_upstream_gradient_layouts():
    # grad_out in another memory format than the output, and an expanded (stride-0) one.
    x, index, m = _inputs(3, 3, (16, 16), (8, 8), channels_last=True)
    go_nchw = torch.randn(x.shape).to(DEVICE).contiguous()
    _, g_f = _run(M.mix_images, x, index, m, go_nchw)
    _, g_e = _run(E.mix_images_eager, x, index, m, go_nchw)
    _check_close(g_f, g_e, 1e-5, "NCHW grad_out for a channels_last output")
    ones = torch.ones((), device=DEVICE).expand(x.shape)
    _, g_f = _run(M.mix_images, x, index, m, ones)
    _, g_e = _run(E.mix_images_eager, x, index, m, ones)
    _check_close(g_f, g_e, 1e-5, "expanded grad_out")


# ---- errors --------------------------------------------------------------------------------
def _good():
    x, index, m = _inputs(2, 3, (8, 8), (2, 2))
    return x, index, m


@pytest.mark.parametrize("fn", [M.mix_images, E.mix_images_eager])
def test_errors_single(fn):
    x, index, m = _good()
    with pytest.raises(ValueError, match="4-D"):
        fn(x[0], index, m)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fn(x.double(), index, m)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(x.tolist(), index, m)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        fn(x, index[:1], m)
    with pytest.raises(TypeError, match="int64"):
        fn(x, index.float(), m)
    with pytest.raises(ValueError, match="samples"):
        fn(x, index, m[:1])
    with pytest.raises(ValueError, match="one channel"):
        fn(x, index, m.expand(2, 2, 2, 2))
    with pytest.raises(ValueError, match="larger than the images"):
        fn(x, index, torch.randn(2, 1, 16, 4, device=DEVICE))
    with pytest.raises(ValueError, match="4-D"):
        fn(x, index, m[:, 0])
    with pytest.raises(ValueError, match="mode"):
        fn(x, index, m, mode="bicubic")
    with pytest.raises(ValueError, match="exactly one"):
        fn(x, index, m, lam=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        fn(x, index)
    with pytest.raises(ValueError, match="0-d"):
        fn(x, index, lam=torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="lam"):
        fn(x, index, lam="0.5")
    with pytest.raises(ValueError, match="require grad"):
        fn(x, index, lam=torch.tensor(0.5, requires_grad=True))
    meta_index = torch.empty(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="is on meta"):
        fn(x, meta_index, m)
    with pytest.raises(ValueError, match="is on meta"):
        fn(x, index, torch.empty(2, 1, 2, 2, device="meta"))


@pytest.mark.parametrize("fn", [M.mix_images_pair, E.mix_images_pair_eager])
def test_errors_pair(fn):
    x, index, m = _good()
    with pytest.raises(ValueError, match="mask_logits_a"):
        fn(x, index, None, index, m)
    with pytest.raises(ValueError, match="exactly one"):
        fn(x, index, m, index)
    with pytest.raises(ValueError, match="exactly one"):
        fn(x, index, m, index, m, lam_b=0.5)
    with pytest.raises(ValueError, match="index_b"):
        fn(x, index, m, index[:1], m)
    with pytest.raises(ValueError, match="mask_logits_b"):
        fn(x, index, m, index, m[:, :, :1].expand(2, 2, 1, 2))
    with pytest.raises(ValueError, match="mode"):
        fn(x, index, m, index, lam_b=0.5, mode="area")


def test_images_requiring_grad_are_refused():
    x, index, m = _good()
    x.requires_grad_()
    with pytest.raises(NotImplementedError, match="no gradient to the images"):
        M.mix_images(x, index, m)
    with torch.no_grad():
        M.mix_images(x, index, m)           # fine without a graph
