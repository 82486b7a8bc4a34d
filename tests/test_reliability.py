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
    with pytest.raises(NonFiniteLossError, match=r"consecutive.*NaN/Inf.*this run wrote no checkpoint yet"):
        train(cfg)
    # with a checkpoint of this run, the advice is to resume from it
    cfg.checkpoint_every, cfg.overwrite = 3, True
    _poison(monkeypatch, {(0, i) for i in range(4, 100)})
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
    """Rank 1 raises at its third batch (a wrapped loader, set up by this test's runner)."""
    runner = tmp_path / "run.py"
    runner.write_text(textwrap.dedent(f"""
        import sys, torch.distributed as dist
        sys.path.insert(0, {ROOT!r})
        from fastmix.data import TensorLoader
        orig = TensorLoader.__iter__
        def failing(self):
            for i, item in enumerate(orig(self)):
                if self.train and i == 2 and dist.get_rank() == 1:
                    raise RuntimeError("injected fault in rank 1")
                yield item
        TensorLoader.__iter__ = failing
        import train
        sys.exit(train.main(sys.argv[1:]))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", str(runner), *TINY, "--epochs", "2", "--out",
                        str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
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


# ---- round two: what a new user broke (issue: reliability, round two) ----------------------
def _small_tmpfs(path, size):
    """Mount a real tmpfs of ``size`` at ``path`` (root only); False where that is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_real_full_disk_while_checkpointing_keeps_the_run_and_last_good(tmp_path):
    """A real ENOSPC inside torch.save (a tmpfs too small for two checkpoints), or where no
    tmpfs can be mounted, a real EFBIG from RLIMIT_FSIZE: a warning, the run goes on."""
    out = tmp_path / "disk"
    mounted = _small_tmpfs(out, "3m")
    try:
        limit = None if mounted else 512 * 1024
        preexec = None
        if limit:
            import resource

            def preexec():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        r = subprocess.run([sys.executable, "train.py", *TINY, "--method", "mixup", "--epochs", "2",
                            "--checkpoint-every", "3", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, preexec_fn=preexec)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning: could not write checkpoint" in r.stderr
        assert "Traceback" not in r.stderr
        assert json.loads((out / "summary.json").read_text())["epochs"] == 2
        if mounted:   # the first checkpoint fitted; every later one needed room for two
            state = load_checkpoint(str(out / "last.pt"))
            assert (state["epoch"], state["batch"]) == (0, 3)
        assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    finally:
        if mounted:
            subprocess.run(["umount", str(out)])


def test_a_new_run_never_destroys_an_earlier_one(tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(TINY + ["--epochs", "1", "--out", out]).returncode == 0
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("metrics.jsonl", "last.pt")}
    r = run_cli(TINY + ["--epochs", "1", "--out", out, "--lr", "0.05"])
    assert r.returncode == 2 and "holds an earlier run" in r.stderr and "--overwrite" in r.stderr
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    # --overwrite starts afresh; if that run then stops (exit 3), its advice names its own state
    r = run_cli(TINY + ["--epochs", "2", "--out", out, "--overwrite", "--lr", "1e38",
                        "--max-bad-steps", "5"])
    assert r.returncode == 3, r.stderr[-2000:]
    if "resume from" in r.stderr:
        assert load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 1e38
    else:
        assert "wrote no checkpoint yet" in r.stderr and not os.path.exists(os.path.join(out, "last.pt"))


def test_overwrite_leaves_no_log_of_the_earlier_run(tmp_path):
    """--overwrite with fewer logs than the earlier run: its metrics.csv, tb/, mix grids and best
    checkpoints go with it (read later, they would pass for this run's); other files stay."""
    out = tmp_path / "o"
    r = run_cli(TINY + ["--epochs", "1", "--out", str(out), "--log", "csv,tensorboard",
                        "--grid-every", "1", "--save-best"])
    assert r.returncode == 0, r.stderr[-2000:]
    logged = {"metrics.csv", "tb", "mix_epoch0001.png", "best.pt"}
    assert logged <= set(os.listdir(out))
    (out / "notes.txt").write_text("the user's")
    r = run_cli(TINY + ["--epochs", "1", "--out", str(out), "--overwrite"])
    assert r.returncode == 0, r.stderr[-2000:]
    left = set(os.listdir(out))
    assert not logged & left and "notes.txt" in left and "metrics.jsonl" in left


@pytest.mark.parametrize("change,needle", [(["--batch-size", "20"], "batch_size 40 -> 20"),
                                           (["--weight-decay", "0.001"], "weight_decay "),
                                           (["--lr", "0.2"], "lr ")])
def test_resume_refuses_another_configuration(tmp_path, change, needle):
    out = str(tmp_path / "o")
    common = TINY + ["--epochs", "2", "--out", out]
    r = run_cli(common + ["--checkpoint-every", "3", "--max-bad-steps", "2"])
    assert r.returncode == 0
    r = run_cli(common + ["--resume"] + change)
    assert r.returncode == 2 and "does not fit this configuration" in r.stderr and needle in r.stderr
    assert os.path.join(out, "last.pt") in r.stderr            # the path, never the word "auto"
    # what may change (where and how it runs) resumes
    r = run_cli(common + ["--resume", "--max-bad-steps", "3", "--no-compile"])
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_of_a_file_that_is_not_a_training_checkpoint(tmp_path):
    for name, obj in (("tensor.pt", torch.arange(3)), ("plain.pt", {"fc.weight": torch.ones(2)})):
        torch.save(obj, tmp_path / name)
        r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path / "o"), "--resume",
                            str(tmp_path / name)])
        assert r.returncode == 2 and "is not a fastmix training checkpoint" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "None processes" not in r.stderr


def test_refused_checkpoint_never_advises_running_its_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path / "o"), "--resume",
                        str(tmp_path / "evil.pt")])
    assert r.returncode == 2 and "evil.pt" in r.stderr
    assert "Re-running" not in r.stderr and "set to `False`" not in r.stderr
    assert "unsupported GLOBAL posix.system" in r.stderr and not (tmp_path / "pwned").exists()


def test_killed_checkpoint_write_leaves_no_temporary_behind(tmp_path):
    """kill -9 in the middle of the second checkpoint write (a real SIGKILL from inside
    torch.save); the resumed run removes the temporary file and finishes."""
    out = tmp_path / "o"
    runner = tmp_path / "run.py"
    runner.write_text(textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        real, calls = torch.save, [0]
        def dying_save(obj, f, *a, **k):
            calls[0] += 1
            if calls[0] == 2:
                f.write(b"x" * 100000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = dying_save
        import train
        sys.exit(train.main(sys.argv[1:]))
    """))
    args = TINY + ["--epochs", "2", "--checkpoint-every", "3", "--out", str(out)]
    r = subprocess.run([sys.executable, str(runner), *args], cwd=ROOT, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert [f for f in os.listdir(out) if f.startswith(".tmp-last.pt")]
    r = run_cli(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "left by an interrupted write" in r.stderr
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


@pytest.mark.parametrize("argv,needle", [
    (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu9"], "is not a device"),
    (["--channels-last", "maybe"], "expected true/false"),
    (["--image-size", "0"], "--image-size must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--momentum", "1.5"], "--momentum must lie in [0, 1)"),
    (["--method", "mixup", "--export-head", "one_q"], "is not a head of this run"),
    (["--export", "/nonexistent-folder/x.pt"], "does not exist"),
])
def test_more_bad_command_lines_exit_2_before_work(argv, needle, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    no_preset = [a for a in TINY if a not in ("--dataset", "synthetic", "--arch", "resnet_small")]
    r = run_cli((no_preset if "cuda" in argv else TINY) + ["--epochs", "1", "--out",
                                                          str(tmp_path / "o")] + argv)
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_first_log_line_says_what_the_run_resolved_to(tmp_path):
    r = run_cli(TINY + ["--epochs", "1", "--out", str(tmp_path / "o")])
    first = r.stderr.splitlines()[0]
    assert first.startswith("fastmix: automix on synthetic, arch resnet_small, 1 epochs")
    assert "preset none (--dataset/--arch given without --preset" in first
    r = run_cli(["--preset", "cpu-small", "--print-config", "--dataset", "synthetic"])
    assert json.loads(r.stdout)["epochs"] == 3


def test_metrics_are_valid_json_even_with_nan():
    from fastmix.engine import json_line
    line = json_line({"loss": float("nan"), "top1": {"a": float("inf"), "b": 1.5}, "l": [float("-inf")]})
    assert json.loads(line) == {"loss": None, "top1": {"a": None, "b": 1.5}, "l": [None]}


def test_fused_and_eager_agree_on_out_of_range_labels_and_indices():
    from fastmix.functional import mixup_images
    from fastmix.mixblock import MixBlock
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 5])   # 5 is out of range
    ok = torch.tensor([0, 1, 2, 3, 4, 0])
    for fused in (False, True):
        with pytest.raises(IndexError):
            mixed_cross_entropy(logits, y, ok, 0.3, fused=fused)
        with pytest.raises(IndexError):
            mixed_cross_entropy(logits, ok, -ok - 1, 0.3, fused=fused)
        with pytest.raises(IndexError):
            mixup_images(torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 6]), 0.3, fused=fused)
    mb = MixBlock(8)
    z = torch.randn(3, 8, 2, 2)
    with pytest.raises(IndexError):
        mb(z, 0.5, torch.tensor([0, 1, 3]), (4, 4))
    from fastmix.kernels.mixblock_attn import mixblock_attention
    qk, v = torch.randn(3, 4, 4), torch.randn(3, 4)
    with pytest.raises(IndexError):
        mixblock_attention(qk, v, torch.tensor([0, 1, 3]))


def test_silently_accepted_api_inputs_are_refused():
    from fastmix.functional import cutmix_box, mix_images
    import numpy as np
    from fastmix.mixes import fmix_mask, gridmix_mask
    for draw in (cutmix_box, fmix_mask, gridmix_mask):
        for lam in (1.5, -0.1, "0.5"):
            with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
                draw(8, 8, lam, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[N, 1, h, w\]"):
        mix_images(torch.randn(2, 3, 8, 8), torch.tensor([1, 0]), torch.randn(2, 3, 2, 2),
                   fused=False)

    class OneMap(torch.nn.Module):
        out_channels = (16, 16)

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return [self.conv(x)]
    model = AutoMix(OneMap(), 10, fused=False)
    with pytest.raises(ValueError, match="two maps"):
        model.forward_train(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    r = subprocess.run([sys.executable, "-c", "import fastmix.kernels, fastmix; "
                        "print(fastmix.kernels.__name__)"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "fastmix.kernels", r.stderr


def test_step_guard_restores_buffers_of_every_dtype_and_keeps_a_good_step():
    """The guard's flat backup (one cat before, cat + where + foreach copy after, per dtype):
    a non-finite step puts back fp32 and bf16 buffers of any shape, NaN-filled ones included;
    a finite step keeps the step's values bit for bit; integer buffers are not touched."""
    m = torch.nn.Module()
    m.register_buffer("a", torch.randn(5))
    m.register_buffer("b", torch.randn(3, dtype=torch.bfloat16))
    m.register_buffer("c", torch.randn(2, 4))
    m.register_buffer("n", torch.tensor(7))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    guard = engine.StepGuard(m, torch.device("cpu"))

    def step(loss):
        guard.before()
        start = {k: v.clone() for k, v in m.state_dict().items()}
        m.a.add_(1.0 / 3)
        m.b.mul_(3)
        m.c.fill_(float("nan"))
        m.n.add_(1)
        moved = {k: v.clone() for k, v in m.state_dict().items()}
        ok = guard.after_backward(torch.tensor(loss), opt)
        return ok, start, moved

    ok, start, moved = step(float("nan"))
    assert not ok.item() and opt.found_inf.item() == 1
    for k in "abc":
        assert torch.equal(getattr(m, k), start[k]), k
    assert m.n.item() == 8                       # not a float buffer: left as the step left it
    ok, start, moved = step(1.5)
    assert ok.item()
    assert torch.equal(m.a, moved["a"]) and torch.equal(m.b, moved["b"])
    assert torch.isnan(m.c).all() and m.b.dtype == torch.bfloat16
    assert guard.total.item() == 1


def test_an_index_is_range_checked_again_only_after_it_changes():
    """check_index remembers a passed check per tensor version: the same labels handed to a
    second op are not read again, an in-place write or a tighter bound re-checks them, and a
    bad value written after a good check is still caught."""
    from fastmix.checks import check_index, device_side_index_checks
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    y = torch.tensor([0, 3, 1, 2])
    cpu = torch.device("cpu")
    with Ops() as ops:
        check_index("y", y, 4, cpu, "x", high=10)
        check_index("y", y, 4, cpu, "x", high=10)       # same version: nothing read
        check_index("y", y, 4, cpu, "x", high=20)       # looser bound: still nothing
    assert ops.names.count("min") == 1 and ops.names.count("max") == 1
    with Ops() as ops:
        check_index("y", y, 4, cpu, "x", high=4)        # tighter bound: read again
    assert ops.names.count("min") == 1
    y[2] = 9                                            # an in-place write after the check
    with pytest.raises(IndexError, match=r"\[0, 4\).*found 9"):
        check_index("y", y, 4, cpu, "x", high=4)
    with pytest.raises(IndexError, match="found 9"):    # a failed check is not remembered
        check_index("y", y, 4, cpu, "x", high=4)
    z = torch.tensor([1, 0])
    with device_side_index_checks(), Ops() as ops:      # the CUDA path: asserted once
        check_index("z", z, 2, cpu, "x")
        check_index("z", z, 2, cpu, "x")
    assert ops.names.count("_assert_async") == 1
    with torch.inference_mode():                        # no version counter: always checked
        w = torch.tensor([5])
    with pytest.raises(IndexError):
        check_index("w", w, 1, cpu, "x", high=3)
    with pytest.raises(IndexError):
        check_index("w", w, 1, cpu, "x", high=3)


# ---- round three: two runs in one folder, full disks, signals, one-line errors -----------------
# (issue: reliability, round three). Small runs: 32-image batches of resnet_small, mixup.
SMALL = ["--dataset", "synthetic", "--arch", "resnet_small", "--method", "mixup", "--batch-size",
         "32", "--test-subset", "64", "--device", "cpu", "--no-progress", "--channels-last",
         "false"]


def _wait_for(predicate, proc, timeout=120, what="the run", every=0.05):
    """Poll ``predicate()`` until true; fail if ``proc`` ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended (exit {proc.returncode}) before it was ready")
        time.sleep(every)
    raise AssertionError(f"{what} was not ready within {timeout} s")


def _records(path):
    """metrics.jsonl parsed; every line must be a whole JSON object (none cut short)."""
    text = open(path).read()
    assert text.endswith("\n"), "metrics.jsonl ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def _epochs_logged(out):
    """Lines in OUT/metrics.jsonl (written whole each epoch: never a partial one)."""
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _stripped(path):
    return [{k: r[k] for k in ("epoch", "step", "losses", "top1")} for r in _records(path)]


def test_two_runs_started_together_into_one_out_one_is_refused(tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "train.py", *SMALL, "--train-subset", "96", "--epochs", "2",
            "--out", str(out)]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(0.05)
    second = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    runs = {p.pid: (p, *p.communicate(timeout=300)) for p in (first, second)}
    refused = [pid for pid, (p, _, err) in runs.items() if p.returncode == 2]
    assert len(refused) == 1, {pid: (p.returncode, err[-1500:]) for pid, (p, _, err) in runs.items()}
    winner = next(pid for pid in runs if pid not in refused)
    p, _, err = runs[refused[0]]
    last = err.strip().splitlines()[-1]
    assert last == (f"error: --out {out} is in use by another run (pid {winner}, which holds "
                    f"{out / '.lock'}): wait for it to end or stop it, or choose another --out")
    assert "Traceback" not in err and "epoch 1/2" not in err       # refused before any work
    assert runs[winner][0].returncode == 0, runs[winner][2][-2000:]
    assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2]   # one run's epochs
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_overwrite_into_a_running_runs_out_is_refused_and_deletes_nothing(tmp_path):
    """The running run is paused (SIGSTOP) once its first checkpoint is on disk, so that it
    surely holds OUT while the second run, with --overwrite, is refused."""
    out = tmp_path / "o"
    common = SMALL + ["--train-subset", "64", "--out", str(out)]
    running = subprocess.Popen([sys.executable, "train.py", *common, "--epochs", "2"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "last.pt").exists(), running)   # epoch 1 written
        running.send_signal(signal.SIGSTOP)
        before = {f: (out / f).read_bytes() for f in ("last.pt", "metrics.jsonl")}
        r = run_cli(common + ["--epochs", "1", "--overwrite", "--lr", "0.3"], timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"error: --out {out} is in use by another run (pid {running.pid}, ")
        assert {f: (out / f).read_bytes() for f in before} == before
    finally:
        running.send_signal(signal.SIGCONT)
        _, err = running.communicate(timeout=300)
    assert running.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2]


def test_a_killed_runs_lock_file_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "o"
    common = SMALL + ["--train-subset", "64", "--epochs", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "train.py", *common], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / ".lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid), proc)
    proc.send_signal(signal.SIGKILL)        # the lock file stays, with the dead run's pid
    proc.wait()
    assert lock.read_text().strip() == str(proc.pid)
    r = run_cli(common + ["--overwrite"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "in use" not in r.stderr


def test_lock_out_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    from fastmix.checkpoint import OutInUseError, lock_out
    with lock_out(str(tmp_path)):
        with pytest.raises(OutInUseError, match=rf"in use by another run \(pid {os.getpid()},"):
            lock_out(str(tmp_path))          # another open file: flock refuses it
    with lock_out(str(tmp_path)):            # released on leaving the block
        pass


def _fill(folder):
    """Fill the file system of ``folder`` with a real file until a write fails (ENOSPC)."""
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == 28
    finally:
        os.close(fd)


def test_no_checkpoint_fits_the_disk_exit_4_and_the_summary_says_so(tmp_path):
    """A tmpfs too small for one checkpoint (2.5 MB): every checkpoint write fails with a real
    ENOSPC, named in the warning; metrics.jsonl and summary.json (small) are written whole;
    the run finishes, but exits 4 with a last line saying nothing can resume it."""
    out = tmp_path / "disk"
    if not _small_tmpfs(out, "512k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = run_cli(SMALL + ["--train-subset", "64", "--epochs", "2", "--out", str(out)],
                    timeout=180)
        assert r.returncode == 4, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "unexpected pos" not in r.stderr
        warning = (f"warning: could not write checkpoint {out / 'last.pt'} (No space left on "
                   f"device (ENOSPC)); the previous checkpoint, if any, is intact")
        assert r.stderr.count(warning) == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: none of this run's 2 checkpoint writes succeeded (last: No space left on "
            f"device (ENOSPC)): {out / 'last.pt'} is not this run's state and the run cannot be "
            f"resumed")
        assert json.loads(r.stdout)["method"] == "mixup"          # the results, still
        summary = json.loads((out / "summary.json").read_text())
        assert summary["checkpoint"] == {"path": str(out / "last.pt"), "written": 0, "failed": 2,
                                         "last_error": "No space left on device (ENOSPC)"}
        assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2]
        assert not (out / "last.pt").exists()
        assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(out)])


def test_disk_fills_mid_run_keeps_the_last_good_checkpoint_and_whole_files(tmp_path):
    """A 3 MB tmpfs: epoch 1's checkpoint (2.5 MB) fits, epoch 2's and the export (1.3 MB) do
    not (real ENOSPC); the run goes on, metrics.jsonl and summary.json are whole, exit 4 for
    the missing export."""
    out = tmp_path / "disk"
    if not _small_tmpfs(out, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = run_cli(SMALL + ["--train-subset", "64", "--epochs", "2", "--out", str(out),
                             "--export", str(out / "model.pt")], timeout=180)
        assert r.returncode == 4, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert (f"warning: could not write checkpoint {out / 'last.pt'} (No space left on "
                f"device (ENOSPC))") in r.stderr
        assert (f"warning: could not write the export {out / 'model.pt'} (No space left on "
                f"device (ENOSPC))") in r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: the export {out / 'model.pt'} was not written (No space left on device "
            f"(ENOSPC))")
        assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1     # the last good one
        summary = json.loads((out / "summary.json").read_text())
        assert summary["checkpoint"]["written"] == 1 and summary["checkpoint"]["failed"] == 1
        assert summary["export_error"] == "No space left on device (ENOSPC)"
        assert "exported_head" not in summary
        assert [r["epoch"] for r in _records(out / "metrics.jsonl")] == [1, 2]
        assert not (out / "model.pt").exists()
        assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(out)])


def test_a_full_disk_from_the_start_every_file_warns_none_is_cut_short(tmp_path):
    """Nothing fits (a filled tmpfs): metrics.jsonl, the mix grid PNG, the checkpoint, the
    export and summary.json each fail with one warning naming the file and ENOSPC; no file is
    left empty or cut short; the run finishes and exits 4, saying summary.json is missing."""
    out = tmp_path / "disk"
    if not _small_tmpfs(out, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        _fill(out)
        r = run_cli([a if a != "mixup" else "automix" for a in SMALL] +
                    ["--train-subset", "64", "--epochs", "1", "--grid-every", "1", "--out",
                     str(out), "--export", str(out / "model.pt")], timeout=180)
        assert r.returncode == 4, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        enospc = "(No space left on device (ENOSPC))"
        for what, name in (("metrics", "metrics.jsonl"), ("the mix grid", "mix_epoch0001.png"),
                           ("checkpoint", "last.pt"), ("the export", "model.pt"),
                           ("the summary", "summary.json")):
            assert f"warning: could not write {what} {out / name} {enospc}" in r.stderr, \
                (name, r.stderr[-3000:])
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"error: {out / 'summary.json'} was not written (No space left on device (ENOSPC))")
        # nothing half-written: metrics.jsonl as the run began (no epoch yet), no temporaries
        assert sorted(os.listdir(out)) == [".lock", "filler", "metrics.jsonl"]
        assert (out / "metrics.jsonl").read_bytes() == b""
    finally:
        subprocess.run(["umount", str(out)])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference for the signal tests: the same run, never stopped (metrics and export)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = run_cli(SMALL + ["--train-subset", "128", "--epochs", "3", "--out", str(tmp / "o"),
                         "--export", str(tmp / "model.pt")], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "o" / "metrics.jsonl", tmp / "model.pt"


def _stop_and_resume(tmp_path, uninterrupted, signum, wait_for, extra=()):
    """Start the run, wait until ``wait_for(out)``, send ``signum``; check the stop (exit code,
    message, checkpoint); run the printed resume command; compare with the uninterrupted run."""
    out = tmp_path / "o"
    args = SMALL + ["--train-subset", "128", "--epochs", "3", "--out", str(out), "--export",
                    str(tmp_path / "model.pt"), *extra]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: wait_for(out), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"{name}: stopping after the current step, with a checkpoint" in err
    last = err.strip().splitlines()[-1]
    head = rf"stopped by {name} after step (\d+) of 12; checkpoint {out / 'last.pt'}; resume with: "
    import re
    m = re.match(head, last)
    assert m, last
    state = load_checkpoint(str(out / "last.pt"))
    assert state["step"] == int(m.group(1)) < 12
    assert not (out / "summary.json").exists() and not (tmp_path / "model.pt").exists()
    import shlex
    cmd = shlex.split(last[m.end():])
    assert cmd[:2] == ["python", "train.py"] and cmd[-1] == "--resume" and str(out) in cmd
    r = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics, model = uninterrupted
    assert _stripped(out / "metrics.jsonl") == _stripped(metrics)
    a, b = torch.load(model), torch.load(tmp_path / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return state


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path,
                                                                            uninterrupted):
    # after epoch 1 is logged: the stop lands in epoch 2 (or at its start)
    state = _stop_and_resume(tmp_path, uninterrupted, signal.SIGTERM,
                             lambda out: _epochs_logged(out) >= 1)
    assert state["epoch"] == 1


def test_sigint_stops_mid_epoch_with_a_checkpoint_and_resumes_exactly(tmp_path, uninterrupted):
    # Ctrl-C once the first mid-epoch checkpoint (step 2 of epoch 1) is on disk: the stop's
    # checkpoint is at step 2 (the signal came between that checkpoint's rename and the stop
    # check that follows it: the periodic checkpoint is the stop's), 3, or 4, the epoch's last
    # (the resumed run then only evaluates it)
    state = _stop_and_resume(tmp_path, uninterrupted, signal.SIGINT,
                             lambda out: (out / "last.pt").exists(), ["--checkpoint-every", "2"])
    assert state["epoch"] == 0 and 2 <= state["batch"] <= 4


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "train.py", *args]


@pytest.mark.slow
def test_ddp_signal_to_every_process_stops_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """Two ranks under torchrun; SIGTERM to both workers and to the agent, as a scheduler that
    signals the whole job does: each worker gets it twice (the agent forwards its copy), and
    must still stop after the step with a checkpoint, not die without one. The
    printed torchrun command resumes it; metrics and export equal an uninterrupted DDP run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = SMALL + ["--batch-size", "16", "--train-subset", "256", "--epochs", "3"]
    ref = subprocess.run(_torchrun(*args, "--out", str(tmp_path / "ref"), "--export",
                                   str(tmp_path / "ref.pt")), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "o"
    launch = _torchrun(*args, "--out", str(out), "--export", str(tmp_path / "model.pt"))
    agent = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _epochs_logged(out) >= 1, agent)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2
    # the workers first, the agent 0.3 s later: its copy then reaches each worker after the
    # worker's handler took the first (two signals close together are one to Python's handler)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    os.kill(agent.pid, signal.SIGTERM)
    _, err = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert err.count("SIGTERM: stopping after the current step, with a checkpoint (another "
                     "signal after 2 s stops at once") == 2, err[-3000:]
    import re
    m = re.search(r"stopped by SIGTERM after step (\d+) of 24; checkpoint (\S+); resume with: "
                  r"torchrun <the same launch options> (.*)", err)
    assert m and m.group(2) == str(out / "last.pt"), err[-3000:]
    state = load_checkpoint(str(out / "last.pt"))
    assert state["step"] == int(m.group(1)) < 24
    assert not (out / "summary.json").exists() and not (tmp_path / "model.pt").exists()
    import shlex
    cmd = shlex.split(m.group(3))
    assert cmd[0] == "train.py" and cmd[-1] == "--resume"
    r = subprocess.run(_torchrun(*cmd[1:]), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stripped(out / "metrics.jsonl") == _stripped(tmp_path / "ref" / "metrics.jsonl")
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_sigterm_stops_at_once(tmp_path):
    """The second SIGTERM comes while the first one's step is still running (128-image steps;
    the first one's message is polled for every 5 ms): the process ends at once, by the
    signal's default action."""
    out = tmp_path / "o"
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *SMALL, "--batch-size", "128",
                                 "--train-subset", "384", "--epochs", "2", "--out", str(out)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    _wait_for(lambda: _epochs_logged(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: "SIGTERM: stopping after the current step" in err_path.read_text(), proc,
              timeout=30, what="the first SIGTERM's handling", every=0.005)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.time() - t < 5
    assert proc.returncode == -signal.SIGTERM     # the default action: no step finished first
    assert "Traceback" not in err_path.read_text()
    # the kernel released the lock: the next run goes ahead
    r = run_cli(SMALL + ["--train-subset", "64", "--epochs", "1", "--out", str(out),
                         "--overwrite"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path):
    """A real allocation failure: the address space capped at this interpreter's baseline +
    1.5 GB, far below what a 4096-image batch needs."""
    import resource
    probe = subprocess.run([sys.executable, "-c", "import train; print([l.split()[1] for l in "
                            "open('/proc/self/status') if l.startswith('VmPeak')][0])"],
                           cwd=ROOT, capture_output=True, text=True)
    limit = int(probe.stdout.split()[-1]) * 1024 + 1536 * 2**20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "train.py", *SMALL, "--batch-size", "4096",
                        "--train-subset", "4096", "--epochs", "1", "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=cap, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of memory (") and "lower --batch-size (now 4096" in last
    assert "enforce fail" not in last


def test_out_of_memory_message_for_each_kind_and_not_for_other_errors():
    import train as train_cli
    cfg = Config(batch_size=96)
    cuda = train_cli.out_of_memory_message(torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 80 GiB\n"
        "of which 1 GiB is free."), cfg)
    assert cuda.startswith("error: out of memory (OutOfMemoryError: CUDA out of memory. Tried "
                           "to allocate 2.00 GiB") and "(now 96" in cuda and "free the GPU" in cuda
    assert "\n" not in cuda
    assert "(MemoryError)" in train_cli.out_of_memory_message(MemoryError(), cfg)
    assert train_cli.out_of_memory_message(RuntimeError("shapes cannot be multiplied"), cfg) is None


@pytest.mark.parametrize("content,reason", [
    (b"", "the file is empty (0 bytes)"),
    ("truncated", "PytorchStreamReader failed reading zip archive"),
    (os.urandom(4096), "UnpicklingError: "),
])
def test_a_bad_init_weights_file_is_one_line_with_the_real_reason(tmp_path, content, reason):
    path = tmp_path / "w.pt"
    if content == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        content = path.read_bytes()[:3000]
    path.write_bytes(content)
    r = run_cli([a if a != "resnet_small" else "resnet18" for a in SMALL] +
                ["--epochs", "1", "--init-weights", str(path), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --init-weights {path} is not a loadable state dict "
                               f"(truncated, corrupt, or not a torch.save file): ")
    assert reason in lines[0]
    assert "weights_only" not in lines[0] and "Re-running" not in lines[0]
    assert not (tmp_path / "o").exists()                  # refused before any data or folder


@pytest.mark.parametrize("device", ["cuda:7", "cuda:x", "meta"])
def test_a_bad_device_is_one_line_before_any_work(tmp_path, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    r = run_cli(SMALL + ["--epochs", "1", "--device", device, "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device ") and device in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_logged_sums_are_the_same_read_saved_or_resumed_mid_epoch():
    """The epoch's logged means must not depend on when the sums were read (log_every), saved
    (a mid-epoch checkpoint) or resumed: the additions stay in step order. Values whose float32
    sum depends on the grouping."""
    from fastmix.engine import LoggedSums
    cpu, ok = torch.device("cpu"), torch.tensor(True)
    values = [1e8, 3.0, -1e8, 5.0, 7.0, 1e-3, 11.0]

    def run(read_at=(), stop_at=None):
        logged = LoggedSums(cpu)
        for i, v in enumerate(values):
            if i == stop_at:                 # a checkpoint, then a new process resumes from it
                logged = LoggedSums(cpu, logged.partial())
            logged.add({"loss": torch.tensor(v), "finite_steps": ok}, ok)
            if i in read_at:
                logged.merged()
        return logged.means()

    plain = run()
    assert plain == run(read_at=(1, 3)) == run(stop_at=2) == run(read_at=(0,), stop_at=4)
    total = torch.tensor(0.0)
    for v in values:                         # float32, one addition a step
        total = total + torch.tensor(v)
    assert plain["loss"] == float(total) / len(values)


def test_the_resume_hint_keeps_the_command_and_resumes_from_out():
    import train as train_cli
    assert train_cli.resume_command(["--epochs", "3", "--resume", "old/x.pt", "--out", "a b",
                                     "--overwrite", "--lr", "0.1"]) == \
        "python train.py --epochs 3 --out 'a b' --lr 0.1 --resume"
    assert train_cli.resume_command(["--resume=o/last.pt", "--out", "o", "--resume"]) == \
        "python train.py --out o --resume"
