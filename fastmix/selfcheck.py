"""First-run self-check: do the fused kernels work on this machine?

``python -m fastmix.selfcheck`` prints the GPU, driver and library versions; runs each fused op
against its eager twin (forward outputs and input gradients, fp32 and bf16, outputs
NaN-poisoned before each call so an unwritten element shows) at real shapes; runs a few whole
AutoMix training steps fused against eager; on a GPU times eager, ``torch.compile(eager)`` and
fused for representative cases; and writes everything to a JSON report to attach to a bug
report. Exit status 1 when any check fails.

``train.py`` runs the correctness part once at start on CUDA (``--selfcheck auto``, the
default; ``--no-selfcheck`` skips it): an op that raises or disagrees runs as its eager twin
for the whole run, with one warning naming the op and the report file, and ``summary.json``
records the path each op took (``op_paths``). On the CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``) at small shapes: that is how CI tests this module.
"""
import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch

from fastmix import functional as Fn

OPS = Fn.FUSED_OPS
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def environment(device):
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "device": str(device), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(
            p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count)
        try:
            v = torch._C._cuda_getDriverVersion()
            env["driver_cuda_version"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:  # not every build exposes it
            env["driver_cuda_version"] = None
    return env


# ---- the cases: (name, fused fn, eager fn, make inputs) at real (GPU) or small (CPU) shapes --
def _cases(device, dtype, small):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    def perm(n):
        return torch.randperm(n, generator=g).to(device)

    def ce(n, k):
        def make():
            return (rand(n, k, scale=3.0, grad=True), torch.randint(0, k, (n,), generator=g)
                    .to(device), torch.randint(0, k, (n,), generator=g).to(device),
                    torch.tensor(0.3, device=device)), {"label_smoothing": 0.1}
        return make

    def attn(n, hw, d):
        def make():
            b = lambda: rand(d, scale=0.5, dt=torch.float32, grad=True)  # noqa: E731
            return (rand(n, hw * hw, d, scale=0.3, grad=True), rand(n, hw * hw, grad=True),
                    perm(n), b(), b(), torch.tensor(0.2, device=device, requires_grad=True)), {}
        return make

    def mix(n, px, m, bilinear, channels_last):
        def make():
            x = rand(n, 3, px, px)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return (x, perm(n), rand(n, 1, m, m, dt=torch.float32, grad=True), perm(n),
                    rand(n, 1, m, m, dt=torch.float32)), {"mode": "bilinear" if bilinear
                                                           else "nearest"}
        return make

    if small:
        shapes = {"mixed_cross_entropy": [ce(8, 10)],
                  "mixblock_attention": [attn(4, 4, 16)],
                  "mix_images": [mix(4, 16, 4, False, True), mix(3, 12, 5, True, False)]}
    else:
        shapes = {"mixed_cross_entropy": [ce(256, 100), ce(64, 1000)],
                  "mixblock_attention": [attn(100, 8, 128), attn(64, 14, 512)],
                  "mix_images": [mix(100, 32, 8, False, True), mix(64, 224, 14, True, True)]}
    fns = {"mixed_cross_entropy": Fn.mixed_cross_entropy,
           "mixblock_attention": Fn.mixblock_attention,
           "mix_images": Fn.mix_images_pair}
    return {op: [(fns[op], make) for make in makers] for op, makers in shapes.items()}


def _run(fn, args, kwargs):
    """Outputs and input gradients of fn(*args) (a scalar-weighted sum of the outputs)."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            else a for a in args]
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * (i + 1) / o.numel()).sum() for i, o in enumerate(outs)
               if o.requires_grad)
    grads = []
    if isinstance(loss, torch.Tensor):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(loss, leaves)
    return [o.detach().float() for o in outs] + [g.float() for g in grads]


def _rel_err(got, want, floor=1e-3):
    """max |got - want| over max |want| (at least ``floor``: a gradient that is zero in exact
    arithmetic, like the key bias's, is compared absolutely)."""
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    if got.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / want.abs().max().clamp_min(floor))


def check_ops(device, dtypes=None, small=None):
    """``{op: {"ok": bool, "error": str or None, "cases": [...]}}``: each fused op against its
    eager twin, outputs and gradients, in every dtype (fp32 and bf16 on CUDA; fp32 and fp16
    under the interpreter, whose numpy has no bfloat16)."""
    from fastmix.kernels import _common
    cuda = device.type == "cuda"
    small = not cuda if small is None else small
    dtypes = dtypes or ((torch.float32, torch.bfloat16) if cuda else (torch.float32, torch.float16))
    report = {op: {"ok": True, "error": None, "cases": []} for op in OPS}
    poison = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True     # an element a kernel forgets to write reads as NaN
    try:
        for dtype in dtypes:
            for op, cases in _cases(device, dtype, small).items():
                for fn, make in cases:
                    args, kwargs = make()
                    case = {"dtype": str(dtype).replace("torch.", ""),
                            "shape": [list(a.shape) for a in args[:1]]}
                    try:
                        want = _run(functools.partial(fn, fused=False), args, kwargs)
                        got = _run(functools.partial(fn, fused=True), args, kwargs)
                        err = max(_rel_err(g, w) for g, w in zip(got, want))
                        case["max_rel_err"] = err
                        case["ok"] = err <= TOLERANCE[dtype] and len(got) == len(want)
                        if not case["ok"]:
                            msg = f"{case['dtype']} {case['shape']}: relative error {err:.3g}"
                            report[op]["error"] = report[op]["error"] or msg
                    except Exception as e:
                        case.update(ok=False, error=f"{type(e).__name__}: {e}")
                        report[op]["error"] = report[op]["error"] or case["error"]
                        report[op]["traceback"] = traceback.format_exc(limit=6)
                    report[op]["ok"] &= case["ok"]
                    report[op]["cases"].append(case)
    finally:
        _common.POISON_OUTPUTS = poison
    return report


def check_steps(device, steps=2):
    """A few AutoMix training steps, fused against eager from the same weights and draws:
    ``{"ok", "max_loss_rel_err", "max_grad_rel_err"}``."""
    from fastmix.automix import AutoMix
    from fastmix.backbones import build_backbone
    torch.manual_seed(0)
    n, px = (8, 16) if device.type != "cuda" else (64, 32)
    models = {}
    for fused in (False, True):
        torch.manual_seed(0)
        models[fused] = AutoMix(build_backbone("resnet_small", 3), 10, seed=0,
                                fused=fused).to(device)
    models[True].load_state_dict(models[False].state_dict())
    loss_err = grad_err = 0.0
    try:
        for s in range(steps):
            g = torch.Generator().manual_seed(s)
            x = torch.randn(n, 3, px, px, generator=g).to(device)
            y = torch.randint(0, 10, (n,), generator=g).to(device)
            res = {}
            for fused, model in models.items():
                torch.manual_seed(100 + s)        # the same permutations for both
                model.rng = np.random.default_rng(s)
                loss, _ = model.forward_train(x, y)
                model.zero_grad(set_to_none=True)
                loss.backward()
                res[fused] = (loss.detach().float(), {k: p.grad.float() for k, p in
                                                      model.named_parameters() if p.grad is not None})
            loss_err = max(loss_err, _rel_err(res[True][0], res[False][0]))
            grad_err = max([grad_err] + [_rel_err(res[True][1][k], v)
                                         for k, v in res[False][1].items()])
        ok = loss_err <= 1e-4 and grad_err <= 1e-3
        return {"ok": ok, "max_loss_rel_err": loss_err, "max_grad_rel_err": grad_err,
                "steps": steps, "batch": [n, 3, px, px]}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6)}


def time_ops(device):
    """Median forward+backward time (ms) of eager, torch.compile(eager) and fused, per op, at
    the first real shape in bf16 (CUDA only: the interpreter's times mean nothing)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device: timings would time the Triton interpreter"}
    from triton.testing import do_bench
    out = {}
    for op, cases in _cases(device, torch.bfloat16, small=False).items():
        fn, make = cases[0]
        args, kwargs = make()
        eager = functools.partial(fn, fused=False)
        impls = {"eager": eager, "compile": torch.compile(eager),
                 "fused": functools.partial(fn, fused=True)}
        row = {}
        for name, impl in impls.items():
            try:
                row[name + "_ms"] = do_bench(lambda: _run(impl, args, kwargs))
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {e}"
        if "fused_ms" in row and "eager_ms" in row:
            row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        if "fused_ms" in row and "compile_ms" in row:
            row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"]
        out[op] = row
    return out


def write_report(report, path):
    """Atomically write the JSON report (NaN/inf as strings)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str,
                  allow_nan=True)
    os.replace(tmp, path)
    return path


def run(device=None, out="selfcheck.json", timing=True, steps=True, small=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    report = {"environment": environment(device), "ops": check_ops(device, small=small)}
    if steps:
        report["steps"] = check_steps(device)
    if timing:
        report["timing"] = time_ops(device)
    report["ok"] = all(r["ok"] for r in report["ops"].values()) and \
        report.get("steps", {"ok": True})["ok"]
    report["elapsed_s"] = time.perf_counter() - t0
    if out:
        write_report(report, out)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmix.selfcheck",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    ap.add_argument("--out", default="selfcheck.json", help="the JSON report")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-steps", action="store_true")
    args = ap.parse_args(argv)
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if cpu and "TRITON_INTERPRET" not in os.environ and "fastmix.kernels.mixed_ce" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"      # before the kernels are imported
    report = run(args.device, args.out, timing=not args.no_timing, steps=not args.no_steps)
    env = report["environment"]
    print(" ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    for op, r in report["ops"].items():
        worst = max((c.get("max_rel_err", float("inf")) for c in r["cases"]), default=0.0)
        print(f"{op:22s} {'ok  ' if r['ok'] else 'FAIL'} worst relative error {worst:.2e}"
              + (f"  ({r['error']})" if r["error"] else ""))
    if "steps" in report:
        s = report["steps"]
        print(f"{'training steps':22s} {'ok  ' if s['ok'] else 'FAIL'} "
              + (f"loss {s['max_loss_rel_err']:.2e}, grads {s['max_grad_rel_err']:.2e}"
                 if "max_loss_rel_err" in s else s.get("error", "")))
    for op, row in report.get("timing", {}).items():
        print(f"{op:22s} " + (row if isinstance(row, str) else
                              "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items())))
    print(f"report: {args.out}" if args.out else "", f"({report['elapsed_s']:.1f} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
