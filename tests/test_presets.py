"""The paper's configurations (spec §3) as presets: every row resolved against the spec's own
values, a few training steps of each on synthetic data of its shape, the WideResNet and the
Mix Block's stage (``mask_layer``), the compounding mask-loss schedule (spec §2.3) and
``--init-weights``.

SPEC is written from spec §3's table and its "Data pipelines" list, not from fastmix's code.
"""
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as train_cli  # noqa: E402

from fastmix.backbones import build_backbone, load_torchvision_weights  # noqa: E402
from fastmix.config import PRESETS, resolve  # noqa: E402
from fastmix.schedules import MaskLossWeight  # noqa: E402

# ---- spec §3, one dict per row ---------------------------------------------------------------
# Common to all rows (§3 "Common to all"): α 2, EMA start 0.999, mask loss 0.1 (L1 unless the
# row says L1+Variance), lam_margin 0.08, nearest upsampling, SGD momentum 0.9; EMA warm-up
# window 10% (§2.3 adjust_scope [0.1, 1.0]).
COMMON = dict(alpha=2.0, ema_momentum=0.999, ema_warmup=0.1, mask_loss_weight=0.1,
              mask_loss_mode="L1", lam_margin=0.08, upsample="nearest", momentum=0.9,
              method="automix")
# CIFAR-100 R-18 / RX-50: SGD 0.1 wd 1e-4, the MB in the same group, cosine to 0.05 for all,
# batch 100 on 1 GPU, 400 epochs, EMA end 0.999999, mask loss constant, no λ-concat, stage 3.
CIFAR = dict(COMMON, epochs=400, batch_size=100, devices=1, lr=0.1, min_lr=0.05, mb_lr=0.1,
             mb_min_lr=0.05, mb_momentum=0.9, weight_decay=1e-4, ema_end=0.999999,
             mask_loss_schedule="constant", lam_concat=False, mask_layer=2,
             mix_shuffle_no_repeat=False, init_weights=None)
# Tiny-ImageNet: SGD 0.2 -> 0.05, MB lr 0.1 -> 1e-3 (additional scheduler), 64 px bicubic RRC,
# test at 64 without a crop.
TINY = dict(CIFAR, dataset="imagefolder", image_size=64, data_pipeline="tiny-imagenet", lr=0.2,
            min_lr=0.05, mb_lr=0.1, mb_min_lr=1e-3)
# ImageNet: λ-concat, SGD 0.1 -> 0 wd 1e-4, MB lr 0.1 -> 1e-3 momentum 0.9, 4 x 64, 100 epochs,
# EMA end 0.99999, the compounding cosine hook on the mask loss; RRC 224 bicubic, test 256/224.
IMAGENET = dict(COMMON, dataset="imagefolder", image_size=224, data_pipeline="imagenet",
                epochs=100, batch_size=64, devices=4, lr=0.1, min_lr=0.0, mb_lr=0.1,
                mb_min_lr=1e-3, mb_momentum=0.9, weight_decay=1e-4, ema_end=0.99999,
                mask_loss_schedule="official-cosine", lam_concat=True, mask_layer=2,
                mix_shuffle_no_repeat=False, init_weights=None)
# CUB-200 / Aircraft: torchvision-pretrained, SGD 0.001 wd 5e-4, MB 0.01 -> 5e-4 momentum 0.9,
# backbone cosine to 0, 16 on 1 GPU, 200 epochs, mix_shuffle_no_repeat, Resize 256 + RRC 224
# scale [0.5, 1].
FINE = dict(IMAGENET, data_pipeline="fine-grained", epochs=200, batch_size=16, devices=1,
            lr=1e-3, min_lr=0.0, mb_lr=0.01, mb_min_lr=5e-4, mb_momentum=0.9, weight_decay=5e-4,
            mix_shuffle_no_repeat=True, init_weights="required")

SPEC = {
    "cifar100-r18": dict(CIFAR, dataset="cifar100", arch="resnet18_cifar"),
    "cifar100-rx50": dict(CIFAR, dataset="cifar100", arch="resnext50_cifar"),
    # WRN-28-8: lr 0.03, wd 1e-3, MB lr 0.03 momentum 0, cosine to 1e-3 (all), mask_layer 1
    "cifar100-wrn28-8": dict(CIFAR, dataset="cifar100", arch="wrn28_8", lr=0.03, min_lr=1e-3,
                             weight_decay=1e-3, mb_lr=0.03, mb_min_lr=1e-3, mb_momentum=0.0,
                             mask_layer=1),
    # CIFAR-10: no config in the repository; "presumably the CIFAR-100 recipe with 10 classes"
    "cifar10-r18": dict(CIFAR, dataset="cifar10", arch="resnet18_cifar"),
    "cifar10-rx50": dict(CIFAR, dataset="cifar10", arch="resnext50_cifar"),
    "tinyimagenet-r18": dict(TINY, arch="resnet18_cifar"),
    "tinyimagenet-rx50": dict(TINY, arch="resnext50_cifar", batch_size=50, devices=2),
    "imagenet-r18": dict(IMAGENET, arch="resnet18"),
    "imagenet-r34": dict(IMAGENET, arch="resnet34"),
    "imagenet-r50": dict(IMAGENET, arch="resnet50"),
    "imagenet-r101": dict(IMAGENET, arch="resnet101"),
    "imagenet-rx101": dict(IMAGENET, arch="resnext101_32x4d"),
    "imagenet-r50-m0-ep100": dict(IMAGENET, arch="resnet50", mb_momentum=0.0, epochs=100),
    "imagenet-r50-m09-ep300": dict(IMAGENET, arch="resnet50", mb_momentum=0.9, epochs=300),
    "imagenet-r50-plus": dict(IMAGENET, arch="resnet50", upsample="bilinear",
                              mask_loss_mode="L1+Variance"),
    "cub-r18": dict(FINE, arch="resnet18"),
    "cub-rx50": dict(FINE, arch="resnext50_32x4d", mask_loss_mode="L1+Variance"),
    "aircraft-r18": dict(FINE, arch="resnet18"),
    "aircraft-rx50": dict(FINE, arch="resnext50_32x4d", mask_loss_mode="L1+Variance"),
}
# (image size, classes) of each dataset, for the synthetic batches
SHAPE = {"cifar100": (32, 100), "cifar10": (32, 10), "tinyimagenet": (64, 200),
         "imagenet": (224, 1000), "cub": (224, 200), "aircraft": (224, 100)}


def effective(cfg):
    """The values a run uses: Mix Block settings left None follow the main group, α the
    method's default (as ``build_optimizer`` and ``build_model`` do)."""
    from fastmix.config import DEFAULT_ALPHA
    out = dict(cfg)
    for k, main in (("mb_lr", "lr"), ("mb_min_lr", "min_lr"), ("mb_momentum", "momentum")):
        if out[k] is None:
            out[k] = out[main]
    if out["alpha"] is None:
        out["alpha"] = DEFAULT_ALPHA[out["method"]]
    return out


def test_every_spec_row_has_a_preset():
    spec_rows = set(SPEC)
    assert spec_rows <= set(PRESETS), spec_rows - set(PRESETS)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_resolves_to_the_spec_row(name, capsys):
    assert train_cli.main(["--preset", name, "--print-config"]) == 0
    got = effective(json.loads(capsys.readouterr().out))
    want = SPEC[name]
    wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert not wrong, f"{name}: (resolved, spec) differ: {wrong}"


def test_flags_override_a_preset_and_baselines_keep_their_alpha(capsys):
    assert train_cli.main(["--preset", "imagenet-r50", "--epochs", "300", "--mb-momentum", "0",
                           "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 300 and cfg["mb_momentum"] == 0 and cfg["lam_concat"] is True
    assert train_cli.main(["--preset", "cifar100-r18", "--method", "cutmix", "--print-config"]) == 0
    assert effective(json.loads(capsys.readouterr().out))["alpha"] == 0.2


# ---- a few steps of every preset on synthetic data of its shape -------------------------------
def _torchvision_format_weights(arch, path, num_classes=1000, seed=0):
    """What ``torch.save(torchvision.models.<arch>().state_dict(), path)`` writes: the backbone
    tensors under torchvision's names plus a 1000-class ``fc``."""
    torch.manual_seed(seed)
    state = build_backbone(arch).state_dict()
    c = 2048 if "50" in arch or "101" in arch else 512
    state["fc.weight"] = torch.randn(num_classes, c)
    state["fc.bias"] = torch.randn(num_classes)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_trains_a_few_steps_on_its_shape(name, tmp_path):
    from fastmix.engine import build_step, build_training, set_epoch_lr
    cfg = resolve({}, name)[0]
    size, classes = SHAPE[name.split("-")[0]]
    over = dict(batch_size=2, channels_last=False, amp="none", compile=False, cuda_graphs=False,
                device="cpu", progress=False)
    if cfg.init_weights == "required":
        over["init_weights"] = str(tmp_path / "tv.pt")
        saved = _torchvision_format_weights(cfg.arch, over["init_weights"])
    cfg = resolve(over, name)[0]
    torch.manual_seed(0)
    model, opt, scaler = build_training(cfg, torch.device("cpu"), 3, classes)
    if cfg.init_weights:   # both encoders start from the file's weights (fc dropped)
        for enc in (model.backbone_q, model.backbone_k):
            own = enc.state_dict()
            for k in ("conv1.weight", "layer4.0.bn1.running_var", "layer3.0.conv1.weight"):
                assert torch.equal(own[k], saved[k]), k
    # the Mix Block's stage (mask_layer): layer3 of a ResNet (stride 4 with the CIFAR stem, 16
    # with ImageNet's), stage 2 of WRN-28-8 (stride 2)
    tap, final = model.backbone_q(torch.randn(1, 3, size, size))
    stride = 2 if cfg.arch.startswith("wrn") else 4 if cfg.arch.endswith("_cifar") else 16
    assert tap.shape[-2:] == (size // stride, size // stride)
    lam_ch = 1 if cfg.lam_concat else 0
    assert model.mix_block.query.in_channels == tap.shape[1] + lam_ch
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["mix_block"]["base_lr"] == SPEC[name]["mb_lr"]
    assert groups["mix_block"]["momentum"] == SPEC[name]["mb_momentum"]
    assert groups["main"]["base_lr"] == SPEC[name]["lr"] and groups["main"]["weight_decay"] == SPEC[name]["weight_decay"]
    step_fn, _ = build_step(cfg, model, opt, scaler, torch.device("cpu"))
    set_epoch_lr(opt, 0, cfg.epochs)
    mb0 = [p.detach().clone() for p in model.mix_block.parameters()]
    g = torch.Generator().manual_seed(1)
    total = cfg.epochs * 10
    for step in range(2):
        x = torch.randn(2, 3, size, size, generator=g)
        y = torch.randint(0, classes, (2,), generator=g)
        loss, logs, ok = step_fn(x, y, step, total)
        assert bool(ok) and math.isfinite(float(loss))
    moved = [not torch.equal(a, b) for a, b in zip(mb0, model.mix_block.parameters())]
    assert any(moved)                     # the Mix Block trains
    assert math.isfinite(float(logs["loss_mask"]))


# ---- the mask-loss weight schedule (spec §2.3) -------------------------------------------------
def _hook_simulation(base, T, until):
    """The official hook, literally: before iteration t it sets
    w = annealing_cos(w, 0, t / T) = 0 + (w - 0) / 2 * (cos(pi t / T) + 1), from the current w."""
    w, out = base, []
    for t in range(until):
        w = 0 + (w - 0) / 2 * (math.cos(math.pi * t / T) + 1)
        out.append(w)
    return out


def test_official_cosine_follows_the_hook_recurrence():
    T = 500_400                                  # ImageNet, 100 epochs of 5,004 iterations
    epoch = T // 100
    until = int(0.05 * T)
    sim = _hook_simulation(0.1, T, until)
    sched = MaskLossWeight(0.1, "official-cosine")
    for t in list(range(0, 50)) + list(range(50, until, 997)) + [until - 1]:
        assert sched(t, T) == pytest.approx(sim[t], rel=1e-12, abs=1e-300), t
    assert sched(0, T) == 0.1                    # t = 0: cos(0) = 1, the weight is untouched
    # spec §2.3: halves by about epoch 1.2, 0.0037 at 2% of training, < 1e-12 after about 4%
    half = next(t for t, w in enumerate(sim) if w <= 0.05)
    assert 1.1 < half / epoch < 1.3
    assert sched(int(0.02 * T), T) == pytest.approx(0.0037, rel=0.05)
    first_tiny = next(t for t, w in enumerate(sim) if w < 1e-12)
    assert 0.035 < first_tiny / T < 0.045 and sched(first_tiny, T) < 1e-12
    assert sched(int(0.039 * T), T) > 1e-12 > sched(int(0.041 * T), T)
    # a resumed run queries a later step first: the same value as the uninterrupted sequence
    fresh = MaskLossWeight(0.1, "official-cosine")
    assert fresh(12_345, T) == sched(12_345, T) == sim[12_345]
    # CUB, 200 epochs of 375 iterations (5,994 images / 16): halves around epoch 4.5,
    # < 1e-12 after about 7.4% (spec §2.3)
    T = 200 * 375
    sim = _hook_simulation(0.1, T, int(0.1 * T))
    assert 4.2 < next(t for t, w in enumerate(sim) if w <= 0.05) / 375 < 4.8
    assert 0.07 < next(t for t, w in enumerate(sim) if w < 1e-12) / T < 0.078


def test_other_mask_loss_schedules():
    assert MaskLossWeight(0.1)(12345, 20000) == 0.1
    clean = MaskLossWeight(0.1, "cosine")
    assert clean(0, 100) == 0.1 and clean(50, 100) == pytest.approx(0.05) and clean(100, 100) == 0
    with pytest.raises(ValueError, match="official-cosine"):
        MaskLossWeight(0.1, "linear")


def test_the_training_step_uses_the_scheduled_weight():
    """AutoMix draws the weight of the step the trainer announces (set_progress): the mask
    loss term of step t is w_t times the Mix Block's mask loss, in the eager step and with the
    weight as a tensor (what a CUDA graph replays)."""
    from fastmix.automix import AutoMix
    torch.manual_seed(0)
    model = AutoMix(build_backbone("resnet_small"), 10, mask_loss_schedule="official-cosine",
                    seed=0, fused=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    T = 1000
    for t in (0, 30, 120):
        model.set_progress(t, T)
        draw = model.draw(x)
        assert draw["mask_loss_weight"] == _hook_simulation(0.1, T, t + 1)[t]
        _, logs = model.losses(x, y, draw)
        unit = dict(draw, mask_loss_weight=1.0)
        _, logs1 = model.losses(x, y, unit)
        assert float(logs["loss_mask"]) == pytest.approx(draw["mask_loss_weight"]
                                                         * float(logs1["loss_mask"]), rel=1e-6)
        tensor = dict(draw, mask_loss_weight=torch.tensor(draw["mask_loss_weight"]))
        assert float(model.losses(x, y, tensor)[1]["loss_mask"]) == pytest.approx(
            float(logs["loss_mask"]), rel=1e-6)
    constant = AutoMix(build_backbone("resnet_small"), 10, seed=0, fused=False)
    constant.set_progress(500, T)
    assert "mask_loss_weight" not in constant.draw(x)   # constant: the draws are as before


# ---- --init-weights --------------------------------------------------------------------------
def test_init_weights_load_and_refuse_clearly(tmp_path):
    path = tmp_path / "r18.pt"
    saved = _torchvision_format_weights("resnet18", path)
    bb = build_backbone("resnet18")
    assert load_torchvision_weights(bb, str(path)) == len(saved) - 2      # fc.* dropped
    assert torch.equal(bb.state_dict()["layer2.1.conv2.weight"], saved["layer2.1.conv2.weight"])
    fresh = build_backbone("resnet18")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    # every refusal names the problem and changes nothing
    _torchvision_format_weights("resnet50", tmp_path / "r50.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    cases = [(tmp_path / "missing.pt", "no such file"),
             (tmp_path / "r50.pt", "does not fit this backbone"),
             (tmp_path / "garbage.pt", "not a loadable state dict"),
             (tmp_path / "list.pt", "expected a state dict")]
    for p, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_torchvision_weights(fresh, str(p))
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="ImageNet-stem"):
        load_torchvision_weights(build_backbone("resnet18_cifar"), str(path))


def test_init_weights_never_run_code(tmp_path):
    """A pickle that would run code on load is refused (weights_only=True), and runs nothing."""
    import pickle
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(ValueError, match="not a loadable state dict"):
        load_torchvision_weights(build_backbone("resnet18"), str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_fine_grained_preset_without_weights_stops_before_any_work(tmp_path):
    import subprocess
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "train.py", "--preset", "cub-r18", "--data-dir",
                        str(tmp_path / "nodata"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--init-weights PATH" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "train.py", "--preset", "cub-r18", "--init-weights",
                        str(tmp_path / "none.pt"), "--data-dir", str(tmp_path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and not out.exists()


# ---- WideResNet and the Mix Block's stage -------------------------------------------------------
def test_wide_resnet_28_8_structure():
    from fastmix.backbones import WideResNet
    net = build_backbone("wrn28_8")
    assert isinstance(net, WideResNet) and net.mask_layer == 1
    # WRN-28-8: 4 blocks per stage, widths 128/256/512, 23.4M parameters (the WRN paper's 23.4M)
    assert [len(s) for s in (net.block1, net.block2, net.block3)] == [4, 4, 4]
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(23.36e6, rel=1e-3)
    tap, final = net(torch.randn(2, 3, 32, 32))
    assert tap.shape == (2, 256, 16, 16) and final.shape == (2, 512, 8, 8)
    assert net.out_channels == (256, 512)
    x = torch.randn(2, 3, 32, 32)
    z = net.bn1(net.block3(net.block2(net.block1(net.conv1(x)))))
    torch.testing.assert_close(net(x)[1], torch.nn.functional.leaky_relu(z, 0.1))  # BN + LReLU
    only = net(torch.randn(2, 3, 32, 32), tap_only=True)
    assert len(only) == 1 and only[0].shape == (2, 256, 16, 16)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 1e-3 and m.eps == 1e-3 for m in bns)


@pytest.mark.parametrize("arch,layer,shape", [
    ("resnet18_cifar", None, (256, 8, 8)), ("resnet18_cifar", 1, (128, 16, 16)),
    ("resnet18_cifar", 3, (512, 4, 4)), ("wrn16_1", None, (32, 16, 16)), ("wrn16_1", 2, (64, 8, 8)),
    ("wrn16_1", 0, (16, 32, 32)), ("resnet50", None, (1024, 2, 2)), ("resnet50", 1, (512, 4, 4))])
def test_mask_layer_moves_the_mix_blocks_stage(arch, layer, shape):
    from fastmix.automix import AutoMix
    size = 32
    bb = build_backbone(arch, mask_layer=layer)
    model = AutoMix(bb, 10, seed=0, fused=False)
    assert model.mix_block.in_channels == shape[0]
    seen = []
    project = model.mix_block.project      # the Mix Block's entry: the tapped feature map z
    model.mix_block.project = lambda z, *a, **k: (seen.append(z.shape), project(z, *a, **k))[1]
    x, y = torch.randn(3, 3, size, size), torch.randint(0, 10, (3,))
    loss, _ = model.forward_train(x, y)
    loss.backward()
    assert seen and tuple(seen[0][1:]) == shape
    assert model.mix_block.query.weight.grad is not None


def test_mask_layer_refusals():
    from fastmix.config import Config, validate_config
    with pytest.raises(ValueError, match="stage index 0-2 of --arch wrn28_8"):
        validate_config(Config(arch="wrn28_8", mask_layer=3))
    validate_config(Config(arch="timm:resnet18", mask_layer=2))   # a feature_info index
    with pytest.raises(ValueError, match="feature_info"):
        validate_config(Config(arch="timm:resnet18", mask_layer=-1))
    with pytest.raises(ValueError, match="has 5 feature stages; tap 9"):
        build_backbone("timm:resnet18", mask_layer=9)
    with pytest.raises(ValueError, match="--timm-kwargs applies to --arch timm"):
        validate_config(Config(arch="resnet18", timm_kwargs="img_size=32"))
    with pytest.raises(ValueError, match="stages 0-3"):
        build_backbone("resnet18", mask_layer=4)


def test_devices_mismatch_warns(capsys):
    from fastmix.engine import check_devices
    cfg = resolve({}, "imagenet-r50")[0]
    check_devices(cfg, world=1)
    err = capsys.readouterr().err
    assert "4 device(s) x 64 = 256 images per step; this run has 1 x 64 = 64" in err
    check_devices(cfg, world=4)
    assert capsys.readouterr().err == ""


def test_fine_grained_preset_end_to_end_from_weights(tmp_path):
    """The CUB recipe through train.py on a small ImageFolder: torchvision-format weights, the
    fine-grained pipeline, the compounding mask-loss schedule, the fixed-point-free shuffles."""
    import subprocess
    from test_imagefolder import fexport
    root = tmp_path / "folder"
    assert fexport.main(["--dataset", "fashion-mnist", "--out", str(root), "--limit", "20"]) == 0
    _torchvision_format_weights("resnet18", tmp_path / "r18.pt")
    r = subprocess.run([sys.executable, "train.py", "--preset", "cub-r18", "--init-weights",
                        str(tmp_path / "r18.pt"), "--data-dir", str(root), "--image-size", "32",
                        "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress",
                        "--loader", "torchvision", "--workers", "1", "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preset cub-r18" in r.stderr and "fine-grained pipeline" in r.stderr
    cfg = json.loads((tmp_path / "o" / "summary.json").read_text())["config"]
    assert cfg["init_weights"] == str(tmp_path / "r18.pt") and cfg["lr"] == 1e-3
    assert cfg["mask_loss_schedule"] == "official-cosine" and cfg["mix_shuffle_no_repeat"]
    epoch = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["lr"]["mix_block"] == pytest.approx(0.01)   # epoch 0 of the MB's own cosine
