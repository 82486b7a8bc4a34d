import copy
import math

import pytest
import torch

from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.schedules import ema_momentum


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return AutoMix(build_backbone("resnet_small", in_chans=1), 10, seed=seed, fused=False, **kw)


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def randomize_mix_block(model):
    with torch.no_grad():
        for p in model.mix_block.parameters():
            p.normal_(0, 0.2)


def grads(module):
    return [p.grad for p in module.parameters()]


def nonzero(gs):
    return any(g is not None and g.abs().sum() > 0 for g in gs)


def all_zero(gs):
    return all(g is None or g.abs().sum() == 0 for g in gs)


@pytest.mark.parametrize("term", ["mix_k", "mask", "one_q", "mix_q"])
def test_gradient_routing(term):
    """Each loss term reaches exactly the modules spec §2.2 says it reaches."""
    weights = {"mix_q": 0.0, "one_q": 0.0, "mix_k": 0.0}
    if term in weights:
        weights[term] = 1.0
    model = make_model(head_weights=weights, mask_loss_weight=1.0 if term == "mask" else 0.0,
                       mask_loss_margin=0.0)
    randomize_mix_block(model)
    with torch.no_grad():  # make every head and BN non-trivial so gradients are non-zero
        for p in model.backbone_q.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for h in (model.head_mix_q, model.head_one_q):
            h.fc.weight.normal_(0, 0.3)
    model.backbone_k.load_state_dict(model.backbone_q.state_dict())
    model.head_mix_k.load_state_dict(model.head_mix_q.state_dict())
    model.head_one_k.load_state_dict(model.head_one_q.state_dict())
    x, y = batch()
    loss, _ = model.forward_train(x, y)
    loss.backward()
    mb = grads(model.mix_block)
    q = grads(model.backbone_q)
    # the momentum encoder and its heads never receive gradients
    for module in (model.backbone_k, model.head_mix_k, model.head_one_k):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    if term in ("mix_k", "mask"):
        assert nonzero(mb) and all_zero(q)
        assert all_zero(grads(model.head_mix_q)) and all_zero(grads(model.head_one_q))
    else:
        assert all_zero(mb) and nonzero(q)
        assert nonzero(grads(model.head_mix_q if term == "mix_q" else model.head_one_q))
        assert all_zero(grads(model.head_one_q if term == "mix_q" else model.head_mix_q))


def test_ema_schedule_values():
    m0, m1, T = 0.999, 0.999999, 1000
    assert ema_momentum(0, T, m0, m1) == m0
    assert ema_momentum(99, T, m0, m1) == m0
    at10 = m1 - (m1 - m0) * (math.cos(math.pi * 0.1) + 1) / 2
    assert ema_momentum(100, T, m0, m1) == pytest.approx(at10, abs=1e-12)
    assert (at10 - m0) / (m1 - m0) == pytest.approx(0.0245, abs=1e-3)  # not shifted to the window
    assert ema_momentum(500, T, m0, m1) == pytest.approx((m0 + m1) / 2, abs=1e-12)
    assert ema_momentum(1000, T, m0, m1) == pytest.approx(m1, abs=1e-12)


def test_ema_updates_parameters_not_buffers():
    model = make_model()
    with torch.no_grad():
        for p in list(model.backbone_q.parameters()) + list(model.head_one_q.parameters()):
            p.add_(torch.randn_like(p))
        for b in model.backbone_q.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    k_before = copy.deepcopy(model.backbone_k.state_dict())
    q = model.backbone_q.state_dict()
    hk, hq = model.head_one_k.fc.weight.clone(), model.head_one_q.fc.weight.clone()
    model.after_step(0, 100)  # m = 0.999
    for name, p in model.backbone_k.named_parameters():
        torch.testing.assert_close(p, 0.999 * k_before[name] + 0.001 * q[name])
    for name, b in model.backbone_k.named_buffers():
        assert torch.equal(b, k_before[name]), name
    torch.testing.assert_close(model.head_one_k.fc.weight, 0.999 * hk + 0.001 * hq)


def test_lam_margin_fallback_is_plain_mixup():
    model = make_model()
    randomize_mix_block(model)
    x, _ = batch()
    z = model.backbone_k(x)[0]
    idx_mb, idx_bb = torch.randperm(6), torch.randperm(6)
    _, x_bb, _ = model._mix(x, z, 0.5, idx_mb, 0.05, idx_bb, True, False)
    torch.testing.assert_close(x_bb, 0.05 * x + 0.95 * x[idx_bb])
    _, x_bb2, _ = model._mix(x, z, 0.5, idx_mb, 0.3, idx_bb, False, False)
    assert (x_bb2 - (0.3 * x + 0.7 * x[idx_bb])).abs().max() > 1e-3


@pytest.mark.parametrize("lam_bb,fallback", [(0.05, True), (0.08, True), (0.5, False), (0.93, True)])
def test_lam_margin_decision(monkeypatch, lam_bb, fallback):
    model = make_model()
    seen = {}
    monkeypatch.setattr(model, "sample_lam", lambda size=None: [0.4, lam_bb])
    orig = model._mix

    def spy(*args):
        seen["fallback"] = args[-2]
        return orig(*args)

    monkeypatch.setattr(model, "_mix", spy)
    model.forward_train(*batch())
    assert seen["fallback"] is fallback


def test_forward_shapes_and_four_heads():
    model = make_model()
    x, y = batch()
    loss, logs = model.forward_train(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(logs) >= {"loss_mix_q", "loss_one_q", "loss_mix_k", "loss_mask"}
    model.eval()
    out = model.predict(x)
    assert list(out) == ["one_k", "mix_k", "one_q", "mix_q"]
    assert all(v.shape == (6, 10) for v in out.values())


def test_initial_automix_mask_is_near_mixup_half():
    model = make_model()
    x, _ = batch()
    z = model.backbone_k(x)[0]
    mask = model.mix_block(z, 0.5, torch.randperm(6), x.shape[-2:])
    assert (mask - 0.5).abs().max() < 0.02


def test_seeded_runs_repeat_exactly():
    def run():
        model = make_model(seed=7)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        torch.manual_seed(7)
        losses = []
        for step in range(3):
            loss, _ = model.forward_train(*batch(seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.after_step(step, 3)
            losses.append(loss.item())
        return losses, model.state_dict()

    (l1, s1), (l2, s2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_no_fixed_point_permutations():
    from fastmix.functional import random_permutation
    for n in (2, 3, 17, 100):
        for _ in range(20):
            p = random_permutation(n, "cpu", no_fixed_points=True)
            assert sorted(p.tolist()) == list(range(n))
            assert (p != torch.arange(n)).all()


def test_api_misuse_errors():
    model = make_model()
    x, y = batch()
    with pytest.raises(ValueError, match="length N"):
        model.forward_train(x, y[:3])
    with pytest.raises(TypeError, match="int64"):
        model.forward_train(x, y.float())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        model.forward_train(x[0], y)
    with pytest.raises(ValueError, match="out_channels"):
        AutoMix(torch.nn.Conv2d(1, 4, 3), 10)


def test_any_cnn_plugs_in_through_feature_tap():
    from fastmix.backbones import FeatureTap
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.ReLU()))
    net.add_module("mid", torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU()))
    net.add_module("top", torch.nn.Sequential(torch.nn.Conv2d(12, 16, 3, stride=2, padding=1), torch.nn.ReLU()))
    tap = FeatureTap(net, "mid", "top", (12, 16))
    model = AutoMix(tap, 10, seed=0, fused=False)
    x, y = batch(n=4)  # 16x16 -> stage "mid" 4x4, upsampled x4 to the image
    loss, _ = model.forward_train(x, y)
    loss.backward()
    assert torch.isfinite(loss) and model.mix_block.query.weight.grad is not None
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        FeatureTap(net, "nope", "top", (12, 16))


def test_k_early_exit_skips_stage4_of_the_clean_pass():
    model = make_model(k_early_exit=True)
    x, y = batch()
    calls = []
    model.backbone_k.layer4.register_forward_hook(lambda *a: calls.append(1))
    model.forward_train(x, y)
    assert len(calls) == 1  # only the pass on the Mix Block's images
    plain = make_model()
    calls.clear()
    plain.backbone_k.layer4.register_forward_hook(lambda *a: calls.append(1))
    plain.forward_train(x, y)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="tap_only"):
        from fastmix.backbones import FeatureTap
        AutoMix(FeatureTap(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), "0", "0", (4, 4)), 10,
                k_early_exit=True)


# ---- the official ViT options: switch_off and mask_adjust -------------------------------------
def _official_adjust(mask_bb, lam0, epsilon=1e-8):
    """spec §2.1's mask_adjust, literally as the official step does it: in-place rows of the
    two-channel mask [N, 2, H, W] (channel 0 the image's weight), λ the Mix Block's."""
    mask_bb = mask_bb.clone()
    _mask = mask_bb[:, 0, :, :].clamp(min=epsilon, max=1 - epsilon)
    _mean = _mask.mean(dim=[1, 2])
    larg, less = _mean > lam0 + epsilon, _mean < lam0 - epsilon
    mask_bb[larg, 0] = _mask[larg] * (lam0 / _mean[larg].view(-1, 1, 1))
    mask_bb[larg, 1] = 1 - mask_bb[larg, 0]
    mask_bb[less, 1] = (1 - _mask[less]) * ((1 - lam0) / (1 - _mean[less].view(-1, 1, 1)))
    mask_bb[less, 0] = 1 - mask_bb[less, 1]
    return mask_bb


def test_mask_adjust_is_the_official_rescale():
    from fastmix.methods.automix import adjust_mask
    g = torch.Generator().manual_seed(3)
    s = torch.sigmoid(torch.randn(7, 1, 9, 11, generator=g) * 2 + torch.linspace(-2, 2, 7).view(-1, 1, 1, 1))
    for lam in (0.2, 0.5, 0.83):
        ours = adjust_mask(s, lam)
        ref = _official_adjust(torch.cat([1 - s, s], 1), lam)[:, 1:]
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        means = (1 - ours).mean(dim=(1, 2, 3))
        moved = ~torch.isclose((1 - s).mean(dim=(1, 2, 3)), torch.tensor(lam), atol=1e-7)
        assert moved.sum() >= 5
        torch.testing.assert_close(means[moved], torch.full_like(means[moved], lam), atol=1e-5, rtol=0)


def test_mask_adjust_in_the_step_makes_the_bb_mask_mean_lambda_mb():
    model = make_model(mask_adjust=1.0)
    randomize_mix_block(model)
    x, _ = batch(6)
    index_mb, index_bb = torch.tensor([1, 2, 3, 4, 5, 0]), torch.tensor([3, 4, 5, 0, 1, 2])
    with torch.no_grad():
        z = model.backbone_k(x)[0]
        _, x_bb, _ = model._mix(x, z, 0.3, index_mb, 0.6, index_bb, False, False, adjust=True)
        _, x_plain, _ = model._mix(x, z, 0.3, index_mb, 0.6, index_bb, False, False)
    s = (x_bb - x) / (x[index_bb] - x)                  # the partner's weight, per pixel
    kept = (1 - s).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kept, torch.full_like(kept, 0.3), atol=2e-3, rtol=0)   # λ_mb
    assert not torch.allclose(x_bb, x_plain)


def test_switch_off_skips_the_momentum_encoders_mixed_pass():
    model = make_model(switch_off=0.5)
    x, y = batch(6)
    draws = [model.draw(x)["train_mb"] for _ in range(400)]
    assert 0.4 < sum(draws) / len(draws) < 0.6
    calls = []
    model.head_mix_k.register_forward_hook(lambda *a: calls.append(1))
    d = model.draw(x)
    d["train_mb"] = False
    loss_off, logs = model.losses(x, y, d)
    assert calls == [] and logs["mb_trained"].item() == 0.0 and logs["loss_mix_k"].item() == 0.0
    loss_off.backward()
    assert all(p.grad is not None for p in model.mix_block.parameters())   # the mask loss
    d["train_mb"] = True
    loss_on, logs = model.losses(x, y, d)
    assert calls == [1] and logs["loss_mix_k"].item() > 0
    torch.testing.assert_close(loss_on - loss_off, logs["loss_mix_k"], rtol=1e-5, atol=1e-6)


def test_off_options_draw_nothing_more():
    """Without switch_off / mask_adjust a step draws exactly what it drew before they existed:
    runs keep their random streams (the committed studies regenerate)."""
    x, _ = batch(6)
    a, b = make_model(), make_model(switch_off=1.0)
    da, db = a.draw(x), b.draw(x)
    assert set(da) == set(db) == {"lam_mb", "lam_bb", "index_mb", "index_bb"}
    assert a.rng.random() == b.rng.random()
