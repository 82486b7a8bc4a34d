"""ImageFolder export, scanning and the two loaders (DALI CPU-only pipeline, PIL fallback).

DALI is required, not skipped: `make test` installs nvidia-dali-cuda130 (its CPU pipelines
run without a GPU). The GPU ("mixed" nvJPEG) path is not exercised here.
"""
import collections
import gzip
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmix.data import FASHION_MNIST_DIR, DatasetError
from fastmix.data import export as fexport
from fastmix.data.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, DaliLoader, ScanResult,
                                      TorchvisionLoader, build_imagefolder_loader,
                                      check_image_file, scan_imagefolder)

LOADERS = {"dali": DaliLoader, "torchvision": TorchvisionLoader}
SIZE = 32
FM_CLASSES = ["Ankle_boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker",
              "T-shirt_top", "Trouser"]


def make(kind, root, split, batch_size, train, **kw):
    kw.setdefault("num_workers", 1 if kind == "dali" else 0)   # 2 shared cores: no forks
    kw.setdefault("size", SIZE)
    return LOADERS[kind](root, split, batch_size, train, **kw)


def write_idx(folder, prefix, images, labels):
    """Fashion-MNIST's four-file IDX layout (gzip)."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), *images.shape[1:]) + images.tobytes())
    with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def unnormalise(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() * std + mean) * 255


def smooth_image(seed=0, w=56, h=40):
    """Low-frequency RGB content: the two loaders' resamplers agree closely on it."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, 127 + 100 * np.sin(yy / 6 + xx / 9 + seed)], -1)
    return Image.fromarray(a.astype(np.uint8), "RGB")


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    """Fashion-MNIST exported with the CLI entry point: 20 train, 20 val JPEGs (2 per class).

    Falls back to a synthetic IDX set when the Debian package is not installed.
    """
    tmp = tmp_path_factory.mktemp("fm")
    data_dir = FASHION_MNIST_DIR
    if not os.path.exists(os.path.join(data_dir, "train-images-idx3-ubyte.gz")):
        rng = np.random.default_rng(0)
        data_dir = str(tmp / "idx")
        for prefix in ("train", "t10k"):
            write_idx(data_dir, prefix, rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                      np.arange(40, dtype=np.uint8) % 10)
    out = str(tmp / "folder")
    assert fexport.main(["--dataset", "fashion-mnist", "--data-dir", data_dir, "--out", out,
                         "--limit", "20"]) == 0
    return out


@pytest.fixture(scope="module")
def weird_root(tmp_path_factory):
    """Two classes, every awkward input in both: grey, CMYK, PNG (also named .jpg), palette,
    RGBA, WebP, BMP, trailing bytes after EOI (all valid) and a truncated JPEG, a zero-byte
    JPEG, a text file named .jpg (all bad), plus a .txt that is not an image at all."""
    root = tmp_path_factory.mktemp("weird")
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            img = smooth_image(seed=c)
            img.save(d / "good.jpg", quality=95)
            img.convert("L").save(d / "grey.jpg", quality=95)
            img.convert("CMYK").save(d / "cmyk.jpg", quality=95)
            img.save(d / "png.png")
            img.save(d / "png_named.jpg", format="PNG")
            img.convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
            img.convert("RGBA").save(d / "rgba.png")
            img.save(d / "upper.WEBP", quality=95)
            img.save(d / "b.bmp")
            data = (d / "good.jpg").read_bytes()
            (d / "trailing.jpg").write_bytes(data + b"\0" * 100 + b"camera trailer")
            (d / "truncated.jpg").write_bytes(data[:len(data) // 2])
            (d / "zero.jpg").write_bytes(b"")
            (d / "text.jpg").write_text("this is not an image\n")
            (d / "notes.txt").write_text("ignored: not an image extension\n")
    return str(root)


BAD = {"truncated.jpg", "zero.jpg", "text.jpg"}
GOOD = {"good.jpg", "grey.jpg", "cmyk.jpg", "png.png", "png_named.jpg", "palette.png", "rgba.png",
        "upper.WEBP", "b.bmp", "trailing.jpg"}


# ---- export ---------------------------------------------------------------------------------
def test_export_layout(fm_root):
    for split in ("train", "val"):
        assert sorted(os.listdir(os.path.join(fm_root, split))) == FM_CLASSES
        files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(fm_root, split)) for f in fs]
        assert len(files) == 20 and all(f.endswith(".jpg") for f in files)
        counts = collections.Counter(os.path.basename(os.path.dirname(f)) for f in files)
        assert set(counts.values()) == {2}          # --limit is class-balanced
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.mode == "L" and im.size == (28, 28)
    # a second export into the same folder is refused (stale files would mix in)
    assert fexport.main(["--dataset", "fashion-mnist", "--out", fm_root, "--limit", "5"]) == 2


def test_export_labels_match_source(tmp_path):
    """Image i of class folder c is source image i, and its label is c."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], np.uint8)
    write_idx(str(tmp_path / "idx"), "train", images, labels)
    write_idx(str(tmp_path / "idx"), "t10k", images[:10], np.arange(10, dtype=np.uint8))
    counts = fexport.export("fashion-mnist", str(tmp_path / "out"), str(tmp_path / "idx"), quality=100)
    assert counts == {"train": 12, "val": 10}
    names = [fexport.folder_name(n) for n in fexport.FASHION_MNIST_CLASSES]
    for i, lab in enumerate(labels):
        path = tmp_path / "out" / "train" / names[lab] / f"{i}.jpg"
        got = np.asarray(Image.open(path)).astype(int)
        assert np.abs(got - images[i]).mean() < 8    # JPEG q100 of noise
    # classes absent from the train split (0 and 7) make a train/val mismatch the scan refuses
    with pytest.raises(DatasetError, match="only in .*val: Sneaker, T-shirt_top"):
        scan_imagefolder(str(tmp_path / "out"), "train")


def test_export_cifar10_names_from_meta(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(src / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                         b"labels": list(range(10))}, f)
    meta = [f"thing {i}" for i in range(10)]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [m.encode() for m in meta]}, f)
    assert fexport.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                         str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out" / "val")) == [f"thing_{i}" for i in range(10)]
    with Image.open(tmp_path / "out" / "train" / "thing_3" / "3.jpg") as im:
        assert im.mode == "RGB" and im.size == (32, 32)


# ---- the two loaders agree ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_loader_interface(fm_root, kind):
    ld = make(kind, fm_root, "train", 8, True)
    assert ld.classes == FM_CLASSES and ld.num_classes == 10 and ld.num_skipped == 0
    assert len(ld) == 2                       # 20 images, drop_last
    ld.set_epoch(0)
    batches = list(ld)
    assert len(batches) == len(ld)
    for x, y in batches:
        assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.shape == (8,) and y.dtype == torch.int64 and x.device.type == y.device.type == "cpu"
        assert int(y.min()) >= 0 and int(y.max()) < 10
        px = unnormalise(x)                  # the normalisation is ImageNet mean/std * 255
        assert px.min() > -0.5 and px.max() < 255.5 and px.max() > 200 and px.min() < 5
        # Fashion-MNIST is grey: the three RGB channels carry the same pixel values
        assert (px[:, 0] - px[:, 1]).abs().max() < 0.5 and (px[:, 0] - px[:, 2]).abs().max() < 0.5
    ld.set_epoch(1)
    again = list(ld)
    assert not torch.equal(again[0][0], batches[0][0])   # new order / augmentation each epoch
    val = make(kind, fm_root, "val", 8, False)
    assert len(val) == 3 and [x.shape[0] for x, _ in val] == [8, 8, 4]   # partial last batch


def test_loaders_agree_on_classes_labels_and_pixels(fm_root):
    dali, pil = make("dali", fm_root, "val", 6, False), make("torchvision", fm_root, "val", 6, False)
    assert dali.classes == pil.classes == FM_CLASSES and dali.files == pil.files
    for epoch in range(2):
        dali.set_epoch(epoch)
        pil.set_epoch(epoch)
        xd, yd = map(torch.cat, zip(*dali))
        xp, yp = map(torch.cat, zip(*pil))
        # evaluation: every file once, in file order -> same labels, same pixels
        assert torch.equal(yd, yp) and yd.tolist() == dali.labels
        diff = (xd - xp).abs().flatten(1).mean(1)
        other = (xd - xd.roll(1, 0)).abs().flatten(1).mean(1)
        assert diff.max() < 0.05 < other.min()     # same image, up to decoder/resampler rounding
    # training: both read the same (seed, epoch) permutation -> the same label sequence, and
    # each epoch's label multiset is the dataset's
    full = collections.Counter(dali.labels)
    tr = {kind: make(kind, fm_root, "train", 5, True, seed=3) for kind in LOADERS}
    orders = set()
    for epoch in range(2):
        seqs = []
        for ld in tr.values():
            ld.set_epoch(epoch)
            seqs.append(torch.cat([y for _, y in ld]).tolist())
        assert seqs[0] == seqs[1] and collections.Counter(seqs[0]) == full
        orders.add(tuple(seqs[0]))
    assert len(orders) == 2                   # reshuffled between epochs


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_and_channels_last(fm_root, kind, dtype):
    ref, _ = next(iter(make(kind, fm_root, "val", 4, False)))
    ld = make(kind, fm_root, "val", 4, False, dtype=dtype, channels_last=True)
    x, _ = next(iter(ld))
    assert x.dtype == dtype and x.shape == (4, 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert x.permute(0, 2, 3, 1).is_contiguous()          # an NCHW view of NHWC memory
    assert torch.allclose(x.float(), ref, atol=0.05, rtol=0.01)


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
@pytest.mark.parametrize("n", [20, 19])
def test_sharding_two_ranks(fm_root, kind, n):
    """Label = file index, so the labels seen identify the files. 19 files: uneven shards."""
    files, _, _ = scan_imagefolder(fm_root, "train", verify=False)
    ids = ScanResult(files[:n], list(range(n)), [str(i) for i in range(n)])
    for train in (True, False):
        ranks = [make(kind, fm_root, "train", 3, train, shard=(r, 2), scan=ids) for r in range(2)]
        # train: each rank gets ceil(n / 2) = 10 files -> 3 full batches (equal, or DDP hangs);
        # eval: contiguous blocks [0, n//2) and [n//2, n) with partial last batches
        assert [len(ld) for ld in ranks] == ([3, 3] if train else [4, 4] if n == 20 else [3, 4])
        for epoch in range(3):
            seen = []
            for ld in ranks:
                ld.set_epoch(epoch)
                seen.append(torch.cat([y for _, y in ld]).tolist())
            both = collections.Counter(seen[0] + seen[1])
            if not train:   # every file exactly once over the two ranks, every epoch
                assert sorted(both) == list(range(n)) and max(both.values()) == 1
                assert [sum(1 for _ in ld) for ld in ranks] == [len(ld) for ld in ranks]
                continue
            assert len(seen[0]) == len(seen[1]) == 9
            if n == 20:     # disjoint within an epoch
                assert max(both.values()) == 1
            else:           # one file is repeated to pad 19 to 20: at most it appears twice
                assert max(both.values()) <= 2 and sum(v - 1 for v in both.values()) <= 1


# ---- bad inputs -----------------------------------------------------------------------------
def test_scan_skips_bad_files_and_keeps_awkward_ones(weird_root):
    scan = scan_imagefolder(weird_root, "train")
    files, labels, classes = scan
    assert classes == ["cat", "dog"]
    assert {os.path.basename(f) for f in files} == GOOD
    assert {os.path.basename(p) for p, _ in scan.skipped} == BAD and len(scan.skipped) == 6
    reasons = {os.path.basename(p): r for p, r in scan.skipped}
    assert reasons["zero.jpg"] == "zero bytes" and "not a JPEG" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"].lower()
    for f, lab in zip(files, labels):                         # labels stay with their files
        assert classes[lab] == os.path.basename(os.path.dirname(f))
    assert check_image_file(os.path.join(weird_root, "val", "dog", "trailing.jpg")) is None
    assert check_image_file(os.path.join(weird_root, "val", "dog", "truncated.jpg"), "full")


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_loaders_decode_every_kept_file_as_rgb(weird_root, kind):
    for train in (True, False):
        ld = make(kind, weird_root, "val", 4, train)
        assert ld.num_skipped == 6 and len(ld.files) == 20
        batches = list(ld)
        assert len(batches) == len(ld) == (5 if train else 5)
        for x, y in batches:
            assert x.shape[1:] == (3, SIZE, SIZE) and torch.isfinite(x).all()
    # evaluation pixels: grey decodes to three equal channels, the others agree across loaders
    ld = make(kind, weird_root, "val", 20, False)
    x, y = next(iter(ld))
    names = [os.path.basename(f) for f in ld.files]
    px = unnormalise(x)
    g = names.index("grey.jpg")
    assert (px[g, 0] - px[g, 1]).abs().max() < 0.5 and (px[g, 1] - px[g, 2]).abs().max() < 0.5
    good = px[names.index("good.jpg")]
    for n in ("cmyk.jpg", "png.png", "png_named.jpg", "rgba.png", "b.bmp", "upper.WEBP", "palette.png"):
        assert (px[names.index(n)] - good).abs().mean() < 8, n   # same picture, 0-255 scale


def test_bad_files_without_verify_fail_with_a_dataset_error(weird_root):
    """What verification prevents: DALI stops mid-epoch on an undecodable file."""
    scan = scan_imagefolder(weird_root, "val", verify=False)
    assert len(scan.files) == 24 and {os.path.basename(p) for p, _ in scan.skipped} == {"zero.jpg"}
    with pytest.raises(DatasetError, match=r"(?s)DALI could not decode.*(text|truncated)\.jpg.*--verify-images full"):
        for _ in make("dali", weird_root, "val", 24, False, scan=scan):
            pass
    with pytest.raises(DatasetError, match=r"(text|truncated)\.jpg: cannot decode"):
        for _ in make("torchvision", weird_root, "val", 24, False, scan=scan):
            pass


def test_refusals_name_the_folder(tmp_path, weird_root):
    with pytest.raises(DatasetError, match="needs a root folder"):
        scan_imagefolder(None, "train")
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        scan_imagefolder(str(tmp_path / "nowhere"), "train")
    (tmp_path / "r").mkdir()
    with pytest.raises(DatasetError, match=r"r/train does not exist"):
        scan_imagefolder(str(tmp_path / "r"), "train")
    (tmp_path / "r" / "train").mkdir()
    (tmp_path / "r" / "train" / "stray.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"r/train has no class folders"):
        scan_imagefolder(str(tmp_path / "r"), "train")
    for c in ("a", "b"):
        (tmp_path / "r" / "train" / c).mkdir()
    smooth_image().save(tmp_path / "r" / "train" / "a" / "x.jpg")
    (tmp_path / "r" / "train" / "b" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"class folder .*r/train/b has no images \(1 files"):
        scan_imagefolder(str(tmp_path / "r"), "train")
    # a class whose only images are all bad is refused too (after skipping them)
    (tmp_path / "r" / "train" / "b" / "zero.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"no readable image.*r/train/b"):
        scan_imagefolder(str(tmp_path / "r"), "train")
    # train/val with different classes: refused from either side, naming the classes
    bad = tmp_path / "mismatch"
    shutil.copytree(weird_root, bad)
    os.rename(bad / "val" / "dog", bad / "val" / "wolf")
    for split in ("train", "val"):
        with pytest.raises(DatasetError, match=r"only in .*train: dog; only in .*val: wolf|"
                                               r"only in .*val: wolf; only in .*train: dog"):
            scan_imagefolder(str(bad), split)
    with pytest.raises(DatasetError, match="differ"):
        build_imagefolder_loader(weird_root, "val", 4, False, classes=["cat", "wolf"], quiet=True)


def test_build_loader_choice_and_log(fm_root, capsys):
    ld = build_imagefolder_loader(fm_root, "val", 8, False, loader="auto", size=SIZE, num_workers=1)
    err = capsys.readouterr().err
    assert isinstance(ld, DaliLoader) and "dali loader" in err and "auto: DALI" in err
    ld = build_imagefolder_loader(fm_root, "val", 8, False, loader="torchvision", size=SIZE,
                                  num_workers=0)
    err = capsys.readouterr().err
    assert isinstance(ld, TorchvisionLoader) and "requested (--loader torchvision)" in err
    assert err.count("\n") == 1 and ld.num_classes == 10
    with pytest.raises(ValueError, match="loader must be one of"):
        build_imagefolder_loader(fm_root, "val", 8, False, loader="tfrecord")


def test_auto_falls_back_without_dali(fm_root, capsys, monkeypatch):
    import fastmix.data.imagefolder as imf
    monkeypatch.setattr(imf, "dali_available", lambda: (False, "ModuleNotFoundError: no nvidia"))
    ld = build_imagefolder_loader(fm_root, "val", 8, False, size=SIZE, num_workers=0)
    assert isinstance(ld, TorchvisionLoader)
    assert "auto: DALI not importable (ModuleNotFoundError" in capsys.readouterr().err
    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        build_imagefolder_loader(fm_root, "val", 8, False, loader="dali")


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_epochs_are_reproducible_for_resume(fm_root, kind):
    """An epoch's batches depend on (seed, epoch) only: not on the epochs run before, on an
    earlier pass that stopped early, or (DALI) on the number of decoding threads. This is what
    the trainer's exact mid-epoch resume relies on."""
    run = make(kind, fm_root, "train", 4, True, seed=5)
    run.set_epoch(0)
    list(run)
    run.set_epoch(1)
    next(iter(run))                               # a pass that stops after one batch
    run.set_epoch(1)
    full = list(run)
    assert len(full) == len(run) == 5
    fresh = make(kind, fm_root, "train", 4, True, seed=5,
                 num_workers=2 if kind == "dali" else 0)
    fresh.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(full, fresh):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    other = make(kind, fm_root, "train", 4, True, seed=6)
    other.set_epoch(1)
    assert not torch.equal(next(iter(other))[0], full[0][0])


def test_pil_workers_do_not_change_the_augmentation(fm_root):
    """Random draws are keyed by (seed, epoch, index): 0 or 2 DataLoader workers, same batch."""
    a = make("torchvision", fm_root, "train", 10, True, num_workers=0)
    b = make("torchvision", fm_root, "train", 10, True, num_workers=2)
    for ld in (a, b):
        ld.set_epoch(3)
    (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
    assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---- exact resume with the PIL loader; unreadable bodies (reliability, round two) ------------
def test_pil_loader_never_draws_from_the_global_rng(fm_root):
    """Starting a DataLoader iterator draws a base seed; from the global torch RNG that shifted
    the training step's random stream after a mid-epoch resume."""
    ld = make("torchvision", fm_root, "train", 4, True, num_workers=1)
    state = torch.get_rng_state()
    next(iter(ld))
    assert torch.equal(torch.get_rng_state(), state)


def test_pil_loader_mid_epoch_resume_is_exact(fm_root, tmp_path, monkeypatch):
    from fastmix.engine import Config, load_checkpoint, train
    cfg = dict(method="automix", arch="resnet_small", dataset="imagefolder", data_dir=fm_root,
               loader="torchvision", workers=1, image_size=16, epochs=2, batch_size=4,
               ema_momentum=0.9, ema_end=0.99, device="cpu", progress=False, checkpoint_every=2,
               channels_last=False)
    full = train(Config(out=str(tmp_path / "full"), export=str(tmp_path / "full.pt"), **cfg))
    orig = TorchvisionLoader.__iter__

    def interrupted(self):
        for i, item in enumerate(orig(self)):
            if self.train and self.epoch == 1 and i == 3:
                raise KeyboardInterrupt("stopped mid-epoch")
            yield item
    monkeypatch.setattr(TorchvisionLoader, "__iter__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(Config(out=str(tmp_path / "cut"), **cfg))
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt"))["batch"] == 3   # mid-epoch 2
    monkeypatch.setattr(TorchvisionLoader, "__iter__", orig)
    resumed = train(Config(out=str(tmp_path / "cut"), resume="auto",
                           export=str(tmp_path / "res.pt"), **cfg))
    assert resumed["final_top1"] == full["final_top1"]
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "res.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _garbage_body_jpeg(path):
    """A real JPEG's header -- SOI up to and with the SOS segment, so its size reads (the
    pre-scan's pixel limit parses it) -- less its quantization tables, then a garbage body and
    an EOI marker: passes the cheap header check, and no decoder reads it (libjpeg-turbo:
    "Quantization table 0x00 was not defined"; DALI falls back to no other decoder)."""
    import io
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    smooth_image().save(buf, format="JPEG", quality=90)
    data, header, i = buf.getvalue(), bytearray(b"\xff\xd8"), 2
    while True:                                  # the marker segments before the scan
        marker, n = data[i:i + 2], int.from_bytes(data[i + 2:i + 4], "big")
        if marker != b"\xff\xdb":                # DQT: dropped
            header += data[i:i + 2 + n]
        i += 2 + n
        if marker == b"\xff\xda":                # SOS: the header ends with it
            break
    path.write_bytes(bytes(header) + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
                     + b"\xff\xd9")


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_garbage_body_jpeg_is_named_or_skipped(fm_root, tmp_path, kind):
    root = tmp_path / "root"
    shutil.copytree(fm_root, root)
    bad = root / "train" / "Bag" / "zz_garbage.jpg"
    _garbage_body_jpeg(bad)
    assert check_image_file(str(bad), "header") is None       # the cheap check lets it through
    assert check_image_file(str(bad), "full") is not None
    base = [sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(root),
            "--loader", kind, "--arch", "resnet_small", "--image-size", "16", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--workers", "1"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(base + ["--out", str(tmp_path / "a")], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "zz_garbage.jpg" in r.stderr and "--verify-images full" in r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "b"), "--verify-images", "full"], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 unreadable image file" in r.stderr and "zz_garbage.jpg" in r.stderr


def _small_tmpfs(path, size, read_only=False):
    """Mount a real tmpfs of ``size`` at ``path`` (root only); False where that is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{'ro,' if read_only else ''}size={size}",
                        "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _idx_source(folder, n):
    """Fashion-MNIST's IDX files with ``n`` random 28 x 28 images per split."""
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(str(folder), prefix, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  np.arange(n, dtype=np.uint8) % 10)
    return str(folder)


def _export(capsys, *args):
    """``(exit status, stderr)`` of the export tool's ``main``."""
    try:
        code = fexport.main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line(err):
    return err.count("\n") == 1 and err.startswith("export: error: ") and "Traceback" not in err


def test_export_tool_refuses_a_bad_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        code, err = _export(capsys, "--dataset", "fashion-mnist", "--out", str(out),
                            "--limit", "10")
        assert code == 2 and "is a file" in err and _one_line(err)
    ro = tmp_path / "ro"
    if _small_tmpfs(ro, "64k", read_only=True):   # unwritable, even for root
        try:
            code, err = _export(capsys, "--dataset", "fashion-mnist", "--out", str(ro / "x"))
            assert code == 2 and f"{ro} is not writable" in err and _one_line(err)
        finally:
            subprocess.run(["umount", str(ro)])


def test_export_tool_refuses_bad_inputs_in_one_line_before_writing(tmp_path, capsys):
    """An unknown dataset, a --data-dir that is not a folder, an empty or a corrupt source
    file: one line, exit status 2, and nothing written (both sources are read first)."""
    src = _idx_source(tmp_path / "idx", 20)
    out = tmp_path / "out"
    base = ["--dataset", "fashion-mnist", "--out", str(out)]
    code, err = _export(capsys, "--dataset", "mnist", "--out", str(out))
    assert code == 2 and "invalid choice: 'mnist'" in err and _one_line(err)
    code, err = _export(capsys, *base, "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere: not a folder" in err and _one_line(err)
    for name, data, needle in [("t10k-images-idx3-ubyte.gz", b"", "too short for an IDX header"),
                               ("t10k-labels-idx1-ubyte.gz", b"\x1f\x8b\x08garbage",
                                "cannot read")]:
        bad = tmp_path / f"bad-{needle[:3]}"
        shutil.copytree(src, bad)
        (bad / name).write_bytes(data)             # the val split's file: read before any write
        code, err = _export(capsys, *base, "--data-dir", str(bad))
        assert code == 2 and needle in err and name in err and _one_line(err), err
        assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "fastmix.data.export", *base, "--data-dir",
                        str(tmp_path / "bad-too")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and _one_line(r.stderr), r.stderr
    assert fexport.main(base + ["--data-dir", src]) == 0          # the good source exports


def _tree(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_export_on_a_full_disk_names_the_file_and_leaves_out_as_it_was(tmp_path, capsys):
    """A real ENOSPC (a 200 KiB tmpfs; each small JPEG takes a 4 KiB page): the error names
    the file and the cause in one line, no partial split and no temporary folder is left, and
    a failed --overwrite keeps the earlier export whole."""
    src = _idx_source(tmp_path / "idx", 100)
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "200k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "fm"
        base = ["--dataset", "fashion-mnist", "--data-dir", src, "--out", str(out)]
        code, err = _export(capsys, *base, "--limit", "100")        # 200 files: 800 KiB
        assert code == 2 and _one_line(err), err
        assert re.search(r"cannot write .*/fm/(train|val)/[^/]+/\d+\.jpg: No space left on device",
                         err), err
        assert os.listdir(disk) == []                               # as it was: nothing
        assert _export(capsys, *base, "--limit", "10")[0] == 0       # fits: 20 files
        before = _tree(out)
        assert len(before) == 20
        code, err = _export(capsys, *base, "--limit", "100", "--overwrite")
        assert code == 2 and "No space left on device" in err and _one_line(err)
        assert _tree(out) == before and sorted(os.listdir(out)) == ["train", "val"]
        assert _export(capsys, *base, "--limit", "11", "--overwrite")[0] == 0
        after = _tree(out)
        assert len(after) == 22 and sorted(os.listdir(out)) == ["train", "val"]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(__import__("fastmix.data.imagefolder", fromlist=["x"]).torchvision_io_available()[0],
                    reason="torchvision imports here: the refusal is for stacks without it")
def test_torchvision_decoder_without_torchvision_is_refused_before_any_work(fm_root, tmp_path):
    """The main venv (CPU torch 2.13.0) has no torchvision: --decoder torchvision stops with a
    clear error before scanning, and the DataLoader loader's default decoder is PIL."""
    with pytest.raises(ImportError, match="--decoder torchvision: torchvision does not import"):
        build_imagefolder_loader(str(tmp_path / "missing"), "train", 4, True,
                                 loader="torchvision", decoder="torchvision")
    assert make("torchvision", fm_root, "val", 4, False).decoder == "pil"


# ---- the presets' pipelines (spec §3: Tiny-ImageNet, CUB/Aircraft) --------------------------------
def test_pipeline_geometry_follows_the_recipes():
    """Train: fine-grained resizes the shorter side to 256/224 of the size, then crops 50-100%
    of that area; imagenet and tiny-imagenet crop 8-100% of the original. Test: imagenet and
    fine-grained resize to 256/224 and cut the centre, tiny-imagenet resizes to the size."""
    from fastmix.data.imagefolder import ImageFileDataset
    w, h, s = 500, 375, 224
    for name, pre, lo in (("imagenet", None, 0.08), ("tiny-imagenet", None, 0.08),
                          ("fine-grained", 256, 0.5)):
        ds = ImageFileDataset(["x"] * 400, [0] * 400, s, True, seed=1, pipeline=name)
        areas = []
        for i in range(400):
            mode, rw, rh, l, t, r, b, flip = ds.geometry(i, w, h)
            assert mode == 0 and flip in (0, 1)
            assert (rw, rh) == ((w, h) if pre is None else (341, 256))
            assert 0 <= l < r <= rw and 0 <= t < b <= rh
            areas.append((r - l) * (b - t) / (rw * rh))
        assert min(areas) >= lo * 0.97 and max(areas) <= 1.0
        assert min(areas) < lo + 0.1   # the range is used down to its lower end
        val = ImageFileDataset(["x"], [0], s, False, pipeline=name).geometry(0, w, h)
        short = {"tiny-imagenet": s}.get(name, 256)
        rw = int(short * w / h)
        assert val == (1, rw, short, (rw - s + 1) // 2, (short - s + 1) // 2,
                       (rw - s + 1) // 2 + s, (short - s + 1) // 2 + s, 0)


def test_tiny_imagenet_test_images_are_not_cropped(tmp_path):
    """At 64 px a 64 x 64 test image passes through untouched (imagenet's 256/224 rule would
    resize it to 73 and cut the centre)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "0.png")
    ld = make("torchvision", str(tmp_path), "val", 2, False, size=64, pipeline="tiny-imagenet")
    x, _ = next(iter(ld))
    for i, f in enumerate(ld.files):
        with Image.open(f) as im:
            ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
            assert torch.allclose(unnormalise(x[i:i + 1])[0], ref, atol=1e-3)
    other = make("torchvision", str(tmp_path), "val", 2, False, size=64)
    assert not torch.allclose(next(iter(other))[0], x, atol=1e-3)


@pytest.mark.parametrize("pipeline", ["tiny-imagenet", "fine-grained"])
def test_loaders_run_every_pipeline_and_agree(fm_root, pipeline):
    """Both loaders, both splits: shapes, finite pixels, the same label order; evaluation
    pixels of DALI and PIL agree (same resize and centre crop)."""
    out = {}
    for kind in LOADERS:
        for train in (True, False):
            ld = make(kind, fm_root, "train" if train else "val", 5, train, pipeline=pipeline,
                      seed=2)
            assert "pipeline" in ld.describe() and pipeline in ld.describe()
            ld.set_epoch(1)
            x, y = map(torch.cat, zip(*ld))
            assert x.shape[1:] == (3, SIZE, SIZE) and torch.isfinite(x).all()
            out[kind, train] = (x, y)
    assert torch.equal(out["dali", True][1], out["torchvision", True][1])
    (xd, yd), (xp, yp) = out["dali", False], out["torchvision", False]
    assert torch.equal(yd, yp)
    assert (xd - xp).abs().flatten(1).mean(1).max() < 0.06


def test_unknown_pipeline_is_refused(fm_root):
    with pytest.raises(ValueError, match="pipeline must be one of"):
        make("torchvision", fm_root, "val", 4, False, pipeline="cifar")
