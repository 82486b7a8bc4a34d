"""Write an array dataset out as an ImageFolder of JPEGs or PNGs (for the DALI / PIL loaders).

    python -m fastmix.data.export --dataset fashion-mnist --out DIR [--data-dir D] [--limit N]
    python -m fastmix.data.export --dataset cifar10 --data-dir ~/data --out DIR

Layout: ``DIR/train/<class>/<i>.jpg`` (the training set) and ``DIR/val/<class>/<i>.jpg`` (the
test set), ``<i>`` the image's index in its source split, class folder names from the
dataset's class names (characters outside ``[A-Za-z0-9._-]`` become ``_``, so Fashion-MNIST's
"T-shirt/top" is ``T-shirt_top``). Grey images are saved as grey JPEGs; the loaders convert
them to RGB. ``--limit N`` keeps at most N images per split, picked class-balanced (round
robin over the classes in source order), so every class has an image whenever N >= the number
of classes. An existing non-empty ``DIR/<split>`` is refused unless ``--overwrite`` (which
replaces it): stale files from an earlier export would otherwise mix in.

Safe to interrupt or to run out of disk: the arguments, ``DIR`` and both source splits are
checked (and read) before anything is written; the images are written into a temporary folder
``DIR/.export-*`` and each split folder is renamed into place only when all of it is written
(an existing one, with ``--overwrite``, is replaced by the rename). A failure -- a full disk
(named: the file and "No space left on device"), an unwritable folder, a corrupt source file
-- leaves ``DIR`` as it was, prints one line and exits with status 2. (Only a kill -9 can
leave a ``DIR/.export-*`` folder behind; the loaders never read it, delete it at will.)
"""
import argparse
import io
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from fastmix.checkpoint import unwritable_reason
from fastmix.data.datasets import DatasetError, load_cifar, load_fashion_mnist, safe_pickle_load

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
EXPORTABLE = ("fashion-mnist", "cifar10", "cifar100")
STAGING_PREFIX = ".export-"


class ExportError(RuntimeError):
    """The export could not be written (a full disk, an unwritable folder); nothing was
    exported."""


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


def _class_folders(names):
    folders = [folder_name(n) for n in names]
    if len(set(folders)) != len(folders):
        raise DatasetError(f"class names collide as folder names: {folders}")
    return folders


def write_split(ds, names, out_dir, limit=None, quality=90, shown_as=None, fmt="jpeg"):
    """Write one ArrayDataset as ``out_dir/<class>/<i>.jpg`` (``fmt="png"``: ``<i>.png``,
    lossless); returns the number written.

    A folder or file that cannot be written (a full disk, no permission) raises
    :class:`ExportError` naming it (as ``shown_as/<class>/<i>.jpg`` when ``shown_as`` is
    given: where it was going to be) and the cause."""
    from PIL import Image
    folders = _class_folders(names)
    labels = ds.labels.numpy()
    idx = balanced_indices(labels, limit)
    images = ds.images.numpy()
    shown_as = shown_as or out_dir
    try:
        for c in np.unique(labels[idx]):
            name = folders[c]
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for i in idx:
            img = images[i]                      # uint8 [C, H, W]
            img = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
            name = os.path.join(folders[labels[i]], f"{i}.{'png' if fmt == 'png' else 'jpg'}")
            buf = io.BytesIO()
            if fmt == "png":
                img.save(buf, format="PNG")
            else:
                img.save(buf, format="JPEG", quality=quality)
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(buf.getbuffer())
    except OSError as e:
        raise ExportError(f"cannot write {os.path.join(shown_as, name)}: "
                          f"{e.strerror or e}") from e
    return len(idx)


def load_split(dataset, data_dir, train):
    if dataset == "fashion-mnist":
        return load_fashion_mnist(data_dir, train)
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(data_dir, 10 if dataset == "cifar10" else 100, train)
    raise ValueError(f"cannot export {dataset!r}; choose from {', '.join(EXPORTABLE)}")


def export(dataset, out, data_dir=None, limit=None, quality=90, overwrite=False, fmt="jpeg"):
    """Export ``dataset``'s train and test sets to ``out/train`` and ``out/val``.

    Returns ``{"train": n, "val": n}``. Raises DatasetError for a missing/bad source or a
    non-empty target split folder without ``overwrite`` (both before anything is written),
    :class:`ExportError` for a write that failed (a full disk: the file and the cause named).
    Atomic per split (see the module doc): on any failure ``out`` is left as it was.
    """
    names = class_names(dataset, data_dir)
    _class_folders(names)
    splits = {"train": True, "val": False}
    for split in splits:                      # refuse before writing anything
        d = os.path.join(out, split)
        if os.path.lexists(d) and not os.path.isdir(d):
            raise DatasetError(f"{d} exists and is not a folder; remove it or choose another --out")
        if os.path.isdir(d) and os.listdir(d) and not overwrite:
            raise DatasetError(f"{d} exists and is not empty; pass --overwrite to replace it")
    sources = {}
    for split, train in splits.items():       # read and check both sources first
        ds = load_split(dataset, data_dir, train)
        if ds.num_classes != len(names):
            raise DatasetError(f"{dataset}: {ds.num_classes} classes but {len(names)} class names")
        sources[split] = ds
    created = not os.path.exists(out)
    staging = None
    try:
        try:
            os.makedirs(out, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out)
        except OSError as e:
            raise ExportError(f"cannot create a folder in {out}: {e.strerror or e}") from e
        try:
            counts = {split: write_split(ds, names, os.path.join(staging, split), limit,
                                         quality, shown_as=os.path.join(out, split),
                                         fmt=fmt)
                      for split, ds in sources.items()}
        except ExportError as e:
            raise ExportError(f"{e}; nothing was exported (the partial export was removed, "
                              f"{out} is as it was)") from e.__cause__
        for split in splits:                  # each split appears whole, by one rename
            _commit(os.path.join(staging, split), os.path.join(out, split),
                    os.path.join(staging, "replaced-" + split))
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                os.rmdir(out)                 # the folder this call made, left empty
            except OSError:
                pass
        raise
    shutil.rmtree(staging, ignore_errors=True)  # only the replaced splits are left in it
    return counts


def _commit(staged, d, old):
    """Rename the written split folder ``staged`` to ``d``; an existing ``d`` (empty, or
    replaced with --overwrite) is first moved to ``old`` and moved back if that fails."""
    moved = False
    try:
        if os.path.lexists(d):
            os.rename(d, old)
            moved = True
        os.rename(staged, d)
    except OSError as e:
        if moved:
            try:
                os.rename(old, d)
            except OSError:
                pass
        raise ExportError(f"cannot move the written split into {d}: {e.strerror or e}") from e


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2, as argparse's)."""

    def error(self, message):
        print(f"export: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    """The command line (see the module doc): 0 when written; 2, with one line on stderr, for
    bad arguments (checked before any work), a missing or corrupt source, a failed write."""
    p = _Parser(prog="python -m fastmix.data.export", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=EXPORTABLE)
    p.add_argument("--out", required=True, help="ImageFolder root to write (OUT/train, OUT/val)")
    p.add_argument("--data-dir", help="source folder (default: the dataset's default location)")
    p.add_argument("--limit", type=int, help="at most this many images per split (class-balanced)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--format", default="jpeg", choices=("jpeg", "png"),
                   help="jpeg (default) or png: lossless, the pixels of the source arrays (the "
                        "CIFAR ViT presets read their 32-px images this way)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/train, OUT/val")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must lie in [1, 100], got {args.quality}")
    why = unwritable_reason(args.out)
    if why:
        p.error(f"--out {args.out}: {why}; give a writable folder (it gets train/ and val/)")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: not a folder (it holds the {args.dataset} files)")
    try:
        counts = export(args.dataset, args.out, args.data_dir, args.limit, args.quality,
                        args.overwrite, args.format)
    except (DatasetError, ExportError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['val']} val images of {args.dataset} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
