"""bench/accuracy.py on a tiny synthetic grid: runs, resumes after a kill, aggregates, plots."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import accuracy  # noqa: E402

TINY = ["--train-subset", "192", "--val-split", "64", "--eval-every", "1", "--train-args",
        "--dataset synthetic --batch-size 32 --test-subset 64"]


def study(out, *extra, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), "--out",
                           str(out), *TINY, *extra], cwd=ROOT, capture_output=True, text=True,
                          **kw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    r = study(out, "--methods", "automix,vanilla", "--seeds", "0,1", "--epochs", "1", "--ema")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_aggregate_is_mean_and_std_of_the_runs(grid):
    out, _ = grid
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"automix", "vanilla"}
    for method, entry in results["methods"].items():
        summaries = [json.loads((out / method / f"seed{s}" / "summary.json").read_text())
                     for s in (0, 1)]
        finals = [s["final_top1"][entry["reported_heads"][str(i)]] for i, s in enumerate(summaries)]
        medians = [s["median_last10_top1"][entry["reported_heads"][str(i)]]
                   for i, s in enumerate(summaries)]
        assert entry["final"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert entry["final"]["std"] == pytest.approx(statistics.stdev(finals))
        assert entry["median_last10"]["mean"] == pytest.approx(statistics.fmean(medians))
        # the head is chosen on the validation split, never on the test split
        for i, s in enumerate(summaries):
            val = s["median_last10_val_top1"]
            assert entry["reported_heads"][str(i)] == max(val, key=val.get)
    assert set(results["methods"]["automix"]["per_head"]) == {"one_k", "mix_k", "one_q", "mix_q"}
    table = (out / "results.md").read_text()
    assert "| automix | 2 |" in table and "| vanilla | 2 |" in table


def test_results_record_provenance_and_read_what_the_runs_wrote(grid):
    out, _ = grid
    text = (out / "results.json").read_text()
    results = json.loads(text)
    prov = results["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert prov["commit"] == head and len(head) == 40
    assert prov["command"].startswith("python bench/accuracy.py ") and "--ema" in prov["command"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["timm"]
    # no absolute path of this machine anywhere (the study folder was given absolute)
    assert str(out) not in text.replace(prov["command"], "") and ROOT not in text
    for method in ("automix", "vanilla"):
        for seed in (0, 1):
            run = results["methods"][method]["runs"][str(seed)]
            assert run["folder"] == f"{method}/seed{seed}"
            folder = out / method / f"seed{seed}"
            summary = json.loads((folder / "summary.json").read_text())
            history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            copy = json.loads((out / "runs" / f"{method}-seed{seed}.json").read_text())
            assert copy["metrics"] == history
            assert copy["summary"]["final_top1"] == summary["final_top1"] == run["final"]
            assert run["median"] == summary["median_last10_top1"]
            assert run["wall_time_s"] == summary["wall_time_s"]
            assert run["images_per_s"] == statistics.median(h["images_per_s"] for h in history)
    # the online head beside the EMA head: vanilla's cls/ema, AutoMix's q/k encoders
    pairs = {m: results["methods"][m]["online_ema"] for m in ("automix", "vanilla")}
    assert set(pairs["vanilla"]["online"]["heads"].values()) == {"cls"}
    assert set(pairs["vanilla"]["ema"]["heads"].values()) == {"ema"}
    assert set(pairs["automix"]["online"]["heads"].values()) <= {"one_q", "mix_q"}
    assert set(pairs["automix"]["ema"]["heads"].values()) <= {"one_k", "mix_k"}
    finals = [json.loads((out / "vanilla" / f"seed{s}" / "summary.json").read_text())
              ["median_last10_top1"]["ema"] for s in (0, 1)]
    assert pairs["vanilla"]["ema"]["median_last10"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert "| vanilla | cls |" in (out / "results.md").read_text()
    assert results["automix_cost"]["vanilla"]["wall_time_ratio"] > 0


def test_check_against_finds_equal_and_different_runs(grid, tmp_path):
    out, _ = grid
    results = json.loads((out / "results.json").read_text())
    same, differ = accuracy.check_against(results, str(out / "results.json"))
    assert len(same) == 4 and differ == []
    results["methods"]["vanilla"]["runs"]["1"]["median"]["cls"] += 0.01
    (tmp_path / "changed.json").write_text(json.dumps(results))
    same, differ = accuracy.check_against(json.loads((out / "results.json").read_text()),
                                          str(tmp_path / "changed.json"))
    assert differ == [("vanilla", "1")] and len(same) == 3


def test_pngs_are_written(grid):
    from PIL import Image
    out, _ = grid
    for name in ("curves.png", "automix_masks.png"):
        path = out / name
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_finished_runs_are_skipped(grid):
    out, _ = grid
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    r = study(out, "--methods", "automix,vanilla", "--seeds", "0,1", "--epochs", "1", "--ema")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done, skipped") == 4 and "starting" not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")} == before


def test_another_command_line_is_refused(grid):
    out, _ = grid
    r = study(out, "--methods", "vanilla", "--seeds", "0", "--epochs", "2")
    assert r.returncode != 0 and "another command line" in r.stderr


def test_killed_study_resumes_from_the_checkpoint(tmp_path):
    """SIGKILL the study (and its training run) after the first epoch's checkpoint; rerun."""
    args = ["--methods", "vanilla", "--seeds", "0", "--epochs", "4"]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), "--out", str(tmp_path),
           "--train-subset", "1024", *TINY[2:], *args]
    ckpt = tmp_path / "vanilla" / "seed0" / "last.pt"
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert ckpt.exists(), "the run never wrote a checkpoint"
    assert not (tmp_path / "vanilla" / "seed0" / "summary.json").exists(), "finished before the kill"
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 4
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vanilla seed 0: resuming" in r.stdout
    lines = (tmp_path / "vanilla" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    log = (tmp_path / "vanilla" / "seed0" / "train.log").read_text()
    assert log.count('"method": "vanilla"') == 1  # one finished run, not two


def test_bad_flags_are_refused_before_work(tmp_path):
    for bad in (["--methods", "mixup,nope"], ["--seeds", "a"], ["--epochs", "0"],
                ["--alpha", "cutmix"], ["--alpha", "cutmix=-1"], ["--alpha", "puzzle=1"],
                ["--preset", "nope"], ["--dataset", "nope"], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as e:
            accuracy.parse_args(bad + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2
    assert not (tmp_path / "x").exists()


def test_per_method_alpha_reaches_only_that_method():
    args = accuracy.parse_args(["--alpha", "cutmix=1"])
    assert accuracy.run_argv(args, "cutmix", 0, "o")[-2:] == ["--alpha", "1.0"]
    assert "--alpha" not in accuracy.run_argv(args, "mixup", 0, "o")


def test_every_comparison_method_runs_through_the_study(tmp_path):
    """ManifoldMix, SaliencyMix, FMix, ResizeMix, GridMix, SmoothMix and PuzzleMix through the
    study script (which runs train.py for each): one seed, one epoch of the tiny grid."""
    new = ["manifoldmix", "saliencymix", "fmix", "resizemix", "gridmix", "smoothmix", "puzzlemix"]
    r = study(tmp_path, "--methods", ",".join(new), "--seeds", "0", "--epochs", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == set(new)
    for m in new:
        summary = json.loads((tmp_path / m / "seed0" / "summary.json").read_text())
        assert summary["method"] == m and summary["config"]["method"] == m
        epoch = json.loads((tmp_path / m / "seed0" / "metrics.jsonl").read_text().splitlines()[-1])
        assert epoch["losses"]["loss"] > 0 and 0 <= summary["final_top1"]["cls"] <= 100
