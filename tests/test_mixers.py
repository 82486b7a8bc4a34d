"""The per-sample and soft-target forms of the mixing ops (``fastmix.functional``) and the
model-free mixers of ``fastmix.mixers``, on the CPU (fused paths under TRITON_INTERPRET).

The mixers against timm's and torchvision's own classes: ``tests/test_peers.py``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmix.functional import (cutmix_box, cutmix_images, mix_images, mix_images_eager,
                                mixed_cross_entropy, mixed_cross_entropy_eager, mixup_images,
                                random_permutation)
from fastmix.mixers import CutMix, Mixup, MixUp, soft_targets

N, K = 7, 11


def _ce_inputs(seed=0, n=N, k=K):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 3
    a = torch.randint(0, k, (n,), generator=g)
    b = torch.randint(0, k, (n,), generator=g)
    lam = torch.rand(n, generator=g)
    return z, a, b, lam


def _smoothed(t, k, eps):
    return (1 - eps) * F.one_hot(t, k).double() + eps / k


# ---- cross-entropy: the per-sample λ and soft targets ---------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_per_sample_lam_cross_entropy_is_the_formula(eps):
    z, a, b, lam = _ce_inputs(1)
    z.requires_grad_()
    logp = z.double().log_softmax(1)
    ce_a = -(_smoothed(a, K, eps) * logp).sum(1)
    ce_b = -(_smoothed(b, K, eps) * logp).sum(1)
    expected = (lam.double() * ce_a + (1 - lam.double()) * ce_b).mean()
    got = mixed_cross_entropy(z, a, b, lam, eps)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, z)
    (g_exp,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(g_got.double(), g_exp.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_target_cross_entropy_is_the_formula(eps):
    z, _, _, _ = _ce_inputs(2)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(N, K, generator=g) ** 3
    t = t / t.sum(1, keepdim=True)
    expected = -(((1 - eps) * t.double() + eps / K) * z.double().log_softmax(1)).sum(1).mean()
    got = mixed_cross_entropy(z, t, label_smoothing=eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # float64 logits and targets (the eager path's dtypes): computed in fp32 all the same
    got64 = mixed_cross_entropy(z.double(), t.double(), label_smoothing=eps)
    assert got64.dtype == torch.float32
    torch.testing.assert_close(got64, got)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("lam_kind", ["float", "0-d", "vector"])
def test_soft_targets_give_the_same_loss(lam_kind, eps):
    z, a, b, lam_v = _ce_inputs(4)
    lam = {"float": 0.35, "0-d": torch.tensor(0.35), "vector": lam_v}[lam_kind]
    soft = soft_targets(a, b, lam, K, eps)
    assert soft.shape == (N, K) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(N))
    from_soft = mixed_cross_entropy(z, soft)
    from_labels = mixed_cross_entropy(z, a, b, lam, eps)
    torch.testing.assert_close(from_soft, from_labels, rtol=1e-6, atol=1e-6)
    # the soft targets are timm's: lam * smoothed one-hot(a) + (1 - lam) * smoothed one-hot(b)
    lam_col = lam_v.double()[:, None] if lam_kind == "vector" else 0.35
    expected = lam_col * _smoothed(a, K, eps) + (1 - lam_col) * _smoothed(b, K, eps)
    torch.testing.assert_close(soft.double(), expected, rtol=1e-6, atol=1e-7)


def test_soft_targets_without_partner_are_plain_smoothed_labels():
    z, a, _, _ = _ce_inputs(5)
    soft = soft_targets(a, None, 1.0, K, 0.1)
    torch.testing.assert_close(soft.double(), _smoothed(a, K, 0.1))
    torch.testing.assert_close(mixed_cross_entropy(z, soft),
                               F.cross_entropy(z, a, label_smoothing=0.1), rtol=1e-6, atol=1e-6)


def test_existing_cross_entropy_calls_are_unchanged():
    """Scalar-λ calls take the code they took before, bit for bit (a committed run must
    reproduce): the dispatcher's eager path is the twin, the twin the two F.cross_entropy."""
    z, a, b, _ = _ce_inputs(6)
    for lam in (0.3, torch.tensor(0.3)):
        got = mixed_cross_entropy(z, a, b, lam, 0.1, fused=False)
        assert torch.equal(got, mixed_cross_entropy_eager(z, a, b, lam, 0.1))
        ref = 0.3 * F.cross_entropy(z, a, label_smoothing=0.1) + \
            (1 - 0.3) * F.cross_entropy(z, b, label_smoothing=0.1)
        if not isinstance(lam, torch.Tensor):
            assert torch.equal(got, ref)
    assert torch.equal(mixed_cross_entropy(z, a, fused=False), F.cross_entropy(z, a))


def test_fused_paths_still_equal_eager_and_new_forms_stay_eager():
    """Under the interpreter: the forms that stay fused (scalar λ) equal eager; the per-sample
    and soft forms ignore fused=True (the kernels take neither) and give the eager result."""
    z, a, b, lam_v = _ce_inputs(7)
    for lam in (0.3, torch.tensor(0.7)):
        for eps in (0.0, 0.1):
            torch.testing.assert_close(mixed_cross_entropy(z, a, b, lam, eps, fused=True),
                                       mixed_cross_entropy(z, a, b, lam, eps, fused=False),
                                       rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed_cross_entropy(z, a, b, lam_v, 0.1, fused=True),
                       mixed_cross_entropy(z, a, b, lam_v, 0.1, fused=False))
    soft = soft_targets(a, b, lam_v, K, 0.1)
    assert torch.equal(mixed_cross_entropy(z, soft, fused=True),
                       mixed_cross_entropy(z, soft, fused=False))
    x = torch.randn(N, 3, 9, 5)
    index = random_permutation(N, "cpu")
    torch.testing.assert_close(mix_images(x, index, lam=0.3, fused=True),
                               mix_images(x, index, lam=0.3, fused=False), rtol=1e-6, atol=1e-6)
    assert torch.equal(mix_images(x, index, lam=lam_v, fused=True),
                       mix_images(x, index, lam=lam_v, fused=False))


# ---- images: the per-sample λ and boxes ------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_mixup_images_is_the_loop(channels_last):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(N, 3, 9, 5, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    index = torch.randperm(N, generator=g)
    lam = torch.rand(N, generator=g)
    lam[0] = 1.0
    loop = torch.stack([lam[i] * x[i] + (1 - lam[i]) * x[index[i]] for i in range(N)])
    for out in (mixup_images(x, index, lam), mix_images(x, index, lam=lam)):
        assert torch.equal(out, loop)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(mixup_images(x, index, lam)[0], x[0])
    half = mixup_images(x.half(), index, lam)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, loop.half(), rtol=1e-3, atol=1e-3)


def test_per_sample_cutmix_images_is_the_loop():
    g = torch.Generator().manual_seed(9)
    h, w = 9, 5
    x = torch.randn(N, 3, h, w, generator=g)
    index = torch.randperm(N, generator=g)
    boxes = torch.tensor([[0, 0, 0, 0],        # empty: unchanged
                          [0, h, 0, w],        # the whole image
                          [2, 7, 1, 4],
                          [3, 3, 0, w],        # empty rows
                          [8, 9, 4, 5],        # the corner pixel
                          [1, 5, 2, 3],
                          [0, 4, 0, 2]])
    loop = x.clone()
    for i, (y0, y1, x0, x1) in enumerate(boxes.tolist()):
        loop[i, :, y0:y1, x0:x1] = x[index[i], :, y0:y1, x0:x1]
    out = cutmix_images(x, index, boxes)
    assert torch.equal(out, loop)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[index[1]])
    assert torch.equal(cutmix_images(x, index, boxes.int()), loop)
    # one box for the batch, as a [4] tensor and as host ints: unchanged
    assert torch.equal(cutmix_images(x, index, boxes[2]), cutmix_images(x, index, (2, 7, 1, 4)))


def test_per_sample_errors():
    z, a, b, lam = _ce_inputs(10)
    with pytest.raises(ValueError, match=r"per-sample \[N\] = \[7\]"):
        mixed_cross_entropy(z, a, b, lam[:5])
    with pytest.raises(TypeError, match="floating point"):
        mixed_cross_entropy(z, a, b, (lam > 0.5).long())
    with pytest.raises(ValueError, match="require grad"):
        mixed_cross_entropy(z, a, b, lam.clone().requires_grad_())
    with pytest.raises(ValueError, match="pass target_b"):
        mixed_cross_entropy(z, a, None, lam)
    with pytest.raises(ValueError, match="is on meta"):
        mixed_cross_entropy(z, a, b, torch.empty(N, device="meta"))
    with pytest.raises(IndexError, match="target_b"):
        mixed_cross_entropy(z, a, torch.full((N,), K), lam)
    with pytest.raises(ValueError, match="0-d"):      # a 2-d λ is neither form
        mixed_cross_entropy(z, a, b, lam[:, None])
    x = torch.randn(N, 3, 8, 8)
    index = torch.randperm(N)
    with pytest.raises(ValueError, match=r"\[N\] = \[7\]"):
        mix_images(x, index, lam=lam[:3])
    with pytest.raises(ValueError, match="exactly one"):
        mix_images(x, index, torch.zeros(N, 1, 2, 2), lam=lam)
    with pytest.raises(ValueError, match="0-d"):      # the kernel's twin refuses it, as the kernel
        mix_images_eager(x, index, lam=lam)
    with pytest.raises(ValueError, match=r"\[N, 4\] = \[7, 4\]"):
        cutmix_images(x, index, torch.zeros(N, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        cutmix_images(x, index, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cutmix_images(x, index, torch.zeros(N, 4))
    with pytest.raises(ValueError, match="is on meta"):
        cutmix_images(x, index, torch.zeros(N, 4, dtype=torch.long, device="meta"))


def test_soft_target_errors():
    z, a, b, _ = _ce_inputs(11)
    soft = soft_targets(a, b, 0.5, K, 0.0)
    with pytest.raises(ValueError, match=r"\[N, K\] = \[7, 11\]"):
        mixed_cross_entropy(z, soft[:, :5])
    with pytest.raises(ValueError, match=r"\[N, K\] = \[7, 11\]"):
        mixed_cross_entropy(z, a.float())             # float class indices are neither form
    with pytest.raises(ValueError, match="target_b=None"):
        mixed_cross_entropy(z, soft, b)
    with pytest.raises(ValueError, match="leave lam at 1.0"):
        mixed_cross_entropy(z, soft, None, 0.5)
    with pytest.raises(ValueError, match="leave lam at 1.0"):
        mixed_cross_entropy(z, soft, None, torch.tensor(1.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        mixed_cross_entropy(z, soft, label_smoothing=1.5)
    with pytest.raises(ValueError, match="2-D"):
        mixed_cross_entropy(z[0], soft)
    with pytest.raises(IndexError):
        soft_targets(torch.full((N,), K), None, 1.0, K)
    with pytest.raises(ValueError, match="num_classes"):
        soft_targets(a, b, 0.5, 0)
    with pytest.raises(ValueError, match="label_smoothing"):
        soft_targets(a, b, 0.5, K, 1.0)
    with pytest.raises(ValueError, match="per-sample lam"):
        soft_targets(a, b, torch.rand(3), K)
    with pytest.raises(ValueError, match=r"\[N\]"):
        soft_targets(a[:, None], b, 0.5, K)


# ---- the mixers -----------------------------------------------------------------------------
def _batch(n=N, h=9, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), torch.randint(0, K, (n,), generator=g)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_mixup_batch_draws_permutation_then_lam(alpha):
    x, y = _batch()
    torch.manual_seed(3)
    x_mix, y_a, y_b, lam = MixUp(alpha, seed=5).mix(x, y)
    torch.manual_seed(3)
    index = random_permutation(N, x.device)
    lam_ref = float(np.random.default_rng(5).beta(alpha, alpha))
    assert isinstance(lam, float) and lam == lam_ref
    assert torch.equal(x_mix, mixup_images(x, index, lam_ref))
    assert y_a is y and torch.equal(y_b, y[index])


def test_cutmix_batch_draws_permutation_then_lam_then_box():
    x, y = _batch(h=23, w=19)
    torch.manual_seed(4)
    x_mix, _, y_b, lam = CutMix(1.0, seed=6).mix(x, y)
    torch.manual_seed(4)
    index = random_permutation(N, x.device)
    rng = np.random.default_rng(6)
    *box, lam_ref = cutmix_box(23, 19, float(rng.beta(1.0, 1.0)), rng)
    assert lam == lam_ref and torch.equal(y_b, y[index])
    assert torch.equal(x_mix, cutmix_images(x, index, tuple(box)))


def test_elem_mode_draws_lam_per_sample():
    x, y = _batch(h=23, w=19)
    torch.manual_seed(5)
    x_mix, _, y_b, lam = MixUp(1.0, mode="elem", seed=7).mix(x, y)
    torch.manual_seed(5)
    index = random_permutation(N, x.device)
    lam_ref = torch.from_numpy(np.random.default_rng(7).beta(1.0, 1.0, N).astype(np.float32))
    assert torch.equal(lam, lam_ref) and torch.equal(y_b, y[index])
    assert torch.equal(x_mix, mixup_images(x, index, lam_ref))
    torch.manual_seed(5)
    x_mix, _, _, lam = CutMix(1.0, mode="elem", seed=7).mix(x, y)
    rng = np.random.default_rng(7)
    draws = rng.beta(1.0, 1.0, N)                     # all λ first, then the boxes in order
    expected = x.clone()
    for i in range(N):
        y0, y1, x0, x1, lam_i = cutmix_box(23, 19, float(draws[i]), rng)
        expected[i, :, y0:y1, x0:x1] = x[index[i], :, y0:y1, x0:x1]
        assert lam[i] == np.float32(lam_i)
    assert torch.equal(x_mix, expected)


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("cls", [MixUp, CutMix])
def test_pair_mode_partners_swap_and_share_lam(cls, n):
    x, y = _batch(n=n, h=11, w=8)
    y = torch.arange(n)                               # y_b is the partner index
    torch.manual_seed(6)
    x_mix, _, index, lam = cls(1.0, mode="pair", seed=8).mix(x, y)
    torch.manual_seed(6)
    perm = random_permutation(n, x.device)
    assert torch.equal(index[perm], perm.flip(0))     # timm's pairs, in the permuted order
    assert torch.equal(index[index], torch.arange(n))
    assert torch.equal(lam[index], lam)
    if n % 2:
        mid = perm[n // 2]
        assert index[mid] == mid and lam[mid] == 1.0 and torch.equal(x_mix[mid], x[mid])
    if cls is MixUp:
        half = np.random.default_rng(8).beta(1.0, 1.0, n // 2).astype(np.float32)
        assert torch.equal(lam[perm[:n // 2]], torch.from_numpy(half))
        assert torch.equal(x_mix, mixup_images(x, index, lam))
    else:   # the two samples of a pair swap the same box: the kept area is λ in both
        moved = (x_mix != x).any(1)
        for i in range(n):
            j = int(index[i])
            assert torch.equal(moved[i], moved[j])
            assert torch.equal(x_mix[i][:, moved[i]], x[j][:, moved[i]])
            assert 1 - moved[i].float().mean() == pytest.approx(float(lam[i]), abs=1e-6)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("cfg", [dict(), dict(mixup_alpha=0.0, cutmix_alpha=1.0),
                                 dict(cutmix_alpha=1.0, prob=0.6),
                                 dict(cutmix_minmax=(0.2, 0.8))])
def test_timm_mixup_targets_and_loss(mode, cfg):
    """The soft targets are the labels' mix, and mixed_cross_entropy on (y_a, y_b, λ) is the
    soft-target loss; x is left unchanged; a RandomState(s) draws what np.random.seed(s) does
    and a Generator works too. (Against timm itself: tests/test_peers.py.)"""
    x, y = _batch(n=8, h=24, w=20, seed=1)
    keep = x.clone()
    z = torch.randn(8, K)
    for seed in range(3):
        np.random.seed(seed)
        x_mix, soft = Mixup(num_classes=K, mode=mode, **cfg)(x, y)
        x_st, soft_st = Mixup(num_classes=K, mode=mode, rng=np.random.RandomState(seed),
                              **cfg)(x, y)
        assert torch.equal(x_mix, x_st) and torch.equal(soft, soft_st)
        mixer = Mixup(num_classes=K, mode=mode, rng=np.random.default_rng(seed), **cfg)
        x_mix, y_a, y_b, lam = mixer.mix(x, y)
        assert torch.equal(y_b, y.flip(0))
        assert isinstance(lam, float) if mode == "batch" else lam.shape == (8,)
        soft = soft_targets(y_a, y_b, lam, K, 0.1)
        torch.testing.assert_close(mixed_cross_entropy(z, soft),
                                   mixed_cross_entropy(z, y_a, y_b, lam, 0.1),
                                   rtol=1e-6, atol=1e-6)
    assert torch.equal(x, keep)


def test_mixer_errors():
    x, y = _batch(n=6)
    with pytest.raises(ValueError, match="even"):
        Mixup()(x[:5], y[:5])
    with pytest.raises(ValueError, match="mode"):
        Mixup(mode="half")
    with pytest.raises(ValueError, match="mixup_alpha > 0"):
        Mixup(mixup_alpha=0.0, cutmix_alpha=0.0).mix(x, y)
    with pytest.raises(TypeError, match="rng"):
        Mixup(rng=42)
    with pytest.raises(ValueError, match="num_classes=None"):
        MixUp()(x, y)
    with pytest.raises(ValueError, match="alpha"):
        CutMix(alpha=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        MixUp(label_smoothing=1.0)
    with pytest.raises(ValueError, match="labels"):
        MixUp().mix(x, y[:3])
    with pytest.raises(TypeError, match="int64"):
        CutMix().mix(x, y.float())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        MixUp().mix(x[0], y)


def test_disabled_and_zero_alpha_leave_the_batch():
    x, y = _batch(n=6)
    m = Mixup(num_classes=K, mode="elem")
    m.mixup_enabled = False
    state = np.random.get_state()[1].copy()
    x_mix, _, _, lam = m.mix(x, y)
    assert x_mix is x and torch.equal(lam, torch.ones(6))
    assert (np.random.get_state()[1] == state).all()      # nothing drawn
    with pytest.raises(ValueError, match="alpha must be positive"):
        MixUp(alpha=0.0)          # as torchvision's v2.MixUp; timm's Mixup takes 0 as "off"


def test_a_permutation_without_fixed_points_of_one_element_is_refused():
    """None exists: ``no_fixed_points=True`` with n = 1 used to return [0] (the one sample
    mixed with itself); it raises instead. n = 0 and n >= 2 are fine, and a plain
    permutation of one element is still [0]."""
    with pytest.raises(ValueError, match="without fixed points of 1 element does not exist"):
        random_permutation(1, "cpu", no_fixed_points=True)
    assert random_permutation(1, "cpu").tolist() == [0]
    assert random_permutation(0, "cpu", no_fixed_points=True).tolist() == []
    assert random_permutation(2, "cpu", no_fixed_points=True).tolist() == [1, 0]
