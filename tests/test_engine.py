"""Trainer features: exact resume, atomic checkpoints, export, DDP (gloo), torch.compile."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmix.backbones import build_backbone
from fastmix.data import TensorLoader, make_synthetic
from fastmix.engine import CheckpointError, Config, atomic_save, load_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(out, **kw):
    base = dict(method="automix", arch="resnet_small", dataset="synthetic", epochs=2,
                batch_size=40, train_subset=200, test_subset=80, ema_momentum=0.9, ema_end=0.99,
                device="cpu", out=str(out), progress=False, checkpoint_every=2)
    base.update(kw)
    return Config(**base)


def _strip(history):
    return [{k: r[k] for k in ("epoch", "step", "losses", "top1", "lr")} for r in history]


@pytest.mark.parametrize("method,ema", [("automix", False), ("cutmix", False), ("mixup", True)])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, method, ema):
    """Exact resume, the EMA head of --ema included (its weights are exported: ema by default)."""
    def cfg(out, **kw):            # this test's runs, with or without --ema
        return tiny_cfg(out, ema=ema, **kw)
    full = train(cfg(tmp_path / "full", method=method, export=str(tmp_path / "full.pt")))
    if ema:
        assert full["exported_head"] == full["reported_head"] == "ema"
        assert set(full["final_top1"]) == {"cls", "ema"}

    # Interrupt the second run in epoch 2 after its mid-epoch checkpoint at step 8 (batch 3).
    orig_iter = TensorLoader.__iter__

    def interrupted(self):
        for i, item in enumerate(orig_iter(self)):
            if self.train and self.epoch == 1 and i == 4:
                raise KeyboardInterrupt("simulated kill")
            yield item

    monkeypatch.setattr(TensorLoader, "__iter__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut", method=method))
    state = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (state["epoch"], state["batch"]) == (1, 3)  # the mid-epoch checkpoint
    monkeypatch.setattr(TensorLoader, "__iter__", orig_iter)
    resumed = train(cfg(tmp_path / "cut", method=method, resume="auto",
                             export=str(tmp_path / "resumed.pt")))

    assert resumed["final_top1"] == full["final_top1"]
    a = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "cut" / "metrics.jsonl")]
    assert _strip(a) == _strip(b)
    wa, wb = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_is_a_plain_state_dict_for_the_named_head(tmp_path):
    summary = train(tiny_cfg(tmp_path, epochs=1, export=str(tmp_path / "cls.pt"), export_head="mix_q"))
    assert summary["exported_head"] == "mix_q"
    state = torch.load(tmp_path / "cls.pt", weights_only=True)
    net = build_backbone("resnet_small", in_chans=3)
    fc = torch.nn.Linear(128, 10)
    missing = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    assert not missing.missing_keys
    fc.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("fc.")})


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.arange(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(str(path))


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, str(path))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"v": torch.tensor(1)}, path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["v"].item() == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_loader_shards_do_not_overlap():
    ds = make_synthetic(103, size=8)
    ds.labels = torch.arange(103) % 10
    seen = []
    for rank in range(2):
        loader = TensorLoader(ds, 10, train=True, shard=(rank, 2), seed=3)
        loader.set_epoch(1)
        idx = torch.cat([loader._order()])
        seen.append(set(idx.tolist()))
        assert len(loader) == 5
    assert not seen[0] & seen[1]


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "train.py", "--dataset", "synthetic", "--arch", "resnet_small",
           "--epochs", "1", "--batch-size", "20", "--train-subset", "160", "--test-subset", "60",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert rec["step"] == 4  # 160 images / 2 ranks / 20 per batch
    assert set(rec["top1"]) == {"one_k", "mix_k", "one_q", "mix_q"}
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["world"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_compiled_step_matches_eager():
    from fastmix.mixup import MixupClassifier
    torch.manual_seed(0)
    eager = MixupClassifier(build_backbone("resnet_small", 3), 10, method="mixup", seed=1, fused=False)
    compiled = MixupClassifier(build_backbone("resnet_small", 3), 10, method="mixup", seed=1, fused=False)
    compiled.load_state_dict(eager.state_dict())
    compiled.backbone.compile()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = []
    for m in (eager, compiled):
        torch.manual_seed(5)
        loss, _ = m.forward_train(x, y)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_cli_rejects_unwritable_out_and_bad_resume(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "train.py", "--dataset", "synthetic", "--arch", "resnet_small",
                        "--epochs", "1", "--no-progress", "--out", str(tmp_path / "o"),
                        "--resume", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "bad.pt" in r.stderr and "Traceback" not in r.stderr


def test_presets_and_apex_option():
    from fastmix.engine import build_optimizer
    cfg = Config(optimizer_impl="apex")
    try:
        import apex  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="apex"):
            build_optimizer(cfg, torch.nn.Linear(2, 2))
    assert dataclasses.replace(cfg, optimizer_impl="torch")


@pytest.mark.slow
def test_compiled_automix_step_on_cpu_matches_eager_and_stops_recompiling():
    """--compile on the CPU path: the engine's own step (AutoMix, backbones compiled by
    Inductor) trains like the eager step, and after the warm-up steps nothing recompiles."""
    from torch._dynamo.utils import counters
    from fastmix.engine import build_step, build_training, resolve_runtime
    torch._dynamo.reset()
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    runs = {}
    for compiled in (False, True):
        cfg = resolve_runtime(Config(method="automix", arch="resnet_small", device="cpu",
                                     compile=compiled, channels_last=False, seed=3),
                              torch.device("cpu"))
        torch.manual_seed(0)          # the same initial weights
        model, opt, scaler = build_training(cfg, torch.device("cpu"), 3, 10)
        step_fn, _ = build_step(cfg, model, opt, scaler, torch.device("cpu"))
        losses, compiles = [], []
        for s in range(5):
            torch.manual_seed(s)
            loss, _, _ = step_fn(x, y, s, 100)
            losses.append(loss)
            compiles.append(counters["stats"]["unique_graphs"])
        runs[compiled] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()],
                          compiles)
    (le, pe, _), (lc, pc, compiles) = runs[False], runs[True]
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert compiles[1] > 0, "nothing was compiled"
    assert compiles[-1] == compiles[1], f"recompiled after the warm-up: graphs per step {compiles}"
