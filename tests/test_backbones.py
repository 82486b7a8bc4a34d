"""The backbones are torchvision's and timm's own networks, and an export is their checkpoint.

For each family (timm ``resnet18``, ``convnext_atto``, ``efficientnet_b0``; torchvision's
``resnet18`` built by ``build_backbone``; torchvision's RegNetY-400MF through ``FeatureTap``;
fastmix's CIFAR ResNet and WideResNet): one training step of AutoMix and of ``Classifier``
(+ EMA) on 2x3x64x64 images, then every head exported, loaded with ``strict=True`` (no key
renamed) into the plain model
(``timm.create_model(name, num_classes=K)``, ``torchvision.models.<arch>(num_classes=K)``, the
wrapped model, ``PlainClassifier``), and the plain model's logits compared with
``model.predict(x)[head]``. Also: ``timm:efficientnet_b0`` keeps every timm parameter but the
classifier; the ImageNet-stem ResNets are torchvision's modules, load ``--init-weights`` and keep
``tap_only`` / ``mix_at`` / ``mask_layer``."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="needs torchvision (the models venv)")
timm = pytest.importorskip("timm", reason="needs timm (the models venv)")

from fastmix.backbones import (FeatureTap, PlainClassifier, TimmBackbone,  # noqa: E402
                               TorchvisionResNet, build_backbone, load_torchvision_weights,
                               plain_model)
from fastmix.checkpoint import export_classifier  # noqa: E402
from fastmix.methods import AutoMix, Classifier, ManifoldMix, Mixup  # noqa: E402

pytestmark = pytest.mark.models   # needs torchvision + timm (the models venv)

K = 7


def _n(module):
    return sum(p.numel() for p in module.parameters())


def _batch(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


def _train_one_step(model, size=64):
    x, y = _batch(size=size)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loss, _ = model.forward_train(x, y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.after_step(0, 10)
    return model.eval()


# family: (build the backbone, build the plain model an export loads into)
FAMILIES = {
    "timm-resnet18": (lambda: build_backbone("timm:resnet18"),
                      lambda: timm.create_model("resnet18", num_classes=K)),
    "timm-convnext_atto": (lambda: build_backbone("timm:convnext_atto"),
                           lambda: timm.create_model("convnext_atto", num_classes=K)),
    "timm-efficientnet_b0": (lambda: build_backbone("timm:efficientnet_b0"),
                             lambda: timm.create_model("efficientnet_b0", num_classes=K)),
    "torchvision-resnet18": (lambda: build_backbone("resnet18"),
                             lambda: torchvision.models.resnet18(num_classes=K)),
    # the wrapped model has 3 classes: the export replaces its fc by the K-class head
    "featuretap-torchvision-regnet_y_400mf": (
        lambda: FeatureTap(torchvision.models.regnet_y_400mf(num_classes=3),
                           "trunk_output.block3", "trunk_output.block4", (208, 440),
                           classifier="fc"),
        lambda: torchvision.models.regnet_y_400mf(num_classes=K)),
    "cifar-resnet_small": (lambda: build_backbone("resnet_small"),
                           lambda: PlainClassifier(build_backbone("resnet_small"), K)),
    "wrn16_1": (lambda: build_backbone("wrn16_1"),
                lambda: PlainClassifier(build_backbone("wrn16_1"), K)),
}


@pytest.mark.parametrize("method", ["automix", "classifier"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_strictly_into_the_plain_model_with_the_same_logits(family, method,
                                                                           tmp_path):
    make_backbone, make_plain = FAMILIES[family]
    torch.manual_seed(0)
    backbone = make_backbone()
    if method == "automix":
        model = AutoMix(backbone, K, seed=0, fused=False)
    else:
        model = Classifier(backbone, K, Mixup(), ema=dict(momentum=0.5, end=0.5, warmup=0.0))
        assert model.backbone is backbone and model.head.fc.out_features == K
    _train_one_step(model)
    x, _ = _batch(seed=1)
    logits = model.predict(x)
    assert set(logits) == set(model.head_names)
    for head in model.head_names:
        path = tmp_path / f"{head}.pt"
        assert export_classifier(model, str(path), head) == head
        state = torch.load(path, weights_only=True)
        plain = make_plain().eval()
        assert sorted(state) == sorted(plain.state_dict()), head     # no prefix, nothing extra
        plain.load_state_dict(state, strict=True)
        with torch.no_grad():
            ours = plain(x)
        assert ours.shape == (2, K) and torch.isfinite(logits[head]).all()
        torch.testing.assert_close(ours, logits[head], rtol=1e-5, atol=1e-5, msg=head)


def test_plain_model_matches_build_backbone(tmp_path):
    """``fastmix.backbones.plain_model(arch, K)`` is the model each arch's export loads into."""
    for arch, cls in (("timm:convnext_atto", timm.models.ConvNeXt),
                      ("resnet18", torchvision.models.ResNet),
                      ("resnet_small", PlainClassifier)):
        torch.manual_seed(0)
        model = Classifier(build_backbone(arch), K, Mixup())
        export_classifier(model.eval(), str(tmp_path / "m.pt"))
        plain = plain_model(arch, K).eval()
        assert type(plain) is cls
        plain.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
        x, _ = _batch(seed=2)
        torch.testing.assert_close(plain(x), model.predict(x)["cls"], rtol=1e-5, atol=1e-5)


# ---- timm ---------------------------------------------------------------------------------------
def test_timm_efficientnet_b0_keeps_every_parameter_but_the_classifier():
    bb = build_backbone("timm:efficientnet_b0")
    full = timm.create_model("efficientnet_b0", num_classes=K)
    classifier = full.get_classifier()
    assert isinstance(classifier, torch.nn.Linear) and classifier.in_features == 1280
    assert _n(bb) == _n(full) - _n(classifier) == 4_007_548
    # features_only=True, used before, dropped conv_head/bn2: 3,595,388 parameters
    assert _n(bb) - 3_595_388 == _n(full.conv_head) + _n(full.bn2) == 412_160
    assert sorted(bb.model.state_dict()) == sorted(
        k for k in full.state_dict() if not k.startswith("classifier."))
    assert bb.out_channels == (112, 1280) and bb.out_channels[1] == bb.model.num_features
    assert (bb.tap_module, bb.tap_stride, bb.classifier_name) == ("blocks.4", 16, "classifier")
    # the final features are forward_features' (after conv_head / bn2), pooled as timm's head
    bb.eval()
    x, _ = _batch()
    with torch.no_grad():
        tap, final = bb(x)
        feats = bb.model.forward_features(x)
    assert feats.shape == (2, 1280, 2, 2) and final.shape == (2, 1280, 1, 1)
    torch.testing.assert_close(final.flatten(1), feats.mean((2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,tap,classifier", [("resnet18", "layer3", "fc"),
                                                 ("convnext_atto", "stages.2", "head.fc"),
                                                 ("efficientnet_b0", "blocks.4", "classifier")])
def test_timm_taps_and_final_are_timms(name, tap, classifier):
    """The tap is the output of the module ``feature_info[-2]`` names (a forward hook on the same
    network agrees); ``final`` is timm's pre-logits ``forward_head(forward_features(x),
    pre_logits=True)``: for ConvNeXt that includes ``head.norm`` (between pool and fc), so
    fastmix's pool + Linear on it is timm's ``forward_head``. ``tap_only`` stops at the tap."""
    torch.manual_seed(0)
    bb = build_backbone(f"timm:{name}").eval()
    assert isinstance(bb, TimmBackbone) and bb.model.feature_info[-2]["module"] == tap
    assert bb.tap_module == tap and bb.classifier_name == classifier
    seen = []
    handle = bb.model.get_submodule(tap).register_forward_hook(lambda m, i, o: seen.append(o))
    x, _ = _batch()
    with torch.no_grad():
        f_tap, final = bb(x)
        pre = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        (only,) = bb(x, tap_only=True)
    handle.remove()
    assert len(seen) == 3                                   # forward, forward_features, tap_only
    assert torch.equal(f_tap, seen[0]) and torch.equal(only, seen[0])
    assert f_tap.shape == (2, bb.out_channels[0], 4, 4)     # stride 16
    assert final.shape == (2, bb.out_channels[1], 1, 1)
    torch.testing.assert_close(final.flatten(1), pre, rtol=0, atol=0)
    if name == "convnext_atto":                             # the head norm is in the backbone
        assert "head.norm.weight" in bb.model.state_dict()


def test_timm_backbone_k_early_exit_stops_at_the_tap():
    torch.manual_seed(0)
    model = AutoMix(build_backbone("timm:resnet18"), K, seed=0, fused=False, k_early_exit=True)
    calls = []
    model.backbone_k.model.layer4.register_forward_hook(lambda *a: calls.append(1))
    x, y = _batch(n=4)
    loss, _ = model.forward_train(x, y)
    loss.backward()
    assert len(calls) == 1          # only the momentum encoder's pass on the Mix Block's images


# ---- torchvision's ImageNet-stem ResNets ----------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext101_32x4d"])
def test_imagenet_resnets_are_torchvisions_network(arch):
    torch.manual_seed(0)
    bb = build_backbone(arch)
    assert isinstance(bb, TorchvisionResNet)
    block = torchvision.models.resnet.BasicBlock if arch == "resnet18" \
        else torchvision.models.resnet.Bottleneck
    assert all(type(b) is block for layer in (bb.layer1, bb.layer4) for b in layer)
    tv = plain_model(arch, 1000)
    assert sorted(bb.state_dict()) == sorted(k for k in tv.state_dict() if not k.startswith("fc."))
    assert _n(bb) == _n(tv) - _n(tv.fc)
    if arch == "resnext101_32x4d":      # no torchvision builder: torchvision's ResNet class,
        ref = timm.create_model(arch)   # module for module timm's ResNeXt-101 32x4d
        assert _n(tv) == _n(ref) == 44_177_704
        tv.load_state_dict(ref.state_dict(), strict=True)
    else:
        assert type(tv) is torchvision.models.ResNet
    missing, unexpected = tv.load_state_dict(bb.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    bb.eval(), tv.eval()
    x, _ = _batch()
    with torch.no_grad():
        f3, final = bb(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        t3 = tv.layer3(tv.layer2(tv.layer1(h)))
        t4 = tv.layer4(t3)
    assert torch.equal(f3, t3) and torch.equal(final, t4)


def test_init_weights_load_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "r18.pt"
    torch.save(tv.state_dict(), path)
    bb = build_backbone("resnet18")
    assert load_torchvision_weights(bb, str(path)) == len(tv.state_dict()) - 2   # fc dropped
    own = bb.state_dict()
    assert all(torch.equal(own[k], v) for k, v in tv.state_dict().items()
               if not k.startswith("fc."))
    bb.eval()
    x, _ = _batch()
    with torch.no_grad():
        final = bb(x)[1]
        logits = tv(x)
    torch.testing.assert_close(tv.fc(final.mean((2, 3))), logits, rtol=1e-5, atol=1e-5)
    # a file of another architecture is refused before anything changes
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this backbone"):
        load_torchvision_weights(bb, str(tmp_path / "r34.pt"))
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    with pytest.raises(ValueError, match="ImageNet-stem"):
        load_torchvision_weights(build_backbone("timm:resnet18"), str(path))


def test_imagenet_resnet_tap_only_and_mix_at():
    torch.manual_seed(0)
    bb = build_backbone("resnet18").eval()
    calls = []
    bb.layer4.register_forward_hook(lambda *a: calls.append(1))
    x, _ = _batch()
    with torch.no_grad():
        tap, final = bb(x)
        (only,) = bb(x, tap_only=True)
    assert torch.equal(only, tap) and len(calls) == 1          # tap_only skipped layer4
    # mix_at k: mix_fn sees the input (k = 0) or stage k's output
    for k, shape in enumerate([(2, 3, 64, 64), (2, 64, 16, 16), (2, 128, 8, 8),
                               (2, 256, 4, 4)]):
        seen = []
        with torch.no_grad():
            out = bb(x, mix_at=k, mix_fn=lambda h: seen.append(h.shape) or torch.zeros_like(h))
        assert seen == [shape]
        if k > 0:                      # the zeroed stage output flows on (eval-mode BN: 0 -> 0)
            assert out[1].abs().max() == 0
    # ManifoldMix trains on it
    model = Classifier(build_backbone("resnet18"), K, ManifoldMix())
    _train_one_step(model)


@pytest.mark.parametrize("mask_layer", [0, 1, 2, 3])
def test_imagenet_resnet_mask_layer_moves_the_tap(mask_layer):
    torch.manual_seed(0)
    bb = build_backbone("resnet18", mask_layer=mask_layer).eval()
    seen = []
    bb.get_submodule(f"layer{mask_layer + 1}").register_forward_hook(
        lambda m, i, o: seen.append(o))
    x, _ = _batch()
    with torch.no_grad():
        tap, final = bb(x)
    channels, stride = (64, 128, 256, 512)[mask_layer], 4 * 2 ** mask_layer
    assert bb.out_channels == (channels, 512) and bb.tap_stride == stride
    assert torch.equal(tap, seen[0]) and tap.shape == (2, channels, 64 // stride, 64 // stride)
    assert AutoMix(bb, K, fused=False).mix_block.query.in_channels == channels


def test_featuretap_classifier_must_be_a_linear(tmp_path):
    net = torchvision.models.mobilenet_v3_small(num_classes=K)     # classifier: an MLP
    bb = FeatureTap(net, "features.8", "features.12", (48, 576), classifier="classifier")
    model = Classifier(bb, K, Mixup())
    with pytest.raises(ValueError, match="not a Linear"):
        export_classifier(model, str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="classifier"):
        FeatureTap(net, "features.8", "features.12", (48, 576), classifier=None)
