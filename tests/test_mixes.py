"""The other methods of the paper's tables (fastmix.mixes, MixupClassifier): ManifoldMix,
SaliencyMix, FMix, ResizeMix, GridMix, SmoothMix, beside Mixup and CutMix.

The pixel test: give every sample a constant image of its own value c_i; a mixed pixel is then
c_i (1 - m) + c_j m, so the partner's weight m of every pixel, and the kept area 1 - mean(m),
can be read back off the mixed batch and compared with the λ the labels use."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastmix import mixes
from fastmix.backbones import FeatureTap, build_backbone
from fastmix.functional import mixed_cross_entropy
from fastmix.mixup import BASELINES, MixupClassifier

IMAGE_METHODS = ("mixup", "cutmix", "saliencymix", "fmix", "resizemix", "gridmix", "smoothmix")
BINARY = ("cutmix", "saliencymix", "fmix", "resizemix", "gridmix")


def make(method, seed=0, alpha=1.0, arch="resnet_small"):
    torch.manual_seed(seed)
    return MixupClassifier(build_backbone(arch), 10, method=method, alpha=alpha, seed=seed,
                           fused=False)


def constant_batch(n, h, w):
    """Sample i is the constant image 1 + i (distinct values, so the source of a pixel and
    the partner's weight are readable)."""
    return (1.0 + torch.arange(n, dtype=torch.float32)).view(n, 1, 1, 1).expand(n, 3, h, w).clone()


def partner_weight(x_mix, x, index):
    a, b = x[:, 0], x[index][:, 0]
    same = (a == b)
    return torch.where(same, torch.zeros_like(a), (x_mix[:, 0] - a) / torch.where(same, 1, b - a))


def lam_value(lam):
    return float(lam) if isinstance(lam, torch.Tensor) else lam


@pytest.mark.parametrize("method", IMAGE_METHODS)
@pytest.mark.parametrize("shape", [(6, 32, 32), (1, 17, 23), (4, 40, 28)])
def test_lambda_is_the_kept_area_of_the_actual_mask(method, shape):
    n, h, w = shape
    model = make(method, seed=3)
    for trial in range(6):
        x = constant_batch(n, h, w)
        if method == "saliencymix":   # give the partner images a bright spot somewhere
            x[:, :, (trial * 5) % h, (trial * 7) % w] += 50
        draw = model.draw(x)
        x_mix, y_a, y_b, lam = model.mix_with(x, torch.zeros(n, dtype=torch.long), draw)
        index = draw["index"]
        fixed = index == torch.arange(n)       # a sample paired with itself shows no mixing
        m = partner_weight(x_mix, x, index)[~fixed]
        if m.numel() == 0:
            continue
        assert m.min() >= -1e-5 and m.max() <= 1 + 1e-5                      # in [0, 1]
        if method in BINARY:
            assert torch.all((m.abs() < 1e-5) | ((m - 1).abs() < 1e-5))      # binary
        # the same mask for every pair: the kept area of any pair is the λ of the labels
        kept = 1 - m.mean(dim=(-2, -1))
        assert torch.allclose(kept, torch.full_like(kept, lam_value(lam)), atol=1e-5), \
            (method, kept, lam)


def test_boxes_clipped_at_the_border_keep_lambda_exact():
    rng = np.random.default_rng(0)
    seen_clipped = 0
    for _ in range(300):
        tau = mixes.resizemix_tau(rng, 1.0)
        y0, y1, x0, x1, lam = mixes.resizemix_box(13, 19, tau, rng)
        assert 0 <= y0 <= y1 <= 13 and 0 <= x0 <= x1 <= 19
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (13 * 19))
        seen_clipped += (y0 == 0) or (x0 == 0) or (y1 == 13) or (x1 == 19)
        assert 0.1 <= tau <= 0.8
    assert seen_clipped > 50
    sal = torch.zeros(20, 30)
    sal[0, 29] = 1.0                                      # the peak in a corner: clipped box
    box, lam = mixes.saliency_box(sal, 0.36)              # side ratio 0.8: 16 x 24
    assert box.tolist() == [0, 8, 17, 30]
    assert float(lam) == pytest.approx(1 - 8 * 13 / 600)


def test_labels_use_the_lambda_of_the_pixels():
    for method in IMAGE_METHODS + ("manifoldmix",):   # PuzzleMix: its own test below
        model = make(method, seed=1)
        x, y = torch.randn(5, 3, 24, 24), torch.tensor([0, 3, 5, 7, 9])
        draw = model.draw(x)
        loss, _ = model.losses(x, y, draw)
        x_mix, _, _, lam = model.mix_with(x, y, draw)
        index = draw["index"]
        if method == "manifoldmix":
            logits = model.head(model.backbone(x, mix_at=draw["layer"],
                                               mix_fn=lambda h: lam * h + (1 - lam) * h[index])[-1])
        else:
            logits = model.logits(x_mix)
        want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[index])
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), method


@pytest.mark.parametrize("method", BASELINES)
def test_seeded_draws_repeat(method):
    x = torch.randn(4, 3, 20, 20)
    outs = []
    for _ in range(2):
        model = make(method, seed=7)
        torch.manual_seed(11)                 # the device permutation's stream
        draw = model.draw(x)
        outs.append((draw, model.losses(x, torch.arange(4), draw)[0].item()))
    (a, la), (b, lb) = outs
    assert la == lb and a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k


def test_bad_alpha_and_backbones_are_refused():
    for method in ("mixup", "fmix", "gridmix", "resizemix", "saliencymix", "manifoldmix",
                   "puzzlemix"):
        with pytest.raises(ValueError, match="alpha must be positive"):
            make(method, alpha=0.0)
    make("smoothmix", alpha=0.0)        # SmoothMix draws no λ
    tap = FeatureTap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "0", "0", (4, 4))
    with pytest.raises(ValueError, match="ManifoldMix mixes hidden features"):
        MixupClassifier(tap, 10, method="manifoldmix")
    from fastmix.step import CUDAGraphStep
    model = make("manifoldmix")
    with pytest.raises(ValueError, match="ManifoldMix's stage"):
        CUDAGraphStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None, "cpu",
                      capture=False)
    from fastmix.config import Config, validate_config
    with pytest.raises(ValueError, match="without --cuda-graphs"):
        validate_config(Config(method="manifoldmix", cuda_graphs=True))
    with pytest.raises(ValueError, match="timm backbone"):
        validate_config(Config(method="manifoldmix", arch="timm:resnet18"))


# ---- no read-back in the step -------------------------------------------------------------------
class ReadBacks(TorchDispatchMode):
    """Counts the aten ops that copy a device value to the host (.item(), bool(), .tolist(),
    nonzero's size): on a GPU each is a sync. On the CPU they run silently, hence this count.

    Not counted: the index checks of ``fastmix.checks``, which read a CPU tensor's min/max on
    purpose and use ``torch._assert_async`` (no sync) on CUDA."""
    SYNCING = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback
        name = func.overloadpacket.__name__
        if name in self.SYNCING and not any(
                f.filename.endswith(os.path.join("fastmix", "checks.py"))
                for f in traceback.extract_stack()):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "puzzlemix"])
def test_no_read_back_in_the_step(method):
    """Draw, mix, forward and backward of every method read nothing off the device: the host
    draws come from numpy, SaliencyMix's box stays a device tensor. (The check itself is live:
    a .item() inside the mode is counted.)"""
    model = make(method, seed=2)
    x, y = torch.randn(4, 3, 24, 24), torch.randint(0, 10, (4,))
    with ReadBacks() as mode:
        loss, logs = model.losses(x, y, model.draw(x))
        loss.backward()
    assert mode.seen == [], (method, mode.seen)
    with ReadBacks() as mode:
        loss.item()
    assert mode.seen == ["_local_scalar_dense"]


# ---- hand-made cases against the definitions -------------------------------------------------
class FixedNormal:
    """An rng whose standard_normal returns a given array (the spectrum FMix samples)."""

    def __init__(self, values):
        self.values = values

    def standard_normal(self, shape):
        assert tuple(shape) == self.values.shape
        return self.values


def one_coefficient(h, w, row, col, part):
    """FMix's draw ``[H, Wf, 2]`` with a single 1 at ``[row, col, part]``."""
    p = np.zeros((h, w // 2 + 1 + w % 2, 2))
    p[row, col, part] = 1.0
    return FixedNormal(p)


@pytest.mark.parametrize("h,w", [(8, 12), (12, 8), (7, 9)])
def test_fmix_noise_reads_the_draw_as_the_fmix_code_does(h, w):
    """FMix's code builds its complex spectrum from the first two rows of the scaled draw
    (``s[0] p[0] + 1j s[1] p[1]``, a [Wf, 2] array whose rows are vertical frequencies and
    whose two columns are 0 and 1 cycle across), not from the draw's last (real, imaginary)
    axis. One coefficient at a time, the min-max scaled image is a known cosine or sine."""
    x, y = np.arange(w)[None, :], np.arange(h)[:, None]
    cases = {                                   # (draw row, frequency row b, column k): image
        (0, 0, 1): np.cos(2 * np.pi * x / w),   # 1 cycle across
        (0, 1, 0): np.cos(2 * np.pi * y / h),   # 1 cycle down
        (0, 2, 0): np.cos(4 * np.pi * y / h),   # 2 cycles down
        # the second row of the draw is the imaginary part: i e^{iθ} has real part -sin θ
        (1, 2, 0): -np.sin(4 * np.pi * y / h),
        (1, 0, 1): -np.sin(2 * np.pi * x / w),
    }
    for (row, b, k), f in cases.items():
        f = np.broadcast_to(f, (h, w))
        want = (f - f.min()) / (f.max() - f.min())           # FMix's min-max scaling
        img = mixes.fourier_low_freq_image(h, w, 3.0, one_coefficient(h, w, row, b, k))
        np.testing.assert_allclose(img, want, atol=1e-12, err_msg=str((row, b, k)))


def test_fmix_noise_uses_two_rows_of_the_draw_and_one_cycle_across():
    """Properties of the FMix code's noise, on random draws: rows 2.. of the draw never
    matter; across the width the image has no frequency above one cycle (its rfft along the
    width is zero from 2 cycles on); along the height it has frequencies up to min(Wf, H) - 1.
    (The isotropic reading fastmix used before fails the first two.)"""
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (28, 28), (24, 20), (20, 24), (17, 23)):
        p = rng.standard_normal((h, w // 2 + 1 + w % 2, 2))
        img = mixes.fourier_low_freq_image(h, w, 3.0, FixedNormal(p))
        assert img.min() == 0.0 and img.max() == 1.0
        q = p.copy()
        q[2:] = rng.standard_normal(q[2:].shape)
        np.testing.assert_array_equal(mixes.fourier_low_freq_image(h, w, 3.0, FixedNormal(q)), img)
        across = np.abs(np.fft.rfft(img - img.mean(), axis=1))
        assert across[:, 2:].max() < 1e-9 * across.max() and across[:, 1].max() > 1e-3
        down = np.abs(np.fft.fft(img - img.mean(), axis=0))
        assert down[min(p.shape[1], h) - 1].max() > 0      # the highest vertical frequency used
    # decay power: the larger, the less energy above 2 cycles down (0.17 at 1, 0.002 at 3)
    high = []
    for decay in (1.0, 3.0):
        share = []
        for p in np.random.default_rng(1).standard_normal((40, 32, 17, 2)):
            img = mixes.fourier_low_freq_image(32, 32, decay, FixedNormal(p))
            down = np.abs(np.fft.fft(img - img.mean(), axis=0)) ** 2
            share.append(down[3:-2].sum() / down.sum())
        high.append(np.mean(share))
    assert high[0] > 0.1 and high[1] < 0.01
    with pytest.raises(ValueError, match="2 rows"):
        mixes.fourier_low_freq_image(1, 8, 3.0, FixedNormal(np.zeros((1, 5, 2))))


def test_fmix_binarises_the_top_lambda_fraction():
    rng = np.random.default_rng(0)
    img = mixes.fourier_low_freq_image(16, 16, 3.0, rng)
    for lam in (0.0, 0.3, 0.5, 0.77, 1.0):
        keep = mixes.binarise_top(img, lam, rng)
        num = int(keep.sum())
        assert num in (math.floor(lam * 256), math.ceil(lam * 256))
        if 0 < num < 256:   # every kept pixel is at least as bright as every dropped one
            assert img[keep == 1].min() >= img[keep == 0].max()
    # decay power 3: most of the noise's energy is in the lowest frequencies
    spec = np.abs(np.fft.rfft2(img - img.mean()))
    assert spec[:3, :3].sum() + spec[-2:, :3].sum() > 0.5 * spec.sum()


def test_saliency_peak_is_a_known_blob():
    """A small bright blob on a smooth gradient: the spectral residual is largest there, and
    the box centres on it."""
    h, w = 48, 64
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    g = torch.Generator().manual_seed(0)
    for i, (cy, cx) in enumerate(((10, 50), (30, 12), (40, 40), (5, 5))):
        img = (xx / w + yy / h).float().expand(3, h, w).clone()
        if i % 2:
            img = img + 0.05 * torch.randn(3, h, w, generator=g)
        img[:, cy - 1:cy + 2, cx - 1:cx + 2] += 3.0
        sal = mixes.spectral_residual_saliency(img)
        peak = int(torch.argmax(sal))
        assert abs(peak // w - cy) <= 2 and abs(peak % w - cx) <= 2, (peak // w, peak % w)
        box, lam = mixes.saliency_box(sal, 0.75)          # a half-side box around the peak
        y0, y1, x0, x1 = box.tolist()
        assert y0 <= cy < y1 and x0 <= cx < x1


def test_resizemix_pastes_the_nearest_resized_partner():
    x = torch.randn(3, 2, 15, 21)
    index = torch.tensor([2, 0, 1])
    for box in ((0, 15, 0, 21), (2, 9, 3, 20), (5, 6, 0, 4), (14, 15, 20, 21)):
        y0, y1, x0, x1 = box
        want = x.clone()
        want[:, :, y0:y1, x0:x1] = F.interpolate(x[index], (y1 - y0, x1 - x0), mode="nearest")
        assert torch.equal(mixes.resizemix_images(x, index, box), want), box
        assert torch.equal(mixes.resizemix_images(x, index, torch.tensor(box)), want), box


def test_gridmix_mask_is_a_grid_of_holes():
    rng = np.random.default_rng(4)
    for lam in (0.2, 0.5, 0.9):
        m, kept = mixes.gridmix_mask(32, 32, lam, rng)
        assert set(np.unique(m)) <= {0.0, 1.0} and kept == pytest.approx(1 - m.mean())
        rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
        # a product of a row set and a column set: every marked row has the same columns
        assert all(np.array_equal(m[r], m[rows[0]]) for r in rows)
        assert len(rows) >= 2 and len(cols) >= 2
    with pytest.raises(ValueError, match="too small"):
        mixes.gridmix_mask(6, 6, 0.5, rng, n_holes=(5, 5))


def test_smoothmix_mask_is_a_gaussian_blob():
    rng = np.random.default_rng(5)
    m, lam = mixes.smoothmix_mask(32, 32, rng)
    assert 0 < m.min() and m.max() <= 1 and lam == pytest.approx(1 - m.mean())
    cy, cx = np.unravel_index(np.argmax(m), m.shape)
    # log m is an inverted paraboloid: separable second differences are constant
    lm = np.log(m)
    d2 = lm[cy, 2:] - 2 * lm[cy, 1:-1] + lm[cy, :-2]
    np.testing.assert_allclose(d2, d2[0], rtol=1e-9)


class Scripted:
    """An rng that hands out given draws in order (integers, uniform, random), checking each
    against the caller's range."""

    def __init__(self, *values):
        self.values = list(values)

    def _next(self, ok):
        v = self.values.pop(0)
        assert ok(v), v
        return v

    def integers(self, low, high):
        return self._next(lambda v: low <= v < high)

    def uniform(self, low, high):
        return self._next(lambda v: low <= v <= high)

    def random(self):
        return self._next(lambda v: 0 <= v < 1)


def rows_cols(rows, cols, h=32, w=32):
    m = np.zeros((h, w))
    m[np.ix_(rows, cols)] = 1.0
    return m


def test_gridmix_crop_inside_the_image():
    """Area 0.5, aspect 1: a 22 x 22 crop at (int(10 · 0.3), int(10 · 0.75)) = (3, 7); 4
    patches of ceil(22 / 4) = 6 px; λ 0.75: holes of int(6 · 0.5) = 3 px."""
    m, lam = mixes.gridmix_mask(32, 32, 0.75, Scripted(4, 1.0, 0.5, 1.0, 0.3, 0.75))
    rows = [r for a in (0, 6, 12, 18) for r in range(7 + a, 7 + min(a + 3, 22))]
    cols = [c for a in (0, 6, 12, 18) for c in range(3 + a, 3 + min(a + 3, 22))]
    np.testing.assert_array_equal(m, rows_cols(rows, cols))
    assert lam == 1 - 12 * 12 / 1024


def test_gridmix_tall_crop_is_placed_as_openmixup_places_it():
    """Area 1, aspect 2: cut_w = int(sqrt(1024 / 2)) = 22, cut_h = 44 > 32. Not clamped: the
    offset int((32 - 44) · 0.5) = -6, and OpenMixup's slice of the first hole row,
    [-6, -3), counts from the bottom (rows 26-28); rows past 32 are cut. 4 patches of 6 px,
    holes of 3: hole rows start at -6, 0, 6, ... 36."""
    m, lam = mixes.gridmix_mask(32, 32, 0.75, Scripted(4, 1.0, 1.0, 2.0, 0.35, 0.5))
    rows = [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20, 24, 25, 26, 27, 28, 30, 31]
    cols = [3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23]       # x0 = int(10 · 0.35) = 3
    np.testing.assert_array_equal(m, rows_cols(rows, cols))
    assert lam == 1 - 19 * 12 / 1024
    # fastmix's earlier crop, clamped to 32 rows from row 0, had no rows 27, 28 and its
    # holes at 0, 6, ... 30: this is the OpenMixup geometry, not that one
    assert m[27].any() and m[28].any() and not m[3:6].any()


def test_gridmix_wide_crop_is_placed_as_openmixup_places_it():
    """Area 1, aspect 0.5: cut_w = int(sqrt(2048)) = 45 > 32, cut_h = 22; 3 patches of 15 px,
    λ 0.75: holes of 7. The column offset int((32 - 45) · 0.5) = -6: the first hole's slice
    [-6, 1) straddles column 0 and is empty (numpy's slice semantics), the others are
    [9, 16) and [24, 31). Rows from int(10 · 0.25) = 2: [2, 9) and [17, 24)."""
    m, lam = mixes.gridmix_mask(32, 32, 0.75, Scripted(3, 1.0, 1.0, 0.5, 0.5, 0.25))
    rows = list(range(2, 9)) + list(range(17, 24))
    cols = list(range(9, 16)) + list(range(24, 31))
    np.testing.assert_array_equal(m, rows_cols(rows, cols))
    assert lam == 1 - 14 * 14 / 1024
    # the clamped crop fastmix used before (32 wide, 16 high, 11-px patches) differs here
    assert not m[:, :9].any()


def test_gridmix_crops_larger_than_the_image_are_common_under_the_defaults():
    """About a third of the draws give a crop taller than a 32-px image and an eighth one
    wider (``bench/fidelity.py``: 32% and 13%): why the placement of such crops matters.
    Every mask is still a product of a row set and a column set, λ its kept area."""
    rng = np.random.default_rng(3)
    tall = wide = 0
    for _ in range(400):
        car, cas = rng.uniform(0.5, 1.0), rng.uniform(0.5, 2.0)
        cut_w = int(math.sqrt(int(1024 * car) / cas))
        wide += cut_w > 32
        tall += cut_w <= 32 and int(cut_w * cas) > 32
        m, lam = mixes.gridmix_mask(32, 32, float(rng.beta(0.2, 0.2)),
                                    Scripted(int(rng.integers(2, 7)), 1.0, car, cas,
                                             rng.random(), rng.random()))
        r, c = m.any(1), m.any(0)
        np.testing.assert_array_equal(m, np.outer(r, c).astype(float))
        assert lam == 1 - m.mean()
    assert 0.25 < tall / 400 < 0.5 and 0.1 < wide / 400 < 0.25


# ---- SaliencyMix: the border artefact of the periodic FFT ---------------------------------------
def peak_of(img, **kwargs):
    sal = mixes.spectral_residual_saliency(img, **kwargs)
    p = int(torch.argmax(sal))
    return p // img.shape[-1], p % img.shape[-1]


def test_saliency_peak_is_on_an_off_centre_blob_over_a_ramp():
    """A small bright blob anywhere (near the border too) on a brightness ramp of random
    direction, with a little noise: the peak lies on the blob. The ramp is what the periodic
    FFT sees as a jump between opposite borders; without the reflect padding (pad=0) the peak
    goes to that border in some of these same cases."""
    rng = np.random.default_rng(1)
    misses_periodic = 0
    for t in range(36):
        h, w = [(32, 32), (28, 28), (40, 48), (64, 64), (17, 23), (48, 40)][t % 6]
        r = int(rng.integers(1, 4))
        cy, cx = int(rng.integers(r + 1, h - r - 1)), int(rng.integers(r + 1, w - r - 1))
        ang, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.5)
        yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        img = (amp * (math.cos(ang) * yy + math.sin(ang) * xx)).float().expand(3, h, w).clone()
        img[:, cy - r:cy + r + 1, cx - r:cx + r + 1] += 1.0
        img += 0.05 * torch.from_numpy(rng.standard_normal((3, h, w))).float()
        py, px = peak_of(img)
        assert abs(py - cy) <= r + 2 and abs(px - cx) <= r + 2, ((h, w), (cy, cx), (py, px))
        qy, qx = peak_of(img, pad=0)
        misses_periodic += not (abs(qy - cy) <= r + 2 and abs(qx - cx) <= r + 2)
    assert misses_periodic >= 3


@pytest.mark.parametrize("h,w", [(28, 28), (32, 32), (40, 48), (64, 64)])
def test_saliency_of_a_band_along_one_border_peaks_on_its_inner_edge(h, w):
    """A flat image with a bright band along one border (a quarter or half of the image): the
    only real edge is the band's inner side. The periodic FFT also sees a jump where the band
    meets the opposite border; the peak must not sit on the image's edge for that reason (the
    plain recipe, pad=0, puts it on the image's edge in at least half of these cases)."""
    g = torch.Generator().manual_seed(0)
    periodic_on_edge = 0
    for frac in (0.25, 0.5):
        for axis in (0, 1):                         # a band along the top, or the left
            n = (h, w)[axis]
            c = int(n * frac)
            img = torch.zeros(3, h, w)
            if axis == 0:
                img[:, :c] = 1.0
            else:
                img[:, :, :c] = 1.0
            img += 0.05 * torch.randn(3, h, w, generator=g)
            at = peak_of(img)[axis]
            assert abs(at - c) <= 3 and 0 < at < n - 1, (frac, axis, c, at)
            periodic_on_edge += peak_of(img, pad=0)[axis] in (0, n - 1)
    assert periodic_on_edge >= 2


def test_saliency_pad_is_checked_and_the_map_has_the_image_size():
    img = torch.rand(3, 20, 30)
    assert mixes.spectral_residual_saliency(img).shape == (20, 30)
    assert mixes.spectral_residual_saliency(img, pad=0).shape == (20, 30)
    for bad in (-1, 64):
        with pytest.raises(ValueError, match="pad"):
            mixes.spectral_residual_saliency(img, pad=bad)


def test_saliency_box_reads_nothing_back():
    """The padded saliency and its box, with λ a float or a 0-d tensor: no device read."""
    img = torch.rand(3, 24, 24)
    for lam in (0.3, torch.tensor(0.3)):
        with ReadBacks() as mode:
            box, lam_adj = mixes.saliency_box(mixes.spectral_residual_saliency(img), lam)
        assert mode.seen == [] and box.dtype == torch.int64 and box.shape == (4,)


# ---- the CutMix box convention ------------------------------------------------------------------
def test_clip_box_on_host_ints_and_tensors():
    """clip_box is cutmix's ``max(c - cut // 2, 0), min(c + cut // 2, size)``: the same numbers
    from host ints (ints back) and from tensors (tensors back, cuts as ints or tensors)."""
    cases = [((5, 7, 4, 6, 13, 19), (3, 7, 4, 10)),     # inside
             ((0, 18, 8, 9, 13, 19), (0, 4, 14, 19)),   # clipped at the top and the right
             ((12, 0, 25, 38, 13, 19), (0, 13, 0, 19)),  # a cut larger than the image
             ((6, 9, 3, 1, 13, 19), (5, 7, 9, 9)),      # odd cuts: ± cut // 2, a 1-wide cut
             ((6, 9, 0, 0, 13, 19), (6, 6, 9, 9))]      # nothing cut
    for args, want in cases:
        got = mixes.clip_box(*args)
        assert got == want and all(type(v) is int for v in got), (args, got)
        cy, cx, ch, cw, h, w = args
        for cuts in ((ch, cw), (torch.tensor(ch), torch.tensor(cw))):
            t = mixes.clip_box(torch.tensor(cy), torch.tensor(cx), *cuts, h, w)
            assert all(isinstance(v, torch.Tensor) and v.dtype == torch.int64 for v in t)
            assert [int(v) for v in t] == list(want), (args, cuts)
    # every centre of a small image, every cut: the tensor path equals the int path
    h, w = 7, 5
    cy, cx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for ch in range(0, 10):
        for cw in (0, 1, 4, 7):
            t = mixes.clip_box(cy, cx, ch, cw, h, w)
            for i in range(h):
                for j in range(w):
                    assert [int(v[i, j]) for v in t] == list(mixes.clip_box(i, j, ch, cw, h, w))


def test_every_cutmix_style_box_is_clip_box():
    """CutMix's, ResizeMix's and SaliencyMix's boxes on the same centres and cuts are
    clip_box's (the one convention)."""
    from fastmix.functional import cutmix_box
    rng = np.random.default_rng(7)
    for _ in range(200):
        h, w = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        lam = float(rng.random())
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        ratio = (1.0 - lam) ** 0.5
        y0, y1, x0, x1, _ = cutmix_box(h, w, lam, Scripted(cy, cx))
        assert (y0, y1, x0, x1) == mixes.clip_box(cy, cx, int(h * ratio), int(w * ratio), h, w)
        tau = float(rng.uniform(0.1, 0.8))
        y0, y1, x0, x1, _ = mixes.resizemix_box(h, w, tau, Scripted(cy, cx))
        assert (y0, y1, x0, x1) == mixes.clip_box(cy, cx, int(h * tau), int(w * tau), h, w)
        sal = torch.zeros(h, w)
        sal[cy, cx] = 1.0
        ratio = math.sqrt(1.0 - lam)
        want = mixes.clip_box(cy, cx, int(h * ratio), int(w * ratio), h, w)
        assert tuple(mixes.saliency_box(sal, lam)[0].tolist()) == want
        assert tuple(mixes.saliency_box(sal, torch.tensor(lam))[0].tolist()) == want


def test_fidelity_bench_refuses_without_openmixup():
    """bench/fidelity.py measures fastmix against OpenMixup's own code, which is never part of
    the project: without --openmixup it stops with a usage error (and imports nothing)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "fidelity.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--openmixup DIR is required" in out.stderr
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "fidelity.py"),
                          "--openmixup", os.path.join(root, "no-such-dir")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a directory" in out.stderr


@pytest.mark.parametrize("arch,stages", [("resnet_small", 4), ("wrn16_1", 3)])
def test_manifoldmix_mixes_the_hidden_features_of_its_stage(arch, stages):
    bb = build_backbone(arch)
    bb.eval()
    x = torch.randn(4, 3, 16, 16)
    index, lam = torch.tensor([3, 2, 1, 0]), 0.3
    mix = lambda h: lam * h + (1 - lam) * h[index]  # noqa: E731
    plain = bb(x)[-1]
    outs = []
    for layer in range(3):
        out = bb(x, mix_at=layer, mix_fn=mix)[-1]
        outs.append(out)
        assert not torch.allclose(out, plain)
    # stage 0 is input Mixup
    torch.testing.assert_close(outs[0], bb(mix(x))[-1])
    assert not torch.allclose(outs[1], outs[2])
    model = make("manifoldmix", seed=0, arch=arch)
    layers = {model.draw(x)["layer"] for _ in range(60)}
    assert layers == {0, 1, 2}


# ---- PuzzleMix ----------------------------------------------------------------------------------
def test_puzzlemix_graph_cut_keeps_each_images_salient_side():
    """A hand-made 4 x 4 case: the own image's saliency is all in the left half, the partner's
    all in the right half, no smoothness cost: the cut keeps the own image on the left (mask 1)
    and gives the right to the partner (mask 0)."""
    from fastmix.puzzlemix import graphcut_mask
    own = np.zeros((4, 4))
    own[:, :2] = 1 / 8
    partner = np.zeros((4, 4))
    partner[:, 2:] = 1 / 8
    zero_x, zero_y = np.zeros((3, 4)), np.zeros((4, 3))
    mask = graphcut_mask(partner, own, zero_x, zero_y, lam=0.5, beta=0.0, eta=0.0, n_labels=3)
    np.testing.assert_array_equal(mask, np.repeat([[1.0, 1.0, 0.0, 0.0]], 4, 0))
    # the prior alone (flat saliency): λ near 1 keeps everything, near 0 gives everything
    flat = np.full((4, 4), 1 / 16)
    assert (graphcut_mask(flat, flat, zero_x, zero_y, 0.99, 0.0, 0.2) == 1).all()
    assert (graphcut_mask(flat, flat, zero_x, zero_y, 0.01, 0.0, 0.2) == 0).all()


def test_puzzlemix_transport_moves_whole_blocks():
    """The plan is a partial permutation (at most one 1 per row and column) and transporting
    moves whole blocks: every output block is an input block or zero."""
    from fastmix.puzzlemix import mask_transport, transport_blocks
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float()
    sal = torch.rand(3, 4, 4, generator=g)
    plan = mask_transport(mask, sal / sal.sum((1, 2), keepdim=True), eps=0.8)
    assert set(plan.unique().tolist()) <= {0.0, 1.0}
    assert plan.sum(-1).max() <= 1 and plan.sum(-2).max() <= 1
    img = torch.randn(3, 2, 8, 8, generator=g)
    out = transport_blocks(img, plan, 4)
    blocks = lambda t: t.reshape(3, 2, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, -1)  # noqa: E731
    bi, bo = blocks(img), blocks(out)
    for n in range(3):
        for j in range(16):
            src = plan[n, :, j].nonzero()
            want = bi[n, src[0, 0]] if len(src) else torch.zeros_like(bo[n, j])
            torch.testing.assert_close(bo[n, j], want)
    # the identity plan leaves the image unchanged
    eye = torch.eye(16).expand(3, 16, 16)
    torch.testing.assert_close(transport_blocks(img, eye, 4), img)


def test_puzzlemix_step_lambda_is_each_samples_kept_area():
    """Per-sample λ from the mask; the loss is the per-sample soft target's CE; the grid size
    divides the image (28 px: 2 or 4 blocks); the saliency pass leaves no parameter gradient
    and the modules' train mode as it was."""
    from fastmix.puzzlemix import block_choices
    assert block_choices(32) == [2, 4, 8, 16] and block_choices(28) == [2, 4]
    model = make("puzzlemix", seed=4)
    x, y = torch.randn(5, 3, 28, 28), torch.tensor([0, 1, 2, 3, 4])
    for _ in range(4):
        draw = model.draw(x)
        assert draw["block_num"] in (2, 4)
        x_mix, _, _, lam = model.mix_with(x, y, draw)
        assert all(p.grad is None for p in model.parameters()) and model.training
        assert lam.shape == (5,) and lam.min() >= 0 and lam.max() <= 1
        # with transport the kept pixels of a sample come from its moved blocks; λ_i is the
        # kept area of its mask: 1/(L-1) steps on a B x B grid
        steps = lam * 2 * draw["block_num"] ** 2
        assert torch.allclose(steps, steps.round(), atol=1e-5)
        loss, _ = model.losses(x, y, draw)
        logits = model.logits(x_mix)
        ce = lambda t: F.cross_entropy(logits, t, reduction="none")  # noqa: E731
        want = (lam * ce(y) + (1 - lam) * ce(y[draw["index"]])).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="square"):
        model.draw(torch.randn(2, 3, 16, 20))


def test_puzzlemix_reads_the_device_and_is_not_captured(monkeypatch):
    """The graph cut runs on the host: PuzzleMix is the method with read-backs in its step
    (the unary and pairwise terms go to the host as numpy arrays: on the CPU no aten op shows
    it, so this spies on Tensor.numpy), and --cuda-graphs refuses it."""
    model = make("puzzlemix", seed=0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    calls = []
    numpy = torch.Tensor.numpy
    monkeypatch.setattr(torch.Tensor, "numpy", lambda t, *a, **k: calls.append(t.shape) or
                        numpy(t, *a, **k))
    model.losses(x, y, model.draw(x))
    assert len(calls) == 4     # own and partner unary terms, the two pairwise weights
    assert not model.graph_capturable
    from fastmix.config import Config, validate_config
    with pytest.raises(ValueError, match="without --cuda-graphs"):
        validate_config(Config(method="puzzlemix", cuda_graphs=True))


def test_presets_give_the_comparison_methods_their_own_recipe():
    """A preset is AutoMix's recipe; with another --method the official baseline recipe
    applies: cosine to 0, and weight decay 5e-4 for the cutting methods on CIFAR-100
    ResNeXt-50 (spec §3, §4.2); flags still win; AutoMix is unchanged."""
    from fastmix.config import DEFAULT_ALPHA, resolve
    auto = resolve({}, "cifar100-rx50")[0]
    assert auto.min_lr == 0.05 and auto.weight_decay == 1e-4
    for method in ("cutmix", "fmix", "resizemix", "saliencymix", "gridmix"):
        cfg = resolve({"method": method}, "cifar100-rx50")[0]
        assert cfg.min_lr == 0.0 and cfg.weight_decay == 5e-4, method
    for method in ("mixup", "manifoldmix", "puzzlemix", "smoothmix", "vanilla"):
        cfg = resolve({"method": method}, "cifar100-rx50")[0]
        assert cfg.min_lr == 0.0 and cfg.weight_decay == 1e-4, method
    assert resolve({"method": "cutmix"}, "cifar100-r18")[0].weight_decay == 1e-4
    assert resolve({"method": "cutmix", "weight_decay": 1e-3, "min_lr": 0.01},
                   "cifar100-rx50")[0].weight_decay == 1e-3
    # α per method: spec §4.2's CIFAR-100 R-18 table
    assert {m: DEFAULT_ALPHA[m] for m in ("mixup", "cutmix", "manifoldmix", "saliencymix", "fmix",
                                          "puzzlemix", "resizemix")} == \
        {"mixup": 1, "cutmix": 0.2, "manifoldmix": 2, "saliencymix": 0.2, "fmix": 0.2,
         "puzzlemix": 1, "resizemix": 1}
