"""First-run self-check: do the fused kernels work on this machine?

``python -m fastmix.selfcheck`` (installed: ``fastmix-selfcheck``) prints the GPU, driver and
library versions; runs each fused op against its eager twin (forward outputs and input
gradients, fp32 and bf16, outputs NaN-poisoned before each call so an unwritten element shows)
at real shapes; runs a few whole AutoMix training steps fused against eager; on a GPU times
eager, ``torch.compile(eager)`` and fused for representative cases; and writes everything to a
JSON report to attach to a bug report. Exit status 1 when any check fails; 2, with one line on
stderr, for arguments checked before any work (a --device that is not a name, or absent on this
machine; an --out that is a folder or cannot be written) and for a report that cannot be
written (written atomically: a temporary file renamed over ``--out``).

``train.py`` runs the correctness part once at start on CUDA (``--selfcheck auto``, the
default; ``--no-selfcheck`` skips it) on the op calls its own step makes: the variants, shapes
and dtypes are recorded from one step of the run's model on fake tensors
(``record_op_calls``), and checked in a child process (``check_ops_isolated``), so a kernel
that crashes the process or poisons the CUDA context (an illegal address, a device-side
assert) takes only the child with it. An op that raises, crashes, hangs or disagrees runs as
its eager twin for the whole run, with one warning naming the op and the report file, and
``summary.json`` records the path each op took (``op_paths``). On the CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``) at small shapes: that is how CI tests this module.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
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
    eager twin, outputs and gradients, in every dtype (fp32, bf16 and fp16 on CUDA; fp32 and
    fp16 under the interpreter, whose bfloat16 arithmetic is broken)."""
    from fastmix.kernels import _common
    cuda = device.type == "cuda"
    small = not cuda if small is None else small
    dtypes = dtypes or ((torch.float32, torch.bfloat16, torch.float16) if cuda
                        else (torch.float32, torch.float16))
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
                    _add_case(report[op], _compare(fn, args, kwargs, dtype, case))
    finally:
        _common.POISON_OUTPUTS = poison
    return report


def _compare(fn, args, kwargs, dtype, case):
    """Fill ``case`` with the fused call's worst relative error against the eager twin's."""
    try:
        want = _run(functools.partial(fn, fused=False), args, kwargs)
        got = _run(functools.partial(fn, fused=True), args, kwargs)
        err = max(_rel_err(g, w) for g, w in zip(got, want))
        case["max_rel_err"] = err
        case["ok"] = err <= TOLERANCE[dtype] and len(got) == len(want)
        if not case["ok"]:
            case["error"] = f"{case['dtype']} {case['shape']}: relative error {err:.3g}"
    except Exception as e:
        case.update(ok=False, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(limit=6))
    return case


def _add_case(entry, case):
    entry["cases"].append(case)
    entry["ok"] &= bool(case["ok"])
    if not case["ok"] and entry["error"] is None:
        entry["error"] = case.get("error") or "failed"
        if "traceback" in case:
            entry["traceback"] = case["traceback"]


# ---- the run's own op calls, checked in a child process ------------------------------------
# The dispatchers of fastmix.functional whose calls a run's step makes, their op, and which
# positional arguments hold a permutation ("perm") or class labels ("label").
DISPATCHERS = {"mixed_cross_entropy": ("mixed_cross_entropy", {1: "label", 2: "label"}),
               "mixblock_attention": ("mixblock_attention", {2: "perm"}),
               "mix_images": ("mix_images", {1: "perm"}),
               "mix_images_pair": ("mix_images", {1: "perm", 3: "perm"})}
_LAM_ARGS = {"mixed_cross_entropy": {3}, "mix_images": {3}, "mix_images_pair": {5}}
_SCALE = {"mixed_cross_entropy": {0: 3.0}, "mixblock_attention": {0: 0.3, 3: 0.5, 4: 0.5, 5: 0.5}}


def _describe(name, args):
    """A JSON-able record of one dispatcher call: each argument's shape, dtype, gradient flag
    and memory format (tensors), value (numbers, strings) or None."""
    spec = []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append({"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""),
                         "grad": bool(a.requires_grad),
                         "channels_last": a.dim() == 4 and a.is_contiguous(
                             memory_format=torch.channels_last) and not a.is_contiguous()})
        else:
            spec.append(a)
    return {"fn": name, "args": spec}


def record_op_calls(model, x_shape, num_classes, autocast, x_dtype=torch.float32,
                    channels_last=False):
    """The fused-op calls one training step of ``model`` makes on a batch of ``x_shape``:
    ``[{"fn", "args"}]`` without repeats, recorded on fake tensors (nothing is computed, the
    model's weights, buffers and random streams are left as they were).

    ``autocast``: a callable returning the run's autocast context. Ops are recorded at their
    dispatcher, before the fused or eager path is chosen, with the dtypes autocast gives."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    device = next(model.parameters()).device
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    saved, memo = [], {}

    def fake(t):
        if id(t) not in memo:
            memo[id(t)] = fm.from_tensor(t.detach())
        return memo[id(t)]

    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for k, t in list(store.items()):
                if t is not None:
                    saved.append((store, k, t))
                    store[k] = (torch.nn.Parameter(fake(t), requires_grad=t.requires_grad)
                                if isinstance(t, torch.nn.Parameter) else fake(t))
    host_rng = copy.deepcopy(getattr(model, "rng", None))
    ema_pairs = getattr(model, "_ema_pairs", None)
    calls, seen = [], set()

    def record(name, args):
        rec = _describe(name, args)
        # the λ drawn this step is not a variant: calls that differ only in it are one case
        key = json.dumps({**rec, "args": [("λ" if i in _LAM_ARGS.get(name, ()) else a)
                                          for i, a in enumerate(rec["args"])]},
                         sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            calls.append(rec)

    class _NoValues(torch.utils._python_dispatch.TorchDispatchMode):
        # A fake tensor has no value: a host read (the CPU index checks) gets 0 / False.
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "is_nonzero"):
                return 0 if name == "_local_scalar_dense" else False
            return func(*args, **(kwargs or {}))

    previous_paths = Fn.set_op_paths({op: False for op in OPS})   # eager: fake tensors only
    fused = getattr(model, "fused", None)
    if hasattr(model, "fused"):
        model.fused = None
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), fm, _NoValues():
            Fn._CALL_RECORDER = record
            x = torch.randn(x_shape, device=device).to(x_dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, num_classes, (x_shape[0],), device=device)
            with autocast():
                loss, _ = model.losses(x, y, model.draw(x))
            loss.backward()
    finally:
        Fn._CALL_RECORDER = None
        Fn.set_op_paths(previous_paths)
        if hasattr(model, "fused"):
            model.fused = fused
        for store, k, t in saved:
            store[k] = t
        if host_rng is not None:
            model.rng = host_rng
        if hasattr(model, "_ema_pairs"):
            model._ema_pairs = ema_pairs
    return calls


def fixed_calls(device, dtypes, small=None):
    """The self-check's own cases (``_cases``) as call records, for a run whose step could not
    be recorded (a method whose draws read values on the host, as PuzzleMix's graph cut)."""
    import inspect
    small = device.type != "cuda" if small is None else small
    names = {getattr(Fn, n): n for n in DISPATCHERS}
    out = []
    for dtype in dtypes:
        for cases in _cases(device, dtype, small).values():
            for fn, make in cases:
                args, kwargs = make()
                bound = inspect.signature(fn).bind(*args, **kwargs)
                bound.apply_defaults()
                out.append(_describe(names[fn], [v for k, v in bound.arguments.items()
                                                 if k != "fused"]))
    return out


def _inputs(rec, device, g):
    """Random inputs (never zeros) of a recorded call's shapes, dtypes and flags."""
    _, kinds = DISPATCHERS[rec["fn"]]
    scales = _SCALE.get(rec["fn"], {})
    args = []
    for i, a in enumerate(rec["args"]):
        if not isinstance(a, dict):
            args.append(a)
            continue
        dtype = getattr(torch, a["dtype"])
        shape = a["shape"]
        if kinds.get(i) == "perm":
            t = torch.randperm(shape[0], generator=g)
        elif kinds.get(i) == "label":
            classes = rec["args"][0]["shape"][-1]
            t = torch.randint(0, classes, shape, generator=g)
        elif not dtype.is_floating_point:
            t = torch.randint(0, 256, shape, generator=g)
        elif not shape:                           # a 0-d λ or weight
            t = torch.rand((), generator=g) * 0.8 + 0.1
        else:
            t = torch.randn(*shape, generator=g) * scales.get(i, 1.0)
        t = t.to(device=device, dtype=dtype)
        if a.get("channels_last"):
            t = t.contiguous(memory_format=torch.channels_last)
        args.append(t.requires_grad_(a["grad"]) if dtype.is_floating_point else t)
    return args


def _lowest_precision(rec):
    dts = {a["dtype"] for a in rec["args"] if isinstance(a, dict)}
    for name in ("bfloat16", "float16"):
        if name in dts:
            return getattr(torch, name)
    return torch.float32


def check_recorded(rec, device, seed=0):
    """One recorded call: its fused op against the eager twin on random inputs of its shapes,
    outputs NaN-poisoned before the call. A case dict (``ok``, ``max_rel_err``, ``error``)."""
    from fastmix.kernels import _common
    fn = getattr(Fn, rec["fn"])
    dtype = _lowest_precision(rec)
    case = {"fn": rec["fn"], "dtype": str(dtype).replace("torch.", ""),
            "shape": [a["shape"] for a in rec["args"] if isinstance(a, dict)][:1],
            "variant": [None if a is None else ("tensor" if isinstance(a, dict) else a)
                        for a in rec["args"]]}
    poison = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True
    try:
        args = _inputs(rec, device, torch.Generator().manual_seed(seed))
        return _compare(fn, args, {}, dtype, case)
    finally:
        _common.POISON_OUTPUTS = poison


def _signal_name(code):
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def check_ops_isolated(device, records, timeout=600.0):
    """``check_recorded`` of every record in child processes: the report of ``check_ops``.

    One child runs the cases one after the other and writes a line when it starts and ends
    each. A child that dies (a segfault, an abort, a poisoned CUDA context that kills it) or
    runs past ``timeout`` seconds fails the case it was in, and the op's later cases; a fresh
    child carries on with the other ops. The parent never touches the kernels."""
    report = {op: {"ok": True, "error": None, "cases": []} for op in OPS}
    results, remaining = {}, list(range(len(records)))
    with tempfile.TemporaryDirectory(prefix="fastmix-selfcheck-") as tmp:
        while remaining:
            cases_path = os.path.join(tmp, "cases.json")
            progress_path = os.path.join(tmp, f"progress{remaining[0]}.jsonl")
            with open(cases_path, "w") as f:
                json.dump([[i, records[i]] for i in remaining], f)
            env = dict(os.environ)
            if device.type != "cuda":
                env["TRITON_INTERPRET"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(
                [p for p in [env.get("PYTHONPATH", "")] + sys.path if p])
            cmd = [sys.executable, "-m", "fastmix.selfcheck", "--device", str(device),
                   "--child", cases_path, "--progress", progress_path]
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                   timeout=timeout, stdin=subprocess.DEVNULL)
                how = None if r.returncode == 0 else (
                    f"killed by {_signal_name(r.returncode)}" if r.returncode < 0
                    else f"exit status {r.returncode}")
                tail = (r.stderr or "").strip().splitlines()[-3:]
            except subprocess.TimeoutExpired as e:
                how, tail = f"no answer within {timeout:.0f} s", (
                    (e.stderr or b"").decode(errors="replace").strip().splitlines()[-3:])
            started = None
            if os.path.exists(progress_path):
                with open(progress_path) as f:
                    for line in f:
                        try:
                            msg = json.loads(line)
                        except json.JSONDecodeError:   # a line cut short by the crash
                            continue
                        if "done" in msg:
                            results[msg["done"]] = msg["case"]
                            started = None
                        else:
                            started = msg["start"]
            if how is not None and started is None:
                # died outside any case (at import, CUDA initialisation): every case left fails
                started = remaining[0]
            if started is not None and started not in results:
                why = (f"the self-check process died ({how or 'ended early'}) during this case"
                       + (": " + " | ".join(tail) if tail else ""))
                op = DISPATCHERS[records[started]["fn"]][0]
                results[started] = {"fn": records[started]["fn"], "ok": False, "error": why,
                                    "crashed": True}
                for i in remaining:     # the same op's later cases would crash it again
                    if i not in results and DISPATCHERS[records[i]["fn"]][0] == op:
                        results[i] = {"fn": records[i]["fn"], "ok": False, "skipped": True,
                                      "error": f"not run: an earlier {op} case crashed the "
                                               f"self-check process"}
            remaining = [i for i in remaining if i not in results]
    for i in range(len(records)):
        _add_case(report[DISPATCHERS[records[i]["fn"]][0]], results[i])
    return report


def _child(device, cases_path, progress_path):
    """The child process of ``check_ops_isolated``: each case, with a line before and after."""
    with open(cases_path) as f:
        cases = json.load(f)
    with open(progress_path, "a", buffering=1) as out:
        for i, rec in cases:
            out.write(json.dumps({"start": i}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            case = check_recorded(rec, device, seed=i)
            case.pop("traceback", None) if case["ok"] else None
            out.write(json.dumps({"done": i, "case": case}, default=str) + "\n")
            out.flush()
    return 0


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
        with _no_tf32():
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


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls and convolutions in IEEE fp32 (cuDNN's TF32 convolutions, on by default,
    would move the fused and eager steps' gradients apart by more than the 1e-3 tolerance)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def time_ops(device):
    """Median forward+backward time (ms) of eager, torch.compile(eager) and fused, per op, at
    the first real shape in bf16 (CUDA only: the interpreter's times mean nothing);
    ``triton.testing.do_bench(return_mode="median")``."""
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
                row[name + "_ms"] = do_bench(lambda: _run(impl, args, kwargs),
                                             return_mode="median")
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {e}"
        if "fused_ms" in row and "eager_ms" in row:
            row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        if "fused_ms" in row and "compile_ms" in row:
            row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"]
        out[op] = row
    return out


def write_report(report, path):
    """Atomically write the JSON report (NaN/inf as strings): a temporary file in the same
    folder (made if missing), flushed and fsync'ed, then renamed over ``path``, so a crash or
    a full disk leaves the old report or the new one, never a torn file (the temporary file is
    removed when the write fails, and the ``OSError`` is raised)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2, default=str, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2, as argparse's)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def device_problem(name):
    """None when ``name`` is a device this machine can run the self-check on, else why not
    (checked before any work: a bad ``--device`` would otherwise fail mid-check)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {name!r} is not a device name: cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: the self-check runs on cpu or cuda, not {device.type}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                    f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return (f"--device {name}: this machine has {count} CUDA device(s), "
                    f"cuda:0 to cuda:{count - 1}")
    return None


def report_problem(out):
    """None when the report can be written to ``out`` (its folder exists and is writable, or
    can be made), else why not; checked before any work, never by writing."""
    from fastmix.checkpoint import unwritable_reason
    if os.path.isdir(out):
        return (f"--out {out} is a folder: give the report's file name, e.g. "
                f"{os.path.join(out, 'selfcheck.json')}")
    why = unwritable_reason(os.path.dirname(os.path.abspath(out)))
    return f"--out {out}: {why}" if why else None


def _read_cases(path):
    """The ``--child`` cases file: ``[[index, record], ...]``; ``ValueError`` if unreadable."""
    try:
        with open(path) as f:
            cases = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--child {path}: cannot read the cases ({type(e).__name__}: "
                         f"{getattr(e, 'strerror', None) or e})") from None
    if not isinstance(cases, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[1], dict)
            and c[1].get("fn") in DISPATCHERS and isinstance(c[1].get("args"), list)
            for c in cases):
        raise ValueError(f"--child {path}: not a list of [index, call record] pairs")
    return cases


def main(argv=None) -> int:
    """``python -m fastmix.selfcheck`` (installed: the ``fastmix-selfcheck`` command): the
    exit status (see the module doc)."""
    installed = os.path.basename(sys.argv[0]) == "fastmix-selfcheck"
    ap = _Parser(prog="fastmix-selfcheck" if installed else "python -m fastmix.selfcheck",
                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    ap.add_argument("--out", default="selfcheck.json", help="the JSON report")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--child", metavar="CASES", help=argparse.SUPPRESS)
    ap.add_argument("--progress", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    if not problem and args.out and not args.child:
        problem = report_problem(args.out)
    if not problem and args.child and not args.progress:
        problem = "--child needs --progress FILE"
    if problem:
        ap.error(problem)
    cpu = torch.device(device).type == "cpu"
    if cpu and "TRITON_INTERPRET" not in os.environ and "fastmix.kernels.mixed_ce" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"      # before the kernels are imported
    if args.child:
        try:
            _read_cases(args.child)
        except ValueError as e:
            ap.error(str(e))
        return _child(torch.device(device), args.child, args.progress)
    report = run(device, None, timing=not args.no_timing, steps=not args.no_steps)
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
    if args.out:
        try:
            write_report(report, args.out)
        except OSError as e:                  # e.g. a full disk: the results above stand
            print(f"{ap.prog}: error: cannot write the report {args.out}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    print(f"report: {args.out}" if args.out else "", f"({report['elapsed_s']:.1f} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
