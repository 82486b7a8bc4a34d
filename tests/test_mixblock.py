import math

import pytest
import torch

from fastmix.mixblock import MixBlock


def reference_mask(mb, z, lam, index, size, mode="nearest"):
    """An independent float64 computation of the Mix Block with einsum + softmax."""
    z = z.double()
    n, c, h, w = z.shape
    wq, bq = mb.query.weight.double()[:, :, 0, 0], mb.query.bias.double()
    wv, bv = mb.value.weight.double()[:, :, 0, 0], mb.value.bias.double()
    zi, zj = z, z[index]
    if mb.lam_concat:
        zi = torch.cat([zi, torch.full((n, 1, h, w), lam, dtype=z.dtype)], 1)
        zj = torch.cat([zj, torch.full((n, 1, h, w), 1 - lam, dtype=z.dtype)], 1)
    q = torch.einsum("oc,nchw->nhwo", wq, zi).reshape(n, h * w, -1) + bq
    k = torch.einsum("oc,nchw->nhwo", wq, zj).reshape(n, h * w, -1) + bq
    v = torch.einsum("oc,nchw->nhwo", wv, zj).reshape(n, h * w) + bv
    logits = torch.einsum("nid,njd->nij", q, k) / math.sqrt(mb.inter_channels)
    m = torch.einsum("nij,nj->ni", logits.softmax(-1), v).reshape(n, 1, h, w)
    m = torch.sigmoid(torch.nn.functional.interpolate(m, size=size, mode=mode))
    return torch.cat([1 - m, m], 1)


def randomize(mb, scale=0.3):
    with torch.no_grad():
        for p in mb.parameters():
            p.normal_(0, scale)
    return mb


@pytest.mark.parametrize("lam_concat", [False, True])
@pytest.mark.parametrize("hw,size", [((7, 7), (28, 28)), ((8, 8), (32, 32)), ((2, 3), (8, 12))])
def test_matches_independent_computation(lam_concat, hw, size):
    torch.manual_seed(0)
    mb = randomize(MixBlock(12, lam_concat=lam_concat))
    z = torch.randn(5, 12, *hw)
    index = torch.randperm(5)
    mask = mb(z, 0.3, index, size)
    assert mask.shape == (5, 2, *size) and mask.dtype == torch.float32
    ref = reference_mask(mb, z, 0.3, index, size)
    torch.testing.assert_close(mask.double(), ref, rtol=1e-5, atol=1e-6)


def test_bilinear_matches_reference():
    torch.manual_seed(1)
    mb = randomize(MixBlock(8, upsample="bilinear"))
    z, index = torch.randn(3, 8, 4, 4), torch.tensor([2, 0, 1])
    torch.testing.assert_close(mb(z, 0.6, index, (16, 16)).double(),
                               reference_mask(mb, z, 0.6, index, (16, 16), "bilinear"), rtol=1e-5, atol=1e-6)


def test_channels_sum_to_one_and_lam_concat_changes_mask():
    torch.manual_seed(2)
    mb = randomize(MixBlock(16, lam_concat=True))
    z, index = torch.randn(4, 16, 7, 7), torch.randperm(4)
    a, b = mb(z, 0.2, index, (28, 28)), mb(z, 0.9, index, (28, 28))
    torch.testing.assert_close(a.sum(1), torch.ones(4, 28, 28))
    assert (a - b).abs().max() > 1e-3  # λ enters q, k and v


def test_initial_mask_is_about_half():
    torch.manual_seed(3)
    mb = MixBlock(256)
    mask = mb(torch.randn(8, 256, 8, 8), 0.5, torch.randperm(8), (32, 32))
    assert (mask - 0.5).abs().max() < 0.02
    assert mb.inter_channels == 128
    assert abs(mb.query.weight.std().item() - 0.01) < 0.002 and mb.query.bias.abs().max() == 0


def test_inter_channels_ignore_lam_channel():
    mb = MixBlock(256, lam_concat=True)
    assert mb.query.weight.shape == (128, 257, 1, 1) and mb.value.weight.shape == (1, 257, 1, 1)


def test_softmax_is_over_partner_positions():
    # With v constant over the partner's positions, P v equals that constant whatever P is:
    # true only if every row of P sums to 1 over the partner's (key) positions.
    torch.manual_seed(4)
    mb = randomize(MixBlock(6))
    with torch.no_grad():
        mb.value.weight.zero_()
        mb.value.bias.fill_(0.7)
    logits = mb.mask_logits(torch.randn(3, 6, 5, 5), 0.4, torch.randperm(3))
    torch.testing.assert_close(logits, torch.full_like(logits, 0.7))


@pytest.mark.parametrize("mode", ["L1", "L1+Variance"])
def test_mask_loss_values(mode):
    mb = MixBlock(4, mask_loss_mode=mode, mask_loss_margin=0.1)
    m = torch.rand(3, 8, 8)
    lam = 0.2
    mean = m.mean()
    expected = torch.relu((1 - mean - lam).abs() - 0.1)
    if mode == "L1+Variance":
        expected = expected - 2 * ((m - mean) ** 2).mean()
    torch.testing.assert_close(mb.mask_loss(m, lam), expected)
    # inside the margin the L1 term is zero
    inside = torch.full((2, 4, 4), 0.75)
    assert MixBlock(4, mask_loss_margin=0.1).mask_loss(inside, 0.3).item() == 0.0


def test_mask_loss_is_a_batch_mean():
    # Per-sample areas 0.1 and 0.9 average to 0.5: a batch-mean loss is 0 for λ=0.5.
    mb = MixBlock(4, mask_loss_margin=0.0)
    m = torch.stack([torch.full((4, 4), 0.1), torch.full((4, 4), 0.9)])
    assert mb.mask_loss(m, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_errors():
    mb = MixBlock(8)
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        mb(torch.randn(8, 4, 4), 0.5, torch.arange(8), (8, 8))
    with pytest.raises(ValueError, match="8 channels"):
        mb(torch.randn(2, 6, 4, 4), 0.5, torch.arange(2), (8, 8))
    with pytest.raises(ValueError, match="length N=2"):
        mb(torch.randn(2, 8, 4, 4), 0.5, torch.arange(3), (8, 8))
    with pytest.raises(TypeError, match="integer"):
        mb(torch.randn(2, 8, 4, 4), 0.5, torch.tensor([0.0, 1.0]), (8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mb(torch.randn(2, 8, 4, 4), 1.5, torch.arange(2), (8, 8))
    with pytest.raises(ValueError, match="mask_loss_mode"):
        MixBlock(8, mask_loss_mode="L3")
