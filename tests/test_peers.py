"""The peers as oracles: torchvision's v2.MixUp / v2.CutMix and timm's Mixup on the same
inputs as fastmix's Mixup and CutMix (images, λ, boxes and the loss against their soft
targets), and the timm / torchvision backbone paths AutoMix takes (the stages they tap).

Conventions, asserted below: torchvision pairs sample i with i - 1 (``roll(1, 0)``), timm with
n - 1 - i (``flip(0)``), fastmix with a random permutation, so fastmix is given the peer's
pairing. CutMix boxes: fastmix's equals torchvision's (the CutMix paper's: half-sides
``cut // 2`` on both sides of the centre); timm's upper edges are ``centre + (cut + 1) // 2``,
one pixel further when the cut is odd. λ is ``1 - box area / image area`` in all three
(timm with ``correct_lam=True``)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmix.backbones import build_backbone
from fastmix.functional import cutmix_box, cutmix_images, mixed_cross_entropy, mixup_images

pytestmark = pytest.mark.models   # `make test` runs these in the torchvision + timm venv

tv2 = pytest.importorskip("torchvision.transforms.v2", reason="needs torchvision (make test installs it)")
timm_mixup = pytest.importorskip("timm.data.mixup", reason="needs timm (make test installs it)")
import timm  # noqa: E402

N, K, H, W = 6, 10, 24, 20


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, H, W, generator=g)
    y = torch.tensor([0, 3, 1, 7, 3, 9])          # neighbours differ: λ is readable off targets
    return x, y


def _soft_ce(logits, soft):
    return -(soft * logits.log_softmax(1)).sum(1).mean()


@pytest.mark.parametrize("seed", range(4))
def test_mixup_equals_torchvision_mixup(seed):
    x, y = _batch(seed)
    torch.manual_seed(seed)
    mixed, soft = tv2.MixUp(alpha=1.0, num_classes=K)(x, y)
    index = torch.arange(N).roll(1)               # torchvision pairs i with i - 1
    lam = float(soft[0, y[0]])
    torch.testing.assert_close(mixup_images(x, index, lam, fused=False), mixed,
                               rtol=1e-6, atol=1e-6)
    logits = torch.randn(N, K)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y[index], lam, fused=False),
                               _soft_ce(logits, soft), rtol=1e-6, atol=1e-6)


class _Centre:
    """A numpy-Generator stand-in that hands cutmix_box a chosen centre (y, then x)."""

    def __init__(self, cy, cx):
        self.values = [cy, cx]

    def integers(self, low, high):
        return self.values.pop(0)


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_equals_torchvision_cutmix(seed):
    x, y = _batch(seed)
    cut = tv2.CutMix(alpha=1.0, num_classes=K)
    torch.manual_seed(seed)
    params = cut.make_params([x])
    # torchvision's draws, in its order: λ ~ Beta, then the centre's x, then its y
    torch.manual_seed(seed)
    lam = float(cut._dist.sample(()))
    cx, cy = int(torch.randint(W, size=(1,))), int(torch.randint(H, size=(1,)))
    y0, y1, x0, x1, lam_adj = cutmix_box(H, W, lam, _Centre(cy, cx))
    assert (x0, y0, x1, y1) == params["box"]
    assert lam_adj == pytest.approx(params["lam_adjusted"], abs=1e-12)
    torch.manual_seed(seed)
    mixed, soft = cut(x, y)
    index = torch.arange(N).roll(1)
    torch.testing.assert_close(cutmix_images(x, index, (y0, y1, x0, x1)), mixed, rtol=0, atol=0)
    logits = torch.randn(N, K)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y[index], lam_adj, fused=False),
                               _soft_ce(logits, soft), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_and_label_smoothing_equal_timm_mixup(smoothing):
    x, y = _batch(1)
    np.random.seed(0)
    mix = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=smoothing,
                           num_classes=K)
    mixed, soft = mix(x.clone(), y)
    index = torch.arange(N).flip(0)               # timm pairs i with n - 1 - i
    off = smoothing / K
    lam = float((soft[0, y[0]] - off) / (1 - smoothing))
    torch.testing.assert_close(mixup_images(x, index, lam, fused=False), mixed,
                               rtol=1e-6, atol=1e-6)
    logits = torch.randn(N, K)
    torch.testing.assert_close(
        mixed_cross_entropy(logits, y, y[index], lam, label_smoothing=smoothing, fused=False),
        _soft_ce(logits, soft), rtol=1e-5, atol=1e-6)


def test_cutmix_box_against_timm_rand_bbox():
    """Same λ correction; the same box when the cut is even; timm's upper edges one pixel
    further when it is odd (timm: ``centre + (cut + 1) // 2``; fastmix and torchvision:
    ``centre + cut // 2``). Checked over many λ and centres, timm drawing the same centre."""
    checked_odd = checked_even = 0
    for i, lam in enumerate(np.linspace(0.02, 0.98, 49)):
        for seed in range(4):
            np.random.seed(100 * i + seed)
            (yl, yh, xl, xh), lam_t = timm_mixup.cutmix_bbox_and_lam((3, H, W), lam)
            np.random.seed(100 * i + seed)           # the same centre: cy, then cx
            cy, cx = np.random.randint(0, H), np.random.randint(0, W)
            y0, y1, x0, x1, lam_f = cutmix_box(H, W, float(lam), _Centre(cy, cx))
            cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
            assert (y0, x0) == (yl, xl)
            assert y1 == min(cy + cut_h // 2, H) and yh == min(cy + (cut_h + 1) // 2, H)
            assert x1 == min(cx + cut_w // 2, W) and xh == min(cx + (cut_w + 1) // 2, W)
            if cut_h % 2 == 0 and cut_w % 2 == 0:
                assert (y1, x1) == (yh, xh) and lam_f == pytest.approx(lam_t, abs=1e-12)
                checked_even += 1
            else:
                checked_odd += 1
            assert lam_f == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W), abs=1e-12)
            assert lam_t == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W), abs=1e-12)
    assert checked_even > 20 and checked_odd > 20


# ---- fastmix.mixers against timm's Mixup and torchvision's v2.MixUp / v2.CutMix ---------------
MIXUP_CONFIGS = {
    "mixup": dict(mixup_alpha=1.0, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "switch": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    "prob": dict(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5),
    "minmax": dict(mixup_alpha=1.0, cutmix_minmax=(0.2, 0.8)),
    "uncorrected": dict(mixup_alpha=0.0, cutmix_alpha=0.5, correct_lam=False),
}


@pytest.mark.parametrize("size", [(24, 20), (23, 19)])
@pytest.mark.parametrize("config", sorted(MIXUP_CONFIGS))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixers_mixup_equals_timm_mixup(mode, config, size):
    """fastmix.mixers.Mixup is timm's Mixup on the same draws (numpy's global generator seeded
    alike): the same images and soft targets bit for bit, the same number of draws, and
    mixed_cross_entropy (on the targets, or on y_a, y_b, λ) is timm's SoftTargetCrossEntropy."""
    from timm.loss import SoftTargetCrossEntropy
    from fastmix.mixers import Mixup
    h, w = size
    kwargs = dict(MIXUP_CONFIGS[config], mode=mode, label_smoothing=0.1, num_classes=K)
    y = torch.tensor([0, 3, 1, 7, 3, 9])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, 3, h, w, generator=g)
        np.random.seed(seed)
        x_timm, soft_timm = timm_mixup.Mixup(**kwargs)(x.clone(), y)
        state_timm = np.random.get_state()
        np.random.seed(seed)
        x_ours, soft_ours = Mixup(**kwargs)(x, y)
        state_ours = np.random.get_state()
        assert (state_ours[1] == state_timm[1]).all() and state_ours[2] == state_timm[2]
        assert torch.equal(x_ours, x_timm)
        assert torch.equal(soft_ours, soft_timm)
        np.random.seed(seed)
        x_mix, y_a, y_b, lam = Mixup(**kwargs).mix(x, y)
        assert torch.equal(x_mix, x_timm)
        if mode == "batch":
            assert isinstance(lam, float)
        else:
            assert lam.shape == (N,) and lam.dtype == torch.float32
        logits = torch.randn(N, K, generator=g)
        loss_timm = SoftTargetCrossEntropy()(logits, soft_timm)
        torch.testing.assert_close(mixed_cross_entropy(logits, soft_ours), loss_timm,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, lam, 0.1), loss_timm,
                                   rtol=1e-6, atol=1e-6)


def test_mixers_mixup_with_a_random_state_is_timm_on_the_seeded_global():
    from fastmix.mixers import Mixup
    x, y = _batch(2)
    kwargs = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", num_classes=K)
    np.random.seed(7)
    x_timm, soft_timm = timm_mixup.Mixup(**kwargs)(x.clone(), y)
    x_ours, soft_ours = Mixup(rng=np.random.RandomState(7), **kwargs)(x, y)
    assert torch.equal(x_ours, x_timm) and torch.equal(soft_ours, soft_timm)


class _Draws:
    """A numpy-Generator stand-in that hands the mixers chosen draws: λ, then the centre."""

    def __init__(self, lam, centre=()):
        self.lam, self.values = lam, list(centre)

    def beta(self, a, b, size=None):
        return self.lam

    def integers(self, low, high):
        return self.values.pop(0)


def _roll_partners(monkeypatch):
    """fastmix's mixers draw torchvision's pairing (i with i - 1) instead of a permutation."""
    import fastmix.methods.base
    monkeypatch.setattr(fastmix.methods.base, "random_permutation",
                        lambda n, device, no_fixed_points=False:
                        torch.arange(n, device=device).roll(1))


@pytest.mark.parametrize("seed", range(4))
def test_mixers_mixup_equals_torchvision_mixup(seed, monkeypatch):
    from fastmix.mixers import MixUp
    _roll_partners(monkeypatch)
    x, y = _batch(seed)
    tv_mix = tv2.MixUp(alpha=1.0, num_classes=K)
    torch.manual_seed(seed)
    mixed, soft = tv_mix(x, y)
    torch.manual_seed(seed)
    lam = float(tv_mix._dist.sample(()))
    ours = MixUp(alpha=1.0, num_classes=K)
    ours.rng = _Draws(lam)
    x_ours, soft_ours = ours(x, y)
    torch.testing.assert_close(x_ours, mixed, rtol=0, atol=0)
    torch.testing.assert_close(soft_ours, soft, rtol=0, atol=0)
    ours.rng = _Draws(lam)
    _, y_a, y_b, lam_ours = ours.mix(x, y)
    assert lam_ours == lam and torch.equal(y_b, y.roll(1))
    logits = torch.randn(N, K)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, lam_ours),
                               _soft_ce(logits, soft), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_mixers_cutmix_equals_torchvision_cutmix(seed, monkeypatch):
    from fastmix.mixers import CutMix
    _roll_partners(monkeypatch)
    x, y = _batch(seed)
    cut = tv2.CutMix(alpha=1.0, num_classes=K)
    torch.manual_seed(seed)
    mixed, soft = cut(x, y)
    torch.manual_seed(seed)           # torchvision's draws, in its order: λ, centre x, centre y
    lam = float(cut._dist.sample(()))
    cx, cy = int(torch.randint(W, size=(1,))), int(torch.randint(H, size=(1,)))
    ours = CutMix(alpha=1.0, num_classes=K)
    ours.rng = _Draws(lam, (cy, cx))
    x_ours, soft_ours = ours(x, y)
    torch.testing.assert_close(x_ours, mixed, rtol=0, atol=0)
    torch.testing.assert_close(soft_ours, soft, rtol=0, atol=0)
    ours.rng = _Draws(lam, (cy, cx))
    _, y_a, y_b, lam_adj = ours.mix(x, y)
    logits = torch.randn(N, K)
    torch.testing.assert_close(mixed_cross_entropy(logits, y_a, y_b, lam_adj),
                               _soft_ce(logits, soft), rtol=1e-6, atol=1e-6)


# ---- backbones ------------------------------------------------------------------------------
TIMM_TAPS = {   # family: (model, the tapped module = the second-last feature stage, its channels,
    #                      the final (pre-logits) width: num_features, or head_hidden_size)
    "resnet": ("resnet18", "layer3", 256, 512),
    "resnet-d": ("resnet26d", "layer3", 1024, 2048),
    "efficientnet": ("efficientnet_b0", "blocks.4", 112, 1280),     # after conv_head / bn2
    "convnext": ("convnext_atto", "stages.2", 160, 320),
    "regnet": ("regnetx_002", "s3", 152, 368),
    "mobilenetv3": ("mobilenetv3_small_100", "blocks.3", 48, 1024),  # conv_head after the pool
}


@pytest.mark.parametrize("family", sorted(TIMM_TAPS))
def test_timm_backbones_tap_the_second_last_stage_of_the_whole_network(family):
    """``timm:<name>`` is ``timm.create_model(name, num_classes=0)``, unaltered: its tap is the
    output of the module ``feature_info[-2]`` names (a hook on it agrees), its final features
    timm's pre-logits (``forward_head(forward_features(x), pre_logits=True)``, [N, C, 1, 1])."""
    name, module, c_tap, c_final = TIMM_TAPS[family]
    bb = build_backbone(f"timm:{name}").eval()
    assert bb.model.feature_info[-2]["module"] == bb.tap_module == module
    assert tuple(bb.out_channels) == (c_tap, c_final)
    full = timm.create_model(name, num_classes=K)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(bb) == count(full) - count(full.get_classifier())    # all but the classifier
    seen = []
    bb.model.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f3, final = bb(x)
        pre = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    assert torch.equal(f3, seen[0]) and f3.shape == (2, c_tap, 4, 4)      # stride 16
    assert final.shape == (2, c_final, 1, 1) and torch.equal(final.flatten(1), pre)


def test_timm_resnet18_automix_has_the_whole_network():
    from fastmix.automix import AutoMix
    bb = build_backbone("timm:resnet18")
    full = timm.create_model("resnet18", num_classes=0)
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in bb.parameters()) == 11_176_512    # layer4 included
    model = AutoMix(bb, 10, seed=0, fused=False)
    loss, _ = model.forward_train(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    loss.backward()
    assert model.mix_block.in_channels == 256                        # layer3 feeds the Mix Block
    assert bb.model.layer4[1].conv2.weight.grad is not None          # and layer4 trains


def test_featuretap_on_a_torchvision_resnet():
    import torchvision
    from fastmix.backbones import FeatureTap
    tv = torchvision.models.resnet50(num_classes=10)
    bb = FeatureTap(tv, "layer3", "layer4", (1024, 2048))
    f3, final = bb(torch.randn(2, 3, 64, 64))
    assert f3.shape == (2, 1024, 4, 4) and final.shape == (2, 2048, 2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_imagenet_resnets_are_torchvisions(arch):
    """The ImageNet-stem ResNets are built by ``torchvision.models.<arch>``: the state dict is
    torchvision's less ``fc`` (it loads into ``torchvision.models.<arch>`` strictly but ``fc``)
    and both give the same layer3 / layer4 features, so the export is a torchvision checkpoint."""
    import torchvision
    torch.manual_seed(0)
    ours = build_backbone(arch).eval()
    assert type(ours.layer1[0]).__module__ == "torchvision.models.resnet"
    tv = getattr(torchvision.models, arch)(num_classes=10).eval()
    missing, unexpected = tv.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    f3, final = ours(x)
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        t3 = tv.layer3(tv.layer2(tv.layer1(h)))
        t4 = tv.layer4(t3)
    torch.testing.assert_close(f3, t3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, t4, rtol=1e-5, atol=1e-5)
