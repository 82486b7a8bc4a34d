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
from fastmix.data.imagefolder import (ImageFileDataset, TorchvisionLoader,
                                      build_imagefolder_loader, scan_imagefolder)
from test_imagefolder import (_garbage_body_jpeg, fm_root, unnormalise,  # noqa: F401
                              weird_root)

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
