"""ImageFolder data: ``ROOT/<split>/<class>/*.jpg`` through NVIDIA DALI or a PIL fallback.

Both loaders present :class:`fastmix.data.TensorLoader`'s interface: iteration yields
``(images [B, 3, S, S] normalised float, labels int64 [B])`` on the loader's device,
``len()`` is the number of batches per epoch, ``set_epoch(epoch)``; plus ``num_classes``,
``classes``, ``files``, ``labels``, ``skipped`` (``[(path, reason)]``) and ``num_skipped``.

* :func:`scan_imagefolder` lists and checks the files before anything trains. It *refuses*
  (:class:`DatasetError` naming the folder) a missing root or split, a split with no class
  folders, a class folder with no images and train/val class lists that differ. It *skips and
  counts* (one log line naming the first few, and ``ScanResult.skipped``) files that would crash
  a decoder mid-epoch: zero-byte files, files whose bytes are not JPEG/PNG/BMP/WebP whatever
  their name, truncated files (see ``verify``), and images of more than ``max_image_pixels``
  pixels (``MAX_IMAGE_PIXELS`` by default; the size is read from the header, nothing is
  decoded: a 20000 x 20000 PNG of a few hundred KB would otherwise decode to gigabytes, in
  DALI and the torchvision decoder alike). A file is dropped with its label, so no image ever
  gets another's label; a class left with no valid image is refused.
* :class:`DaliLoader`: ``fn.readers.file`` -> decode (``"mixed"``: nvJPEG on the GPU, or the CPU
  decoder) -> RandomResizedCrop + flip (train) or resize + centre crop (val) ->
  ``crop_mirror_normalize``. Everything decodes as RGB (grey, CMYK, palette and RGBA inputs
  become 3 channels).
* :class:`TorchvisionLoader`: the same pipeline as a ``torch.utils.data.Dataset`` in
  ``DataLoader`` workers, normalised on the loader's device. It decodes with
  ``torchvision.io.decode_image`` and resamples with ``torchvision.transforms.v2.functional``
  when torchvision imports (``decoder="torchvision"``; on CUDA the workers only read bytes and
  ``decode_jpeg(device="cuda")`` decodes the batch with nvJPEG), else with PIL
  (``decoder="pil"``: the transforms re-implemented in a few lines, so the loader also runs
  where torchvision cannot import, as beside the CPU build of torch 2.13.0). A JPEG the device
  decoder refuses (nvJPEG: CMYK, some progressive or odd-subsampling files) is decoded on the
  CPU instead and counted (``cpu_fallbacks``, see :meth:`TorchvisionLoader.decode_batch`).
* :func:`build_imagefolder_loader` picks one (``loader="auto"``: DALI when it imports and its
  pipeline builds, else the DataLoader loader) and logs one line saying which and why.

Augmentation (``pipeline``, spec §3's data pipelines, ``PIPELINES``): ``imagenet`` (default):
train = RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic) to ``size`` + horizontal flip
p=0.5; test = resize the shorter side to ``round(size * 256 / 224)`` (bicubic) + centre crop
``size``. ``tiny-imagenet``: the same training crop; test = shorter side to ``size`` + centre
crop (no crop for the 64 x 64 images). ``fine-grained`` (CUB-200, Aircraft): train = shorter
side to ``round(size * 256 / 224)``, then RandomResizedCrop(scale 0.5-1) + flip, bilinear;
test as ``imagenet`` but bilinear. Normalisation: ImageNet mean/std (pass ``mean``/``std``
for other data).

Epoch order (``_ImageFolderLoaderBase.epoch_indices``, shared by both loaders, so they read
the same files in the same order): training reshuffles the whole file list every epoch with
``torch.randperm`` seeded by ``(seed, epoch)`` -- the same on every rank -- and rank r takes
every world-th file of it, so ranks never overlap within an epoch and together see every file
(DistributedSampler semantics, including its padding: when world does not divide the count,
the first files of the permutation are repeated so that every rank has the same number of
batches). The last partial batch is dropped in training. Evaluation (``train=False``) reads
rank r's contiguous block of the sorted file list once, with a partial last batch.
Augmentation randomness is a function of ``(seed, epoch, rank)`` (DALI) or ``(seed, epoch,
file index)`` (DataLoader loader, either decoder): an epoch's batches do not depend on what ran before, so ``set_epoch`` is
exact and the trainer's mid-epoch resume sees the batches of the uninterrupted run.
"""
import io
import math
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastmix.data.datasets import DatasetError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")
LOADERS = ("auto", "dali", "torchvision")
DECODERS = ("auto", "pil", "torchvision")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
FALLBACK_WARN_FIRST = 5   # CPU decode fallbacks named in a log line; later ones are only counted
# The pre-scan's pixel limit (width x height), PIL's own Image.MAX_IMAGE_PIXELS default
# (1024 ** 3 // 4 // 3: 256 MiB as 24-bit RGB); --max-image-pixels raises it, 0 = no limit.
MAX_IMAGE_PIXELS = 89_478_485
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP"}


def log(msg):
    """One line on stderr (seen without any logging set-up, also in DDP workers)."""
    print(f"fastmix.data: {msg}", file=sys.stderr, flush=True)


def val_resize(size, ratio=256 / 224):
    """Shorter side before the centre crop: 256 for 224, in proportion otherwise."""
    return int(round(size * ratio))


class Pipeline(tuple):
    """One augmentation recipe of spec §3 (``PIPELINES``): ``pre_resize`` (shorter side to
    ``size * pre_resize`` before the training crop, or None), ``scale`` (RandomResizedCrop's area
    range), ``interp`` ("bicubic" or "bilinear", every resize), ``val_ratio`` (test: shorter
    side to ``size * val_ratio``, then the centre ``size`` crop), ``randaug`` (a timm RandAugment
    config string applied after the crop and flip, e.g. ``rand-m9-mstd0.5-inc1``, or None; it
    runs on PIL images in the DataLoader workers, so only ``--loader torchvision`` takes it),
    ``reprob`` (the probability of timm's RandomErasing after normalisation, 0 for none; it
    rides with RandAugment in the DataLoader loader)."""
    __slots__ = ()
    _fields = ("pre_resize", "scale", "interp", "val_ratio", "randaug", "reprob")

    def __new__(cls, pre_resize, scale, interp, val_ratio, randaug=None, reprob=0.0):
        return tuple.__new__(cls, (pre_resize, scale, interp, val_ratio, randaug, reprob))

    def __getattr__(self, name):
        try:
            return self[self._fields.index(name)]
        except ValueError:
            raise AttributeError(name) from None


PIPELINES = {
    # ImageNet: RandomResizedCrop(size, 0.08-1, bicubic) + flip; Resize 256 + CenterCrop 224.
    "imagenet": Pipeline(None, RRC_SCALE, "bicubic", 256 / 224),
    # Tiny-ImageNet: RandomResizedCrop(64, bicubic) + flip; test at 64 with no crop (the
    # images are 64 x 64: a resize of the shorter side to the size, a no-op for them).
    "tiny-imagenet": Pipeline(None, RRC_SCALE, "bicubic", 1.0),
    # CUB-200 / Aircraft: Resize 256, RandomResizedCrop(224, scale 0.5-1) + flip; Resize 256 +
    # CenterCrop 224. The spec names no interpolation here: torchvision's default, bilinear.
    "fine-grained": Pipeline(256 / 224, (0.5, 1.0), "bilinear", 256 / 224),
    # The official ViT recipes (OpenMixup's sz224_randaug CIFAR-100 base): CIFAR's 32-px images
    # upsampled by RandomResizedCrop(224, scale 0.8-1, bicubic) + flip + RandAugment (2 ops,
    # magnitude 7, std 0.5; timm's op set, where the official config draws from FixMatch's 14
    # ops); test: Resize(224, bicubic), no crop.
    "cifar-vit": Pipeline(None, (0.8, 1.0), "bicubic", 1.0, "rand-m7-n2-mstd0.5"),
    # ImageNet DeiT (OpenMixup's swin_sz224_8xbs128 base, timm's create_transform):
    # RandomResizedCrop(224, 0.08-1, bicubic) + flip + RandAugment m9 mstd0.5 inc1, then after
    # normalisation RandomErasing (p 0.25, one box, per-pixel normal noise); test Resize 256 +
    # CenterCrop 224.
    "deit": Pipeline(None, RRC_SCALE, "bicubic", 256 / 224, "rand-m9-mstd0.5-inc1", 0.25),
}


def randaugment(config, mean=IMAGENET_MEAN):
    """timm's RandAugment for ``config`` (a PIL image -> a PIL image), filling with ``mean``."""
    from timm.data.auto_augment import rand_augment_transform
    fill = tuple(int(round(255 * m)) for m in mean)
    return rand_augment_transform(config, dict(translate_const=100, img_mean=fill))


def random_erasing(probability):
    """timm's ``RandomErasing`` as the DeiT recipe builds it (``probability``, one box of 2-33 %
    of the image, aspect 0.3-3.3), here only to draw each sample's box: the loader fills the box
    on the device with per-pixel N(0, 1) noise after normalisation, timm's ``'pixel'`` mode."""
    from timm.data.random_erasing import RandomErasing
    return RandomErasing(probability=probability, mode="const", max_count=1, device="cpu")


def erase_boxes(x, boxes, generator):
    """``x`` (a normalised NCHW float batch) with each sample's box ``[top, left, h, w]``
    (``h = 0``: none) filled with per-pixel N(0, 1) noise from ``generator`` (on x's device);
    a new tensor in x's memory format."""
    n, _, h, w = x.shape
    top, left, bh, bw = boxes.to(x.device).unbind(1)
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    rows = (r >= top[:, None]) & (r < (top + bh)[:, None])
    cols = (c >= left[:, None]) & (c < (left + bw)[:, None])
    mask = (rows[:, :, None] & cols[:, None, :])[:, None]
    noise = torch.empty_like(x).normal_(generator=generator)
    return torch.where(mask, noise, x)


def seeded_call(fn, img, seed):
    """``fn(img)`` with Python's and numpy's global generators seeded from ``seed`` (timm's
    augmentations draw from them) and restored afterwards: the same sample gets the same ops
    whatever process or order runs it, and nothing else sees the draws."""
    import random
    state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return fn(img)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def _shorter_to(w, h, r):
    """``(w, h)`` resized so the shorter side is ``r`` (torchvision's ``Resize(int)``)."""
    return (r, int(r * h / w)) if w <= h else (int(r * w / h), r)


# ---- scanning and checking ------------------------------------------------------------------
class ScanResult(tuple):
    """``(files, labels, classes)``; ``.skipped`` lists ``(path, reason)`` of dropped files."""

    def __new__(cls, files, labels, classes, skipped=(), root=None, split=None):
        self = super().__new__(cls, (files, labels, classes))
        self.skipped, self.root, self.split = list(skipped), root, split
        return self

    files = property(lambda self: self[0])
    labels = property(lambda self: self[1])
    classes = property(lambda self: self[2])


def _class_dirs(split_dir):
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _list_class(class_dir, allowed_roots):
    """Image files under ``class_dir`` (recursively, symlinks followed), sorted, as
    ``(files, others, refused)``. A linked folder is entered once (a link cycle cannot loop), and
    a file or folder whose real path lies outside ``allowed_roots`` (the dataset root and the
    split folder, resolved) is not read: it lands in ``refused`` with the reason."""
    out, others, refused, seen = [], 0, [], set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not _inside(real, allowed_roots):
            if real not in seen:
                refused.append((dirpath, f"links outside the dataset, to {real}"))
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not _is_image(f):
                others += 1
                continue
            path = os.path.join(dirpath, f)
            target = os.path.realpath(path)
            if not _inside(target, allowed_roots):
                refused.append((path, f"links outside the dataset, to {target}"))
            else:
                out.append(path)
    return out, others, refused


def _inside(path, roots):
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def split_overlap(files_a, files_b):
    """Real files that appear in both lists (e.g. a val image linked into train)."""
    real_a = {os.path.realpath(f) for f in files_a}
    return sorted({os.path.realpath(f) for f in files_b} & real_a)


def _sniff(head):
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def open_image(fp):
    """``fp`` (a path or a binary file object) as a lazy PIL image of its sniffed format: only
    the header is read (``.size``, ``.mode``); ``.load()`` or ``.convert()`` decode.

    Unlike ``PIL.Image.open`` it does not apply PIL's own decompression-bomb check (a
    ``DecompressionBombError`` above ``2 * Image.MAX_IMAGE_PIXELS``, a warning above it): the
    pixel limit is the pre-scan's ``max_image_pixels``, the same for every loader and decoder,
    so raising it admits a large image to the PIL decoder too. Raises
    ``PIL.UnidentifiedImageError`` for a file that is not a JPEG, PNG, BMP or WebP image.
    """
    from PIL import Image, UnidentifiedImageError
    path = isinstance(fp, (str, bytes, os.PathLike))
    if path:
        with open(fp, "rb") as f:
            head = f.read(16)
    else:
        fp.seek(0)
        head = fp.read(16)
        fp.seek(0)
    kind = _sniff(head)
    name = os.fspath(fp) if path else getattr(fp, "name", "<bytes>")
    if kind is None:
        raise UnidentifiedImageError(f"cannot identify image file {name!r}: not a JPEG, PNG, "
                                     f"BMP or WebP file (starts with {head[:8]!r})")
    fmt = _PIL_FORMATS[kind]
    if fmt not in Image.OPEN:
        Image.init()
    if fmt not in Image.OPEN:        # a Pillow built without this format's plugin
        raise UnidentifiedImageError(f"cannot identify image file {name!r}: this Pillow cannot "
                                     f"read {fmt}")
    factory = Image.OPEN[fmt][0]
    try:
        return factory(fp) if path else factory(fp, name)
    except (SyntaxError, IndexError, TypeError, struct.error) as e:   # PIL's "not my format"
        raise UnidentifiedImageError(f"cannot identify image file {name!r}: {fmt} header: "
                                     f"{e}") from None


def check_max_pixels(max_pixels):
    """``max_pixels`` if it is a valid pixel limit (an int >= 0; 0 = none), else ``ValueError``."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_image_pixels must be an int >= 0 (0: no limit), got "
                         f"{max_pixels!r}")
    return max_pixels


def _too_many_pixels(w, h, max_pixels):
    return (f"{w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,} (a decompression "
            f"bomb? not decoded; --max-image-pixels raises the limit, 0 = none)")


def check_image_file(path, mode="header", max_pixels=MAX_IMAGE_PIXELS):
    """``None`` if ``path`` looks decodable, else the reason it is not.

    Always: the size is not zero and the first bytes are a JPEG, PNG, BMP or WebP signature
    (the decoders sniff the content, not the extension, so a PNG named .jpg is fine), and,
    unless ``max_pixels`` is 0, the header parses (:func:`open_image`; nothing is decoded)
    and gives a width x height of at most ``max_pixels``.
    ``mode="header"`` (cheap: a few small reads) also wants the format's end marker near the
    end of the file (JPEG EOI, PNG IEND) or, for BMP and WebP, the file size the header
    declares; a file that fails this is decoded in full with PIL to decide (so a valid JPEG
    with trailing bytes after EOI is kept, a truncated one is dropped). ``mode="full"``
    decodes every file (within the pixel limit).
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "zero bytes"
        with open(path, "rb") as f:
            head = f.read(16)
            kind = _sniff(head)
            if kind is None:
                return f"not a JPEG, PNG, BMP or WebP file (starts with {head[:8]!r})"
            if max_pixels:
                w, h = open_image(f).size      # the header only
                if w * h > max_pixels:
                    return _too_many_pixels(w, h, max_pixels)
            if mode != "full":
                f.seek(max(0, size - 64))
                tail = f.read()
                if kind == "jpeg" and b"\xff\xd9" in tail:
                    return None
                if kind == "png" and b"IEND" in tail:
                    return None
                if kind == "bmp" and len(head) >= 6 and int.from_bytes(head[2:6], "little") <= size:
                    return None
                if kind == "webp" and int.from_bytes(head[4:8], "little") + 8 <= size:
                    return None
        with open_image(path) as im:
            im.load()   # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES is off)
        return None
    except Exception as e:  # any failure to read or decode means: do not train on it
        return f"{type(e).__name__}: {e}"


def scan_imagefolder(root, split, verify=True, check_splits=SPLITS, classes=None, subset=None,
                     seed=0, workers=None, quiet=False, max_image_pixels=MAX_IMAGE_PIXELS):
    """List ``root/split/<class>/*`` images; returns ``ScanResult(files, labels, classes)``.

    Classes are the sub-folders of ``root/split`` sorted by name; label = index in that list.
    Image files: extensions .jpg .jpeg .png .bmp .webp (any case), searched recursively;
    other files are ignored. Raises :class:`DatasetError` (naming the folder) for a missing
    root or split, no class folders, a class folder without images, a class list that differs
    from the other split of ``check_splits`` present under ``root`` (or from ``classes``, when
    given), or nothing valid left after checking.

    Skipped with a count (never raised, never trained on): zero-byte files (always checked:
    one stat each) and, when ``verify`` is on, undecodable files -- ``verify=True`` or
    ``"header"``: the cheap check of :func:`check_image_file`; ``"full"``: decode every file
    with PIL; ``False``: no content check (a bad file then stops training with an error).
    With a content check, images of more than ``max_image_pixels`` pixels (width x height from
    the header, never decoded; default ``MAX_IMAGE_PIXELS``, 0 = no limit) are skipped too;
    ``verify=False`` reads no file's content, so it applies no pixel limit either.
    ``subset=n`` keeps a random (``seed``) n files, picked before the content check.
    """
    check_max_pixels(max_image_pixels)
    if not root:
        raise DatasetError(f"ImageFolder needs a root folder (--data-dir ROOT): ROOT/{split}/"
                           f"<class>/<image files>")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"ImageFolder root {root!r} does not exist or is not a folder "
                           f"(expected ROOT/{split}/<class>/<image files>)")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise DatasetError(f"ImageFolder split folder {split_dir} does not exist (folders in "
                           f"{root}: {', '.join(present) or 'none'}); expected "
                           f"{root}/{split}/<class>/<image files>")
    found = _class_dirs(split_dir)
    if not found:
        raise DatasetError(f"{split_dir} has no class folders: expected {split_dir}/<class>/"
                           f"<image files>, one sub-folder per class")
    if classes is not None and list(classes) != found:
        _raise_mismatch(split_dir, found, "the given class list", list(classes))
    for other in check_splits or ():
        other_dir = os.path.join(root, other)
        if other != split and os.path.isdir(other_dir):
            theirs = _class_dirs(other_dir)
            if theirs != found:
                _raise_mismatch(split_dir, found, other_dir, theirs)
    files, labels, skipped, refused, owner, dupes = [], [], [], [], {}, []
    allowed = {os.path.realpath(root), os.path.realpath(split_dir)}
    for label, name in enumerate(found):
        listed, others, out_of_tree = _list_class(os.path.join(split_dir, name), allowed)
        refused += out_of_tree
        if not listed:
            extra = f" ({others} files with other extensions)" if others else ""
            raise DatasetError(f"class folder {os.path.join(split_dir, name)} has no images{extra}: "
                               f"every class needs at least one {'/'.join(IMG_EXTENSIONS)} file")
        for path in listed:
            real = os.path.realpath(path)
            if real in owner:   # one file reached twice (links, or a linked folder)
                first, first_label = owner[real]
                if first_label != label:
                    raise DatasetError(
                        f"{path} and {first} are the same file ({real}) in two classes "
                        f"({name}, {found[first_label]}): its label would be ambiguous")
                dupes.append(path)
                continue
            owner[real] = (path, label)
            files.append(path)
            labels.append(label)
    if (refused or dupes) and not quiet:
        if refused:
            log(f"{split_dir}: not read, {len(refused)} link(s) leading outside the dataset "
                f"root: " + "; ".join(f"{p} ({r})" for p, r in refused[:3]))
        if dupes:
            log(f"{split_dir}: {len(dupes)} file(s) reached a second time through links, used "
                f"once: {', '.join(dupes[:3])}")
    if subset is not None and subset < len(files):
        keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:subset])
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    mode = {True: "header", False: "size"}.get(verify, verify)
    if mode not in ("size", "header", "full"):
        raise ValueError(f"verify must be True, False, 'header' or 'full', got {verify!r}")
    if mode == "size":
        reasons = [None if os.path.getsize(f) else "zero bytes" for f in files]
    else:
        workers = workers or min(32, 4 * (os.cpu_count() or 1))
        if len(files) < 256 or workers == 1:
            reasons = [check_image_file(f, mode, max_image_pixels) for f in files]
        else:  # I/O bound (and PIL decodes without the GIL): threads
            with ThreadPoolExecutor(workers) as pool:
                reasons = list(pool.map(lambda f: check_image_file(f, mode, max_image_pixels),
                                        files, chunksize=64))
    if any(reasons):
        kept = [i for i, r in enumerate(reasons) if r is None]
        skipped = [(f, r) for f, r in zip(files, reasons) if r is not None]
        files, labels = [files[i] for i in kept], [labels[i] for i in kept]
        if not quiet:
            shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
            more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            log(f"{split_dir}: skipped {len(skipped)} unreadable image file(s) of "
                f"{len(files) + len(skipped)}: {shown}{more}")
        empty = sorted(set(range(len(found))) - set(labels))
        if empty:
            raise DatasetError(f"class folder(s) with no readable image after skipping bad files: "
                               f"{', '.join(os.path.join(split_dir, found[c]) for c in empty)}")
    return ScanResult(files, labels, found, skipped, root, split)


def _raise_mismatch(split_dir, mine, other, theirs):
    only_mine = sorted(set(mine) - set(theirs))
    only_theirs = sorted(set(theirs) - set(mine))
    detail = []
    if only_mine:
        detail.append(f"only in {split_dir}: {', '.join(only_mine)}")
    if only_theirs:
        detail.append(f"only in {other}: {', '.join(only_theirs)}")
    raise DatasetError(f"class folders of {split_dir} and {other} differ ({'; '.join(detail)}): "
                       f"labels are class indices in sorted order, so both splits need the same "
                       f"class folders")


# ---- shared loader plumbing -----------------------------------------------------------------
def _resolve_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _ImageFolderLoaderBase:
    name = "?"

    def _setup(self, root, split, batch_size, train, size, device, shard, seed, dtype,
               channels_last, mean, std, scan, verify, subset, pipeline="imagenet"):
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
        self.pipeline_name, self.pipeline = pipeline, PIPELINES[pipeline]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if scan is None:
            scan = scan_imagefolder(root, split, verify=verify, subset=subset, seed=seed)
        self.files, self.labels, self.classes = list(scan[0]), list(scan[1]), list(scan[2])
        self.skipped = list(getattr(scan, "skipped", []))
        self.num_skipped = len(self.skipped)
        # JPEGs the loader's device decoder refused and the CPU decoded (TorchvisionLoader with
        # decode_on_device; always 0 for DALI, whose "mixed" decoder falls back internally):
        # a running count over the loader's life, and {path: why} of the distinct files.
        self.cpu_fallbacks, self.cpu_fallback_files = 0, {}
        self.num_classes = len(self.classes)
        self.root, self.split = root, split
        self.batch_size, self.train, self.size = batch_size, train, size
        self.device = _resolve_device(device)
        self.rank, self.world = rank, world
        self.seed, self.epoch = seed, 0
        self.dtype = dtype
        self.channels_last = (self.device.type == "cuda") if channels_last is None else channels_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.drop_last = train
        n = len(self.files)
        # samples of this rank per epoch: train pads every shard to ceil(n / world), as
        # DistributedSampler and DALI's pad_last_batch do; eval reads its own shard once
        self.shard_size = math.ceil(n / world) if train else len(self._eval_shard(n))
        if train and batch_size > self.shard_size:
            raise ValueError(f"batch size {batch_size} is larger than the dataset "
                             f"({self.shard_size} images on this rank)")

    def _eval_shard(self, n):
        """Evaluation: rank r's contiguous block [n*r//world, n*(r+1)//world), in file order."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def epoch_indices(self, epoch):
        """File indices this rank reads in ``epoch``, in order (both loaders use this).

        Train: ``torch.randperm`` seeded by ``seed * 100003 + epoch`` (the same on every rank),
        padded to a multiple of ``world`` with its first entries (DistributedSampler), rank r
        taking every world-th, cut to whole batches. Eval: ``_eval_shard``.
        """
        n = len(self.files)
        if not self.train:
            return list(self._eval_shard(n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        total = self.shard_size * self.world
        if total > n:
            perm = torch.cat([perm, perm[:total - n]])
        return perm[self.rank:total:self.world][:len(self) * self.batch_size].tolist()

    def __len__(self):
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def describe(self):
        return (f"{self.name} loader, {self.split} {len(self.files)} images of {self.num_classes} "
                f"classes ({self.num_skipped} skipped), shard {self.rank}/{self.world}, "
                f"{len(self)} batches of {self.batch_size} at {self.size}px on {self.device}, "
                f"{self.pipeline_name} pipeline")


# ---- DALI -----------------------------------------------------------------------------------
def dali_available():
    """``(True, version)`` or ``(False, why)``."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
        return True, nvidia.dali.__version__
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"{type(e).__name__}: {e}"


class DaliLoader(_ImageFolderLoaderBase):
    """ImageFolder through a DALI pipeline; on CUDA decoding runs on the GPU (nvJPEG, "mixed").

    ``device="cpu"`` runs a CPU-only pipeline (no GPU needed). Output layout: with
    ``channels_last`` (default on CUDA) DALI writes HWC and the batch is handed to torch as
    the NCHW permute of that NHWC tensor -- a channels-last tensor, no copy; otherwise DALI
    writes CHW (contiguous NCHW). DALI emits float16 or float32; bfloat16 is converted from
    float32 (keeping the memory format). ``num_workers`` = DALI CPU threads.

    Order and randomness are functions of ``(seed, epoch, rank)`` alone, as in the PIL
    loader and TensorLoader, so ``set_epoch`` is exact and a resumed run (which draws and
    discards the first batches of its epoch) sees the very batches of the uninterrupted one:
    each training epoch gets its own pipeline, whose ``fn.readers.file`` reads this rank's
    files of ``epoch_indices(epoch)`` in order (the same files, in the same order, as the PIL
    loader) and whose augmentation seed is ``(seed, epoch, rank)``. The reader's own
    ``random_shuffle`` is not used: it only shuffles within a 1024-file buffer and its order
    depends on how many epochs the pipeline has run. The next epoch's pipeline is built (and
    starts prefetching) as soon as an epoch ends; building one costs milliseconds on the CPU.
    Evaluation keeps one pipeline over this rank's contiguous block.
    """
    name = "dali"

    def __init__(self, root, split, batch_size, train, size=224, device="cpu", shard=(0, 1),
                 seed=0, dtype=torch.float32, channels_last=None, num_workers=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, scan=None, verify=True, subset=None,
                 prefetch=2, pipeline="imagenet"):
        self._setup(root, split, batch_size, train, size, device, shard, seed, dtype,
                    channels_last, mean, std, scan, verify, subset, pipeline)
        import nvidia.dali
        self.version = nvidia.dali.__version__
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DaliLoader runs on cpu or cuda, not {self.device}")
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.prefetch = prefetch
        self._iter, self._key, self._fresh = None, None, False
        self._prepare(self.epoch)      # build now: a DALI that cannot run fails here

    def _build(self, epoch):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        gpu = self.device.type == "cuda"
        size, train, pipe = self.size, self.train, self.pipeline
        idx = self.epoch_indices(epoch)
        files, labels = [self.files[i] for i in idx], [self.labels[i] for i in idx]
        layout = "HWC" if self.channels_last else "CHW"
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        mean255, std255 = [m * 255 for m in self.mean], [s * 255 for s in self.std]
        aug_seed = (self.seed * 100003 + epoch * 7919 + self.rank * 104729 + 1) % (2 ** 31)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_workers,
                      device_id=self.device.index if gpu else None, seed=aug_seed,
                      prefetch_queue_depth=self.prefetch)
        def pipeline():
            jpegs, lab = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                         pad_last_batch=True, name="Reader")
            dec = "mixed" if gpu else "cpu"
            # nvJPEG scratch sizes from NVIDIA's ImageNet example (avoid reallocations)
            extra = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}
            interp = types.INTERP_CUBIC if pipe.interp == "bicubic" else types.INTERP_LINEAR
            if train and pipe.pre_resize is None:   # crop while decoding: only the box decodes
                img = fn.decoders.image_random_crop(
                    jpegs, device=dec, output_type=types.RGB, random_area=list(pipe.scale),
                    random_aspect_ratio=list(RRC_RATIO), num_attempts=100, **extra)
                img = fn.resize(img, resize_x=size, resize_y=size, interp_type=interp,
                                antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
            elif train:                              # resize, then RandomResizedCrop
                img = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, **extra)
                img = fn.resize(img, resize_shorter=val_resize(size, pipe.pre_resize),
                                interp_type=interp, antialias=True)
                img = fn.random_resized_crop(img, size=[size, size], random_area=list(pipe.scale),
                                             random_aspect_ratio=list(RRC_RATIO),
                                             num_attempts=100, interp_type=interp, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                img = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, **extra)
                img = fn.resize(img, resize_shorter=val_resize(size, pipe.val_ratio),
                                interp_type=interp, antialias=True)
                mirror = False
            img = fn.crop_mirror_normalize(
                img, dtype=out_type, output_layout=layout, crop=(size, size), crop_pos_x=0.5,
                crop_pos_y=0.5, mean=mean255, std=std255, mirror=mirror)
            return img, (lab.gpu() if gpu else lab)

        it = DALIGenericIterator(
            pipeline(), ["images", "labels"], reader_name="Reader", auto_reset=not train,
            prepare_first_batch=False,   # decode nothing (and fail on no file) before iteration
            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)
        if len(it) != len(self):
            raise RuntimeError(f"DALI iterator has {len(it)} batches per epoch, expected {len(self)}")
        return it

    def _prepare(self, epoch):
        key = epoch if self.train else 0
        if self._iter is None or self._key != key or not self._fresh:
            self._iter = None                 # free the old pipeline before the new one
            self._iter, self._key, self._fresh = self._build(epoch), key, True

    def __iter__(self):
        self._prepare(self.epoch)
        it, self._fresh = self._iter, False   # a pass that stops early leaves it unusable
        done = 0
        try:
            for batch in it:
                done += 1
                x, y = batch[0]["images"], batch[0]["labels"]
                if self.channels_last:
                    x = x.permute(0, 3, 1, 2)  # NHWC memory -> NCHW channels-last view, no copy
                if x.dtype != self.dtype:
                    x = x.to(self.dtype)
                yield x, y.view(-1).to(torch.int64)
        except RuntimeError as e:
            self._iter = None
            # DALI's error does not name the file: decode (with PIL) the files of the batch
            # that failed and the ones it had prefetched, and name the culprits.
            idx = self.epoch_indices(self.epoch)
            near = idx[done * self.batch_size:(done + self.prefetch + 2) * self.batch_size]
            bad = [(self.files[i], r) for i in near
                   if (r := check_image_file(self.files[i], "full")) is not None]
            where = ("; ".join(f"{p} ({r})" for p, r in bad[:5]) if bad else
                     "no single file of the failing batches fails to decode with PIL")
            raise DatasetError(
                f"DALI could not decode an image of {self.root}/{self.split} ({where}). The "
                f"cheap pre-scan checks only a file's signature and end marker; run with "
                f"--verify-images full to decode every file before training and skip the "
                f"unreadable ones. DALI said: {str(e).splitlines()[0][:300]}") from None
        if self.train:                        # build the next epoch's pipeline: it prefetches
            self._iter = None                 # while the caller evaluates
            self._prepare(self.epoch + 1)
        else:
            self._fresh = True                # auto_reset: ready for the next pass


# ---- PIL fallback ---------------------------------------------------------------------------
def random_resized_crop_box(w, h, rng, scale=RRC_SCALE, ratio=RRC_RATIO):
    """torchvision's RandomResizedCrop.get_params: ``(left, top, right, bottom)``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    if w / h < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def torchvision_io_available():
    """``(True, version)`` when ``torchvision.io`` and ``transforms.v2.functional`` import, else
    ``(False, why)`` (the main test venv's CPU torch 2.13.0 has no torchvision beside it)."""
    try:
        import torchvision
        import torchvision.io  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
        return True, torchvision.__version__
    except Exception as e:  # ImportError, or a torchvision built for another torch
        return False, f"{type(e).__name__}: {e}"


def _is_bmp(head):
    return head[:2] == b"BM"


class ImageFileDataset(torch.utils.data.Dataset):
    """``(uint8 HWC [S, S, 3] tensor, label)`` per file.

    ``decoder="pil"``: PIL decodes and resamples. ``decoder="torchvision"``:
    ``torchvision.io.decode_image`` decodes (libjpeg-turbo / libpng / libwebp; BMP, which it does
    not read, goes through PIL) and ``transforms.v2.functional`` crops and resamples (bicubic,
    antialiased) the uint8 tensor. Both draw the same crop boxes and flips (:meth:`geometry`),
    so the two decoders give the same crops up to resampler rounding.

    With ``raw=True`` the dataset does not decode: it returns the file's bytes and its
    geometry, and :meth:`TorchvisionLoader` decodes the batch (on the GPU with nvJPEG when the
    loader's device is CUDA) and applies :func:`apply_geometry` there.

    Random draws come from ``numpy.random.default_rng((seed, epoch, index))``: the same
    whatever worker decodes the sample. Set ``.epoch`` before each epoch (the loader does).
    """

    def __init__(self, files, labels, size, train, seed=0, decoder="pil", raw=False,
                 pipeline="imagenet", mean=IMAGENET_MEAN):
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {decoder!r}")
        self.pipeline = PIPELINES[pipeline]
        if raw and train and self.pipeline.randaug:
            raise ValueError(f"the {pipeline} pipeline's RandAugment runs on decoded PIL images "
                             f"in the workers: it cannot decode on the device (raw=False)")
        self.randaug = randaugment(self.pipeline.randaug, mean) \
            if train and self.pipeline.randaug else None
        self.erasing = random_erasing(self.pipeline.reprob) \
            if train and self.pipeline.reprob else None
        if raw and self.erasing is not None:
            raise ValueError(f"the {pipeline} pipeline's RandomErasing boxes are drawn in the "
                             f"workers with its RandAugment: it cannot decode on the device")
        self.files, self.labels = files, labels
        self.size, self.train, self.seed, self.epoch = size, train, seed, 0
        self.decoder, self.raw = decoder, raw

    def __len__(self):
        return len(self.files)

    def _error(self, index, e):
        return DatasetError(f"{self.files[index]}: cannot decode ({type(e).__name__}: {e}); run "
                            f"with --verify-images full to decode every file before training and "
                            f"skip the unreadable ones")

    def geometry(self, index, w, h):
        """Eight ints fixing the crop of a ``w`` x ``h`` image: ``(mode, rw, rh, left, top,
        right, bottom, flip)``: resize to ``rw`` x ``rh`` (skipped when that is the image's
        size), then mode 0 (train): resample the box to ``size`` x ``size`` and flip if
        ``flip``; mode 1 (test): cut the box (a ``size`` x ``size`` centre crop)."""
        s, p = self.size, self.pipeline
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            rw, rh = (w, h) if p.pre_resize is None else _shorter_to(w, h, val_resize(s, p.pre_resize))
            box = random_resized_crop_box(rw, rh, rng, scale=p.scale)
            return (0, rw, rh, *box, int(rng.random() < 0.5))
        rw, rh = _shorter_to(w, h, val_resize(s, p.val_ratio))
        x0, y0 = (rw - s + 1) // 2, (rh - s + 1) // 2   # half-pixel offsets round up, as DALI
        return (1, rw, rh, x0, y0, x0 + s, y0 + s, 0)

    def load(self, index):
        path = self.files[index]
        try:
            if self.decoder == "pil":
                with open_image(path) as im:
                    img = im.convert("RGB")   # grey, CMYK, palette, RGBA -> RGB
            else:
                img = decode_file(path)
        except Exception as e:
            raise self._error(index, e) from e
        interp = self.pipeline.interp
        if self.decoder == "pil":
            out = apply_geometry_pil(img, self.geometry(index, *img.size), self.size, interp)
        else:
            g = self.geometry(index, img.shape[2], img.shape[1])
            out = apply_geometry(img, g, self.size, interp).permute(1, 2, 0).contiguous()
        return out if self.randaug is None else self.augment(out, index)

    def augment(self, hwc, index):
        """The pipeline's RandAugment on one uint8 HWC crop, drawn from ``(seed, epoch, index)``."""
        from PIL import Image
        arr = hwc.numpy() if isinstance(hwc, torch.Tensor) else hwc
        seed = int(np.random.default_rng((self.seed, self.epoch, index, 1)).integers(2**62))
        out = np.asarray(seeded_call(self.randaug, Image.fromarray(arr), seed))
        return torch.from_numpy(out.copy()) if isinstance(hwc, torch.Tensor) else out

    def erase_box(self, index):
        """``[top, left, h, w]`` of this sample's RandomErasing box (all 0: none), drawn by timm's
        ``RandomErasing`` from ``(seed, epoch, index)`` on a probe of the crop's size."""
        probe = torch.ones(1, self.size, self.size, dtype=torch.uint8)
        seed = int(np.random.default_rng((self.seed, self.epoch, index, 2)).integers(2**62))
        seeded_call(self.erasing, probe, seed)
        hit = probe[0] == 0
        if not hit.any():
            return torch.zeros(4, dtype=torch.int64)
        rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
        top, left = int(rows[0]), int(cols[0])
        return torch.tensor([top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1])

    def load_raw(self, index):
        """``(file bytes as a uint8 tensor, geometry)`` without decoding the pixels (the size
        comes from the header)."""
        path = self.files[index]
        try:
            with open_image(path) as im:
                w, h = im.size
        except Exception as e:
            raise self._error(index, e) from e
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        return data, torch.tensor(self.geometry(index, w, h), dtype=torch.int64)

    def __getitem__(self, index):
        if self.raw:
            data, g = self.load_raw(index)
            return data, g, index, self.labels[index]
        img = self.load(index)
        if not isinstance(img, torch.Tensor):
            img = torch.from_numpy(img.copy())
        if self.erasing is not None:
            return img, self.labels[index], self.erase_box(index)
        return img, self.labels[index]


def apply_geometry_pil(img, g, s, interp="bicubic"):
    """A PIL image -> uint8 HWC array: :meth:`ImageFileDataset.geometry` with PIL's resampler."""
    from PIL import Image
    mode, rw, rh, left, top, right, bottom, flip = g
    f = Image.BICUBIC if interp == "bicubic" else Image.BILINEAR
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), f)
    if mode == 0:
        img = img.resize((s, s), f, box=(left, top, right, bottom))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        img = img.crop((left, top, right, bottom))
    return np.asarray(img)


def apply_geometry(img, g, s, interp="bicubic"):
    """A uint8 CHW tensor (any device) -> uint8 CHW ``[3, s, s]``: the same geometry with
    torchvision's resampler (antialiased, as PIL's)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    mode, rw, rh, left, top, right, bottom, flip = [int(v) for v in g]
    f = InterpolationMode.BICUBIC if interp == "bicubic" else InterpolationMode.BILINEAR
    if (rh, rw) != tuple(img.shape[-2:]):
        img = TF.resize(img, [rh, rw], interpolation=f, antialias=True)
    if mode == 0:
        img = TF.resized_crop(img, top, left, bottom - top, right - left, [s, s],
                              interpolation=f, antialias=True)
        return img.flip(-1) if flip else img
    return img[:, top:bottom, left:right]


def decode_file(path, data=None):
    """``torchvision.io.decode_image`` as RGB (uint8 ``[3, H, W]``); BMP through PIL."""
    from torchvision.io import ImageReadMode, decode_image
    if data is None:
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    if _is_bmp(bytes(data[:2].tolist())):
        with open_image(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return decode_image(data, mode=ImageReadMode.RGB)


def decode_file_fallback(path, data=None):
    """A file the device decoder refused, on the CPU: ``(uint8 [3, H, W], how)``.

    First :func:`decode_file` (``torchvision.io`` on the CPU: the very pixels of the worker path,
    ``decode_on_device=False``), else PIL's ``convert("RGB")`` as the last resort -- PIL is what
    the scan's ``--verify-images full`` decodes with, so a file it reads is a file the scan keeps
    (e.g. a JPEG whose EOI marker is missing after zero padding: libjpeg-turbo has the whole
    image, PIL accepts it, torchvision.io refuses "Image is incomplete or truncated"; PIL and
    libjpeg-turbo then give the same pixels). Raises PIL's error when neither decodes it.
    """
    if data is None:
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    try:
        return decode_file(path, data), "torchvision.io on the CPU"
    except Exception:
        pass
    with open_image(io.BytesIO(data.numpy().tobytes())) as im:
        img = im.convert("RGB")   # grey, CMYK, palette, RGBA -> RGB, as decoder="pil"
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), "PIL on the CPU"


def _first_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _collate_raw(items):
    data, geom, index, labels = zip(*items)
    return list(data), torch.stack(geom), list(index), torch.tensor(labels)


class _ShardSampler(torch.utils.data.Sampler):
    """The loader's ``epoch_indices`` for its current epoch."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader.epoch_indices(self.loader.epoch))

    def __iter__(self):
        return iter(self.loader.epoch_indices(self.loader.epoch))


class TorchvisionLoader(_ImageFolderLoaderBase):
    """ImageFolder through ``torch.utils.data.DataLoader`` workers.

    The torchvision ``RandomResizedCrop(bicubic) + RandomHorizontalFlip`` / ``Resize +
    CenterCrop`` pipeline. ``decoder``: ``"torchvision"`` (``torchvision.io`` decode +
    ``transforms.v2`` resampling), ``"pil"`` (PIL, needs no torchvision) or ``"auto"``
    (torchvision when it imports). Workers return uint8 HWC crops; the batch moves to ``device``
    as uint8 (pinned on CUDA) and is normalised there. With ``channels_last`` the NHWC batch
    becomes a channels-last NCHW view, no copy.

    ``decode_on_device`` (default: on for the torchvision decoder on CUDA): workers only read
    the files' bytes and draw the crops; the batch's JPEGs are decoded by
    ``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG on CUDA; other formats on the
    CPU) and cropped on the device. Same crops as the worker path (tested on the CPU). A JPEG
    the device decoder refuses is decoded on the CPU (:func:`decode_file_fallback`) and the
    batch completes with the same crop; ``cpu_fallbacks`` counts these files (over the loader's
    life, every epoch's included), ``cpu_fallback_files`` maps each distinct one to the device's
    error, and the first ``FALLBACK_WARN_FIRST`` are named in a log line.
    """
    name = "torchvision"

    def __init__(self, root, split, batch_size, train, size=224, device="cpu", shard=(0, 1),
                 seed=0, dtype=torch.float32, channels_last=None, num_workers=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, scan=None, verify=True, subset=None,
                 decoder="auto", decode_on_device=None, pipeline="imagenet"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        ok, info = torchvision_io_available()
        if decoder == "torchvision" and not ok:
            raise ImportError(f"--decoder torchvision: torchvision does not import ({info}); "
                              f"install torchvision matching this torch, or use --decoder pil")
        self.decoder = decoder if decoder != "auto" else ("torchvision" if ok else "pil")
        self._setup(root, split, batch_size, train, size, device, shard, seed, dtype,
                    channels_last, mean, std, scan, verify, subset, pipeline)
        if decode_on_device is None:
            decode_on_device = self.decoder == "torchvision" and self.device.type == "cuda" \
                and not (train and PIPELINES[pipeline].randaug)
        if decode_on_device and self.decoder != "torchvision":
            raise ValueError("decode_on_device needs decoder='torchvision'")
        self.decode_on_device = decode_on_device
        self.dataset = ImageFileDataset(self.files, self.labels, size, train, seed,
                                        decoder=self.decoder, raw=decode_on_device,
                                        pipeline=pipeline, mean=mean)
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=_ShardSampler(self),
            num_workers=self.num_workers, drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda" and not decode_on_device,
            collate_fn=_collate_raw if decode_on_device else None, persistent_workers=False,
            # Starting an iterator draws a base seed; from the global torch RNG it would shift
            # the training step's random stream (and break exact resume). The augmentation is
            # keyed by (seed, epoch, index), not by this seed.
            generator=torch.Generator().manual_seed(seed))

    def decode_batch(self, data, geom, index):
        """Decode a batch of file bytes on ``self.device`` and crop it: uint8 NHWC.

        The JPEGs go to ``decode_jpeg`` as one list; when that raises (one file it refuses fails
        the whole call), each is decoded alone on the device, and a file the device refuses
        again is decoded on the CPU (:meth:`_decode_on_cpu`) and moved to the device. The crop
        is the worker-drawn ``geom`` either way. A file no decoder reads raises
        :class:`DatasetError` naming it.
        """
        from torchvision.io import ImageReadMode, decode_jpeg
        jpeg = [i for i, d in enumerate(data) if bytes(d[:2].tolist()) == b"\xff\xd8"]
        imgs = [None] * len(data)
        if jpeg:
            try:
                out = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB,
                                  device=self.device)
            except Exception:                 # find the file(s) that failed: one by one
                out = []
                for i in jpeg:
                    try:
                        out.append(decode_jpeg(data[i], mode=ImageReadMode.RGB, device=self.device))
                    except Exception as e:
                        out.append(self._decode_on_cpu(data[i], index[i], e))
            for i, img in zip(jpeg, out):
                imgs[i] = img
        for i, img in enumerate(imgs):
            if img is None:                   # PNG, WebP, BMP: decoded on the CPU
                try:
                    img = decode_file(self.files[index[i]], data[i])
                except Exception as e:
                    raise self.dataset._error(index[i], e) from e
                imgs[i] = img.to(self.device)
        g = geom.tolist()
        interp = self.dataset.pipeline.interp
        return torch.stack([apply_geometry(img, gi, self.size, interp) for img, gi in zip(imgs, g)]
                           ).permute(0, 2, 3, 1).contiguous()

    def _decode_on_cpu(self, data, index, device_error):
        """A JPEG the device decoder refused (``device_error``): decoded on the CPU, on the
        device; counted, and named in a log line for the first ``FALLBACK_WARN_FIRST``."""
        path = self.files[index]
        try:
            img, how = decode_file_fallback(path, data)
        except Exception as e:              # no decoder reads it: a corrupt file, named
            raise self.dataset._error(index, e) from e
        self.cpu_fallbacks += 1
        self.cpu_fallback_files.setdefault(path, _first_line(device_error))
        if self.cpu_fallbacks <= FALLBACK_WARN_FIRST:
            log(f"warning: the {self.device} JPEG decoder refused {path} "
                f"({_first_line(device_error)}); decoded it with {how} instead (fallback "
                f"{self.cpu_fallbacks}; the first {FALLBACK_WARN_FIRST} are named, all are counted "
                f"in the loader's cpu_fallbacks)")
            if self.cpu_fallbacks == FALLBACK_WARN_FIRST:
                log(f"warning: any further CPU decode fallbacks of {self.root}/{self.split} "
                    f"are counted (cpu_fallbacks), not logged")
        return img.to(self.device)

    def __iter__(self):
        self.dataset.epoch = self.epoch   # workers start per epoch and copy the dataset
        for i, batch in enumerate(self._loader):
            boxes = None
            if self.decode_on_device:
                data, geom, index, y = batch
                x = self.decode_batch(data, geom, index)
            else:
                x, y, *boxes = batch
                x = x.to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2)                     # NCHW view of NHWC
            x = (x.float() - self._mean) / self._std
            if boxes:
                # RandomErasing's noise: a generator keyed by (seed, epoch, rank, batch), so a
                # resumed run (which draws the skipped batches) fills the same boxes alike
                g = torch.Generator(device=self.device).manual_seed(int(np.random.default_rng(
                    (self.seed, self.epoch, self.rank, i, 3)).integers(2**62)))
                x = erase_boxes(x, boxes[0], g)
            x = x.to(self.dtype)
            if not self.channels_last:
                x = x.contiguous()
            yield x, y.to(self.device, non_blocking=True).to(torch.int64)

    def describe_decode(self):
        if self.decode_on_device:
            where = "GPU (torchvision.io nvJPEG)" if self.device.type == "cuda" else "the loader's device"
            return f"{where}, crops on {self.device}; {self.num_workers} workers read files"
        lib = "torchvision.io" if self.decoder == "torchvision" else "PIL"
        return f"CPU ({lib}, {self.num_workers} workers)"


# ---- choosing one ---------------------------------------------------------------------------
def build_imagefolder_loader(root, split, batch_size, train, loader="auto", device="cpu",
                             size=224, shard=(0, 1), seed=0, dtype=torch.float32,
                             channels_last=None, num_workers=None, verify=True, subset=None,
                             classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, quiet=False,
                             decoder="auto", pipeline="imagenet",
                             max_image_pixels=MAX_IMAGE_PIXELS):
    """A DALI or DataLoader loader over ``root/split``; logs one line saying which runs and why.

    ``loader="auto"``: DALI when it imports and its pipeline builds, else the DataLoader
    loader; ``"dali"`` raises ImportError without DALI; ``"torchvision"``: the DataLoader
    loader, decoding with ``decoder`` (``"auto"``: ``torchvision.io`` when torchvision imports,
    else PIL; see :class:`TorchvisionLoader`). An explicit ``decoder`` with ``loader="dali"``
    is refused (DALI decodes itself). ``classes``: the class list the split must have (pass the train loader's ``classes`` when
    building the val loader). ``max_image_pixels``: the pre-scan's pixel limit (see
    :func:`scan_imagefolder`; 0 = none). Dataset problems raise :class:`DatasetError` before
    any training.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if loader == "dali" and decoder != "auto":
        raise ValueError(f"--decoder {decoder} is for --loader torchvision: DALI decodes itself")
    if decoder == "torchvision" and not torchvision_io_available()[0]:
        raise ImportError(f"--decoder torchvision: torchvision does not import "
                          f"({torchvision_io_available()[1]}); install torchvision matching this "
                          f"torch, or use --decoder pil")
    check_max_pixels(max_image_pixels)
    scan = scan_imagefolder(root, split, verify=verify, classes=classes, subset=subset, seed=seed,
                            quiet=quiet, max_image_pixels=max_image_pixels)
    kw = dict(size=size, device=device, shard=shard, seed=seed, dtype=dtype,
              channels_last=channels_last, num_workers=num_workers, mean=mean, std=std, scan=scan,
              pipeline=pipeline)
    ok, info = dali_available()
    randaug = train and PIPELINES.get(pipeline, PIPELINES["imagenet"]).randaug
    if loader == "dali" and randaug:
        raise ValueError(f"the {pipeline} pipeline's RandAugment ({randaug}) runs on PIL images "
                         f"in DataLoader workers, which DALI has not: use --loader torchvision "
                         f"(--loader auto picks it)")
    if loader == "torchvision":
        why = "requested (--loader torchvision)"
    elif randaug:
        why = f"auto: the {pipeline} pipeline's RandAugment runs in the DataLoader workers"
        loader = "torchvision"
    elif loader == "dali":
        if not ok:
            raise ImportError(f"--loader dali: NVIDIA DALI does not import ({info}); install it "
                              f"with `pip install nvidia-dali-cuda130` (or `pip install -e .[dali]`), "
                              f"or use --loader torchvision")
        ld = DaliLoader(root, split, batch_size, train, **kw)
        why = "requested (--loader dali)"
    elif ok:
        try:
            ld = DaliLoader(root, split, batch_size, train, **kw)
            why = f"auto: DALI {info} imports"
        except (DatasetError, ValueError):
            raise
        except Exception as e:  # e.g. a DALI build that does not match this CUDA driver
            why = f"auto: the DALI {info} pipeline failed to build ({type(e).__name__}: {e})"
            loader = "torchvision"
    else:
        why = f"auto: DALI not importable ({info})"
        loader = "torchvision"
    if loader == "torchvision":
        ld = TorchvisionLoader(root, split, batch_size, train, decoder=decoder, **kw)
    if not quiet:
        decode = ("GPU (nvJPEG, mixed)" if ld.device.type == "cuda" else "CPU") if ld.name == "dali" \
            else ld.describe_decode()
        log(f"{ld.describe()}; decode on {decode}; {why}")
    return ld
