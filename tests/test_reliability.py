"""Fault injection: kills, interrupted writes, corrupt files, NaN steps, bad command lines,
API misuse, a failing DDP rank, a full disk. Each test is a row of the README's table."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fastmix.engine as engine
from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.data import TensorLoader
from fastmix.engine import Config, NonFiniteLossError, load_checkpoint, train
from fastmix.functional import mixed_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--arch", "resnet_small", "--batch-size", "40",
        "--train-subset", "400", "--test-subset", "80", "--ema-momentum", "0.9", "--ema-end", "0.99",
        "--device", "cpu", "--no-progress", "--channels-last", "false"]


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, **kw)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    common = TINY + ["--epochs", "2", "--checkpoint-every", "3"]
    full = run_cli(common + ["--out", str(tmp_path / "full"), "--export", str(tmp_path / "full.pt")])
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint inside epoch 2, then kill -9
        if ckpt.exists():
            try:
                if load_checkpoint(str(ckpt))["epoch"] == 1 and load_checkpoint(str(ckpt))["batch"] > 0:
                    break
            except Exception:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(str(ckpt))
    assert state["epoch"] == 1 and 0 < state["batch"]
    resumed = run_cli(common + ["--out", str(out), "--resume", "--export", str(tmp_path / "res.pt")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    strip = lambda p: [{k: r[k] for k in ("epoch", "step", "losses", "top1")}  # noqa: E731
                       for r in map(json.loads, open(p))]
    assert strip(out / "metrics.jsonl") == strip(tmp_path / "full" / "metrics.jsonl")
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "res.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch, sys
        sys.path.insert(0, {ROOT!r})
        from fastmix.engine import atomic_save
        atomic_save({{"v": torch.arange(10)}}, {str(path)!r})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_save({{"v": torch.arange(20)}}, {str(path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(str(path))["v"], torch.arange(10))


def _poison(monkeypatch, bad_batches):
    orig = TensorLoader.__iter__

    def poisoned(self):
        for i, (x, y) in enumerate(orig(self)):
            if self.train and (self.epoch, i) in bad_batches:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y

    monkeypatch.setattr(TensorLoader, "__iter__", poisoned)


@pytest.mark.parametrize("method", ["automix", "mixup"])
def test_nan_batches_are_skipped_and_counted(tmp_path, monkeypatch, method):
    _poison(monkeypatch, {(0, 2), (1, 0), (1, 4)})
    cfg = Config(method=method, arch="resnet_small", dataset="synthetic", epochs=2, batch_size=40,
                 train_subset=400, test_subset=80, device="cpu", out=str(tmp_path), progress=False,
                 export=str(tmp_path / "w.pt"))
    summary = train(cfg)
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["losses"]["skipped_steps"] for r in recs] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for r in recs for v in r["losses"].values())
    state = load_checkpoint(str(tmp_path / "last.pt"))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(0 <= v <= 100 for v in summary["final_top1"].values())


def test_consecutive_nan_steps_stop_the_run_with_a_message(tmp_path, monkeypatch):
    _poison(monkeypatch, {(0, i) for i in range(100)})
    cfg = Config(method="automix", arch="resnet_small", dataset="synthetic", epochs=1, batch_size=20,
                 train_subset=400, test_subset=40, device="cpu", out=str(tmp_path), progress=False,
                 max_bad_steps=5, log_every=5)
    with pytest.raises(NonFiniteLossError, match=r"consecutive.*NaN/Inf.*resume from .*last\.pt"):
        train(cfg)


def test_skipped_step_changes_nothing():
    """A NaN step leaves parameters, optimizer momentum, EMA encoder and BN buffers as they were."""
    torch.manual_seed(0)
    model = AutoMix(build_backbone("resnet_small", 3), 10, seed=0, fused=False)
    cfg = Config(lr=0.1)
    opt = engine.build_optimizer(cfg, model, fused=True)
    guard = engine.StepGuard(model, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))

    def step(x):
        guard.before()
        loss, _ = model.forward_train(x, y)
        opt.zero_grad()
        loss.backward()
        ok = guard.after_backward(loss, opt, scaler)
        opt.step()
        model.after_step(0, 10, ok)
        return ok

    assert step(x).item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mom = [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"]]
    bad = x.clone()
    bad[1, 2, 3, 4] = float("inf")
    assert not step(bad).item()
    after = model.state_dict()
    for k, v in before.items():
        if "num_batches_tracked" not in k:
            assert torch.equal(after[k], v), k
    assert all(torch.equal(m, opt.state[p]["momentum_buffer"])
               for m, p in zip(mom, opt.param_groups[0]["params"]))
    assert guard.total.item() == 1 and guard.max_run.item() == 1


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "resnet999"], "--arch 'resnet999' is unknown"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be positive"),
    (["--method", "foo"], "invalid choice"),
])
def test_bad_command_lines_exit_2_before_work(argv, needle, tmp_path):
    r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path / "o")] + argv)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_batch_larger_than_dataset_and_unwritable_out(tmp_path):
    r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path / "o"), "--batch-size", "500"])
    assert r.returncode == 2 and "larger than the dataset" in r.stderr and "Traceback" not in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli(TINY + ["--epochs", "1", "--out", str(blocker / "sub")])
    assert r.returncode == 2 and "is not writable" in r.stderr


def test_api_misuse_raises_clear_errors():
    model = AutoMix(build_backbone("resnet_small", 3), 10, fused=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="1 channels but the backbone takes 3|backbone takes 3"):
        model.forward_train(x[:, :1], y)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mixed_cross_entropy(torch.randn(4, 10), y, y, 1.3, fused=False)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        model.mix_block(torch.randn(4, 64, 4, 4), -0.1, torch.arange(4), (16, 16))
    with pytest.raises(ValueError, match="length N=4"):
        model.mix_block(torch.randn(4, 64, 4, 4), 0.5, torch.arange(5), (16, 16))
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        model.mix_block(torch.randn(64, 4, 4), 0.5, torch.arange(4), (16, 16))
    with pytest.raises(ValueError, match="on meta"):
        model.mix_block(torch.randn(4, 64, 4, 4), 0.5, torch.arange(4, device="meta"), (16, 16))


@pytest.mark.slow
def test_ddp_one_rank_fails_all_exit_nonzero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTMIX_INJECT_FAULT="1:2")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", "train.py", *TINY, "--epochs", "2", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0 and "injected fault" in r.stderr
    assert time.time() - t < 180


def test_disk_full_on_checkpoint_keeps_last_good(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = engine.atomic_save

    def flaky(obj, path):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(engine, "atomic_save", flaky)
    cfg = Config(method="mixup", arch="resnet_small", dataset="synthetic", epochs=2, batch_size=40,
                 train_subset=200, test_subset=40, device="cpu", out=str(tmp_path), progress=False)
    train(cfg)  # the run goes on
    assert "could not write checkpoint" in capsys.readouterr().err
    assert load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 1  # the last good one


@pytest.mark.slow
def test_ddp_nan_on_one_rank_is_skipped_on_all(tmp_path):
    """Rank 1 gets a NaN batch (FASTMIX_POISON_BATCH, read by this test's runner script): both
    ranks must skip that step, so the weights stay finite and both count one skipped step."""
    runner = tmp_path / "run.py"
    runner.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {ROOT!r})
        from fastmix.data import TensorLoader
        orig = TensorLoader.__iter__
        def poisoned(self):
            for i, (x, y) in enumerate(orig(self)):
                if self.train and self.epoch == 0 and i == 1 and dist.get_rank() == 1:
                    x = x.clone(); x[0, 0, 0, 0] = float("nan")
                yield x, y
        TensorLoader.__iter__ = poisoned
        import train
        sys.exit(train.main(sys.argv[1:]))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", str(runner), *TINY, "--method", "mixup", "--epochs", "1",
                        "--out", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(open(tmp_path / "o" / "metrics.jsonl").read().splitlines()[-1])
    assert rec["losses"]["skipped_steps"] == 1
    state = load_checkpoint(str(tmp_path / "o" / "last.pt"))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resume_with_another_configuration_is_refused(tmp_path):
    r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(TINY + ["--epochs", "2", "--out", str(tmp_path), "--resume", "--arch", "resnet18_cifar"])
    assert r.returncode == 2 and "does not fit this configuration" in r.stderr
    assert "Traceback" not in r.stderr
