#!/usr/bin/env python
"""Counted, not timed: memory traffic, launches, FLOPs, activation memory and read-backs of
every fused op against its eager twin, and of every method's whole training step.

    python bench/counts.py                        # the real shapes (FakeTensorMode: ~2 min)
    python bench/counts.py --quick                # tiny shapes (what CI runs)
    python bench/counts.py --results bench/RESULTS.md --json runs/counts.json

Nothing is computed: every tensor is a ``FakeTensorMode`` tensor (shapes, strides and dtypes,
no data), so the R-50 224 px step counts as fast as the CIFAR one. What is counted, per call:

* **bytes**: every aten op that is not a view reads each distinct input tensor once and writes
  each output once (``unique elements x element size``; a broadcast (stride-0) dimension counts
  once; an in-place op reads and writes its operand, ``copy_``/``fill_``/``out=`` only write).
  A fused Triton kernel is recorded at its launch (``bench/launches.py``; it does not run) and
  moves each distinct tensor argument once, plus one more read of the tensor it gathers through
  an index per index argument (``GATHERED``). Both sides are compulsory traffic: an op's
  operands once, as a bandwidth-bound GPU kernel moves them; re-reads served by the L2 cache
  and the cuDNN/cuBLAS workspaces are not counted on either side.
* **launches**: one per aten op that is not a view or an allocation, one per Triton kernel. A
  lower bound on CUDA (cuDNN may run two kernels for one convolution backward; a foreach op
  launches once per ~110 tensors).
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; elementwise
  work is not counted), plus the Mix Block kernels' matmul FLOPs from their launch shapes
  (the backward recomputes the attention scores, as flash attention does).
* **saved**: the bytes autograd holds for backward at the end of the forward
  (``saved_tensors_hooks``; distinct storages, parameters and buffers excluded; autocast's
  bf16 weight copies included).
* **peak**: the most bytes of tensor storage alive at once during the step (parameters,
  buffers, gradients, optimizer state, the batch, activations, temporaries), tracked by
  storage weak references as ``torch.distributed._tools.mem_tracker.MemTracker`` does (which
  cannot be used here: it hooks every parameter, and the momentum encoder's are frozen). It is
  what ``torch.cuda.max_memory_allocated`` would report without the caching allocator's
  rounding, the figure closest to the GPU memory of the paper's tables.
* **read-backs**: aten ops that copy a device value to the host (``.item()``, ``bool()``,
  ``nonzero``...), each a host sync on a GPU. The index checks of ``fastmix.checks`` are
  counted as CUDA runs them (``device_side_index_checks``: a ``torch._assert_async``, no read);
  any other value ``fastmix.checks`` reads on the host is listed apart (``cpu_checks``).

The **modelled GPU time** is a roofline model, not a measurement: per op
``max(bytes / 3.35 TB/s, FLOPs / peak)`` (H100 SXM: HBM3 3.35 TB/s; bf16/fp16 989 TFLOP/s
dense; fp32 convolutions 495 TFLOP/s, TF32 as cuDNN does by default; other fp32 matmuls
67 TFLOP/s), summed over the step, plus ``LAUNCH_US`` per launch.

Step configurations (``CONFIGS``): faithful = the official step (AutoMix: ``bench/official_step.py``,
the spec's data flow) in fp32 NCHW, per-parameter SGD, a NaN check read back each step;
eager = fastmix's eager ops in bf16 autocast + channels-last, foreach SGD; fused = fastmix's
Triton kernels, fused SGD and the step guard (what ``train.py`` runs on a GPU, without
``torch.compile``, whose fusion of the backbone's elementwise ops is not counted here). The
CPU's autocast policy stands in for CUDA's (the same ops run in bf16: convolutions, matmuls).
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field

# The fused ops run on CPU tensors only under the interpreter switch; nothing is executed here.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, flop_registry  # noqa: E402

from bench.common import replace_section  # noqa: E402
from bench.launches import arg_names, recording  # noqa: E402
from fastmix.checks import device_side_index_checks  # noqa: E402

HBM_BYTES_PER_S = 3.35e12           # H100 SXM HBM3
PEAK_LOWP = 989.4e12                # dense bf16 / fp16 tensor cores
PEAK_TF32 = 494.7e12                # dense TF32 (cuDNN convolutions in fp32, the default)
PEAK_FP32 = 66.9e12                 # fp32 without tensor cores (matmuls: TF32 is off by default)
# Per launch: a kernel's launch latency plus its ramp-up and tail on the GPU, ~2-4 us, and
# eager PyTorch's host dispatch, 5-10 us per op, which hides behind the GPU only when kernels
# are longer than that. The model takes 5 us; a CUDA graph replay cuts the host part.
LAUNCH_US = 5.0

CONV_OPS = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution",
            "mkldnn_convolution"}
# Ops that allocate or only touch metadata: no kernel, no traffic.
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "_unsafe_view", "set_", "resize_", "lift_fresh", "detach_", "_reshape_alias",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
             "sym_is_contiguous", "_has_compatible_shallow_copy_type", "record_stream",
             "_record_function_enter", "_record_function_enter_new", "_record_function_exit"}
WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_",
              "exponential_", "_foreach_copy_", "_foreach_zero_"}
# Ops whose result the host waits for (a device-to-host copy of a value or a shape).
READ_BACK = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select",
             "_unique", "_unique2", "unique_dim", "unique_consecutive", "item"}
# Per fused kernel: the tensor read a second time through each index argument (the partner's
# rows: x[index] in the mix, the partner's keys qk[index] in the attention).
GATHERED = {"_mix_fwd_kernel": ("x_ptr", ("ia_ptr", "ib_ptr")),
            "_mix_bwd_kernel": ("x_ptr", ("idx_ptr",)),
            "_fwd_kernel": ("qk_ptr", ("idx_ptr",)),
            "_bwd_dq_kernel": ("qk_ptr", ("idx_ptr",)),
            "_bwd_dk_kernel": ("qk_ptr", ("idx_ptr",))}


def unique_bytes(t):
    """Bytes of the distinct elements a tensor addresses (a stride-0 dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(v):
    return [t for t in tree_leaves(v) if isinstance(t, torch.Tensor)]


def _distinct(ts):
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def op_io(func, args, kwargs, out):
    """``(reads, writes)``: the distinct tensors an aten op reads and writes."""
    name = func.overloadpacket.__name__
    reads, writes = [], []
    for i, a in enumerate(func._schema.arguments):
        v = kwargs.get(a.name) if (a.kwarg_only or i >= len(args)) else args[i]
        ts = _tensors(v)
        if a.alias_info is not None and a.alias_info.is_write:
            writes += ts
            if not (a.is_out or name in WRITE_ONLY):
                reads += ts
        else:
            reads += ts
    writes += [t for t in _tensors(out) if not any(t is w for w in writes)]
    return _distinct(reads), _distinct(writes)


def peak_flops(name, dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return PEAK_LOWP
    return PEAK_TF32 if name in CONV_OPS else PEAK_FP32


def roofline_s(nbytes, flops, peak):
    return max(nbytes / HBM_BYTES_PER_S, flops / peak if flops else 0.0)


@dataclass
class Tally:
    """What one counted call did."""
    bytes: int = 0
    launches: int = 0
    kernel_launches: int = 0          # of which Triton kernels
    flops: int = 0                    # FlopCounterMode + the Mix Block kernels
    saved: int = 0                    # bytes held for backward at the end of the call
    roofline_s: float = 0.0           # sum over launches of max(bytes/BW, FLOPs/peak)
    read_backs: list = field(default_factory=list)     # (op, where)
    cpu_checks: int = 0               # host reads made inside fastmix.checks
    by_op: dict = field(default_factory=dict)          # name -> [launches, bytes]
    peak: int = 0                     # MemTracker's peak (steps only)
    flops_counter: int = 0            # FlopCounterMode's own total (aten ops only)

    @property
    def model_ms(self):
        """The modelled GPU time: the roofline sum plus LAUNCH_US per launch (a model)."""
        return 1e3 * self.roofline_s + self.launches * LAUNCH_US / 1e3

    def add_launch(self, name, nbytes, flops, dtype):
        self.launches += 1
        self.bytes += nbytes
        self.flops += flops
        self.roofline_s += roofline_s(nbytes, flops, peak_flops(name, dtype))
        entry = self.by_op.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += nbytes


def _where():
    """The innermost project frame of the current Python stack (``file:line``), and whether
    the call comes from fastmix.checks."""
    stack = traceback.extract_stack()[:-2]              # less _where and __torch_dispatch__
    check = any(f.filename.endswith(os.path.join("fastmix", "checks.py")) for f in stack)
    for f in reversed(stack):
        if f.filename.startswith(ROOT) and os.sep + "site-packages" + os.sep not in f.filename:
            return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}", check
    return "?", check


class LiveBytes:
    """Bytes of tensor storage alive now and at most, from weak references to the storages."""

    def __init__(self):
        self.refs, self.now, self.peak = {}, 0, 0

    def track(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.refs:
            return
        nbytes = st.nbytes()

        def freed(_, key=key, nbytes=nbytes):
            self.refs.pop(key, None)
            self.now -= nbytes

        self.refs[key] = weakref.ref(st, freed)
        self.now += nbytes
        self.peak = max(self.peak, self.now)


class Counter(TorchDispatchMode):
    """Counts every aten op below it (see the module docstring) into ``self.tally``; with
    ``live``, tracks every tensor the ops return."""

    def __init__(self, tally, live=None):
        super().__init__()
        self.tally, self.live = tally, live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = packet.__name__
        if name in READ_BACK:
            where, check = _where()
            if check:
                self.tally.cpu_checks += 1
            else:
                self.tally.read_backs.append((name, where))
            if any(isinstance(t, FakeTensor) for t in _tensors(args)):
                # A fake tensor has no value: the host gets 0 / False (an index check passes,
                # a NaN check reads "no NaN"); the read-back itself is what is counted.
                if name in ("_local_scalar_dense", "is_nonzero"):
                    return 0 if name == "_local_scalar_dense" else False
                raise RuntimeError(f"{where}: {name} reads a data-dependent shape off the "
                                   f"device; it cannot be counted on fake tensors")
        out = func(*args, **kwargs)
        if self.live is not None:
            for t in _tensors(out):
                self.live.track(t)
        if func.is_view or name in NO_LAUNCH or func.namespace == "prim":
            return out
        reads, writes = op_io(func, args, kwargs, out)
        nbytes = sum(unique_bytes(t) for t in reads) + sum(unique_bytes(t) for t in writes)
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        dtype = next((t.dtype for t in reads if t.is_floating_point()), torch.float32)
        self.tally.add_launch(name, nbytes, flops, dtype)
        return out


def _kernel_fn_name(target):
    t = target
    while hasattr(t, "fn"):
        t = t.fn
    return t.__name__


def kernel_counts(name, target, args, kwargs):
    """``(bytes, FLOPs, dtype)`` of one recorded Triton launch (see the module docstring)."""
    names = arg_names(target)
    bound = dict(zip(names, args))
    tensors = _distinct(_tensors(list(args)))
    nbytes = sum(unique_bytes(t) for t in tensors)
    fn = _kernel_fn_name(target)
    if fn in GATHERED:
        src, indices = GATHERED[fn]
        n_idx = len(_distinct([bound[i] for i in indices if isinstance(bound.get(i), torch.Tensor)]))
        nbytes += n_idx * unique_bytes(bound[src])
    flops, dtype = 0, torch.float32
    if "qk_ptr" in bound:                     # the Mix Block attention: matmul FLOPs
        n, L, d = bound["qk_ptr"].shape
        dtype = bound["qk_ptr"].dtype
        s = 2 * n * L * L * d                 # one q k^T
        pv = 2 * n * L * L                    # one P v (the value has width 1)
        if fn == "_fwd_kernel":
            flops = s + pv
        elif fn == "_bwd_dq_kernel":
            flops = 2 * s                     # recompute S, dS @ k
        elif fn == "_bwd_dk_kernel":
            flops = (2 * s if kwargs.get("COMPUTE_DK", True) else s) + pv
    return nbytes, flops, dtype


@contextlib.contextmanager
def counting(tally, exclude_storages=(), resident=None):
    """Count everything run inside into ``tally`` (kernels recorded, not run). ``resident``:
    the tensors alive before (parameters, optimizer state, the batch...); given, the peak of
    live bytes goes to ``tally.peak``."""
    saved = {}
    exclude = set(exclude_storages)

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in exclude:
            saved[key] = t.untyped_storage().nbytes()
        return t

    live = None
    if resident is not None:
        live = LiveBytes()
        for t in resident:
            live.track(t)
    flop_mode = FlopCounterMode(display=False)
    with recording() as log, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            device_side_index_checks(), flop_mode, Counter(tally, live):
        yield
    if live is not None:
        tally.peak = live.peak
    aten_flops = flop_mode.get_total_flops()
    for name, target, args, kwargs in log:
        nbytes, flops, dtype = kernel_counts(name, target, args, kwargs)
        tally.kernel_launches += 1
        tally.add_launch(name, nbytes, flops, dtype)
    tally.flops_counter += aten_flops
    tally.saved = sum(saved.values())


def storages_of(module):
    return {t.untyped_storage()._cdata for t in list(module.parameters()) + list(module.buffers())}


# ---- the op cases ----------------------------------------------------------------------------
def _op_cases(quick):
    from bench import cases_mask_mix, cases_mixblock_attn, cases_mixed_ce
    out = []
    for mod in (cases_mixblock_attn, cases_mask_mix, cases_mixed_ce):
        out += mod.cases("cpu", quick)
    return out


def count_op(case, path, fm):
    """Forward and backward of one case on one path: ``(fwd Tally, bwd Tally or None)``."""
    fn = case.fused if path == "fused" else case.eager
    with fm, counting(Tally()):                         # learn the outputs' shapes
        args, kwargs = case.make()
        outs = _tensors(fn(*args, **kwargs))
        grads = [torch.randn_like(o) for o in outs if o.requires_grad]
        args, kwargs = case.make()
    fwd = Tally()
    with fm, counting(fwd):
        outs = fn(*args, **kwargs)
    diff = [o for o in _tensors(outs) if o.requires_grad]
    if not diff or case.bytes_fwd_bwd is None:
        return fwd, None
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    bwd = Tally()
    with fm, counting(bwd):
        # autograd.grad, not backward: the gradients are returned, not accumulated into the
        # leaves' .grad (in a model they flow on to the op before; no AccumulateGrad copy)
        torch.autograd.grad(diff, leaves, grads)
    return fwd, bwd


def op_rows(quick):
    rows = []
    for case in _op_cases(quick):
        row = {"op": case.op, "shape": case.shape, "design_bytes": case.bytes_fwd_bwd or case.bytes_fwd}
        for path in ("eager", "fused"):
            fwd, bwd = count_op(case, path, FakeTensorMode(allow_non_fake_inputs=True))
            total = _sum(fwd, bwd)
            row[path] = {"bytes": total.bytes, "launches": total.launches,
                         "kernels": total.kernel_launches, "flops": total.flops,
                         "saved": fwd.saved, "read_backs": len(total.read_backs),
                         "model_us": 1e3 * total.model_ms, "fwd_bytes": fwd.bytes,
                         "fwd_launches": fwd.launches}
        rows.append(row)
    return rows


def _sum(*tallies):
    out = Tally()
    for t in tallies:
        if t is None:
            continue
        for k in ("bytes", "launches", "kernel_launches", "flops", "roofline_s", "cpu_checks"):
            setattr(out, k, getattr(out, k) + getattr(t, k))
        out.read_backs += t.read_backs
    return out


# ---- the training steps ----------------------------------------------------------------------
CONFIGS = ("faithful", "eager", "fused")
METHODS = ("vanilla", "mixup", "cutmix", "automix", "manifoldmix", "saliencymix", "fmix",
           "resizemix", "gridmix", "smoothmix")
# (label, preset, batch): the real shapes, and the tiny one CI counts.
SHAPES = (("R-18 CIFAR 32px", "cifar100-r18", 100), ("R-18 CIFAR 32px", "cifar100-r18", 256),
          ("R-50 224px", "imagenet-r50", 64))
QUICK_SHAPES = (("tiny ResNet 32px", "cifar100-r18", 4),)
# Fixed draws (AutoMix's λ away from the Mixup fallback, so every step does the same work).
LAMS = {"lam_mb": 0.4, "lam_bb": 0.6}


def _config(method, preset, batch, config, quick):
    from fastmix.config import resolve
    flags = {"method": method, "batch_size": batch, "eager": config != "fused",
             "amp": "none" if config == "faithful" else "bf16",
             "channels_last": config != "faithful", "compile": False, "cuda_graphs": False}
    if quick:
        flags["arch"] = "resnet_small"
    return resolve(flags, preset)[0]


def _fake_module(model, fm):
    """Swap every parameter and buffer of ``model`` for a fake copy (shared ones stay shared)."""
    memo = {}

    def fake(t):
        if id(t) not in memo:
            memo[id(t)] = (t, fm.from_tensor(t.detach()))
        return memo[id(t)][1]

    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = fake(b)
    if hasattr(model, "_ema_pairs"):
        model._ema_pairs = None
    return model


def count_step(method, preset, batch, config, quick=False):
    """One steady-state training step (the second; the first creates the optimizer state),
    counted: a Tally."""
    from fastmix.engine import build_model, build_optimizer
    from fastmix.functional import FUSED_OPS, set_op_paths
    from fastmix.step import StepGuard, TrainStep
    from fastmix.runtime import autocast_context
    cfg = _config(method, preset, batch, config, quick)
    classes = 1000 if preset.startswith("imagenet") else 100
    size = 224 if preset.startswith("imagenet") else 32
    device = torch.device("cpu")
    torch.manual_seed(0)
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_model(cfg, 3, classes, seed=0)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = _fake_module(model, fm)
    previous = set_op_paths({op: config == "fused" for op in FUSED_OPS})
    try:
        with fm:
            opt = build_optimizer(cfg, model, fused=config == "fused")
            for g in opt.param_groups:      # faithful: the per-parameter loop; eager: foreach
                g["foreach"] = {"faithful": False, "eager": True}.get(config)
            guard = StepGuard(model, device, enabled=config == "fused")
            runner = model
            if method == "automix" and config == "faithful":
                from bench.official_step import OfficialAutoMix
                runner = OfficialAutoMix(model)
            step = TrainStep(runner, opt, guard, lambda: autocast_context(cfg, device))
            def batch_():
                x = torch.randn(batch, 3, size, size)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                return x, torch.randint(0, classes, (batch,))

            def one(i, x, y):
                draw = model.draw(x)
                draw.update({k: v for k, v in LAMS.items() if k in draw})
                loss, _, _ = step(x, y, i, 10 ** 6, draw=draw)
                if config == "faithful":             # the official NaN check: a read-back
                    bool(torch.isnan(loss).any())

            with counting(Tally()):
                one(0, *batch_())
            x, y = batch_()                           # a new batch, as from the loader
            tally = Tally()
            resident = [x, y] + _resident(model, opt, guard)
            with counting(tally, storages_of(model), resident):
                one(1, x, y)
    finally:
        set_op_paths(previous)
    return tally


def _resident(model, opt, guard):
    """The tensors a step starts with: parameters, buffers, gradients, optimizer state and
    the step guard's copies."""
    ts = list(model.parameters()) + list(model.buffers())
    ts += [p.grad for p in model.parameters() if p.grad is not None]
    ts += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    ts += guard.backup + [guard.total, guard.run, guard.max_run]
    return ts


def step_rows(quick, methods=METHODS, configs=CONFIGS):
    rows = []
    for label, preset, batch in (QUICK_SHAPES if quick else SHAPES):
        for method in methods:
            for config in configs:
                t0 = time.perf_counter()
                t = count_step(method, preset, batch, config, quick)
                rows.append({"shape": f"{label} b{batch}", "method": method, "config": config,
                             "bytes": t.bytes, "launches": t.launches,
                             "kernels": t.kernel_launches, "flops": t.flops, "saved": t.saved,
                             "peak": t.peak, "read_backs": t.read_backs,
                             "cpu_checks": t.cpu_checks, "model_ms": t.model_ms,
                             "roofline_ms": 1e3 * t.roofline_s,
                             "count_s": round(time.perf_counter() - t0, 2)})
                print(f"  counted {label} b{batch} {method} {config} "
                      f"({rows[-1]['count_s']} s)", file=sys.stderr, flush=True)
    return rows


# ---- tables ----------------------------------------------------------------------------------
def _mb(b):
    return f"{b / 2 ** 20:.2f}"


def _x(a, b):
    return f"{a / b:.2f}x" if b else "-"


def op_table(rows):
    lines = ["| op | shape | eager MiB | fused MiB | design MiB | traffic fused/eager | "
             "eager launches | fused launches | launches fused/eager | eager saved MiB | "
             "fused saved MiB | model eager µs | model fused µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, f = r["eager"], r["fused"]
        lines.append(
            f"| {r['op']} | {r['shape']} | {_mb(e['bytes'])} | {_mb(f['bytes'])} | "
            f"{_mb(r['design_bytes'])} | {_x(f['bytes'], e['bytes'])} | {e['launches']} | "
            f"{f['launches']} ({f['kernels']} Triton) | {_x(f['launches'], e['launches'])} | "
            f"{_mb(e['saved'])} | {_mb(f['saved'])} | {e['model_us']:.1f} | {f['model_us']:.1f} |")
    return "\n".join(lines) + "\n"


def step_table(rows):
    base = {(r["shape"], r["config"]): r for r in rows if r["method"] == "vanilla"}
    lines = ["| shape | method | config | GFLOP | FLOPs / vanilla | traffic GiB | traffic / "
             "vanilla | launches (Triton) | launches / vanilla | saved MiB | saved / vanilla | "
             "peak MiB | peak / vanilla | read-backs | model ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = base.get((r["shape"], r["config"]))
        rel = (lambda k: _x(r[k], v[k])) if v else (lambda k: "-")  # noqa: E731
        rb = len(r["read_backs"])
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['config']} | {r['flops'] / 1e9:.1f} | "
            f"{rel('flops')} | {r['bytes'] / 2 ** 30:.2f} | {rel('bytes')} | {r['launches']} "
            f"({r['kernels']}) | {rel('launches')} | {_mb(r['saved'])} | {rel('saved')} | "
            f"{_mb(r['peak'])} | {rel('peak')} | {rb} | {r['model_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def read_back_notes(rows):
    out = []
    for r in rows:
        if r["read_backs"]:
            where = collections.Counter(w for _, w in r["read_backs"])
            out.append(f"- {r['shape']} {r['method']} {r['config']}: " +
                       ", ".join(f"{w} x{c}" for w, c in sorted(where.items())))
    return "\n".join(out) + ("\n" if out else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI)")
    ap.add_argument("--ops-only", action="store_true")
    ap.add_argument("--steps-only", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--results", help="put the tables into this markdown file (between "
                                      "<!-- counts:begin/end --> markers)")
    args = ap.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    ops = [] if args.steps_only else op_rows(args.quick)
    steps = [] if args.ops_only else step_rows(args.quick, methods)
    command = "python bench/counts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Counted by `{command.strip()}` ({time.strftime('%Y-%m-%d')}, torch "
            f"{torch.__version__}, {time.perf_counter() - t0:.0f} s on the CPU, FakeTensorMode). "
            f"**Modelled GPU time is a roofline model, not a measurement**: per op max(bytes / "
            f"3.35 TB/s, FLOPs / peak) + {LAUNCH_US:g} µs per launch (bench/counts.py).\n\n")
    if ops:
        text += "#### Per op (forward + backward)\n\n" + op_table(ops) + "\n"
    if steps:
        text += "#### Per training step\n\n" + step_table(steps) + "\n"
        notes = read_back_notes(steps)
        text += ("Read-backs in the step:\n" + notes if notes else
                 "No read-back in any step.\n")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ops": ops, "steps": steps}, f, indent=1)
    if args.results:
        replace_section(args.results, text, "counts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
