"""The methods layer (fastmix.methods): one class per method carrying its facts, the
model-free mixers as callables, every method's ``.mix()``, and the EMA for every method."""
import ast
import copy
import os

import numpy as np
import pytest
import torch

import fastmix.methods as M
from fastmix import config
from fastmix.backbones import build_backbone
from fastmix.methods import Classifier, ema_update_, soft_targets
from fastmix.mixup import MixupClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10


def _images(n=6, h=16, w=16):
    """Image i is the constant i + 1 (every channel): a mixed pixel's value says whose it is."""
    return (torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1)
            .expand(n, 3, h, w).contiguous())


def test_the_method_list_and_facts_come_from_the_classes():
    assert config.METHODS == tuple(M.METHODS) and config.METHODS[0] == "automix"
    for name, cls in M.METHODS.items():
        assert cls.name == name
        assert config.DEFAULT_ALPHA[name] == cls.default_alpha
    assert {n for n, c in M.METHODS.items() if not c.capturable} == {"manifoldmix", "puzzlemix"}
    assert set(config.CUTTING_METHODS) == {"cutmix", "saliencymix", "fmix", "resizemix",
                                           "gridmix"}
    assert set(M.MIXERS) == set(M.METHODS) - {"automix", "manifoldmix", "puzzlemix"}
    assert M.facts("cutmix") == dict(name="cutmix", default_alpha=0.2, capturable=True,
                                     needs=(), recipe="cutting", draws_lam=True,
                                     modes=("batch", "pair", "elem"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        M.method_class("nope")


def _imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_config_is_no_longer_tied_to_a_method_implementation():
    fm = {m for m in _imports("fastmix/config.py") if m.startswith("fastmix")}
    assert not {m for m in fm if m.startswith(("fastmix.mixup", "fastmix.automix", "fastmix.mixes",
                                               "fastmix.puzzlemix", "fastmix.methods."))}, fm
    assert "fastmix.methods" in fm


def _string_compares_on_method(path):
    """``method == "..."``-style comparisons (``method``/``cfg.method`` against a string)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left] + list(node.comparators)
        named = any((isinstance(s, ast.Name) and s.id == "method") or
                    (isinstance(s, ast.Attribute) and s.attr == "method") for s in sides)
        literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                      isinstance(s, (ast.Tuple, ast.List)) for s in sides)
        if named and literal:
            found.append(node.lineno)
    return found


@pytest.mark.parametrize("path", ["fastmix/config.py", "fastmix/engine.py", "fastmix/step.py",
                                  "fastmix/checkpoint.py", "fastmix/selfcheck.py", "train.py",
                                  "fastmix/train_cli.py"])
def test_no_method_switch_outside_the_methods_package(path):
    assert _string_compares_on_method(path) == []


@pytest.mark.parametrize("name", sorted(M.MIXERS))
def test_every_mixer_is_a_callable_for_any_loop(name):
    """``mixer(x, y) -> (x, soft targets)``: the targets' weights are the pixels' shares."""
    x, y = _images(), torch.tensor([0, 3, 1, 7, 3, 9])
    mixer = M.MIXERS[name](num_classes=K, seed=0)
    torch.manual_seed(0)
    x_mix, soft = mixer(x, y)
    assert x_mix.shape == x.shape and soft.shape == (6, K)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    torch.manual_seed(0)
    x2, y_a, y_b, lam = M.MIXERS[name](num_classes=K, seed=0).mix(x, y)
    assert torch.equal(x2, x_mix)
    if y_b is None:                                   # vanilla
        assert torch.equal(x_mix, x) and torch.equal(soft.argmax(1), y)
        return
    lam_t = torch.as_tensor(lam, dtype=torch.float32).expand(6)
    expect = soft_targets(y_a, y_b, lam_t, K)
    torch.testing.assert_close(soft, expect)


@pytest.mark.parametrize("name", ["cutmix", "fmix", "gridmix", "resizemix", "saliencymix"])
def test_lambda_is_the_share_of_the_own_pixels(name):
    x = _images(4, 20, 20)
    y = torch.arange(4)
    torch.manual_seed(1)
    mixer = M.MIXERS[name](alpha=1.0, num_classes=K, seed=3)
    draw = mixer.draw(x)
    x_mix, _, _, lam = mixer.mix_with(x, y, draw)
    own = (x_mix == x).all(1).float().mean(dim=(1, 2))        # pixels still the image's own
    partner_is_self = draw["index"] == torch.arange(4)
    for i in range(4):
        if not partner_is_self[i]:
            assert float(own[i]) == pytest.approx(float(lam), abs=1e-6), (name, i)


@pytest.mark.parametrize("method", list(M.METHODS))
def test_every_methods_mix_works(method):
    torch.manual_seed(0)
    backbone = build_backbone("resnet_small", 3)
    model = (M.AutoMix(backbone, K, seed=0) if method == "automix" else
             MixupClassifier(backbone, K, method=method, seed=0))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, K, (6,))
    x_mix, y_a, y_b, lam = model.mix(x, y)
    assert x_mix.shape == x.shape and torch.isfinite(x_mix).all()
    lam = torch.as_tensor(lam, dtype=torch.float32)
    assert ((lam >= 0) & (lam <= 1)).all()
    if method in ("puzzlemix", "automix"):
        assert lam.shape == (6,)                      # per-sample λ (kept areas)


def test_puzzlemix_needs_the_model_and_says_so():
    mixer = M.PuzzleMix(num_classes=K, seed=0)
    with pytest.raises(ValueError, match="model=classifier"):
        mixer(torch.randn(4, 3, 16, 16), torch.arange(4))


def test_soft_targets_with_label_smoothing_are_timms_mixup_target():
    y_a, y_b = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    t = soft_targets(y_a, y_b, 0.7, 3, 0.3)
    off, on = 0.1, 0.8
    assert t[0].tolist() == pytest.approx([off, 0.7 * on + 0.3 * off, 0.7 * off + 0.3 * on])
    lam = torch.tensor([0.2, 0.5, 1.0])
    torch.testing.assert_close(soft_targets(y_a, y_b, lam, 3)[2], torch.tensor([1., 0., 0.]))


# ---- the EMA -------------------------------------------------------------------------------
def test_ema_update_matches_a_lerp_and_skips_a_non_finite_step():
    torch.manual_seed(0)
    ema = [torch.randn(5), torch.randn(3, 2)]
    online = [torch.randn(5), torch.randn(3, 2)]
    want = [torch.lerp(e, o, 0.1) for e, o in zip(ema, online)]
    a = [t.clone() for t in ema]
    ema_update_(a, online, 0.1)
    b = [t.clone() for t in ema]
    ema_update_(b, online, torch.tensor(0.1), finite=torch.tensor(True))
    for w, x, z in zip(want, a, b):
        torch.testing.assert_close(x, w)
        torch.testing.assert_close(z, w)
    c = [t.clone() for t in ema]
    ema_update_(c, online, torch.tensor(0.1), finite=torch.tensor(False))
    assert all(torch.equal(x, e) for x, e in zip(c, ema))


def test_an_ema_head_for_any_method():
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet_small", 3), K, M.CutMix(seed=0),
                       ema=dict(momentum=0.5, end=0.5, warmup=0.0))
    assert model.head_names == ("cls", "ema") and model.default_head == "ema"
    assert not any(p.requires_grad for p in model.ema_backbone.parameters())
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head", "ema_backbone",
                                                             "ema_head"}
    before = copy.deepcopy(model.ema_backbone.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, K, (6,))
    loss, _ = model.forward_train(x, y)
    loss.backward()
    opt.step()
    model.after_step(0, 10)
    online = model.backbone.state_dict()
    for k, v in model.ema_backbone.state_dict().items():
        if v.is_floating_point():          # parameters and BN statistics: halfway (m = 0.5)
            torch.testing.assert_close(v, (before[k] + online[k]) / 2, msg=k)
    model.eval()
    out = model.predict(x)
    assert set(out) == {"cls", "ema"}
    backbone, head = model.head_modules()
    assert backbone is model.ema_backbone and head is model.ema_head
    assert model.ema_momentum_at(0, 10) == 0.5
    assert Classifier(build_backbone("resnet_small", 3), K, M.Mixup()).ema_momentum_at(0, 1) is None


def test_ema_flags_are_checked_before_any_work():
    with pytest.raises(ValueError, match="--ema is for the other methods"):
        config.validate_config(config.Config(method="automix", ema=True))
    with pytest.raises(ValueError, match="--export-head ema is not a head of this run"):
        config.validate_config(config.Config(method="mixup", export_head="ema"))
    config.validate_config(config.Config(method="mixup", ema=True, export_head="ema"))


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_per_sample_lambda_trains_through_the_trainer(tmp_path, mode):
    from fastmix.engine import train
    cfg = config.Config(method="cutmix", mix_mode=mode, arch="resnet_small", dataset="synthetic",
                        epochs=1, batch_size=10, train_subset=30, test_subset=10, device="cpu",
                        out=str(tmp_path), progress=False, ema=True)
    summary = train(cfg)
    assert summary["epochs"] == 1 and set(summary["final_top1"]) == {"cls", "ema"}
    with pytest.raises(ValueError, match="per batch only"):
        config.validate_config(config.Config(method="fmix", mix_mode="elem"))


# ---- model(x) and inference_model() (issue: reliability, round three) -----------------------
def _inference_models():
    """A baseline Classifier, one with an EMA head (the default head then) and an AutoMix,
    after one training step (so the heads and the EMA copies differ)."""
    torch.manual_seed(0)
    models = [Classifier(build_backbone("resnet_small", 3), K, M.Mixup(seed=0)),
              Classifier(build_backbone("resnet_small", 3), K, M.CutMix(seed=0),
                         ema=dict(momentum=0.5)),
              M.AutoMix(build_backbone("resnet_small", 3), K, seed=0)]
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, K, (4,))
    for model in models:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss, logs = model(x, y)                  # model(x, y) is still the training step
        assert loss.dim() == 0 and ("loss_cls" in logs or "loss_mix_q" in logs)
        loss.backward()
        opt.step()
        model.after_step(0, 10)
    return models


def test_model_of_images_alone_is_the_inference_heads_logits():
    x = torch.randn(5, 3, 16, 16)
    for model in _inference_models():
        model.eval()
        out = model(x)                            # was: TypeError, forward() wants y
        want = model.predict(x)[model.default_head]
        assert out.shape == (5, K) and torch.equal(out, want), type(model).__name__
        for head in model.head_names:
            assert torch.equal(model.head_logits(x, head), model.predict(x)[head]), head


def test_inference_model_is_a_module_giving_the_heads_logits():
    x = torch.randn(5, 3, 16, 16)
    for model in _inference_models():
        model.train()
        for head in model.head_names:
            net = model.inference_model(head)
            assert isinstance(net, torch.nn.Module) and isinstance(net, M.InferenceModel)
            assert net.head_name == head and not net.training and model.training
            assert all(not m.training for m in net.modules())
            want = copy.deepcopy(model).eval().predict(x)[head]
            assert torch.equal(net(x), want), (type(model).__name__, head)
        net = model.inference_model()
        assert net.head_name == model.default_head
        backbone, head = net                      # the tuple of earlier versions still unpacks
        assert backbone is net.backbone and head is net.head
        # a copy: training the model on does not move the deployed module, nor its mode the model's
        before = net(x)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert torch.equal(net(x), before)
        with pytest.raises(ValueError, match="head must be one of"):
            model.inference_model("nope")


def test_no_repeat_shuffle_with_a_batch_of_one_is_refused():
    """No permutation of one sample without fixed points exists: AutoMix's
    mix_shuffle_no_repeat with a batch of one is refused (it used to mix each sample with
    itself), from the config before any work and from a step."""
    cfg = config.Config(method="automix", batch_size=1, mix_shuffle_no_repeat=True)
    assert "needs --batch-size of at least 2" in " ".join(M.AutoMix.config_problems(cfg))
    assert M.AutoMix.config_problems(config.Config(batch_size=2, mix_shuffle_no_repeat=True)) == []
    assert M.AutoMix.config_problems(config.Config(batch_size=1)) == []
    assert M.Mixup.config_problems(cfg) == []
    with pytest.raises(ValueError, match="needs --batch-size of at least 2"):
        M.AutoMix.build(cfg, build_backbone("resnet_small", 3), K, 2.0)
    model = M.AutoMix(build_backbone("resnet_small", 3), K, seed=0, mix_shuffle_no_repeat=True)
    x, y = torch.randn(1, 3, 16, 16), torch.randint(0, K, (1,))
    with pytest.raises(ValueError, match="without fixed points of 1 element does not exist"):
        model.forward_train(x, y)
    loss, _ = model.forward_train(torch.randn(2, 3, 16, 16), torch.randint(0, K, (2,)))
    assert torch.isfinite(loss)
