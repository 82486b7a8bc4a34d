#!/usr/bin/env python
"""ImageFolder loader throughput: images/s of each available loader on this device.

    python bench/data.py --data-dir DIR [--synthetic N] [--size 224] [--batch-size 64]
                         [--batches 20] [--warmup 3] [--workers N] [--device auto|cpu|cuda]
                         [--loaders dali,tvio,pil]

DIR is an ImageFolder root (DIR/train/<class>/*.jpg, DIR/val/...; e.g. from
``python -m fastmix.data.export --dataset fashion-mnist --out DIR``). ``--synthetic N`` first
writes N photo-sized JPEGs per split there (500 x 375, quality 90, smooth gradients plus
texture and noise: about ImageNet's mean size and file size), which is what decode speed
depends on; Fashion-MNIST's 28 x 28 files mostly time the resize. For each loader -- ``dali``
(DALI when it imports), ``tvio`` (the DataLoader loader decoding with ``torchvision.io``, on
the GPU with nvJPEG when the device is CUDA; needs torchvision) and ``pil`` (the same loader
decoding with PIL) -- and each split (train: RandomResizedCrop + flip; val:
resize + centre crop) it builds the loader once (the file scan is shared and timed apart),
runs ``--warmup`` batches, then times ``--batches`` batches (reading on across epochs when
one epoch is shorter), synchronising CUDA before the clock stops, and prints a Markdown
table: images/s = batches * batch size / seconds. On CUDA DALI decodes on the GPU ("mixed");
the PIL loader always decodes on the CPU.
"""
import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402

from fastmix.data.imagefolder import (DaliLoader, TorchvisionLoader, dali_available,  # noqa: E402
                                      scan_imagefolder, torchvision_io_available)


def batches(loader, n):
    """Yield ``n`` batches, starting new epochs as needed."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for b in loader:
            yield b
            n -= 1
            if n == 0:
                return
        epoch += 1


def time_loader(loader, n, warmup, device):
    it = batches(loader, n + warmup)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    images = 0
    for x, _ in it:
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return images / dt, 1000 * dt / n


def write_synthetic(root, n, classes=4, w=500, h=375, seed=0):
    """``n`` JPEGs per split under ``root/{train,val}/c<k>/`` (skipped when already there)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split in ("train", "val"):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % classes}")
            path = os.path.join(d, f"{i:05d}.jpg")
            if os.path.exists(path):
                continue
            os.makedirs(d, exist_ok=True)
            f = rng.uniform(0.01, 0.08, 3)
            base = np.stack([127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3] + rng.uniform(0, 6))
                             for c in range(3)], -1)
            img = base + rng.normal(0, 18, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.machine()}, {os.cpu_count()} cores"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="ImageFolder root (DIR/train, DIR/val)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="first write this many 500x375 JPEGs per split into DIR")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--workers", type=int, default=None,
                   help="DALI threads / DataLoader workers (default: min(8, CPU count))")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--loaders", default="dali,tvio,pil")
    p.add_argument("--splits", default="train,val")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    workers = args.workers or min(8, os.cpu_count() or 1)
    if args.synthetic:
        write_synthetic(args.data_dir, args.synthetic)
    ok, dali_info = dali_available()
    tv_ok, tv_info = torchvision_io_available()
    kinds = [k.strip() for k in args.loaders.split(",") if k.strip()]
    rows, notes = [], []
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        t0 = time.perf_counter()
        scan = scan_imagefolder(args.data_dir, split, verify=True)
        scan_s = time.perf_counter() - t0
        sizes = [os.path.getsize(f) for f in scan.files[:2000]]
        notes.append(f"{split}: {len(scan.files)} images, {len(scan.classes)} classes, "
                     f"{len(scan.skipped)} skipped, mean file {sum(sizes) / len(sizes) / 1024:.1f} KiB, "
                     f"scan+verify {scan_s:.2f} s")
        for kind in kinds:
            if kind == "dali" and not ok:
                notes.append(f"dali: not run ({dali_info})")
                continue
            if kind == "tvio" and not tv_ok:
                notes.append(f"tvio: not run ({tv_info})")
                continue
            train = split == "train"
            kw = dict(size=args.size, device=device, num_workers=workers, scan=scan,
                      channels_last=device.type == "cuda")
            if kind == "dali":
                ld = DaliLoader(args.data_dir, split, args.batch_size, train, **kw)
                decode = "GPU nvJPEG" if device.type == "cuda" else "CPU (DALI)"
            else:
                ld = TorchvisionLoader(args.data_dir, split, args.batch_size, train,
                                       decoder="torchvision" if kind == "tvio" else "pil", **kw)
                decode = ld.describe_decode().split(";")[0]
            ips, ms = time_loader(ld, args.batches, args.warmup, device)
            rows.append((kind, split, decode, workers, args.batch_size, args.size, ips, ms))
            del ld
    dali_v = dali_info if ok else "not installed"
    print(f"- device: {device_name(device)}")
    tv_v = tv_info if tv_ok else "not installed"
    print(f"- torch {torch.__version__}, DALI {dali_v}, torchvision {tv_v}, Pillow {PIL.__version__}, "
          f"python {platform.python_version()}")
    print(f"- data: {args.data_dir}; " + "; ".join(notes))
    print(f"- timing: {args.warmup} warm-up batches, then {args.batches} batches, time.perf_counter"
          + (", CUDA synchronised" if device.type == "cuda" else ""))
    print()
    print("| loader | split | decode | threads/workers | batch | size | images/s | ms/batch |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, split, decode, w, b, s, ips, ms in rows:
        print(f"| {kind} | {split} | {decode} | {w} | {b} | {s} | {ips:,.0f} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
