"""Readers for the small datasets fastmix trains on, into uint8 tensors.

Every reader returns a :class:`ArrayDataset`: ``images`` uint8 [N, C, H, W], ``labels`` int64
[N], and the per-channel normalisation of the dataset. Files are validated (magic numbers,
sizes, label ranges) and any problem raises :class:`DatasetError` naming the file.
"""
import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "fashion-mnist-offcentre", "cifar10", "cifar100", "synthetic")


class DatasetError(RuntimeError):
    """A dataset is missing, malformed or inconsistent."""


@dataclass
class ArrayDataset:
    images: torch.Tensor          # uint8 [N, C, H, W]
    labels: torch.Tensor          # int64 [N]
    num_classes: int
    mean: tuple
    std: tuple
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but "
                               f"{self.labels.shape[0]} labels")
        if self.images.shape[0] == 0:
            raise DatasetError(f"{self.name}: the dataset is empty")
        self.labels = self.labels.to(torch.int64)
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DatasetError(f"{self.name}: labels must lie in [0, {self.num_classes}), found "
                               f"range [{lo}, {hi}]")
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise DatasetError(f"{self.name}: {self.images.shape[1]} channels but mean/std for "
                               f"{len(self.mean)}")

    def __len__(self):
        return self.images.shape[0]

    def balanced_order(self, seed=0):
        """A seeded ordering of the samples whose every prefix is class-balanced: the classes
        take turns (a random sample of each class, then a second one of each, ...), so the first
        ``n`` indices hold ``n // K`` or ``n // K + 1`` samples of every class (while the classes
        last). Depends on ``seed`` and the labels only."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        lab = self.labels[perm]
        onehot = torch.nn.functional.one_hot(lab, self.num_classes)
        rank_in_class = (onehot.cumsum(0) * onehot).sum(1) - 1    # 0 for a class's first sample
        turn = torch.argsort(rank_in_class * self.num_classes + lab, stable=True)
        return perm[turn]

    def take(self, idx):
        return ArrayDataset(self.images[idx], self.labels[idx], self.num_classes, self.mean,
                            self.std, self.name)

    def subset(self, n, seed=0):
        """A class-balanced random subset of ``n`` samples (all of them if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        return self.take(self.balanced_order(seed)[:n])

    def split(self, n_val, n_train=None, seed=0):
        """``(train, val)``: a class-balanced validation split of ``n_val`` samples carved out of
        this set, and a class-balanced training subset of ``n_train`` (None: all the rest) from
        the remainder; disjoint, fixed by ``seed``. ``n_val=0``: ``(subset(n_train), None)``."""
        if not n_val:
            return self.subset(n_train, seed), None
        if n_val >= len(self):
            raise DatasetError(f"{self.name}: a validation split of {n_val} leaves no training "
                               f"samples (the set has {len(self)})")
        order = self.balanced_order(seed)
        rest = order[n_val:] if n_train is None else order[n_val:n_val + n_train]
        return self.take(rest), self.take(order[:n_val])


# ---- Fashion-MNIST (IDX) ------------------------------------------------------------------
IDX_MAX_BYTES = 1 << 33   # 8 GiB: far above any IDX dataset; a header claiming more is refused


def _read_idx(path, expected_magic, what):
    """An IDX file (plain or gzip), read no further than its header's declared size + 1 byte:
    a header that lies, or a gzip bomb, is refused without inflating the rest."""
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            data = f.read(16 if what == "images" else 8)
            if len(data) >= 8:
                magic, count = struct.unpack(">II", data[:8])
                body = count * (int.from_bytes(data[8:12], "big") * int.from_bytes(data[12:16], "big")
                                if what == "images" and len(data) == 16 else 1)
                if magic == expected_magic and body <= IDX_MAX_BYTES:
                    data += f.read(body + 1)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if len(data) < 8:
        raise DatasetError(f"{path}: too short for an IDX header")
    magic, count = struct.unpack(">II", data[:8])
    if magic != expected_magic:
        raise DatasetError(f"{path}: bad IDX magic {magic:#x}, expected {expected_magic:#x} ({what})")
    if what == "images":
        if len(data) < 16:
            raise DatasetError(f"{path}: too short for an IDX image header")
        rows, cols = struct.unpack(">II", data[8:16])
        expected = 16 + count * rows * cols
        if expected - 16 > IDX_MAX_BYTES:
            raise DatasetError(f"{path}: the header declares {count} images of {rows}x{cols} "
                               f"({expected} bytes), more than fastmix reads from an IDX file")
        if len(data) != expected:
            raise DatasetError(f"{path}: {len(data)} bytes, expected {expected} for {count} "
                               f"images of {rows}x{cols}")
        arr = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 1, rows, cols)
    else:
        if count > IDX_MAX_BYTES:
            raise DatasetError(f"{path}: the header declares {count} labels, more than fastmix "
                               f"reads from an IDX file")
        if len(data) != 8 + count:
            raise DatasetError(f"{path}: {len(data)} bytes, expected {8 + count} for {count} labels")
        arr = np.frombuffer(data, dtype=np.uint8, offset=8)
    return torch.from_numpy(arr.copy())


def load_fashion_mnist(data_dir=None, train=True):
    data_dir = data_dir or FASHION_MNIST_DIR
    prefix = "train" if train else "t10k"
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(data_dir, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise DatasetError(
                f"Fashion-MNIST not found: no {prefix}-{kind}.gz in {data_dir}. Install it with "
                f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}) "
                f"or point --data-dir at a folder holding the four IDX .gz files.")
        paths.append(found[0])
    images = _read_idx(paths[0], 0x00000803, "images")
    labels = _read_idx(paths[1], 0x00000801, "labels")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                           f"{labels.shape[0]} labels")
    if int(labels.max()) >= 10:
        raise DatasetError(f"{paths[1]}: labels must lie in [0, 10) for Fashion-MNIST, found "
                           f"{int(labels.max())}")
    return ArrayDataset(images, labels.long(), 10, (0.2860,), (0.3530,), "fashion-mnist")


# ---- Fashion-MNIST, off-centre (the label-mismatch regime) ---------------------------------
OFFCENTRE = dict(canvas=32, min_side=14, max_side=22)


def make_offcentre(base, canvas=32, min_side=14, max_side=22, seed=0):
    """Each image of ``base`` (a 1-channel ArrayDataset with a black background, such as
    Fashion-MNIST) resized to a side drawn uniformly from ``[min_side, max_side]`` (bilinear,
    antialiased) and pasted at a uniform random position on a black ``canvas`` x ``canvas``
    image: objects smaller than the image and off its centre, where a box cut from one image and
    pasted into another often misses the object (the label-mismatch argument for learned masks).

    Deterministic: the sides and positions come from a generator seeded with ``seed`` and depend
    on nothing else; ``placements`` holds them (``[N, 3]``: side, top, left)."""
    images = base.images
    if images.dim() != 4 or images.shape[1] != 1:
        raise DatasetError(f"{base.name}: make_offcentre takes 1-channel images, got "
                           f"{tuple(images.shape)}")
    if not 1 <= min_side <= max_side <= canvas:
        raise DatasetError(f"make_offcentre: need 1 <= min_side <= max_side <= canvas, got "
                           f"{min_side}, {max_side}, {canvas}")
    n = images.shape[0]
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(min_side, max_side + 1, (n,), generator=g)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    room = (canvas - side + 1).to(torch.float64)
    top, left = (u[:, 0] * room).floor().long(), (u[:, 1] * room).floor().long()
    out = torch.zeros(n, 1, canvas, canvas, dtype=torch.uint8)
    for s in side.unique().tolist():
        idx = (side == s).nonzero().flatten()
        small = torch.nn.functional.interpolate(images[idx].float(), size=(s, s), mode="bilinear",
                                                align_corners=False, antialias=True)
        small = small.round().clamp(0, 255).to(torch.uint8)
        for j, i in enumerate(idx.tolist()):
            t, l = int(top[i]), int(left[i])
            out[i, :, t:t + s, l:l + s] = small[j]
    ds = ArrayDataset(out, base.labels.clone(), base.num_classes, base.mean, base.std,
                      f"{base.name}-offcentre")
    ds.placements = torch.stack([side, top, left], 1)
    return ds


def load_fashion_mnist_offcentre(data_dir=None, train=True):
    """Fashion-MNIST's 28-pixel objects at 14-22 pixels, off-centre on a 32x32 canvas
    (:func:`make_offcentre`; the training and test sets use the placement seeds 0 and 1). The
    normalisation is recomputed for the darker canvas (mean and std of the training set)."""
    ds = make_offcentre(load_fashion_mnist(data_dir, train), seed=0 if train else 1, **OFFCENTRE)
    ds.mean, ds.std = (0.0924,), (0.2288,)
    return ds


# ---- CIFAR-10/100 (python pickle batches) --------------------------------------------------
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, bytes, numbers, numpy arrays) and
    nothing else: ``find_class`` allows numpy's array reconstruction only, so a pickle that
    names any other callable (``os.system``, ...) is refused before it can run."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}, which a "
                                     f"dataset file has no reason to hold")


def safe_pickle_load(f):
    return SafeUnpickler(f, encoding="bytes").load()


def _read_cifar_batch(path, label_key):
    try:
        with open(path, "rb") as f:
            batch = safe_pickle_load(f)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle raises many kinds on corrupt input
        raise DatasetError(f"{path}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key.encode(), batch.get(label_key))
    if data is None or labels is None:
        raise DatasetError(f"{path}: missing 'data' or '{label_key}'")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if len(labels) != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(labels, dtype=torch.int64)


def load_cifar(data_dir, num_classes=10, train=True):
    if num_classes == 10:
        sub = "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = "labels"
    elif num_classes == 100:
        sub = "cifar-100-python"
        files = ["train"] if train else ["test"]
        key = "fine_labels"
    else:
        raise ValueError("CIFAR has 10 or 100 classes")
    if not data_dir:
        raise DatasetError(f"CIFAR-{num_classes} needs --data-dir (the folder holding {sub}/)")
    root = os.path.join(data_dir, sub) if os.path.isdir(os.path.join(data_dir, sub)) else data_dir
    missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
    if missing:
        raise DatasetError(f"CIFAR-{num_classes} not found: {', '.join(missing)} missing in {root}. "
                           f"Point --data-dir at the folder holding {sub}/ (the python pickle "
                           f"batches of the official archive).")
    parts = [_read_cifar_batch(os.path.join(root, f), key) for f in files]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return ArrayDataset(images, labels, num_classes, CIFAR_MEAN, CIFAR_STD, f"cifar{num_classes}")


# ---- synthetic ------------------------------------------------------------------------------
def make_synthetic(n=2048, num_classes=10, size=32, channels=3, seed=0, train=True):
    """Learnable random data: one random low-frequency template per class plus noise.

    The templates depend only on ``seed``; train and test draw different noise.
    """
    g = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(
        torch.rand(num_classes, channels, 4, 4, generator=g), size=(size, size), mode="bilinear",
        align_corners=False)
    g.manual_seed(seed * 2 + (1 if train else 2))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, channels, size, size, generator=g)
    images = (0.6 * templates[labels] + 0.4 * noise).mul(255).round().clamp(0, 255).to(torch.uint8)
    return ArrayDataset(images, labels, num_classes, (0.5,) * channels, (0.25,) * channels, "synthetic")


def load_dataset(name, data_dir=None, train=True, synthetic_size=32, synthetic_n=None):
    """``(train or test) ArrayDataset`` by name: one of ``DATASETS``."""
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, train)
    if name == "fashion-mnist-offcentre":
        return load_fashion_mnist_offcentre(data_dir, train)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, 10 if name == "cifar10" else 100, train)
    if name == "synthetic":
        n = synthetic_n or (4096 if train else 1024)
        return make_synthetic(n, size=synthetic_size, train=train)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
