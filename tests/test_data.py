import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fastmix.data import (FASHION_MNIST_DIR, ArrayDataset, DatasetError, TensorLoader, load_cifar,
                          load_dataset, load_fashion_mnist,
                          make_synthetic)
from fastmix.data.datasets import make_offcentre


def write_idx(folder, prefix, images, labels, gz=True):
    os.makedirs(folder, exist_ok=True)
    op = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with op(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), images.shape[1], images.shape[2]))
        f.write(images.tobytes())
    with op(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)))
        f.write(labels.tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(str(tmp_path), prefix, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n, dtype=np.uint8))
    return str(tmp_path)


def test_idx_reader_roundtrip(idx_dir):
    ds = load_fashion_mnist(idx_dir, train=True)
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert len(load_fashion_mnist(idx_dir, train=False)) == 10


def test_idx_uncompressed(tmp_path):
    write_idx(str(tmp_path), "train", np.zeros((3, 4, 4), np.uint8) + 7, np.array([1, 2, 3], np.uint8), gz=False)
    assert load_fashion_mnist(str(tmp_path)).images.shape == (3, 1, 4, 4)


def test_missing_fashion_mnist_names_package_and_flag(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(str(tmp_path))


def test_idx_bad_magic_and_size(idx_dir):
    path = os.path.join(idx_dir, "train-images-idx3-ubyte.gz")
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x1234) + data[4:])
    with pytest.raises(DatasetError, match="bad IDX magic"):
        load_fashion_mnist(idx_dir)
    with gzip.open(path, "wb") as f:
        f.write(data[:-5])
    with pytest.raises(DatasetError, match="expected"):
        load_fashion_mnist(idx_dir)
    with open(path, "wb") as f:
        f.write(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        load_fashion_mnist(idx_dir)


def test_idx_label_out_of_range(tmp_path):
    write_idx(str(tmp_path), "train", np.zeros((2, 4, 4), np.uint8), np.array([3, 11], np.uint8))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 10\)"):
        load_fashion_mnist(str(tmp_path))


def write_cifar(folder, files, key, n=8, classes=10):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key.encode(): rng.integers(0, classes, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_and_100_readers(tmp_path):
    write_cifar(str(tmp_path / "cifar-10-batches-py"), [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels")
    train = load_cifar(str(tmp_path), 10, train=True)
    assert train.images.shape == (40, 3, 32, 32) and len(load_cifar(str(tmp_path), 10, False)) == 8
    write_cifar(str(tmp_path / "cifar-100-python"), ["train", "test"], "fine_labels", classes=100)
    assert load_cifar(str(tmp_path), 100, True).num_classes == 100


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_cifar(str(tmp_path), 10)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(str(folder), [f"data_batch_{i}" for i in range(1, 6)], "labels")
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar(str(tmp_path), 10)


def test_synthetic_is_deterministic():
    a, b = make_synthetic(64, seed=3), make_synthetic(64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_loader_shapes_normalisation_and_augmentation():
    ds = make_synthetic(50, size=12, channels=3)
    loader = TensorLoader(ds, 16, train=True, pad=2, seed=0)
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape == (16, 3, 12, 12) for x, _ in batches)
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    plain = list(TensorLoader(ds, 16, train=False))
    assert len(plain) == 4 and plain[-1][0].shape[0] == 2  # eval keeps the partial batch
    xe = plain[0][0]
    expected = (ds.images[:16].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(xe, expected)
    # augmentation: a crop is a shifted window of the reflect-padded image (values preserved)
    assert not torch.equal(batches[0][0], list(TensorLoader(ds, 16, train=True, pad=0, flip=False, seed=0))[0][0])


def test_loader_epochs_reshuffle_and_repeat():
    ds = make_synthetic(40, size=8)
    loader = TensorLoader(ds, 10, seed=1)
    loader.set_epoch(0)
    e0 = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    e1 = torch.cat([y for _, y in loader])
    loader.set_epoch(0)
    assert torch.equal(e0, torch.cat([y for _, y in loader]))
    assert not torch.equal(e0, e1)


def test_loader_rejects_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="larger than the dataset"):
        TensorLoader(make_synthetic(10, size=8), 32)


# ---- the off-centre Fashion-MNIST (the label-mismatch study's dataset) ----------------------
def _objects(n=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 6:22] = torch.randint(1, 256, (n, 1, 20, 16), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % 10, 10, (0.3,), (0.3,), "objects")


def test_offcentre_places_each_resized_object_inside_the_canvas():
    base = _objects()
    ds = make_offcentre(base, canvas=32, min_side=14, max_side=22, seed=5)
    assert ds.images.shape == (64, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels, base.labels) and ds.name == "objects-offcentre"
    side, top, left = ds.placements.unbind(1)
    assert side.min() >= 14 and side.max() <= 22 and len(side.unique()) > 4
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 32).all() and (left + side <= 32).all()
    assert len(top.unique()) > 5 and len(left.unique()) > 5     # off-centre, not one place
    for i in range(64):
        s, t, l = side[i].item(), top[i].item(), left[i].item()
        expect = torch.nn.functional.interpolate(base.images[i:i + 1].float(), size=(s, s),
                                                 mode="bilinear", align_corners=False,
                                                 antialias=True).round().clamp(0, 255)
        assert torch.equal(ds.images[i, :, t:t + s, l:l + s], expect[0].to(torch.uint8))
        outside = ds.images[i].clone()
        outside[:, t:t + s, l:l + s] = 0
        assert not outside.any()                                  # a black canvas elsewhere


def test_offcentre_is_deterministic_and_seeded():
    base = _objects()
    a, b = make_offcentre(base, seed=0), make_offcentre(base, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.placements, b.placements)
    c = make_offcentre(base, seed=1)
    assert not torch.equal(a.placements, c.placements)


def test_offcentre_refuses_bad_input():
    with pytest.raises(DatasetError, match="1-channel"):
        make_offcentre(ArrayDataset(torch.ones(2, 3, 28, 28, dtype=torch.uint8),
                                    torch.zeros(2, dtype=torch.long), 10, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(DatasetError, match="min_side <= max_side <= canvas"):
        make_offcentre(_objects(), canvas=16, min_side=14, max_side=22)


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                    reason="needs the Fashion-MNIST files")
def test_offcentre_fashion_mnist_by_name():
    ds = load_dataset("fashion-mnist-offcentre", train=False)
    assert ds.images.shape == (10000, 1, 32, 32) and ds.num_classes == 10
    x = ds.images.float() / 255
    # the normalisation is the one stated for this canvas (the training set's; test set close)
    assert abs(x.mean().item() - ds.mean[0]) < 0.01 and abs(x.std().item() - ds.std[0]) < 0.01
    fg = (ds.images > 0).float().mean().item()
    assert 0.12 < fg < 0.3                                        # objects a fifth of the canvas
