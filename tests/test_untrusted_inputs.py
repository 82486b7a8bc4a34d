"""Every file fastmix reads for a user is untrusted: it must not run code, make fastmix loop,
read outside the dataset, or silently change what the model trains on."""
import gzip
import os
import pickle
import struct
import subprocess
import sys
import textwrap

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
