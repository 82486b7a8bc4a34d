import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmix.backbones import build_backbone
from fastmix.functional import cutmix_box, cutmix_images, mixed_cross_entropy
from fastmix.mixup import MixupClassifier


def test_cutmix_lambda_is_one_minus_box_area():
    rng = np.random.default_rng(0)
    for lam in np.linspace(0.05, 0.95, 19):
        y0, y1, x0, x1, lam_adj = cutmix_box(28, 32, float(lam), rng)
        assert 0 <= y0 <= y1 <= 28 and 0 <= x0 <= x1 <= 32
        assert lam_adj == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (28 * 32))


def test_cutmix_pixels_match_lambda():
    torch.manual_seed(0)
    model = MixupClassifier(build_backbone("resnet_small", 3), 10, method="cutmix", alpha=1.0,
                            seed=3, fused=False)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    for _ in range(5):
        x_mix, y_a, y_b, lam = model.mix(x, y)
        moved = y_b != y_a
        if not moved.any():
            continue
        same = (x_mix[moved] == x[moved]).float().mean().item()
        assert same == pytest.approx(lam, abs=1e-6)  # λ = share of pixels kept from x


def test_mixup_images_and_labels():
    torch.manual_seed(0)
    model = MixupClassifier(build_backbone("resnet_small", 3), 10, method="mixup", seed=1, fused=False)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    x_mix, y_a, y_b, lam = model.mix(x, y)
    index = y_b  # labels are arange, so y_b is the permutation
    torch.testing.assert_close(x_mix, lam * x + (1 - lam) * x[index])
    assert 0 < lam < 1


def test_vanilla_does_not_mix():
    model = MixupClassifier(build_backbone("resnet_small", 3), 10, method="vanilla", fused=False)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    x_mix, y_a, y_b, lam = model.mix(x, y)
    assert x_mix is x and y_b is None and lam == 1.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_cross_entropy_eager(smoothing):
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64)
    a, b = torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,))
    lam = 0.3
    logp = z.log_softmax(1)
    def target(t):
        return (1 - smoothing) * F.one_hot(t, 7) + smoothing / 7
    expected = -((lam * target(a) + (1 - lam) * target(b)) * logp).sum(1).mean()
    got = mixed_cross_entropy(z, a, b, lam, smoothing, fused=False)
    torch.testing.assert_close(got.double(), expected)
    got_t = mixed_cross_entropy(z, a, b, torch.tensor(lam), smoothing, fused=False)
    torch.testing.assert_close(got_t.double(), expected)


def test_cutmix_images_leaves_input_unchanged():
    x = torch.randn(2, 1, 6, 6)
    keep = x.clone()
    out = cutmix_images(x, torch.tensor([1, 0]), (1, 4, 2, 5, 0.0))
    assert torch.equal(x, keep)
    assert torch.equal(out[0, :, 1:4, 2:5], x[1, :, 1:4, 2:5])


def test_bad_method_and_alpha():
    with pytest.raises(ValueError, match="method"):
        MixupClassifier(build_backbone("resnet_small", 3), 10, method="comixup")
    with pytest.raises(ValueError, match="alpha"):
        MixupClassifier(build_backbone("resnet_small", 3), 10, alpha=-1)
