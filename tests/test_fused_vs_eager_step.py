"""A whole training step with the fused kernels equals the eager step: loss and every
parameter gradient (on CPU the kernels run under the Triton interpreter)."""
import copy

import pytest
import torch

from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.mixup import MixupClassifier


def _step(model, x, y, seed):
    torch.manual_seed(seed)  # same permutations for both models
    loss, logs = model.forward_train(x, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), logs, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _compare(eager, fused, x, y, seed=0):
    le, logs_e, ge = _step(eager, x, y, seed)
    lf, logs_f, gf = _step(fused, x, y, seed)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-6)
    for k in logs_e:
        torch.testing.assert_close(torch.as_tensor(logs_f[k]), torch.as_tensor(logs_e[k]),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert ge.keys() == gf.keys()
    for name in ge:
        a, b = gf[name], ge[name]
        assert (a is None) == (b is None), name
        if b is not None:
            scale = b.abs().max().clamp_min(1e-12)
            err = ((a - b).abs().max() / scale).item()
            assert err < 1e-4, f"{name}: relative error {err:.2e}"
    # the running statistics moved identically too
    for (n, be), bf in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _pair(lam_concat=False, **kw):
    torch.manual_seed(0)
    eager = AutoMix(build_backbone("resnet_small", in_chans=3), 10, seed=5, fused=False,
                    lam_concat=lam_concat, **kw)
    with torch.no_grad():  # a trained-looking Mix Block, so the masks are far from 0.5
        for p in eager.mix_block.parameters():
            p.normal_(0, 0.2)
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def _batch(n=5, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("lam_concat", [False, True])
def test_automix_step_fused_equals_eager(lam_concat, monkeypatch):
    import fastmix.kernels.mask_mix as mm
    import fastmix.kernels.mixblock_attn as ma
    calls = []
    for mod, name in ((mm, "mix_images_pair"), (ma, "mixblock_attention")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    eager, fused = _pair(lam_concat)
    x, y = _batch()
    _compare(eager, fused, x, y)
    assert calls.count("mixblock_attention") == 2 and calls.count("mix_images_pair") == 1


def test_automix_step_fused_equals_eager_mixup_fallback(monkeypatch):
    eager, fused = _pair()
    for m in (eager, fused):
        monkeypatch.setattr(m, "sample_lam", lambda size=None: [0.35, 0.04])
    x, y = _batch()
    _compare(eager, fused, x, y)


def test_automix_step_fused_equals_eager_bilinear_odd_size():
    eager, fused = _pair(upsample="bilinear")
    x, y = _batch(n=3, size=18)  # stage-3 map 5x5 -> 18x18: a non-integer ratio
    _compare(eager, fused, x, y)


@pytest.mark.parametrize("method", ["mixup", "vanilla"])
def test_baseline_step_fused_equals_eager(method):
    torch.manual_seed(0)
    eager = MixupClassifier(build_backbone("resnet_small", 3), 10, method=method, seed=2, fused=False)
    fused = copy.deepcopy(eager)
    fused.fused = True
    x, y = _batch()
    _compare(eager, fused, x, y)
