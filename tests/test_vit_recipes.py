"""The official ViT recipes (docs/official-vit-configs.md, OpenMixup 37e1372): the three ViT
presets against a table written from the configs, AdamW's parameter groups, mmcv's per-step
cosine with its linear warm-up, gradient clipping, the Swin tap, the RandAugment pipelines, and
each preset training two steps on data of its shape with a tiny network of the same family."""
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
from fastmix.backbones import build_backbone
from fastmix.config import resolve
from fastmix.engine import StepLR, build_optimizer, build_step, build_training, step_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- the configs, one dict per preset (from docs/official-vit-configs.md, not from the code) ---
VIT = dict(method="automix", alpha=2.0, dataset="imagefolder", image_size=224,
           optimizer="adamw", lr_schedule="step", warmup_ratio=1e-5, weight_decay=0.05,
           mb_lr=1e-3, mb_min_lr=1e-4, label_smoothing=0.1, lam_concat=True,
           ema_momentum=0.999, ema_warmup=0.25, mask_loss_weight=0.1, mask_loss_mode="L1",
           mask_loss_schedule="official-cosine", lam_margin=0.08, upsample="nearest",
           mask_adjust=0.0, mix_shuffle_no_repeat=False)
SPEC = {
    # C-DeiT: 200 epochs, 100 x 1, lr 5e-4 -> 1e-4, warm-up 5 epochs, clip 10, EMA end 0.99996,
    # switch_off 1.0, drop_path 0.1, out_indices (5, 11), RRC 0.8-1 + RandAugment m7
    "cifar100-deit-s": dict(VIT, arch="timm:deit_small_patch16_224", mask_layer=5,
                            timm_kwargs="drop_path_rate=0.1", epochs=200, batch_size=100,
                            devices=1, lr=5e-4, min_lr=1e-4, warmup_epochs=5, clip_grad=10.0,
                            ema_end=0.99996, switch_off=1.0, data_pipeline="cifar-vit"),
    # C-Swin: as C-DeiT with warm-up 20 epochs, drop_path 0.2, the stage-3 merged map + norm2
    "cifar100-swin-t": dict(VIT, arch="timm:swin_tiny_patch4_window7_224",
                            mask_tap="layers.3.downsample+ln", timm_kwargs="drop_path_rate=0.2",
                            epochs=200, batch_size=100, devices=1, lr=5e-4, min_lr=1e-4,
                            warmup_epochs=20, clip_grad=10.0, ema_end=0.99996, switch_off=1.0,
                            data_pipeline="cifar-vit"),
    # I-DeiT: 300 epochs, 128 x 8, lr 1e-3 -> 1e-5, warm-up 5, clip 5, EMA end 0.99999,
    # switch_off 0.8, timm's RandAugment m9 mstd0.5 inc1
    "imagenet-deit-s": dict(VIT, arch="timm:deit_small_patch16_224", mask_layer=5,
                            timm_kwargs="drop_path_rate=0.1", epochs=300, batch_size=128,
                            devices=8, lr=1e-3, min_lr=1e-5, warmup_epochs=5, clip_grad=5.0,
                            ema_end=0.99999, switch_off=0.8, data_pipeline="deit"),
}
# tiny networks of each family at the presets' 224 px (same tap: DeiT block 6 of patch 16,
# Swin's stage-3 patch merging, 7 x 7)
TINY = {"timm:deit_small_patch16_224": "embed_dim=24,depth=6,num_heads=2,drop_path_rate=0.1",
        "timm:swin_tiny_patch4_window7_224":
            "embed_dim=8,depths=(1,1,1,1),num_heads=(1,1,1,1),drop_path_rate=0.2"}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_vit_preset_resolves_to_the_official_config(name, capsys):
    import json
    assert train_cli.main(["--preset", name, "--print-config"]) == 0
    got = json.loads(capsys.readouterr().out)
    if got["alpha"] is None:
        got["alpha"] = 2.0
    wrong = {k: (got.get(k), v) for k, v in SPEC[name].items() if got.get(k) != v}
    assert not wrong, f"{name}: (resolved, config) differ: {wrong}"


def _tiny(name, **over):
    cfg = resolve(dict(dict(timm_kwargs=TINY[SPEC[name]["arch"]], batch_size=2,
                            channels_last=False, amp="none", compile=False, device="cpu",
                            progress=False), **over), name)[0]
    torch.manual_seed(0)
    return cfg, *build_training(cfg, torch.device("cpu"), 3, 100)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_vit_preset_trains_two_steps_on_its_shape(name):
    cfg, model, opt, scaler = _tiny(name)
    tap, final = model.backbone_q(torch.randn(1, 3, 224, 224))
    # DeiT: block 6's 14 x 14 patch tokens; Swin: the 7 x 7 map after stage 3's merging
    assert tap.shape[-2:] == ((14, 14) if "deit" in name else (7, 7))
    assert model.mix_block.query.in_channels == tap.shape[1] + 1          # λ-concat
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    step_fn, _ = build_step(cfg, model, opt, scaler, torch.device("cpu"))
    set_lr = StepLR(opt, cfg, steps_per_epoch=10)
    mb0 = [p.detach().clone() for p in model.mix_block.parameters()]
    q0 = [p.detach().clone() for p in model.backbone_q.parameters()]
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        set_lr(step, cfg.epochs * 10)
        x = torch.randn(2, 3, 224, 224, generator=g)
        y = torch.randint(0, 100, (2,), generator=g)
        loss, logs, ok = step_fn(x, y, step, cfg.epochs * 10)
        assert bool(ok) and math.isfinite(float(loss))
    assert any(not torch.equal(a, b) for a, b in zip(mb0, model.mix_block.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(q0, model.backbone_q.parameters()))
    # at step 1 of a warm-up of 5 or 20 epochs x 10 steps the main lr is a sliver of its base,
    # the Mix Block's is on its own cosine (no warm-up)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    warm = cfg.warmup_epochs * 10
    assert lrs["main"] == pytest.approx(cfg.lr * (1 - (1 - 1 / warm) * (1 - 1e-5)), rel=1e-3)
    assert lrs["mix_block"] == pytest.approx(cfg.mb_lr, rel=1e-6)


def test_adamw_groups_follow_the_official_weight_decay_rules():
    """Weight decay 0 on norms, biases, cls_token and pos_embed (DeiT) or the relative position
    tables (Swin); 0.05 on linear and conv weights, the Mix Block's included; the Mix Block in
    its own groups at its own lr; the momentum encoder out."""
    for name in ("cifar100-deit-s", "cifar100-swin-t"):
        cfg, model, opt, _ = _tiny(name)
        names = {id(p): n for n, p in model.named_parameters()}
        wd = {names[id(p)]: (g["name"], g["weight_decay"]) for g in opt.param_groups
              for p in g["params"]}
        assert not any(n.startswith(("backbone_k", "head_one_k", "head_mix_k")) for n in wd)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(wd) == trainable
        for n, (group, decay) in wd.items():
            no = (n.endswith(".bias") or "norm" in n or n.endswith(("cls_token", "pos_embed"))
                  or "relative_position_bias_table" in n)
            assert decay == (0.0 if no else 0.05), n
            assert group == ("mix_block" if n.startswith("mix_block.") else "main"), n
        if "deit" in name:
            assert wd["backbone_q.model.cls_token"][1] == 0.0
            assert wd["backbone_q.model.pos_embed"][1] == 0.0
        else:
            tables = [n for n in wd if "relative_position_bias_table" in n]
            assert tables and all(wd[n][1] == 0.0 for n in tables)
        assert wd["mix_block.value.weight"] == ("mix_block", 0.05)


def _mmcv_lr(base, min_lr, it, max_iters, warmup_iters, ratio):
    """mmcv's CosineAnnealingLrUpdaterHook (by_epoch=False) with warmup='linear', literally:
    regular = annealing_cos(base, min_lr, it / max_iters); during warm-up
    k = (1 - it / warmup_iters) * (1 - ratio), lr = regular * (1 - k)."""
    regular = min_lr + 0.5 * (base - min_lr) * (math.cos(math.pi * it / max_iters) + 1)
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - ratio)
        return regular * (1 - k)
    return regular


@pytest.mark.parametrize("it", [0, 1, 7, 249, 250, 251, 5000, 9999])
def test_step_lr_is_mmcvs_cosine_with_linear_warmup(it):
    assert step_lr(5e-4, 1e-4, it, 10000, 250, 1e-5) == pytest.approx(
        _mmcv_lr(5e-4, 1e-4, it, 10000, 250, 1e-5), rel=1e-12)
    # the Mix Block's additional scheduler: the cosine, no warm-up
    assert step_lr(1e-3, 1e-4, it, 10000) == pytest.approx(
        _mmcv_lr(1e-3, 1e-4, it, 10000, 0, 1e-5), rel=1e-12)


def test_the_lr_is_set_before_every_step_of_a_run(tmp_path):
    """train.py with --lr-schedule step and a warm-up: the lr logged after each epoch is the
    per-step schedule's at the epoch's last step (not the per-epoch cosine)."""
    import json
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--preset", "cpu-small", "--method",
                        "vanilla", "--optimizer", "adamw", "--lr", "1e-3", "--min-lr", "1e-5",
                        "--weight-decay", "0.05", "--lr-schedule", "step", "--warmup-epochs",
                        "1", "--clip-grad", "5", "--epochs", "2", "--train-subset", "200",
                        "--test-subset", "100", "--out", str(out), "--no-progress"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(s) for s in open(out / "metrics.jsonl")]
    # 200 images / batch 100 = 2 steps an epoch: the lr of the last step (1, then 3) of 4
    for rec, last in zip(lines, (1, 3)):
        assert rec["lr"]["main"] == pytest.approx(step_lr(1e-3, 1e-5, last, 4, 2, 1e-5))


def test_clip_grad_bounds_the_global_norm_of_every_trained_parameter():
    """--clip-grad: one L2 norm over every parameter with a gradient (the Mix Block's
    included), as mmcv's clip_grad_norm_: the gradients the optimizer stepped with."""
    updates = {}
    for clip in (None, 1e-3):
        cfg = resolve(dict(method="automix", arch="resnet_small", dataset="fashion-mnist",
                           lr=1.0, momentum=0.0, mb_momentum=0.0, weight_decay=0.0,
                           clip_grad=clip, device="cpu", channels_last=False, amp="none",
                           compile=False), "cpu-small")[0]
        torch.manual_seed(0)
        model, opt, scaler = build_training(cfg, torch.device("cpu"), 1, 10)
        step_fn, _ = build_step(cfg, model, opt, scaler, torch.device("cpu"))
        params = [p for g in opt.param_groups for p in g["params"]]
        g = torch.Generator().manual_seed(3)
        step_fn(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g),
                0, 10)
        assert all(p.grad is not None for p in params)
        assert any(n.startswith("mix_block") for n, p in model.named_parameters()
                   if p.grad is not None)
        updates[clip] = torch.cat([p.grad.flatten() for p in params])
    assert updates[None].norm() > 1e-2                     # the raw gradient is far larger
    assert updates[1e-3].norm() == pytest.approx(1e-3, rel=1e-4)
    # the same direction: clipping scales every gradient by one factor
    torch.testing.assert_close(updates[1e-3] / updates[1e-3].norm(),
                               updates[None] / updates[None].norm(), rtol=1e-4, atol=1e-6)


def test_a_skipped_first_adamw_step_leaves_no_trace():
    """A NaN first batch through the fused AdamW step: moments and step count stay as they
    were, so the run equals one that never saw the batch."""
    states = []
    for with_nan in (True, False):
        cfg = resolve(dict(method="vanilla", arch="resnet_small", dataset="fashion-mnist",
                           optimizer="adamw", lr=1e-3, weight_decay=0.05, device="cpu",
                           channels_last=False, amp="none", compile=False), "cpu-small")[0]
        torch.manual_seed(0)
        model, opt, scaler = build_training(cfg, torch.device("cpu"), 1, 10)
        step_fn, guard = build_step(cfg, model, opt, scaler, torch.device("cpu"))
        g = torch.Generator().manual_seed(5)
        if with_nan:
            step_fn(torch.full((8, 1, 28, 28), float("nan")), torch.zeros(8, dtype=torch.long),
                    0, 10)
            assert guard.total.item() == 1
        for s in range(3):
            step_fn(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g),
                    s, 10)
        states.append((model.state_dict(), opt.state_dict()["state"]))
    (ma, oa), (mb, ob) = states
    for k in ma:
        if "num_batches_tracked" not in k:
            assert torch.equal(ma[k], mb[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)


def test_the_swin_tap_is_the_merged_stage_3_map_with_a_plain_layer_norm():
    """Official Swin-T tap: norm2(stage 3 incl. its PatchMerging) = [N, 768, 7, 7]; norm2 never
    trains (only the heads' stage reaches the loss), so it is a LayerNorm without parameters."""
    kw = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    b = build_backbone("timm:swin_tiny_patch4_window7_224", mask_tap="layers.3.downsample+ln",
                       timm_kwargs=kw).eval()
    seen = {}
    b.model.layers[3].downsample.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    x = torch.randn(2, 3, 224, 224)
    tap, final = b(x)
    merged = seen["o"]                                   # NHWC [2, 7, 7, 64]
    assert merged.shape == (2, 7, 7, 64) and tap.shape == (2, 64, 7, 7)
    expect = torch.nn.functional.layer_norm(merged, (64,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(tap, expect)
    assert b.out_channels == (64, 64)
    torch.testing.assert_close(final.flatten(1), b.model.forward_head(
        b.model.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="no module 'layers.9'"):
        build_backbone("timm:swin_tiny_patch4_window7_224", mask_tap="layers.9", timm_kwargs=kw)


def test_a_module_tap_on_a_vit_block_equals_the_feature_info_tap():
    kw = dict(img_size=32, patch_size=4, embed_dim=24, depth=6, num_heads=2)
    a = build_backbone("timm:deit_small_patch16_224", mask_tap="blocks.5", timm_kwargs=kw).eval()
    b = build_backbone("timm:deit_small_patch16_224", mask_layer=5, timm_kwargs=kw).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for u, v in zip(a(x), b(x)):
        torch.testing.assert_close(u, v)


# ---- the RandAugment pipelines -----------------------------------------------------------------
def _folder(root, n=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")


@pytest.mark.parametrize("pipeline", ["cifar-vit", "deit"])
def test_randaugment_pipelines_draw_per_sample_and_leave_global_rngs_alone(tmp_path, pipeline):
    from fastmix.data.imagefolder import ImageFileDataset, scan_imagefolder
    _folder(tmp_path)
    scan = scan_imagefolder(str(tmp_path), "train", quiet=True)
    ds = ImageFileDataset(scan.files, scan.labels, 32, True, seed=0, pipeline=pipeline)
    plain = ImageFileDataset(scan.files, scan.labels, 32, True, seed=0, pipeline="imagenet")
    random.seed(123)
    np.random.seed(123)
    expect_py, expect_np = random.random(), np.random.random()
    random.seed(123)
    np.random.seed(123)
    first = [ds[i][0] for i in range(len(ds))]
    assert (random.random(), np.random.random()) == (expect_py, expect_np)
    again = [ds[i][0] for i in reversed(range(len(ds)))][::-1]   # order does not matter
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, again))
    ds.epoch = 1
    other = [ds[i][0] for i in range(len(ds))]
    assert any(not torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for a, b in zip(first, other))
    # RandAugment changes the crops the plain pipeline gives
    if pipeline == "deit":   # the same crop geometry as imagenet: compare like with like
        assert any(not torch.equal(torch.as_tensor(a), torch.as_tensor(plain[i][0]))
                   for i, a in enumerate(first))


def test_deit_random_erasing_boxes_are_the_ones_timms_pixel_mode_erases(tmp_path):
    """Each sample's box is drawn from (seed, epoch, index) by timm's RandomErasing: the pixels
    timm's own 'pixel' mode changes from the same Python random state are exactly the box; about
    a quarter of the samples get one (p 0.25); the global generators are left alone."""
    from timm.data.random_erasing import RandomErasing
    from fastmix.data.imagefolder import ImageFileDataset, scan_imagefolder
    _folder(tmp_path)
    scan = scan_imagefolder(str(tmp_path), "train", quiet=True)
    ds = ImageFileDataset(scan.files, scan.labels, 224, True, seed=3, pipeline="deit")
    random.seed(7)
    expect = random.random()
    random.seed(7)
    boxes = []
    for epoch in range(100):
        ds.epoch = epoch
        boxes += [(epoch, i, ds.erase_box(i)) for i in range(len(ds))]
    assert random.random() == expect
    hits = [b for b in boxes if b[2][2] > 0]
    assert 0.25 * len(boxes) - 60 < len(hits) < 0.25 * len(boxes) + 60   # 600 draws, ~4.5 std
    for epoch, i, (top, left, h, w) in hits:
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.019 * 224 ** 2 <= h * w <= 224 ** 2 / 3 * 1.03
    timm_re = RandomErasing(probability=0.25, mode="pixel", max_count=1, device="cpu")
    for epoch, i, box in boxes[:60] + hits[:20]:
        ds.epoch = epoch
        img = torch.rand(3, 224, 224) + 5          # the noise never lands near 5
        seed = int(np.random.default_rng((3, epoch, i, 2)).integers(2**62))
        state = random.getstate()
        random.seed(seed)
        changed = timm_re(img.clone()) != img
        random.setstate(state)
        mask = torch.zeros(224, 224, dtype=torch.bool)
        top, left, h, w = box.tolist()
        mask[top:top + h, left:left + w] = True
        assert torch.equal(changed, mask.expand(3, -1, -1)), (epoch, i, box)
        assert torch.equal(ds.erase_box(i), box)      # the same sample, the same box


def test_deit_loader_erases_after_normalisation_and_repeats_on_resume(tmp_path, monkeypatch):
    """The loader fills each box with N(0, 1) noise in normalised units and leaves every other
    pixel as the RandAugment pipeline made it; the same epoch gives the same batch again (a
    resumed run redraws its skipped batches), another epoch other noise."""
    from fastmix.data import imagefolder as F
    _folder(tmp_path, n=8)
    # the deit pipeline with RandomErasing's probability 1: every sample gets a box
    monkeypatch.setitem(F.PIPELINES, "deit-always", F.Pipeline(*F.PIPELINES["deit"][:5], 1.0))
    ld = F.build_imagefolder_loader(str(tmp_path), "train", 4, True, loader="torchvision",
                                    pipeline="deit-always", size=32, num_workers=0, quiet=True)
    batches = [(x.clone(), y.clone()) for x, y in ld]
    again = [(x.clone(), y.clone()) for x, y in ld]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    order = ld.epoch_indices(0)
    erased = []
    for k, (x, _) in enumerate(batches):
        for j, idx in enumerate(order[4 * k:4 * k + 4]):
            img, _, box = ld.dataset[int(idx)]
            ref = (img.permute(2, 0, 1).float() - ld._mean[0]) / ld._std[0]
            top, left, h, w = box.tolist()
            assert h > 0 and w > 0                  # p = 1: every sample has a box
            mask = torch.zeros(32, 32, dtype=torch.bool)
            mask[top:top + h, left:left + w] = True
            assert torch.equal(x[j][:, ~mask], ref[:, ~mask])
            erased.append(x[j][:, mask].flatten())
    noise = torch.cat(erased)
    assert noise.numel() > 300 and abs(noise.mean()) < 0.2 and abs(noise.std() - 1) < 0.15
    ld.set_epoch(1)
    other = [x for x, _ in ld]
    assert not all(torch.equal(a[0], b) for a, b in zip(batches, other))


def test_dali_refuses_a_randaugment_pipeline_and_auto_picks_the_dataloader(tmp_path, capsys):
    from fastmix.data.imagefolder import build_imagefolder_loader
    _folder(tmp_path)
    with pytest.raises(ValueError, match="--loader torchvision"):
        build_imagefolder_loader(str(tmp_path), "train", 2, True, loader="dali",
                                 pipeline="cifar-vit", size=32, quiet=True)
    ld = build_imagefolder_loader(str(tmp_path), "train", 2, True, loader="auto",
                                  pipeline="cifar-vit", size=32, num_workers=0, quiet=True)
    assert ld.name == "torchvision"
    x, y = next(iter(ld))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_vit_preset_end_to_end_through_train_py(tmp_path):
    """train.py --preset cifar100-deit-s on a 224-px image folder with a tiny DeiT: the
    DataLoader loader with RandAugment, AdamW, the per-step warm-up and clipping, one epoch."""
    import json
    _folder(tmp_path / "data", n=8, size=48)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--preset", "cifar100-deit-s",
                        "--data-dir", str(tmp_path / "data"), "--timm-kwargs",
                        TINY["timm:deit_small_patch16_224"], "--epochs", "1", "--batch-size",
                        "4", "--workers", "0", "--out", str(out), "--no-progress"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["epochs"] == 1
    rec = [json.loads(s) for s in open(out / "metrics.jsonl")][-1]
    assert math.isfinite(rec["losses"]["loss"])


# ---- the official step with a ViT (bench/official_step.py: the spec's data flow) ---------------
@pytest.mark.parametrize("name,draw_over", [
    ("cifar100-deit-s", {}),
    ("cifar100-deit-s", {"train_mb": False}),                 # switch_off's coin says skip
    ("imagenet-deit-s", {"train_mb": True, "mask_adjust": True}),
    ("cifar100-swin-t", {"mask_adjust": True}),
])
def test_the_official_step_with_a_vit_computes_fastmixs_loss_and_gradients(name, draw_over):
    """λ-concat, label smoothing 0.1, switch_off and mask_adjust on a tiny DeiT / Swin (fp32,
    eager ops): the official data flow and fastmix's AutoMix give the same loss and the same
    Mix Block and online-encoder gradients on one draw."""
    from bench.official_step import OfficialAutoMix
    over = {"mask_adjust": 1.0} if draw_over.get("mask_adjust") else {}
    cfg, model, _, _ = _tiny(name, eager=True, **over)
    for p in model.mix_block.parameters():                   # a non-trivial mask
        p.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 224, 224, generator=g), torch.randint(0, 100, (4,), generator=g)
    model.set_progress(3, 100)
    draw = model.draw(x)
    draw.update(lam_mb=0.35, lam_bb=0.7, **draw_over)
    results = []
    for runner in (model, OfficialAutoMix(model)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)                                  # drop path draws alike
        loss, _ = runner.losses(x, y, draw)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.mix_block.parameters()],
                        [p.grad.clone() for p in model.backbone_q.parameters()
                         if p.grad is not None]))
    (la, mb_a, q_a), (lb, mb_b, q_b) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert len(q_a) == len(q_b) > 0
    for a, b in zip(mb_a + q_a, mb_b + q_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in mb_a)


def test_three_official_vit_steps_equal_fastmixs_with_adamw_clip_and_warmup():
    """The whole step (TrainStep: AdamW groups, clipping, the per-step warm-up) with the
    official data flow against fastmix's, from the same weights and draws: the same weights
    after three steps, the momentum encoder's EMA included."""
    import copy
    from bench.official_step import OfficialAutoMix
    from fastmix.step import StepGuard, TrainStep
    cfg, model, _, _ = _tiny("cifar100-deit-s", eager=True, clip_grad=0.5)
    models = [model, copy.deepcopy(model)]
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, 3, 224, 224, generator=g), torch.randint(0, 100, (4,), generator=g))
               for _ in range(3)]
    draws = []
    for x, _ in batches:
        models[0].set_progress(0, 30)
        draws.append(models[0].draw(x))
    finals = []
    for i, m in enumerate(models):
        opt = build_optimizer(cfg, m, fused=True)
        runner = m if i == 0 else OfficialAutoMix(m)
        step = TrainStep(runner, opt, StepGuard(m, torch.device("cpu"), enabled=False),
                         contextlib_null, clip=cfg.clip_grad)
        set_lr = StepLR(opt, cfg, steps_per_epoch=3)
        for s, ((x, y), d) in enumerate(zip(batches, draws)):
            set_lr(s, 30)
            torch.manual_seed(100 + s)
            step(x, y, s, 30, draw=d)
        finals.append(m.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-6, msg=k)


def contextlib_null():
    import contextlib
    return contextlib.nullcontext()


def test_png_export_keeps_the_source_pixels(tmp_path):
    """`python -m fastmix.data.export --format png`: the CIFAR ViT presets' image folder holds
    the arrays' exact pixels (JPEG would not)."""
    from fastmix.data import load_dataset
    from fastmix.data import export as fexport
    src = load_dataset("fashion-mnist", train=False)
    out = tmp_path / "fm"
    assert fexport.main(["--dataset", "fashion-mnist", "--out", str(out), "--limit", "10",
                         "--format", "png"]) == 0
    files = sorted((out / "val").rglob("*.png"))
    assert len(files) == 10 and not list((out / "val").rglob("*.jpg"))
    for f in files:
        i = int(f.stem)
        assert np.array_equal(np.asarray(Image.open(f)), src.images[i, 0].numpy()), f
