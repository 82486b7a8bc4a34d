"""Write an array dataset out as an ImageFolder of JPEGs (for the DALI / PIL loaders).

    python -m fastmix.data.export --dataset fashion-mnist --out DIR [--data-dir D] [--limit N]
    python -m fastmix.data.export --dataset cifar10 --data-dir ~/data --out DIR

Layout: ``DIR/train/<class>/<i>.jpg`` (the training set) and ``DIR/val/<class>/<i>.jpg`` (the
test set), ``<i>`` the image's index in its source split, class folder names from the
dataset's class names (characters outside ``[A-Za-z0-9._-]`` become ``_``, so Fashion-MNIST's
"T-shirt/top" is ``T-shirt_top``). Grey images are saved as grey JPEGs; the loaders convert
them to RGB. ``--limit N`` keeps at most N images per split, picked class-balanced (round
robin over the classes in source order), so every class has an image whenever N >= the number
of classes. An existing non-empty ``DIR/<split>`` is refused unless ``--overwrite`` (which
deletes it first): stale files from an earlier export would otherwise mix in.
"""
import argparse
import os
import re
import shutil
import sys

import numpy as np

from fastmix.checkpoint import unwritable_reason
from fastmix.data.datasets import DatasetError, load_cifar, load_fashion_mnist, safe_pickle_load

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
EXPORTABLE = ("fashion-mnist", "cifar10", "cifar100")


def folder_name(name):
    """A class name as a portable folder name: "T-shirt/top" -> "T-shirt_top"."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name).strip()) or "_"


def _cifar_meta_names(data_dir, num_classes):
    """Class names from the CIFAR archive's meta pickle (generic names if it is absent)."""
    sub, meta, key = (("cifar-10-batches-py", "batches.meta", "label_names") if num_classes == 10
                      else ("cifar-100-python", "meta", "fine_label_names"))
    for root in (os.path.join(data_dir or "", sub), data_dir or ""):
        path = os.path.join(root, meta)
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    d = safe_pickle_load(f)
                names = d.get(key.encode(), d.get(key))
                if names is not None and len(names) == num_classes:
                    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            except Exception as e:  # a corrupt meta file only costs the names
                print(f"export: cannot read class names from {path} ({e}); using generic names",
                      file=sys.stderr)
    if num_classes == 10:
        return list(CIFAR10_CLASSES)
    return [f"class_{i:03d}" for i in range(num_classes)]


def class_names(dataset, data_dir=None):
    if dataset == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if dataset in ("cifar10", "cifar100"):
        return _cifar_meta_names(data_dir, 10 if dataset == "cifar10" else 100)
    raise ValueError(f"cannot export {dataset!r}; choose from {', '.join(EXPORTABLE)}")


def balanced_indices(labels, limit):
    """At most ``limit`` indices, round robin over the classes (each class in source order)."""
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picked, rank = [], 0
    while len(picked) < limit:
        for idx in per_class:
            if rank < len(idx) and len(picked) < limit:
                picked.append(idx[rank])
        rank += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


def write_split(ds, names, out_dir, limit=None, quality=90):
    """Write one ArrayDataset as ``out_dir/<class>/<i>.jpg``; returns the number written."""
    from PIL import Image
    folders = [folder_name(n) for n in names]
    if len(set(folders)) != len(folders):
        raise DatasetError(f"class names collide as folder names: {folders}")
    labels = ds.labels.numpy()
    idx = balanced_indices(labels, limit)
    for c in np.unique(labels[idx]):
        os.makedirs(os.path.join(out_dir, folders[c]), exist_ok=True)
    images = ds.images.numpy()
    for i in idx:
        img = images[i]                      # uint8 [C, H, W]
        img = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
        img.save(os.path.join(out_dir, folders[labels[i]], f"{i}.jpg"), quality=quality)
    return len(idx)


def load_split(dataset, data_dir, train):
    if dataset == "fashion-mnist":
        return load_fashion_mnist(data_dir, train)
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(data_dir, 10 if dataset == "cifar10" else 100, train)
    raise ValueError(f"cannot export {dataset!r}; choose from {', '.join(EXPORTABLE)}")


def export(dataset, out, data_dir=None, limit=None, quality=90, overwrite=False):
    """Export ``dataset``'s train and test sets to ``out/train`` and ``out/val``.

    Returns ``{"train": n, "val": n}``. Raises DatasetError for a missing/bad source or a
    non-empty target split folder without ``overwrite``.
    """
    names = class_names(dataset, data_dir)
    splits = {"train": True, "val": False}
    for split in splits:                      # refuse before writing anything
        d = os.path.join(out, split)
        if os.path.isdir(d) and os.listdir(d) and not overwrite:
            raise DatasetError(f"{d} exists and is not empty; pass --overwrite to replace it")
    counts = {}
    for split, train in splits.items():
        ds = load_split(dataset, data_dir, train)
        if ds.num_classes != len(names):
            raise DatasetError(f"{dataset}: {ds.num_classes} classes but {len(names)} class names")
        d = os.path.join(out, split)
        if os.path.isdir(d) and overwrite:
            shutil.rmtree(d)
        counts[split] = write_split(ds, names, d, limit, quality)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=EXPORTABLE)
    p.add_argument("--out", required=True, help="ImageFolder root to write (OUT/train, OUT/val)")
    p.add_argument("--data-dir", help="source folder (default: the dataset's default location)")
    p.add_argument("--limit", type=int, help="at most this many images per split (class-balanced)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/train, OUT/val")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must lie in [1, 100], got {args.quality}")
    why = unwritable_reason(args.out)
    if why:
        p.error(f"--out {args.out}: {why}; give a writable folder (it gets train/ and val/)")
    try:
        counts = export(args.dataset, args.out, args.data_dir, args.limit, args.quality, args.overwrite)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['val']} val images of {args.dataset} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
