"""The DataLoader loader with ``decoder="torchvision"`` (torchvision.io decode, transforms.v2
resampling) and with the batch decoded on the loader's device (``decode_on_device``: nvJPEG on
CUDA; here the same code path on the CPU), against the PIL decoder and each other.

Runs in the torchvision venv (`make test-models`), like test_peers.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastmix.data import DatasetError
from fastmix.data import imagefolder
from fastmix.data.imagefolder import (ImageFileDataset, TorchvisionLoader,
                                      build_imagefolder_loader, check_image_file,
                                      decode_file_fallback, scan_imagefolder)
from test_imagefolder import (_garbage_body_jpeg, fm_root, smooth_image,  # noqa: F401
                              unnormalise, weird_root)

pytestmark = pytest.mark.models
pytest.importorskip("torchvision.io", reason="needs torchvision (make test installs it)")

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(root, split, bs, train, decoder="torchvision", **kw):
    kw.setdefault("num_workers", 0)
    return TorchvisionLoader(root, split, bs, train, size=SIZE, decoder=decoder, **kw)


def run(ld, epoch=0):
    ld.set_epoch(epoch)
    x, y = map(torch.cat, zip(*ld))
    return x, y


def test_auto_decoder_is_torchvision_where_it_imports(fm_root, capsys):
    ld = build_imagefolder_loader(fm_root, "val", 4, False, loader="torchvision", size=SIZE,
                                  num_workers=0)
    assert ld.decoder == "torchvision" and not ld.decode_on_device
    assert "decode on CPU (torchvision.io, 0 workers)" in capsys.readouterr().err
    pil = build_imagefolder_loader(fm_root, "val", 4, False, loader="torchvision", size=SIZE,
                                   num_workers=0, decoder="pil")
    assert pil.decoder == "pil"
    with pytest.raises(ValueError, match="DALI decodes itself"):
        build_imagefolder_loader(fm_root, "val", 4, False, loader="dali", decoder="pil")


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("pipeline", ["imagenet", "fine-grained"])
def test_torchvision_and_pil_decoders_give_the_same_crops(weird_root, train, pipeline):
    """Same files, labels, crop boxes and flips; pixels equal up to the two resamplers'
    rounding (both antialiased), far below the difference between two images."""
    tv = make(weird_root, "val", 5, train, pipeline=pipeline)
    pil = make(weird_root, "val", 5, train, decoder="pil", pipeline=pipeline)
    for epoch in range(2):
        (xt, yt), (xp, yp) = run(tv, epoch), run(pil, epoch)
        assert torch.equal(yt, yp) and xt.shape == xp.shape == (20, 3, SIZE, SIZE)
        diff = (unnormalise(xt) - unnormalise(xp)).abs().flatten(1)
        # rows 0-9 are one class's picture in ten formats, rows 10-19 the other class's
        other = (unnormalise(xt) - unnormalise(xt.roll(10, 0))).abs().flatten(1).mean(1)
        assert diff.mean(1).max() < 2.0 < other.min(), (diff.mean(1).max(), other.min())


def test_decoders_agree_on_the_exported_jpegs(fm_root):
    tv, pil = make(fm_root, "val", 8, False), make(fm_root, "val", 8, False, decoder="pil")
    (xt, yt), (xp, yp) = run(tv), run(pil)
    assert torch.equal(yt, yp)
    assert (unnormalise(xt) - unnormalise(xp)).abs().mean() < 1.0   # 0-255 scale


@pytest.mark.parametrize("train", [False, True])
def test_decoding_the_batch_on_the_device_equals_the_worker_path(weird_root, train):
    """decode_on_device: workers read bytes, the batch is decoded and cropped in the main
    process (JPEG by decode_jpeg on a list; PNG/WebP/BMP one by one): same tensors, exactly."""
    a = make(weird_root, "val", 6, train, num_workers=0)
    b = make(weird_root, "val", 6, train, num_workers=2, decode_on_device=True)
    assert b.decode_on_device and not a.decode_on_device
    for epoch in range(2):
        (xa, ya), (xb, yb) = run(a, epoch), run(b, epoch)
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_torchvision_decoder_epochs_are_exact_for_resume(fm_root):
    run_ = make(fm_root, "train", 4, True, seed=5)
    run(run_, 0)
    run_.set_epoch(1)
    next(iter(run_))                               # a pass that stops after one batch
    full = run(run_, 1)
    fresh = run(make(fm_root, "train", 4, True, seed=5, num_workers=2), 1)
    assert torch.equal(full[0], fresh[0]) and torch.equal(full[1], fresh[1])
    state = torch.get_rng_state()
    next(iter(make(fm_root, "train", 4, True, num_workers=1)))
    assert torch.equal(torch.get_rng_state(), state)    # never draws from the global RNG


@pytest.mark.parametrize("on_device", [False, True])
def test_a_corrupt_file_is_named(weird_root, tmp_path, on_device):
    scan = scan_imagefolder(weird_root, "val", verify=False)   # keeps truncated.jpg, text.jpg
    ld = make(weird_root, "val", 24, False, scan=scan, decode_on_device=on_device)
    with pytest.raises(DatasetError, match=r"(text|truncated)\.jpg: cannot decode.*--verify-images full"):
        list(ld)
    bad = tmp_path / "zz.jpg"
    _garbage_body_jpeg(bad)
    # a body that is garbage between intact markers: the header reads, the decode fails
    ds = ImageFileDataset([str(bad)], [0], SIZE, False, decoder="torchvision", raw=on_device)
    with pytest.raises(DatasetError, match=r"zz\.jpg: cannot decode"):
        if on_device:
            ld.dataset = ds
            ld.files = ds.files
            raw, geom = ds.load_raw(0)
            ld.decode_batch([raw], geom[None], [0])
        else:
            ds.load(0)


def test_train_cli_with_the_torchvision_decoder(fm_root, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir",
                        fm_root, "--loader", "torchvision", "--decoder", "torchvision",
                        "--arch", "resnet_small", "--image-size", "16", "--epochs", "1",
                        "--batch-size", "4", "--device", "cpu", "--no-progress", "--workers", "1",
                        "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torchvision.io" in r.stderr
    assert os.path.exists(tmp_path / "run" / "summary.json")


def test_bench_data_times_each_decoder(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import data as bench_data
    assert bench_data.main(["--data-dir", str(tmp_path / "d"), "--synthetic", "8", "--size", "32",
                            "--batch-size", "4", "--batches", "2", "--warmup", "1", "--workers",
                            "1", "--device", "cpu", "--loaders", "tvio,pil"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tvio") or line.startswith("| pil")]
    assert len(rows) == 4, out                      # two loaders x two splits
    assert any("torchvision.io" in r for r in rows) and any("PIL" in r for r in rows)
    assert len(os.listdir(tmp_path / "d" / "train")) == 4


# ---- a JPEG the device decoder refuses: decoded on the CPU, counted ---------------------------
def _no_eoi(jpeg):
    """The JPEG with its EOI marker replaced by zero padding (a file written into a padded or
    pre-allocated block). The entropy-coded data is whole: libjpeg-turbo decodes every row, PIL
    accepts the file (so the scan keeps it), but ``torchvision.io.decode_jpeg`` -- the loader's
    "device" decoder on the CPU -- refuses it: "Image is incomplete or truncated"."""
    assert jpeg.endswith(b"\xff\xd9")
    return jpeg[:-2] + b"\0" * 64


@pytest.fixture(scope="module")
def fallback_roots(tmp_path_factory):
    """``(root, intact)``: two classes of six files each (RGB, CMYK, grey, progressive JPEGs, a
    PNG and ``noeoi.jpg``); in ``root`` noeoi.jpg has lost its EOI marker (:func:`_no_eoi`), in
    ``intact`` it is the same JPEG whole -- the CPU reference for the same crops."""
    base = tmp_path_factory.mktemp("fallback")
    roots = (base / "root", base / "intact")
    for c, cls in enumerate(("a", "b")):
        img = smooth_image(seed=c)
        for r in roots:
            d = r / "val" / cls
            d.mkdir(parents=True)
            img.save(d / "good.jpg", quality=95)
            img.convert("CMYK").save(d / "cmyk.jpg", quality=95)
            img.convert("L").save(d / "grey.jpg", quality=95)
            img.save(d / "progressive.jpg", quality=90, progressive=True)
            img.save(d / "png.png")
            img.transpose(1).save(d / "noeoi.jpg", quality=90)    # flipped: another picture
        bad = roots[0] / "val" / cls / "noeoi.jpg"
        bad.write_bytes(_no_eoi(bad.read_bytes()))
    return tuple(map(str, roots))


def test_the_no_eoi_jpeg_is_a_real_refusal_that_the_scan_keeps(fallback_roots):
    """The file kind the CPU tests use: a real torchvision.io refusal, no monkeypatching."""
    from torchvision.io import ImageReadMode, decode_jpeg
    root, intact = fallback_roots
    path = os.path.join(root, "val", "a", "noeoi.jpg")
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="incomplete or truncated"):
        decode_jpeg(data, mode=ImageReadMode.RGB, device="cpu")
    assert check_image_file(path) is None and check_image_file(path, "full") is None
    img, how = decode_file_fallback(path, data)
    assert how == "PIL on the CPU"
    with open(os.path.join(intact, "val", "a", "noeoi.jpg"), "rb") as f:
        whole = decode_jpeg(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)
    # PIL and torchvision.io both decode with libjpeg-turbo (islow IDCT, fancy upsampling)
    assert img.shape == whole.shape and torch.equal(img, whole)
    # CMYK, which nvJPEG refuses, is read by torchvision.io on the CPU (the worker path's pixels)
    cmyk = os.path.join(root, "val", "a", "cmyk.jpg")
    img, how = decode_file_fallback(cmyk)
    assert how == "torchvision.io on the CPU" and img.shape == whole.shape


@pytest.mark.parametrize("train", [False, True])
def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu_with_the_same_crop(
        fallback_roots, train, capsys):
    """decode_on_device on the CPU: the batched decode_jpeg raises on noeoi.jpg, the batch is
    retried file by file, noeoi.jpg is decoded on the CPU, and the batch equals -- exactly -- the
    worker path's batch over the intact files; the loader counts and names the fallbacks."""
    root, intact = fallback_roots
    ld = make(root, "val", 6, train, decode_on_device=True)
    ref = make(intact, "val", 6, train)
    assert ld.decode_on_device and ld.cpu_fallbacks == 0 and ld.num_skipped == 0
    for epoch in range(2):
        (x, y), (xr, yr) = run(ld, epoch), run(ref, epoch)
        assert x.shape == (12, 3, SIZE, SIZE)
        assert torch.equal(y, yr) and torch.equal(x, xr)
        assert ld.cpu_fallbacks == 2 * (epoch + 1)                 # two noeoi.jpg per epoch
    bad = {os.path.join(root, "val", c, "noeoi.jpg") for c in ("a", "b")}
    assert set(ld.cpu_fallback_files) == bad
    assert all("incomplete or truncated" in why for why in ld.cpu_fallback_files.values())
    err = capsys.readouterr().err
    named = [line for line in err.splitlines() if "JPEG decoder refused" in line]
    assert len(named) == 4 and all("noeoi.jpg" in line and "PIL on the CPU" in line
                                   for line in named)
    assert ref.cpu_fallbacks == 0                     # the worker path never falls back


def test_cpu_fallbacks_are_named_only_at_first(fallback_roots, capsys, monkeypatch):
    monkeypatch.setattr(imagefolder, "FALLBACK_WARN_FIRST", 3)
    root, _ = fallback_roots
    ld = make(root, "val", 4, False, decode_on_device=True)
    for epoch in range(3):
        run(ld, epoch)
    assert ld.cpu_fallbacks == 6 and len(ld.cpu_fallback_files) == 2
    lines = capsys.readouterr().err.splitlines()
    assert sum("JPEG decoder refused" in line for line in lines) == 3
    assert sum("further CPU decode fallbacks" in line for line in lines) == 1


def test_a_file_no_decoder_reads_is_still_named_and_not_counted(fallback_roots, tmp_path):
    """The fallback stops at PIL: a JPEG cut in half (its header reads, its body does not
    decode anywhere) raises the DatasetError naming the file, in a batch where another file
    falls back."""
    root, _ = fallback_roots
    ld = make(root, "val", 6, False, decode_on_device=True)
    bad = tmp_path / "zz.jpg"
    whole = open(os.path.join(root, "val", "a", "good.jpg"), "rb").read()
    bad.write_bytes(whole[:len(whole) // 2])
    noeoi = os.path.join(root, "val", "a", "noeoi.jpg")
    ds = ImageFileDataset([noeoi, str(bad)], [0, 0], SIZE, False, decoder="torchvision", raw=True)
    ld.dataset, ld.files = ds, ds.files
    (r0, g0), (r1, g1) = ds.load_raw(0), ds.load_raw(1)
    with pytest.raises(DatasetError, match=r"zz\.jpg: cannot decode.*--verify-images full"):
        ld.decode_batch([r0, r1], torch.stack([g0, g1]), [0, 1])
    assert ld.cpu_fallbacks == 1 and list(ld.cpu_fallback_files) == [noeoi]


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True])
def test_cuda_decode_with_cmyk_and_refused_jpegs_completes(fallback_roots, train, capsys):
    """nvJPEG (torchvision's decode_jpeg on CUDA) on a folder with CMYK, progressive, grey and
    EOI-less JPEGs: every batch completes, each picture is the CPU worker path's up to the
    decoders' and resamplers' rounding (a CMYK file decoded with wrong colours would be far
    off), and every file that fell back to the CPU is counted and named."""
    root, intact = fallback_roots
    ld = make(root, "val", 6, train, device="cuda", num_workers=2)
    assert ld.decode_on_device
    ref = make(intact, "val", 6, train)
    for epoch in range(2):
        (x, y), (xr, yr) = run(ld, epoch), run(ref, epoch)
        assert x.device.type == "cuda" and x.shape == xr.shape == (12, 3, SIZE, SIZE)
        assert torch.equal(y.cpu(), yr)
        px, pr = unnormalise(x.float().cpu()), unnormalise(xr)
        diff = (px - pr).abs().flatten(1).mean(1)
        other = (pr - pr.roll(6, 0)).abs().flatten(1).mean(1)     # another picture
        assert diff.max() < 2.0 < other.min(), (diff, other)
    assert set(ld.cpu_fallback_files) <= set(ld.files)
    assert ld.cpu_fallbacks >= len(ld.cpu_fallback_files)
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if "JPEG decoder refused" in line]
    assert len(named) == min(ld.cpu_fallbacks, imagefolder.FALLBACK_WARN_FIRST)
    print(f"CUDA fallbacks: {ld.cpu_fallbacks}: {ld.cpu_fallback_files}")
