"""Every file fastmix reads for a user is untrusted: it must not run code, make fastmix loop,
read outside the dataset, or silently change what the model trains on."""
import gzip
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from fastmix.data import DatasetError, load_cifar, scan_imagefolder
from fastmix.data.export import _cifar_meta_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(good, f)
    assert len(load_cifar(str(tmp_path), 10, train=True)) == 10      # plain batches still load
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": RunsCode(marker), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="data_batch_3.*refused: the pickle names"):
        load_cifar(str(tmp_path), 10, train=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": RunsCode(marker)}, f)
    assert _cifar_meta_names(str(tmp_path), 10)[0] == "airplane"     # generic names, no code
    assert not marker.exists()


def _idx_images(path, count, rows, cols, body):
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">IIII", 0x803, count, rows, cols))
        for chunk in body:
            f.write(chunk)


def test_idx_gzip_bomb_and_lying_header_are_refused_without_inflating(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    # 10 images declared, 512 MiB of zeros inflated behind them
    _idx_images(folder / "train-images-idx3-ubyte.gz", 10, 28, 28,
                (bytes(1 << 24) for _ in range(32)))
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 10) + bytes(10))
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        from fastmix.data import DatasetError, load_fashion_mnist
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_fashion_mnist({str(folder)!r})
        except DatasetError as e:
            print("refused:", e)
        print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "refused:" in r.stdout and "expected 7856" in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.split("grew_mb")[1]) < 64, r.stdout   # the 512 MiB were never inflated
    # a header that declares more than any dataset holds
    _idx_images(folder / "train-images-idx3-ubyte.gz", 2 ** 32 - 1, 4096, 4096, [b""])
    from fastmix.data import load_fashion_mnist
    with pytest.raises(DatasetError, match="more than fastmix reads"):
        load_fashion_mnist(str(folder))


def test_idx_labels_out_of_range_name_the_file(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    _idx_images(folder / "train-images-idx3-ubyte.gz", 3, 2, 2, [bytes(12)])
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 3) + bytes([0, 1, 12]))
    from fastmix.data import load_fashion_mnist
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: labels must lie"):
        load_fashion_mnist(str(folder))


@pytest.fixture
def tree(tmp_path):
    """root/{train,val}/{a,b}/ with two small PNGs each, and a file outside the root."""
    root = tmp_path / "root"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 10)).save(root / split / c / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return root


def test_link_cycle_does_not_loop(tree):
    os.symlink(tree / "train" / "a", tree / "train" / "a" / "loop")
    scan = scan_imagefolder(str(tree), "train", quiet=True)
    assert len(scan[0]) == 4 and sorted(scan[1]) == [0, 0, 1, 1]
    # a link up to the split folder: class b would reach class a's files (and itself)
    os.symlink(tree / "train", tree / "train" / "b" / "up")
    with pytest.raises(DatasetError, match="in two classes"):
        scan_imagefolder(str(tree), "train", quiet=True)


def test_links_outside_the_dataset_are_not_read(tree, tmp_path, capsys):
    os.symlink(tmp_path / "outside.png", tree / "train" / "a" / "evil.png")
    os.symlink(tmp_path, tree / "train" / "b" / "escape")
    scan = scan_imagefolder(str(tree), "train")
    assert not any("evil" in f or "escape" in f for f in scan[0])
    assert len(scan[0]) == 4
    assert "2 link(s) leading outside the dataset root" in capsys.readouterr().err


def test_one_file_in_two_classes_is_an_error_and_twice_in_one_is_used_once(tree, capsys):
    os.symlink(tree / "train" / "a" / "0.png", tree / "train" / "a" / "again.png")
    scan = scan_imagefolder(str(tree), "train")
    assert len(scan[0]) == 4
    assert "reached a second time" in capsys.readouterr().err
    os.symlink(tree / "train" / "a" / "1.png", tree / "train" / "b" / "stolen.png")
    with pytest.raises(DatasetError, match="same file .* in two classes"):
        scan_imagefolder(str(tree), "train", quiet=True)


def test_val_file_linked_into_train_is_reported(tree):
    from fastmix.data.imagefolder import split_overlap
    os.symlink(tree / "val" / "a" / "0.png", tree / "train" / "a" / "leak.png")
    train = scan_imagefolder(str(tree), "train", quiet=True)
    val = scan_imagefolder(str(tree), "val", quiet=True)
    assert split_overlap(train[0], val[0]) == [os.path.realpath(tree / "val" / "a" / "0.png")]


# ---- decompression bombs (issue: reliability, round three) ---------------------------------
def _bomb_png(path, side=20000):
    """A valid ``side`` x ``side`` 8-bit grey PNG of zeros, ~390 KB on disk (400 MB of pixels
    decoded, 1.2 GB as RGB), made without holding its pixels: the IDAT stream is one
    compressed block of 100 rows repeated (each ends with a full flush, so the blocks are
    alike), closed by an empty final block and the stream's Adler-32."""
    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data)))
    rows = b"\0" * ((side + 1) * 100)                 # filter byte 0 + a row of zeros, x 100
    c = zlib.compressobj(9)
    first = c.compress(rows) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(rows) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // 100):
        adler = zlib.adler32(rows, adler)
    idat = first + again * (side // 100 - 1) + b"\x03\x00" + struct.pack(">I", adler)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def test_the_bomb_png_is_real(tmp_path):
    """The test file decodes to its full size: inflating the IDAT stream (in pieces, never
    holding it) gives every row, and the stream's checksum holds."""
    data = open(_bomb_png(tmp_path / "bomb.png"), "rb").read()
    assert 300_000 < len(data) < 500_000
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    d = zlib.decompressobj()
    n = sum(len(d.decompress(idat[i:i + 65536])) for i in range(0, len(idat), 65536))
    assert d.eof and n == 20001 * 20000          # eof: the Adler-32 was checked


@pytest.mark.parametrize("loader,decoder", [("dali", "auto"), ("torchvision", "torchvision"),
                                            ("torchvision", "pil")])
def test_a_decompression_bomb_is_skipped_by_the_prescan_not_decoded(tree, capsys, loader,
                                                                    decoder):
    """A valid 20000 x 20000 PNG passes the signature and end-marker checks; without the pixel
    limit DALI decodes it (2.2 GB) and PIL stops mid-epoch. The pre-scan reads its size from
    the header, names it among the skipped files, and the loader trains on the others."""
    from fastmix.data.imagefolder import MAX_IMAGE_PIXELS, build_imagefolder_loader
    bomb = _bomb_png(tree / "train" / "a" / "bomb.png")
    ld = build_imagefolder_loader(str(tree), "train", 2, True, loader=loader, decoder=decoder,
                                  size=8, num_workers=1 if loader == "dali" else 0)
    assert ld.name == loader and bomb not in ld.files and len(ld.files) == 4
    assert [p for p, _ in ld.skipped] == [bomb]
    reason = ld.skipped[0][1]
    assert "20000 x 20000 = 400,000,000 pixels" in reason and f"{MAX_IMAGE_PIXELS:,}" in reason
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image file(s) of 5" in err and "bomb.png" in err
    for _ in range(2):                                  # two epochs over the 4 good images
        batches = list(ld)
        assert len(batches) == 2 and all(x.shape == (2, 3, 8, 8) for x, _ in batches)


def test_the_pixel_limit_reads_headers_only_and_can_be_raised(tree):
    from fastmix.data.imagefolder import check_image_file, open_image
    bomb = _bomb_png(tree / "train" / "a" / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):   # what PIL's own open does with it
        Image.open(bomb)
    with open_image(bomb) as im:                        # header only, no PIL limit
        assert im.size == (20000, 20000)
    for mode in ("header", "full"):                     # refused before any decode
        assert "over the limit" in check_image_file(bomb, mode)
    for limit in (400_000_000, 0):                      # admitted (not decoded here)
        scan = scan_imagefolder(str(tree), "train", quiet=True, max_image_pixels=limit)
        assert bomb in scan.files and not scan.skipped
    scan = scan_imagefolder(str(tree), "train", quiet=True, max_image_pixels=64)
    assert {os.path.basename(p) for p, _ in scan.skipped} == {"bomb.png"}   # 8 x 8 = 64 kept
    assert "8 x 8 = 64 pixels" in check_image_file(str(tree / "train" / "a" / "0.png"),
                                                    max_pixels=63)
    with pytest.raises(ValueError, match="max_image_pixels must be an int >= 0"):
        scan_imagefolder(str(tree), "train", max_image_pixels=-1)
