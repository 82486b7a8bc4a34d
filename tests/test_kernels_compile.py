"""The fused kernels compile for real GPUs, here, without one (bench/gpu_aot.py), and their
launch wrappers are safe to capture in a CUDA graph.

Triton's compiler and ptxas run on the CPU: every configuration the launchers (and the
autotuner's own pruning) would run is compiled for sm_80 and sm_90 and checked against the
hardware limits. These tests run in subprocesses without TRITON_INTERPRET (conftest.py sets it
for this process, and the kernel modules read it at import)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmix.checks import scalar_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"mixblock_attn._fwd_launch", "mixblock_attn._dq_launch", "mixblock_attn._dk_launch",
           "mask_mix._mix_fwd_kernel", "mask_mix._mix_bwd_kernel",
           "mixed_ce._mixed_ce_fwd_kernel", "mixed_ce._scale_kernel"}


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _python(code, timeout=600):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                       env=_compiled_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_within_the_limits(tmp_path):
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "bench/gpu_aot.py", "--json", str(out)], cwd=ROOT,
                       env=_compiled_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    for kernel in KERNELS:       # every dtype the kernel takes reached the compiler
        dtypes = {d for row in rows if row["kernel"] == kernel for d in row["dtypes"]}
        assert {"fp32", "fp16", "bf16"} <= dtypes, (kernel, dtypes)
    for row in rows:
        assert "error" not in row, row
        assert row["regs"] * row["threads"] <= 65536 and row["spills"] == 0, row
        assert 0 < row["regs"] <= 255 and row["shared"] <= 163 * 1024, row


def test_the_checker_catches_a_spilling_config():
    """A config the pruning drops (fp32 Mix Block dq with biases, 64 x 64 tiles, BLOCK_D 32,
    8 warps) compiled anyway: the check must report its spill, or a clean table means nothing."""
    out = _python("""
        import sys, torch
        sys.path.insert(0, "bench")
        import gpu_aot
        from fastmix.kernels import mixblock_attn as M
        n, L, D = 2, 196, 128
        qk, v, idx = torch.randn(n, L, D), torch.randn(n, L), torch.arange(n)
        b, vb, out, lse = torch.randn(D), torch.tensor(0.1), torch.randn(n, L), torch.randn(n, L)
        args = (qk, v, idx, b, b, vb, out, torch.randn(n, L), lse, torch.empty(n, L, D),
                L, D, 0.1, 0.1)
        kw = dict(HAS_QB=True, HAS_KB=True, HAS_VB=True, LOWP=False, BLOCK_M=64, BLOCK_N=64,
                  BLOCK_D=32, num_warps=8, num_stages=2)
        row = gpu_aot.compile_one(("dq", M._bwd_dq_kernel, args, kw, "", 90))
        M._dq_launch.nargs = dict(zip(M._dq_launch.arg_names, args))
        M.PRUNE_ARCH = "sm_90"
        flags = dict(HAS_QB=True, HAS_KB=True, HAS_VB=True, LOWP=False, BLOCK_N=64)
        kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.num_warps)
                for c in M._dq_launch.prune_configs(flags)]
        print(row["spills"], (64, 32, 8) in kept, gpu_aot.problems(row))
    """)
    spills, kept, problems = out.split(" ", 2)
    assert int(spills) > 0 and "spills" in problems
    assert kept == "False"             # and the pruning never hands it to the autotuner


def test_autotune_keys_name_every_constexpr_flag():
    """One tuned config per kernel variant: a key without a flag would reuse the config tuned
    for one variant (say fp32 without biases) for another (bf16 with them)."""
    out = _python("""
        from triton.runtime.autotuner import Autotuner
        from fastmix.kernels import mixblock_attn as M
        for name in ("_fwd_launch", "_dq_launch", "_dk_launch"):
            a = getattr(M, name)
            assert isinstance(a, Autotuner), name
            flags = {p.name for p in a.fn.params if p.is_constexpr}
            tuned = {k for c in a.configs for k in c.kwargs}
            print(name, sorted(flags - tuned - set(a.keys)))
    """)
    for line in out.strip().splitlines():
        assert line.endswith("[]"), line


def test_autotuning_refuses_to_start_inside_a_capture():
    out = _python("""
        import torch
        from fastmix.kernels import mixblock_attn as M
        torch.cuda.is_available = lambda: True
        torch.cuda.is_current_stream_capturing = lambda: True
        a = M._fwd_launch
        a.nargs = dict(L=64, D=128)
        M.PRUNE_ARCH = "sm_90"
        try:
            a.prune_configs(dict(BLOCK_N=64, LOWP=False))
        except RuntimeError as e:
            print(e)
    """)
    assert "inside a CUDA graph capture" in out and "_fwd_kernel" in out


def test_a_cpu_lambda_reaches_the_device_without_a_copy():
    """A pageable host-to-device copy waits for the stream and is illegal in a capture; the
    0-d CPU λ is read on the host (no device involved) and filled on the device instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    lam = torch.tensor(0.3)
    with Ops() as ops:
        t = scalar_tensor(lam, "meta")
    assert t.device.type == "meta" and t.dtype == torch.float32 and t.dim() == 0
    assert not any("copy" in op for op in ops.seen), ops.seen
    assert scalar_tensor(lam, "cpu").item() == pytest.approx(0.3)      # same device: a cast
    g = torch.tensor(0.5, requires_grad=True)
    assert scalar_tensor(g, "cpu").requires_grad                       # keeps its graph


@pytest.mark.gpu
def test_cpu_lambda_and_capture_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastmix.functional import mixed_cross_entropy
    logits = torch.randn(8, 10, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed_cross_entropy(logits, y, y.flip(0), torch.tensor(0.3)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_bilinear_backward_takes_its_warps_per_architecture(monkeypatch):
    """The 224 px bilinear backward tile: 2 warps on sm_80, 4 on sm_90, where 2 spill under
    triton 3.8 (bench/gpu_aot.py records and compiles each architecture's own config)."""
    import triton
    from fastmix.kernels import mask_mix as MM
    if not triton.__version__.startswith("3.8."):
        pytest.skip(f"the per-architecture floor is measured for triton 3.8, this is "
                    f"{triton.__version__}")
    monkeypatch.setattr(MM, "GPU_CONFIGS", True)
    warps = {}
    for arch in ("sm_80", "sm_90"):
        monkeypatch.setattr(MM, "TARGET_ARCH", arch)
        warps[arch] = MM._bwd_config(224, 224, 14, 14, True)[-1]
    assert warps == {"sm_80": 2, "sm_90": 4}
