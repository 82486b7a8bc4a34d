"""The first-run self-check (fastmix.selfcheck) and the trainer's fallback to an eager twin.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py), so the same code that guards a user's first GPU run is exercised here."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastmix import functional as Fn
from fastmix import selfcheck
from fastmix.engine import Config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def test_report_on_cpu_covers_every_op_dtype_and_steps(tmp_path):
    out = tmp_path / "report.json"
    report = selfcheck.run(CPU, str(out))
    assert report["ok"], report
    saved = json.loads(out.read_text())
    assert set(saved["ops"]) == set(Fn.FUSED_OPS)
    for op, r in saved["ops"].items():
        assert r["ok"] and r["error"] is None, op
        assert {c["dtype"] for c in r["cases"]} == {"float32", "float16"}, op
        assert all(0.0 <= c["max_rel_err"] <= selfcheck.TOLERANCE[torch.float16]
                   for c in r["cases"]), op
    assert saved["steps"]["ok"] and saved["steps"]["steps"] == 2
    assert "skipped" in saved["timing"]          # interpreter timings would mean nothing
    assert saved["environment"]["torch"] == torch.__version__


def test_a_wrong_kernel_and_a_raising_kernel_fail_the_check(monkeypatch):
    from fastmix.kernels import mask_mix, mixed_ce
    good = mixed_ce.mixed_cross_entropy
    monkeypatch.setattr(mixed_ce, "mixed_cross_entropy",
                        lambda *a, **k: good(*a, **k) * 1.01)        # 1% off

    def broken(*a, **k):
        raise RuntimeError("PTX JIT compilation failed")             # as a driver would say
    monkeypatch.setattr(mask_mix, "mix_images_pair", broken)
    ops = selfcheck.check_ops(CPU)
    assert not ops["mixed_cross_entropy"]["ok"]
    assert "relative error" in ops["mixed_cross_entropy"]["error"]
    assert not ops["mix_images"]["ok"]
    assert "PTX JIT compilation failed" in ops["mix_images"]["error"]
    assert ops["mixblock_attention"]["ok"]


def test_cli_exit_status_and_report(tmp_path):
    out = tmp_path / "sc.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "fastmix.selfcheck", "--device", "cpu", "--out",
                        str(out), "--no-steps"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mixblock_attention" in r.stdout and "FAIL" not in r.stdout
    assert json.loads(out.read_text())["ok"] is True


def _tiny(out, **kw):
    return Config(method="automix", arch="resnet_small", dataset="synthetic", epochs=1,
                  batch_size=20, train_subset=40, test_subset=20, device="cpu", out=str(out),
                  progress=False, channels_last=False, **kw)


def _in_the_child(tmp_path, monkeypatch, body):
    """Make the self-check's child process run ``body`` in place of the fused mask mix: a
    sitecustomize module on the child's PYTHONPATH (the trainer's process is not touched)."""
    site = tmp_path / "child-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('TRITON_INTERPRET') == '1':\n"
        "    import fastmix.kernels.mask_mix as _m\n"
        "    def _broken(*a, **k):\n"
        + "".join(f"        {line}\n" for line in body.splitlines()) +
        "    _m.mix_images_pair = _broken\n")
    monkeypatch.setenv("PYTHONPATH", str(site))


@pytest.mark.parametrize("body,needle", [
    ("raise RuntimeError('illegal memory access')", "illegal memory access"),
    ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),          # a real segfault
    ("import os\nos.abort()", "SIGABRT"),
])
def test_training_falls_back_to_the_eager_twin_of_a_failing_op(tmp_path, monkeypatch, body,
                                                               needle):
    """A fused op that raises, or crashes the whole process, in the self-check: the check runs
    in a child process, so the run goes on, on that op's eager twin, to the end."""
    _in_the_child(tmp_path, monkeypatch, body)
    with pytest.warns(RuntimeWarning, match=r"fused mix_images failed its self-check.*"
                                            r"uses the eager mix_images.*selfcheck\.json"):
        summary = train(_tiny(tmp_path / "run", selfcheck=True))
    paths = summary["op_paths"]
    assert paths["mix_images"]["path"] == "eager"
    assert needle in paths["mix_images"]["reason"]
    # the ops that passed ran fused (under the interpreter) for the whole run
    assert paths["mixed_cross_entropy"]["path"] == paths["mixblock_attention"]["path"] == "fused"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["op_paths"] == paths and saved["epochs"] == 1
    assert all(map(math.isfinite, saved["final_top1"].values()))
    report = json.loads((tmp_path / "run" / "selfcheck.json").read_text())
    assert report["ops"]["mix_images"]["ok"] is False
    assert report["calls_recorded_from_the_run"] is True
    assert Fn._OP_PATHS == {}          # the choice does not outlive the run


def _calls(cfg, shape=(6, 3, 16, 16)):
    from fastmix.engine import build_training
    from fastmix.runtime import autocast_context
    model, _, _ = build_training(cfg, CPU, shape[1], 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng, torch_rng = copy.deepcopy(model.rng.bit_generator.state), torch.get_rng_state()
    calls = selfcheck.record_op_calls(model, shape, 10, lambda: autocast_context(cfg, CPU))
    # nothing of the run changed: weights, buffers, random streams
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.rng.bit_generator.state == rng and torch.equal(torch.get_rng_state(), torch_rng)
    return {c["fn"]: c for c in calls}, calls


def test_the_selfcheck_records_the_variants_shapes_and_dtypes_the_run_uses():
    plain, _ = _calls(Config(method="automix", arch="resnet_small", amp="none"))
    attn = plain["mixblock_attention"]["args"]
    assert attn[0]["shape"] == [6, 16, 32] and attn[0]["dtype"] == "float32"
    assert attn[3:6] == [None, None, None]            # lam_concat off: the no-bias kernel
    assert plain["mix_images_pair"]["args"][-1] == "nearest"
    assert plain["mixed_cross_entropy"]["args"][0]["shape"] == [6, 10]
    concat, calls = _calls(Config(method="automix", arch="resnet_small", amp="bf16",
                                  lam_concat=True, upsample="bilinear", label_smoothing=0.1),
                           shape=(5, 3, 24, 24))
    attn = concat["mixblock_attention"]["args"]
    assert attn[0]["dtype"] == "bfloat16" and attn[0]["shape"][:2] == [5, 36]
    assert all(isinstance(a, dict) for a in attn[3:6])     # the λ-bias variant
    assert concat["mix_images_pair"]["args"][-1] == "bilinear"
    assert concat["mixed_cross_entropy"]["args"][0]["dtype"] == "bfloat16"
    assert concat["mixed_cross_entropy"]["args"][4] == 0.1
    # one case per variant: the step's λ draws do not multiply them
    ce = [c for c in calls if c["fn"] == "mixed_cross_entropy"]
    assert len(ce) == 2        # mixed (two targets) and plain (one_q)
    mixup, _ = _calls(Config(method="mixup", arch="resnet_small", amp="none"))
    assert set(mixup) <= {"mix_images", "mixed_cross_entropy"} and "mixed_cross_entropy" in mixup


def test_no_selfcheck_on_the_cpu_by_default_and_eager_paths_recorded(tmp_path):
    summary = train(_tiny(tmp_path))
    assert {p["path"] for p in summary["op_paths"].values()} == {"eager"}
    assert not (tmp_path / "selfcheck.json").exists()
    summary = train(_tiny(tmp_path / "e", eager=True))
    assert {p["reason"] for p in summary["op_paths"].values()} == {"--eager"}


@pytest.mark.gpu
def test_selfcheck_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report = selfcheck.run(torch.device("cuda"), str(tmp_path / "sc.json"))
    assert report["ok"], json.dumps(report, default=str)[:4000]
    assert all("fused_ms" in row for row in report["timing"].values())


# ---- the command line refuses bad arguments before any work (reliability, round three) ------
def _small_tmpfs(path, size, read_only=False):
    """Mount a real tmpfs of ``size`` at ``path`` (root only); False where that is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{'ro,' if read_only else ''}size={size}",
                        "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _cli(capsys, *args):
    """``(exit status, stderr)`` of ``selfcheck.main``."""
    try:
        code = selfcheck.main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_refuses_bad_arguments_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selfcheck, "run", None)      # any work would fail with a TypeError
    absent = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[1, 2]")
    cases = [(["--device", "tpu"], "--device 'tpu' is not a device name"),
             (["--device", "cuda:x"], "is not a device name"),
             (["--device", absent], f"--device {absent}: "),
             (["--device", "cpu", "--out", str(tmp_path)], "is a folder: give the report's file"),
             (["--device", "cpu", "--out", str(blocker / "r.json")], f"{blocker} is a file"),
             (["--device", "cpu", "--child", str(tmp_path / "nope.json"), "--progress",
               str(tmp_path / "p")], "cannot read the cases (FileNotFoundError"),
             (["--device", "cpu", "--child", str(tmp_path / "empty.json"), "--progress",
               str(tmp_path / "p")], "cannot read the cases (JSONDecodeError"),
             (["--device", "cpu", "--child", str(tmp_path / "list.json"), "--progress",
               str(tmp_path / "p")], "not a list of [index, call record] pairs"),
             (["--device", "cpu", "--child", str(tmp_path / "list.json")], "needs --progress")]
    ro = tmp_path / "ro"
    mounted = _small_tmpfs(ro, "64k", read_only=True)
    if mounted:                                     # unwritable, even for root
        cases.append((["--device", "cpu", "--out", str(ro / "r.json")], f"{ro} is not writable"))
    try:
        for args, needle in cases:
            code, err = _cli(capsys, *args)
            assert code == 2 and needle in err, (args, err)
            assert err.count("\n") == 1 and "Traceback" not in err, err
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
    r = subprocess.run([sys.executable, "-m", "fastmix.selfcheck", "--device", "nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--device 'nope' is not a device name" in r.stderr


def test_the_report_is_written_atomically_even_on_a_full_disk(tmp_path):
    """A real ENOSPC (a 64 KiB tmpfs) while writing a report larger than the disk: the
    previous report is left whole, no temporary file is left, and the OSError says why."""
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = disk / "sub" / "selfcheck.json"         # its folder is made
        selfcheck.write_report({"ok": True, "worst": float("nan")}, str(path))
        before = path.read_bytes()
        assert json.loads(before)["ok"] is True
        with pytest.raises(OSError) as e:
            selfcheck.write_report({"ok": False, "big": "x" * 200_000}, str(path))
        assert e.value.errno == 28 and path.read_bytes() == before
        assert os.listdir(path.parent) == ["selfcheck.json"]
    finally:
        subprocess.run(["umount", str(disk)])
