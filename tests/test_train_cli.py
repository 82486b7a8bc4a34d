"""train.py end to end on CPU: every method learns on a Fashion-MNIST subset; the CLI."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train as train_cli
from fastmix.data import FASHION_MNIST_DIR
from fastmix.engine import Config, load_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["automix", "mixup", "cutmix", "vanilla"])
def test_two_epochs_on_fashion_mnist_learn(method, tmp_path):
    assert os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")), \
        "Fashion-MNIST missing: `make test` installs dataset-fashion-mnist"
    cfg = Config(method=method, arch="resnet_small", dataset="fashion-mnist", epochs=2,
                 batch_size=32, lr=0.05, min_lr=0.0, train_subset=4000, test_subset=500,
                 ema_momentum=0.9, ema_end=0.99, device="cpu", out=str(tmp_path), progress=False)
    summary = train(cfg)
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    assert rec["epoch"] == 2 and rec["images_per_s"] > 0 and "loss" in rec["losses"]
    heads = {"automix": {"one_k", "mix_k", "one_q", "mix_q"}}.get(method, {"cls"})
    assert set(rec["top1"]) == heads
    assert set(summary["median_last10_top1"]) == heads and summary["reported_head"] in heads
    # chance is 10%; 250 steps reach 43-62% (measured: automix 61.6 one_k, mixup 46.6,
    # cutmix 43.4, vanilla 60.6)
    assert summary["reported_top1_final"] > 35, summary["final_top1"]
    assert json.load(open(tmp_path / "summary.json"))["reported_head"] == summary["reported_head"]


def test_help_documents_every_flag():
    text = train_cli.parser().format_help()
    internal = {"extra", "log_every"}
    for f in Config.__dataclass_fields__:
        if f in internal:
            continue
        flag = "--no-progress" if f == "progress" else "--" + f.replace("_", "-")
        assert flag in text, f"train.py --help does not document {flag}"
    for flag in ("--preset", "--print-config"):
        assert flag in text


def test_help_is_grouped_by_section_and_lists_every_flag_once():
    """--help: one section per ``config.SECTIONS`` entry (a field falls in the section of the
    nearest start above it), --preset/--print-config in their own, each flag listed once."""
    import inspect
    import re
    from dataclasses import fields

    from fastmix.config import SECTIONS
    p = train_cli.parser()
    text = p.format_help()
    for title in ["recipe"] + [t for _, t in SECTIONS]:
        assert f"\n{title}:\n" in text, f"--help has no section {title!r}"
    listed = []         # the option strings at the start of each option line
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        m = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            listed += [t.rstrip(",") for t in m.group(1).split() if t.startswith("-")]
    every = [s for a in p._actions for s in a.option_strings]
    assert len(listed) == len(set(listed)) and sorted(listed) == sorted(every)
    # each Config field's flags in its section; --preset and --print-config in "recipe"
    group_of = {}
    for g in p._action_groups:
        for a in g._group_actions:
            for s in a.option_strings:
                assert s not in group_of, f"{s} is in two sections"
                group_of[s] = g.title
    starts, section = dict(SECTIONS), None
    for f in fields(Config):
        section = starts.get(f.name, section)
        for a in p._actions:
            if a.dest == f.name:
                assert [group_of[s] for s in a.option_strings] == [section] * len(a.option_strings)
    assert group_of["--preset"] == group_of["--print-config"] == "recipe"
    # every section starts at the first field under one of Config's comment headers, and the
    # first field starts one (a field added above a section's first field breaks this)
    src = inspect.getsource(Config).splitlines()
    after_header = [re.match(r"    (\w+):", src[i + 1]).group(1) for i, line in enumerate(src)
                    if re.match(r"    # ", line) and re.match(r"    \w+:", src[i + 1])]
    assert fields(Config)[0].name in starts
    for start in starts:
        assert start in after_header, f"SECTIONS start {start!r} is not the first field of a " \
                                      f"section of Config (its headers start {after_header})"


def test_presets_resolve_and_flags_override(capsys):
    for name in train_cli.PRESETS:
        assert train_cli.main(["--preset", name, "--print-config"]) == 0
        cfg = json.loads(capsys.readouterr().out)
        assert cfg["preset"] == name
    assert train_cli.main(["--preset", "cifar100-r18", "--lr", "0.3", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["lr"] == 0.3 and cfg["min_lr"] == 0.05 and cfg["arch"] == "resnet18_cifar"


@pytest.mark.parametrize("argv,needle", [
    (["--method", "comixup"], "invalid choice"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-3"], "--batch-size must be positive"),
    (["--dataset", "mnist"], "invalid choice"),
])
def test_bad_command_lines_exit_2(argv, needle):
    r = subprocess.run([sys.executable, "train.py", *argv, "--print-config"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path), "--epochs", "1",
                        "--no-progress", "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr and "Traceback" not in r.stderr


def test_fastmix_kernels_importable_as_subpackage():
    code = "import fastmix.kernels._common as c, fastmix; print(c.__name__)"
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert r.returncode == 0 and "fastmix.kernels._common" in r.stdout, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_trains_from_exported_imagefolder(tmp_path_factory, loader):
    root = tmp_path_factory.getbasetemp() / "fm-jpeg"
    if not root.exists():
        r = subprocess.run([sys.executable, "-m", "fastmix.data.export", "--dataset", "fashion-mnist",
                            "--out", str(root), "--limit", "300"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    out = tmp_path_factory.mktemp(loader)
    r = subprocess.run([sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(root),
                        "--loader", loader, "--image-size", "28", "--arch", "resnet_small",
                        "--method", "mixup", "--epochs", "2", "--batch-size", "20", "--lr", "0.05",
                        "--no-progress", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"fastmix.data: {loader} loader" in r.stderr  # the log line naming the loader
    summary = json.load(open(out / "summary.json"))
    assert summary["final_top1"]["cls"] > 20  # 10 classes: above chance after 30 steps


# ---- the trainer a timm user expects: --evaluate, --save-best, --log, --resume --epochs ------
TINY = dict(arch="resnet_small", dataset="synthetic", batch_size=32, train_subset=192,
            test_subset=64, device="cpu", progress=False, channels_last=False, lr=0.05,
            min_lr=0.0)


def run_config(out, **over):
    """The finished run's settings (``finished_run``), in ``out``, with ``over``."""
    return Config(**{**TINY, **dict(method="mixup", ema=True, ema_momentum=0.5, ema_end=0.9,
                                    val_split=64, epochs=2, save_best=True, keep_top_k=2,
                                    log="tensorboard,csv", grid_every=1, out=str(out)), **over})


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (Mixup with an EMA: heads cls and ema; a validation split) with
    --save-best --keep-top-k 2, --log tensorboard,csv, --no-progress, --grid-every 1 (no Mix
    Block: a warning) and an --export into its own --out, which did not exist yet;
    ``(out, stderr)``. Tests copy it before they change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(run_config(out, export=str(out / "model.pt")))
    return out, err.getvalue()


def copy_run(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_no_progress_keeps_the_epoch_lines_and_harmless_settings_warn(finished_run):
    out, err = finished_run
    lines = err.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == \
        ["epoch 1/2", "epoch 2/2"]
    assert any(line.startswith("epoch 2/2  loss ") and " cls " in line and " ema " in line
               for line in lines)
    assert sum("warning: --grid-every 1" in line and "--method mixup has no Mix Block" in line
               for line in lines) == 1
    # --export into the run's own --out, which the run created
    assert os.path.exists(out / "model.pt")


def test_setting_warnings_name_what_does_nothing():
    from fastmix.config import setting_warnings
    assert setting_warnings(Config(method="automix", dataset="synthetic", grid_every=2)) == []
    assert setting_warnings(Config(method="mixup", grid_every=0)) == []
    [w] = setting_warnings(Config(method="cutmix", grid_every=2))
    assert "--method cutmix has no Mix Block" in w and "writes no grid" in w
    [w] = setting_warnings(Config(method="automix", dataset="imagefolder", grid_every=1))
    assert "--dataset imagefolder keeps no test images" in w


def test_save_best_keeps_the_argmax_epoch_and_the_top_k(finished_run):
    out, _ = finished_run
    recs = records(out)
    values = [r["val_top1"]["ema"] for r in recs]   # default: val_top1 of the inference head
    best_epoch = values.index(max(values)) + 1      # the earliest on a tie
    summary = json.load(open(out / "summary.json"))
    assert summary["best"]["metric"] == "val_top1/ema"
    assert (summary["best"]["epoch"], summary["best"]["value"]) == (best_epoch, max(values))
    assert load_checkpoint(str(out / "best.pt"))["best"] == {
        "metric": "val_top1/ema", "epoch": best_epoch, "value": max(values)}
    assert sorted(f for f in os.listdir(out) if f.startswith("best-")) == ["best-1.pt", "best-2.pt"]
    assert [e["epoch"] for e in summary["best"]["top_k"]][0] == best_epoch


def test_best_keeper_keeps_the_k_best_deletes_the_rest_and_resumes(tmp_path):
    from fastmix.loggers import BestKeeper
    model = torch.nn.Linear(2, 2)
    model.default_head = "cls"
    cfg = Config(method="mixup", out=str(tmp_path), save_best=True, keep_top_k=2)
    keeper = BestKeeper(cfg, model, 0, [])
    assert keeper.metric == "top1/cls"              # no validation split: the test split
    history = []
    for epoch, value in enumerate([10.0, 30.0, None, 20.0, 30.0, 40.0, 5.0], 1):
        history.append({"epoch": epoch, **({"top1": {"cls": value}} if value else {})})
        keeper.update(history[-1], step=epoch)
    best = lambda: sorted(f for f in os.listdir(tmp_path) if f.startswith("best"))  # noqa: E731
    # 40 (epoch 6), then 30 of epoch 2 (the earlier of the tie with epoch 5); the others deleted
    assert best() == ["best-2.pt", "best-6.pt", "best.pt"]
    assert load_checkpoint(str(tmp_path / "best.pt"))["best"]["epoch"] == 6
    # resumed from a checkpoint of epoch 4: epoch 6's file is a killed run's, and goes
    keeper = BestKeeper(cfg, model, 0, history[:4])
    assert best() == ["best-2.pt", "best.pt"]
    assert load_checkpoint(str(tmp_path / "best.pt"))["best"]["epoch"] == 2
    keeper.update(history[4], step=5)
    assert best() == ["best-2.pt", "best-5.pt", "best.pt"]
    # --keep-top-k 1: best.pt only
    one = tmp_path / "one"
    one.mkdir()
    keeper = BestKeeper(Config(method="mixup", out=str(one), save_best=True), model, 0, [])
    for record in history:
        keeper.update(record, step=record["epoch"])
    assert os.listdir(one) == ["best.pt"] and keeper.summary()["best"]["epoch"] == 6


def test_evaluate_prints_every_heads_top1_and_writes_nothing(finished_run, capsys):
    out, _ = finished_run
    before = {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in out.rglob("*")}
    recs = records(out)
    for name, epoch in (("last.pt", 2), ("best.pt", json.load(open(out / "summary.json"))
                                         ["best"]["epoch"])):
        assert train_cli.main(["--evaluate", str(out / name), "--device", "cpu"]) == 0
        stdout, stderr = capsys.readouterr()
        [line] = stdout.splitlines()
        result = json.loads(line)
        assert result["epoch"] == epoch and set(result["top1"]) == {"cls", "ema"}
        assert result["top1"] == recs[epoch - 1]["top1"]
        assert result["val_top1"] == recs[epoch - 1]["val_top1"]
        assert "test top-1 %" in stderr and "ema (inference)" in stderr
    assert {p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in out.rglob("*")} == before


def test_evaluate_refuses_a_bad_checkpoint_before_reading_data(tmp_path, capsys, monkeypatch):
    import fastmix.engine as engine

    def no_data(*a, **k):
        raise AssertionError("data read for a checkpoint that is refused")
    monkeypatch.setattr(engine, "build_data", no_data)
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    torch.save(torch.arange(3), tmp_path / "tensor.pt")
    torch.save({"fc.weight": torch.ones(2)}, tmp_path / "plain.pt")
    for name, needle in (("missing.pt", "does not exist"), ("cut.pt", "is unreadable"),
                         ("tensor.pt", "is not a fastmix checkpoint"),
                         ("plain.pt", "is not a fastmix checkpoint")):
        assert train_cli.main(["--evaluate", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        [line] = err.splitlines()
        assert line.startswith("error: ") and needle in line and name in line, err


def test_log_tensorboard_and_csv_hold_the_metrics_once_per_epoch_after_resumes(
        finished_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from fastmix.loggers import flatten
    out = copy_run(finished_run[0], tmp_path)
    epoch2 = tmp_path / "last-epoch2.pt"
    shutil.copy(out / "last.pt", epoch2)
    train(run_config(out, epochs=3, resume="auto"))
    # as if that run had been killed after logging epoch 3 and before its checkpoint: epoch 3
    # is trained again (its images/s and elapsed time differ: the first one's must be gone)
    shutil.copy(epoch2, out / "last.pt")
    train(run_config(out, epochs=3, resume="auto"))
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    flat = [flatten(r) for r in recs]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"losses/loss", "lr/main", "top1/cls", "top1/ema", "val_top1/ema",
            "images_per_s"} <= tags
    assert tags == {k for f in flat for k in f} - {"epoch"}
    for tag in tags:
        assert [(s.step, s.value) for s in events.Scalars(tag)] == \
            [(r["epoch"], pytest.approx(f[tag], rel=1e-6)) for r, f in zip(recs, flat)
             if tag in f], tag
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [{k: float(v) for k, v in row.items() if v != ""} for row in rows] == \
        [{k: float(v) for k, v in f.items()} for f in flat]


def test_log_tensorboard_has_the_mix_grid_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = Config(**{**TINY, "train_subset": 64}, method="automix", epochs=1, grid_every=1,
                 log="tensorboard", ema_momentum=0.5, ema_end=0.9, out=str(tmp_path))
    train(cfg)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    [image] = events.Images("mix_grid")
    assert image.step == 1 and image.width > 0 and os.path.exists(tmp_path / "mix_epoch0001.png")


def test_resume_extends_a_finished_run_and_replans_its_schedules(finished_run, tmp_path, capsys):
    from fastmix.checkpoint import CheckpointError
    from fastmix.schedules import cosine, ema_momentum
    out = copy_run(finished_run[0], tmp_path)
    first = records(out)
    summary = train(run_config(out, epochs=4, resume="auto"))
    err = capsys.readouterr().err
    assert ("fastmix: extending from 2 to 4 epochs; the cosine schedule is re-planned from "
            "epoch 3 on") in err
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] and recs[:2] == first
    steps = recs[0]["step"]          # per epoch
    for r in recs[2:]:
        assert r["lr"]["main"] == pytest.approx(cosine(0.05, 0.0, (r["epoch"] - 1) / 4))
        assert r["ema_momentum"] == pytest.approx(ema_momentum(r["step"] - 1, 4 * steps, 0.5, 0.9))
    assert json.load(open(out / "summary.json"))["epochs"] == 4 == summary["epochs"]
    values = [r["val_top1"]["ema"] for r in recs]
    assert summary["best"]["epoch"] == values.index(max(values)) + 1
    # fewer epochs than done: refused, nothing written
    before = open(out / "metrics.jsonl").read()
    with pytest.raises(CheckpointError, match="has done 4 of 4 epochs; to extend it, give "
                                              "--epochs larger than 4"):
        train(run_config(out, epochs=3, resume="auto"))
    assert open(out / "metrics.jsonl").read() == before


def test_preset_with_another_dataset_warns_what_it_replaces(capsys):
    assert train_cli.main(["--preset", "cifar100-r18", "--dataset", "fashion-mnist",
                           "--print-config"]) == 0
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: --preset cifar100-r18 is a recipe for --dataset cifar100")
    assert "this run uses --dataset fashion-mnist" in line
    assert train_cli.main(["--preset", "tinyimagenet-r18", "--dataset", "cifar10",
                           "--print-config"]) == 0
    err = capsys.readouterr().err
    assert "--image-size 64, --data-pipeline tiny-imagenet" in err and "do not apply" in err
    assert train_cli.main(["--preset", "cifar100-r18", "--dataset", "cifar100",
                           "--print-config"]) == 0
    assert capsys.readouterr().err == ""


def test_workers_0_and_vanilla_alpha_0_are_accepted(tmp_path, monkeypatch):
    from fastmix.config import validate_config
    from fastmix.engine import _imagefolder_data, build_model
    import fastmix.data.imagefolder as imagefolder
    validate_config(Config(dataset="imagefolder", workers=0))
    validate_config(Config(dataset="imagefolder", workers=0, loader="torchvision"))
    with pytest.raises(ValueError, match="DALI needs at least one CPU thread"):
        validate_config(Config(dataset="imagefolder", workers=0, loader="dali"))
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        validate_config(Config(workers=-1))
    # --loader auto with --workers 0: the DataLoader loader, in the main process
    seen = []

    class Stub:
        files, classes, num_classes = [], ["a", "b"], 2

    def build(root, split, batch_size, train, **kw):
        seen.append((kw["loader"], kw["num_workers"]))
        return Stub()
    monkeypatch.setattr(imagefolder, "build_imagefolder_loader", build)
    _imagefolder_data(Config(dataset="imagefolder", workers=0), torch.device("cpu"), 0, 1)
    _imagefolder_data(Config(dataset="imagefolder", workers=2), torch.device("cpu"), 0, 1)
    assert seen == [("torchvision", 0)] * 2 + [("auto", 2)] * 2
    # vanilla (and smoothmix) draw no λ: α = 0 is accepted; a method that draws λ refuses it
    for method in ("vanilla", "smoothmix"):
        validate_config(Config(method=method, alpha=0.0))
    build_model(Config(method="vanilla", alpha=0.0, arch="resnet_small"), 3, 10)
    with pytest.raises(ValueError, match="--alpha must be positive"):
        validate_config(Config(method="mixup", alpha=0.0))
    with pytest.raises(ValueError, match="--alpha must be >= 0"):
        validate_config(Config(method="vanilla", alpha=-1.0))


def test_export_into_the_new_out_is_accepted(tmp_path):
    from fastmix.engine import check_run_settings
    check_run_settings(Config(out=str(tmp_path / "new"), export=str(tmp_path / "new" / "w.pt")))
    with pytest.raises(ValueError, match="does not exist"):
        check_run_settings(Config(out=str(tmp_path / "new"),
                                  export=str(tmp_path / "other" / "w.pt")))
    with pytest.raises(ValueError, match="does not exist"):
        check_run_settings(Config(out=str(tmp_path / "new"),
                                  export=str(tmp_path / "new" / "sub" / "w.pt")))


@pytest.mark.parametrize("argv,needle", [
    (["--keep-top-k", "3"], "add --save-best"),
    (["--save-best", "--best-metric", "val_top1"], "needs a validation split"),
    (["--save-best", "--best-metric", "top5"], "--best-metric must be val_top1 or top1"),
    (["--save-best", "--best-metric", "top1/one_q", "--method", "mixup"], "is not a head"),
    (["--save-best", "--keep-top-k", "0"], "--keep-top-k must be positive"),
    (["--log", "tensorboard,wandb"], "unknown logger 'wandb'"),
])
def test_bad_best_and_log_settings_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--dataset", "synthetic", "--print-config"] + argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
