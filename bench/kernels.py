#!/usr/bin/env python
"""Kernel benchmark harness: eager vs torch.compile(eager) vs the fused Triton op.

    python bench/kernels.py [--quick] [--ops a,b] [--json OUT.json] [--no-compile]
                            [--compile] [--reps N] [--sets N]

For every case of bench/cases_<op>.py (protocol: bench/common.py) it

1. checks that the fused op matches its eager twin on the case's inputs: every output and,
   when the case times a backward (``bytes_fwd_bwd`` is not None), every input gradient,
   elementwise ``|fused - eager| <= tol * |eager| + tol * max|eager|`` (per tensor) with
   tol = 1e-4 when all floating inputs are fp32 and 2e-2 when any is bf16 / fp16, and the
   same dtypes and shapes. A row that fails is marked FAIL and its fused speed is not
   reported (nor a compile speed whose outputs do not match eager);
2. times eager, ``torch.compile(eager, dynamic=False)`` and fused, forward alone and
   forward + backward. The forward runs in grad mode with the inputs' ``requires_grad`` as
   ``make()`` sets them, as in training (the fused cross-entropy writes its gradient in the
   forward, which its ``bytes_fwd`` counts). The backward is
   ``torch.autograd.backward(differentiable outputs, grad tensors)`` with random grad tensors
   made once per case; input grads are set to None before every timed call;
3. on CUDA, times with ``triton.testing.do_bench(fn, warmup=25, rep=100)`` and takes the
   median (``return_mode="all"`` then ``statistics.median``: the same number as
   ``return_mode="median"``, and the spread goes to the JSON). do_bench zeroes a 256 MB
   buffer before every timed call, so each call starts with a cold L2; on top of that, when
   one input set is at most 64 MiB, the timed function rotates over ``--sets`` (default 4)
   input sets from ``make()``. On the CPU: ``--reps`` (default 3) calls after one warm-up,
   time.perf_counter, the median;
4. on CUDA, measures the device-to-device copy bandwidth in the same run (a 1 GiB
   ``dst.copy_(src)``, bytes read + written over the median time) and reports the fused
   rows' achieved GB/s (``bytes_fwd`` or ``bytes_fwd_bwd`` over the fused median) and their
   % of that copy bandwidth; and the peak memory of one call of each variant
   (``max_memory_allocated`` after ``reset_peak_memory_stats`` minus what was allocated
   before the call: the inputs, which are excluded).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set here before any kernel
module is imported), ``--quick`` is forced and torch.compile is skipped unless
``--compile`` is given: that run is a correctness smoke check of the kernels and of this
harness, not a speed measurement.

Exit status: 0 when every checked case matches, 1 when any is FAIL.
"""
import argparse
import datetime
import gc
import importlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs: set it before any
# fastmix.kernels.* module (imported by the cases modules) is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import fastmix  # noqa: E402,F401  (registers fastmix.kernels in a source checkout)

OPS = {
    "mixblock_attn": "bench.cases_mixblock_attn",
    "mask_mix": "bench.cases_mask_mix",
    "mixed_ce": "bench.cases_mixed_ce",
}
PASSES = ("fwd", "fwd_bwd")
PASS_LABEL = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
IMPLS = ("eager", "compile", "fused")
TOL_FP32 = 1e-4
TOL_LOWP = 2e-2
ROTATE_MAX_BYTES = 64 * 2 ** 20     # rotate input sets when one set is at most this big
COPY_BYTES = 2 ** 30                # the copy-bandwidth probe: 1 GiB read + 1 GiB written


# ------------------------------------------------------------------------------ cases
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cases(device, quick, ops=None):
    """All cases of the named ops (default: all), in OPS order."""
    ops = list(OPS) if ops is None else list(ops)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {', '.join(OPS)}")
    out = []
    for op in ops:
        out.extend(importlib.import_module(OPS[op]).cases(device, quick))
    return out


def case_id(case) -> str:
    return f"{case.op}[{case.shape}]"


def _tensors(args, kwargs):
    return [t for t in itertools.chain(args, kwargs.values()) if isinstance(t, torch.Tensor)]


def grad_leaves(args, kwargs):
    """The input tensors that receive gradients."""
    return [t for t in _tensors(args, kwargs) if t.requires_grad]


def set_bytes(args, kwargs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(args, kwargs))


def tolerance(args, kwargs) -> float:
    lowp = any(t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(args, kwargs))
    return TOL_LOWP if lowp else TOL_FP32


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class Prepared:
    """A case's input sets (all from ``make()``) and its output-grad tensors (made once)."""

    def __init__(self, case, n_sets=4, seed=0):
        self.case = case
        self.has_bwd = case.bytes_fwd_bwd is not None
        torch.manual_seed(seed)
        first = case.make()
        self.bytes_per_set = set_bytes(*first)
        n = n_sets if self.bytes_per_set <= ROTATE_MAX_BYTES else 1
        self.sets = [first] + [case.make() for _ in range(max(n, 1) - 1)]
        self.tol = tolerance(*first)
        self.leaves = [t for a, k in self.sets for t in grad_leaves(a, k)]
        # Which outputs are differentiable, and one random grad tensor for each (once per case).
        outs = as_tuple(case.eager(*first[0], **first[1]))
        self.diff_idx = [i for i, o in enumerate(outs) if o.requires_grad]
        self.grads = [torch.randn_like(outs[i].detach()) for i in self.diff_idx]
        del outs
        if self.has_bwd and not self.diff_idx:
            raise RuntimeError(f"{case_id(case)}: bytes_fwd_bwd is set but no output of the "
                               f"eager op requires grad")
        self._cycle = itertools.cycle(range(len(self.sets)))

    def next_set(self):
        return self.sets[next(self._cycle)]

    def zero_grads(self):
        for t in self.leaves:
            t.grad = None

    def call(self, fn, bwd, args=None, kwargs=None):
        """One forward (and backward) of ``fn`` on the next input set (or the given one)."""
        if args is None:
            args, kwargs = self.next_set()
        outs = as_tuple(fn(*args, **kwargs))
        if bwd:
            diff = []
            for i in self.diff_idx:
                if i >= len(outs) or not outs[i].requires_grad:
                    raise RuntimeError(f"output {i} has no gradient (the eager twin's has)")
                diff.append(outs[i])
            torch.autograd.backward(diff, self.grads)
        return outs

    def timed_fn(self, fn, bwd, zero_grads=False, sync=False):
        """A no-argument callable for a timer: rotates over the input sets."""
        def run():
            if zero_grads:
                self.zero_grads()
            self.call(fn, bwd)
            if sync:
                torch.cuda.synchronize()
        return run


# ------------------------------------------------------------------------------ checking
def compare(got, ref, tol):
    """(ok, normalised error, message) for one tensor against its reference."""
    if got is None or ref is None:
        ok = got is None and ref is None
        return ok, 0.0 if ok else math.inf, "" if ok else "gradient missing on one side"
    if got.shape != ref.shape:
        return False, math.inf, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.dtype != ref.dtype:
        return False, math.inf, f"dtype {got.dtype} != {ref.dtype}"
    g, r = got.detach().double(), ref.detach().double()
    if not torch.equal(torch.isfinite(g), torch.isfinite(r)):
        return False, math.inf, "NaN/inf where the reference is finite (or vice versa)"
    fin = torch.isfinite(r)
    g, r = g[fin], r[fin]
    if r.numel() == 0:
        return True, 0.0, ""
    scale = r.abs().max().item()
    bound = tol * (r.abs() + scale) + 1e-30
    err = ((g - r).abs() / bound).max().item()      # <= 1 passes
    rel = (g - r).abs().max().item() / max(scale, 1e-30)
    return err <= 1.0, rel, "" if err <= 1.0 else f"max |diff| / max |ref| = {rel:.3g}"


def check(prep, fn, ref_fn=None, set_index=0):
    """Compare ``fn`` with the eager twin on one input set: outputs and input gradients.

    Returns a dict: ok, max_rel_err (max |diff| / max |ref| over all tensors), msg."""
    ref_fn = ref_fn or prep.case.eager
    args, kwargs = prep.sets[set_index]
    leaves = grad_leaves(args, kwargs)
    results = {}
    for name, f in (("ref", ref_fn), ("got", fn)):
        for t in leaves:
            t.grad = None
        try:
            outs = prep.call(f, prep.has_bwd, args, kwargs)
        except Exception as e:          # noqa: BLE001 -- a crashing op is a FAIL row
            if name == "ref":
                raise
            return {"ok": False, "max_rel_err": None, "msg": f"{type(e).__name__}: {e}"}
        grads = [t.grad for t in leaves] if prep.has_bwd else []
        results[name] = ([o.detach().clone() for o in outs],
                         [g.clone() if g is not None else None for g in grads])
    for t in leaves:
        t.grad = None
    (ref_out, ref_g), (got_out, got_g) = results["ref"], results["got"]
    if len(got_out) != len(ref_out):
        return {"ok": False, "max_rel_err": None,
                "msg": f"{len(got_out)} outputs, the eager twin has {len(ref_out)}"}
    worst, msgs = 0.0, []
    pairs = [(f"out{i}", g, r) for i, (g, r) in enumerate(zip(got_out, ref_out))]
    pairs += [(f"grad{i}", g, r) for i, (g, r) in enumerate(zip(got_g, ref_g))]
    for name, g, r in pairs:
        ok, rel, msg = compare(g, r, prep.tol)
        if math.isfinite(rel):
            worst = max(worst, rel)
        if not ok:
            msgs.append(f"{name}: {msg}")
    return {"ok": not msgs, "max_rel_err": worst, "msg": "; ".join(msgs)}


# ------------------------------------------------------------------------------ timing
def _stats(times_ms):
    times = sorted(times_ms)
    n = len(times)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": times[0], "max_ms": times[-1],
            "p20_ms": times[int(0.2 * (n - 1))], "p80_ms": times[int(0.8 * (n - 1))], "n": n}


def time_cuda(fn, grad_to_none=None):
    import triton.testing
    times = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                    return_mode="all")
    return _stats(times)


def time_cpu(fn, reps, grad_to_none=None):
    fn()                                                      # warm-up
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def peak_mib(prep, fn, bwd):
    """Peak CUDA memory of one call beyond what was allocated before it (the inputs)."""
    prep.zero_grads()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prep.call(fn, bwd)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    prep.zero_grads()
    return peak / 2 ** 20


def copy_bandwidth():
    """Device-to-device copy bandwidth (GB/s, 1e9 bytes): 1 GiB read + 1 GiB written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    st = time_cuda(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": 2 * COPY_BYTES, **st, "gbps": 2 * COPY_BYTES / (st["median_ms"] * 1e6)}


# ------------------------------------------------------------------------------ one case
def make_compiled(eager):
    return torch.compile(eager, dynamic=False)


def run_case(case, device, opts, copy_gbps=None):
    """Check and time one case; returns its JSON row."""
    cuda = device == "cuda"
    row = {"op": case.op, "shape": case.shape, "id": case_id(case),
           "bytes_fwd": case.bytes_fwd, "bytes_fwd_bwd": case.bytes_fwd_bwd,
           "flops_fwd": case.flops_fwd,
           "extra": {k: v for k, v in case.extra.items()
                     if isinstance(v, (int, float, str, bool)) or v is None},
           "notes": []}
    try:
        prep = Prepared(case, n_sets=opts.sets)
    except Exception as e:                  # noqa: BLE001
        row.update(check={"ok": False, "max_rel_err": None,
                          "msg": f"eager failed: {type(e).__name__}: {e}"}, timings={})
        return row
    row["input_sets"] = len(prep.sets)
    row["bytes_per_set"] = prep.bytes_per_set
    row["tol"] = prep.tol
    fns = {"eager": case.eager, "fused": case.fused}
    try:
        row["check"] = check(prep, case.fused)
    except Exception as e:                  # noqa: BLE001 -- the eager reference itself failed
        row.update(check={"ok": False, "max_rel_err": None,
                          "msg": f"eager failed: {type(e).__name__}: {e}"}, timings={})
        return row
    row["compile_check"] = None
    if opts.compile:
        try:
            compiled = make_compiled(case.eager)
            row["compile_check"] = check(prep, compiled)
            fns["compile"] = compiled
            if not row["compile_check"]["ok"]:
                row["notes"].append(f"torch.compile(eager) not timed: "
                                    f"{row['compile_check']['msg'][:300]}")
        except Exception as e:              # noqa: BLE001
            msg = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            row["compile_check"] = {"ok": False, "max_rel_err": None, "msg": msg}
            row["notes"].append(msg)
    passes = [p for p in PASSES if p == "fwd" or prep.has_bwd]
    timings = {p: {} for p in passes}
    for p in passes:
        bwd = p == "fwd_bwd"
        for impl in IMPLS:
            if impl not in fns:
                continue
            if impl == "fused" and not row["check"]["ok"]:
                continue                    # never time a wrong kernel
            if impl == "compile" and not row["compile_check"]["ok"]:
                continue
            fn = prep.timed_fn(fns[impl], bwd)
            try:
                if cuda:
                    st = time_cuda(fn, grad_to_none=prep.leaves if bwd else None)
                    st["peak_mib"] = peak_mib(prep, fns[impl], bwd)
                else:
                    st = time_cpu(fn, opts.reps, grad_to_none=prep.leaves if bwd else None)
                    st["peak_mib"] = None
            except Exception as e:          # noqa: BLE001
                row["notes"].append(f"{impl} {p}: {type(e).__name__}: {e}")
                continue
            finally:
                prep.zero_grads()
            timings[p][impl] = st
        nbytes = case.bytes_fwd if not bwd else case.bytes_fwd_bwd
        fused = timings[p].get("fused")
        if fused is not None and cuda:
            gbps = nbytes / (fused["median_ms"] * 1e6)
            fused["gbps"] = gbps
            fused["pct_copy_bw"] = 100.0 * gbps / copy_gbps if copy_gbps else None
    row["timings"] = timings
    del prep, fns
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------ report
def _fmt(v, spec=".4g"):
    return "—" if v is None else format(v, spec)


def _median(row, p, impl):
    st = row.get("timings", {}).get(p, {}).get(impl)
    return None if st is None else st["median_ms"]


def table(rows, op, cuda):
    lines = [f"### {op}", "",
             "| shape | pass | check | eager ms | compile ms | fused ms | fused/eager "
             "| fused/compile | GB/s | % copy BW | peak MiB eager/fused |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        if row["op"] != op:
            continue
        chk = row["check"]
        status = "ok" if chk["ok"] else "**FAIL**"
        if chk["ok"] and chk.get("max_rel_err") is not None:
            status += f" ({chk['max_rel_err']:.1e})"
        for p in PASSES:
            if p not in row.get("timings", {}) and not (p == "fwd" and not chk["ok"]):
                continue
            e, c, f = (_median(row, p, i) for i in IMPLS)
            cc = row.get("compile_check")
            c_txt = _fmt(c) if c is not None else (
                "FAIL" if cc is not None and not cc["ok"] else "—")
            fst = row.get("timings", {}).get(p, {}).get("fused") or {}
            est = row.get("timings", {}).get(p, {}).get("eager") or {}
            # (no speed-up on the CPU: interpreter times say nothing about kernel speed)
            su_e = e / f if e and f and cuda else None
            su_c = c / f if c and f and cuda else None
            peak = "—"
            if cuda and (est.get("peak_mib") is not None or fst.get("peak_mib") is not None):
                peak = f"{_fmt(est.get('peak_mib'), '.1f')} / {_fmt(fst.get('peak_mib'), '.1f')}"
            lines.append(
                f"| {row['shape']} | {PASS_LABEL[p]} | {status} | {_fmt(e)} | {c_txt} | "
                f"{'FAIL' if not chk['ok'] else _fmt(f)} | "
                f"{_fmt(su_e, '.2f') + '×' if su_e else '—'} | "
                f"{_fmt(su_c, '.2f') + '×' if su_c else '—'} | "
                f"{_fmt(fst.get('gbps'), '.0f')} | {_fmt(fst.get('pct_copy_bw'), '.0f')} | "
                f"{peak} |")
            if not chk["ok"]:
                break
    fails = [r for r in rows if r["op"] == op and not r["check"]["ok"]]
    for r in fails:
        lines.append(f"\nFAIL {r['shape']}: {r['check']['msg']}")
    notes = [(r["shape"], n) for r in rows if r["op"] == op for n in r.get("notes", [])]
    for shape, n in notes:
        lines.append(f"\nnote {shape}: {n}")
    return "\n".join(lines)


def environment(device):
    import triton
    env = {"device": device,
           "device_name": (torch.cuda.get_device_name() if device == "cuda" else
                           f"CPU: {platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cores (Triton interpreter)"),
           "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = p.total_memory / 2 ** 30
        env["sm_count"] = p.multi_processor_count
        try:
            import subprocess
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except Exception:                   # noqa: BLE001 -- informational only
            env["driver"] = None
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (forced without CUDA)")
    ap.add_argument("--ops", default=None, help=f"comma list of ops (default all: {','.join(OPS)})")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(eager)")
    ap.add_argument("--compile", action="store_true",
                    help="time torch.compile(eager) on the CPU too (default there: skipped)")
    ap.add_argument("--reps", type=int, default=3, help="CPU only: timed calls per variant")
    ap.add_argument("--sets", type=int, default=4,
                    help="input sets to rotate over when one set is <= 64 MiB")
    opts = ap.parse_args(argv)
    if opts.ops:
        unknown = [o for o in opts.ops.split(",") if o not in OPS]
        if unknown:
            ap.error(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    device = default_device()
    cuda = device == "cuda"
    t_start = time.perf_counter()
    forced = []
    if not cuda and not opts.quick:
        opts.quick = True
        forced.append("--quick forced (no CUDA)")
    if not cuda:
        # Tiny tensors: torch's intra-op thread pool only adds wake-up stalls (tens of ms
        # per op seen on a 2-core box); one thread keeps the smoke run short.
        torch.set_num_threads(1)
        forced.append("torch.set_num_threads(1)")
    if opts.no_compile:
        opts.compile = False
        compile_note = "torch.compile: skipped (--no-compile)"
    elif cuda:
        opts.compile = True
        compile_note = "torch.compile(eager, dynamic=False): default mode"
    elif opts.compile:
        compile_note = "torch.compile(eager, dynamic=False) on the CPU (--compile)"
    else:
        compile_note = "torch.compile: skipped on the CPU by default (pass --compile to try)"
    if opts.compile:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 1024))
    ops = opts.ops.split(",") if opts.ops else None
    env = environment(device)

    print("# fastmix kernel benchmarks\n")
    print(f"- device: {env['device_name']}")
    driver = f" (driver {env['driver']})" if env.get("driver") else ""
    print(f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or 'none'}"
          f"{driver}, python {env['python']}")
    print(f"- date: {env['date']}")
    print(f"- command: `{env['command']}`")
    if forced:
        print(f"- {', '.join(forced)}")
    print(f"- {compile_note}")
    if cuda:
        print("- timing: triton.testing.do_bench(warmup=25, rep=100), median ms; L2 flushed "
              "before each call by do_bench; inputs <= 64 MiB rotated over "
              f"{opts.sets} sets")
    else:
        print(f"- timing: {opts.reps} calls after 1 warm-up, time.perf_counter, median ms")
        print("\n**CPU run: the Triton kernels run under TRITON_INTERPRET=1. These figures are "
              "an interpreter smoke check (fused == eager, and the harness runs), NOT speed: "
              "no speed claim can be read from them.**\n")
    copy = None
    if cuda:
        copy = copy_bandwidth()
        print(f"- device copy bandwidth: {copy['gbps']:.0f} GB/s (1 GiB dst.copy_(src), "
              f"read + written bytes / median {copy['median_ms']:.3f} ms)")
    print("- check: fused vs eager outputs and input grads, |d| <= tol*|ref| + tol*max|ref|, "
          f"tol {TOL_FP32:g} (fp32) / {TOL_LOWP:g} (bf16/fp16); in brackets: max|d|/max|ref|")
    print("- GB/s: the case's bytes_fwd (fwd) or bytes_fwd_bwd (fwd+bwd) over the fused "
          "median; peak MiB: one call, beyond the inputs")
    sys.stdout.flush()

    cases = load_cases(device, opts.quick, ops)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        row = run_case(case, device, opts, copy["gbps"] if copy else None)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if not row["check"]["ok"]:
            print(f"FAIL {row['id']}: {row['check']['msg']}", file=sys.stderr)
    for op in (ops or OPS):
        print()
        print(table(rows, op, cuda))
    n_fail = sum(not r["check"]["ok"] for r in rows)
    wall = time.perf_counter() - t_start
    print(f"\n{len(rows)} cases, {n_fail} FAIL, {wall:.1f} s")
    if opts.json:
        out = {"env": env, "quick": opts.quick, "compile": opts.compile,
               "timing": ("do_bench(warmup=25, rep=100) median" if cuda else
                          f"perf_counter, {opts.reps} reps after 1 warm-up, median"),
               "interpreter_smoke": not cuda, "copy_bandwidth": copy, "rows": rows,
               "n_fail": n_fail, "wall_s": wall}
        d = os.path.dirname(os.path.abspath(opts.json))
        os.makedirs(d, exist_ok=True)
        with open(opts.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"wrote {opts.json}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
