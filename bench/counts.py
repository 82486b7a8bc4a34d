#!/usr/bin/env python
"""Counted, not timed: memory traffic, launches, FLOPs, activation memory and read-backs of
every fused op against its eager twin, and of every method's whole training step.

    python bench/counts.py                        # the real shapes (FakeTensorMode: ~2 min)
    python bench/counts.py --quick                # tiny shapes (what CI runs)
    python bench/counts.py --results bench/RESULTS.md --json runs/counts.json
    python bench/counts.py --check-peak           # counted peak against real CPU tensors

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
* **peak**: the most bytes of tensor storage alive at once during one steady-state step (the
  second), from its start to its end: what is alive when it starts (parameters, buffers,
  optimizer state, the step guard's copies, the batch, and the previous step's gradients,
  which ``TrainStep`` drops with ``zero_grad(set_to_none=True)`` after the forward, before
  the backward), plus every tensor the step's ops return, each until it is freed
  (activations, saved tensors, temporaries, the new gradients). Tracked by storage weak
  references as ``torch.distributed._tools.mem_tracker.MemTracker`` does (which cannot be
  used here: it hooks every parameter, and the momentum encoder's are frozen); nothing the
  counter holds keeps a tensor alive. It is what ``torch.cuda.max_memory_allocated`` would
  report without the caching allocator's rounding and without the libraries' workspaces
  (cuDNN, cuBLAS; oneDNN on the CPU), the figure closest to the GPU memory of the paper's
  tables. Checked against the same step on real CPU tensors (``--check-peak``,
  ``measure_step``: the profiler's allocation events), which it matches to 0.1% once the
  blocks an op allocates and frees itself (its workspace) are left out.
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
import gc
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
    peak: int = 0                     # most live storage bytes (steps only)
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

    def __init__(self, tally, live=None, drain=None):
        super().__init__()
        self.tally, self.live, self.drain = tally, live, drain

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.drain is not None:
            self.drain()
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


class _GlobalOnly:
    """FlopCounterMode's module tracker less the modules: every FLOP goes to "Global" (all
    that is read here). The real one puts a multi-grad hook on each module's inputs and
    outputs whose closure holds their grad_fns: reference cycles that keep a graph the step
    drops (the official step's detached mask_bb, 2 MiB at R-18 b32) and its saved tensors
    alive until Python's cyclic collector runs, in the counted peak."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def _no_gc():
    """Collect, then hold Python's cyclic collector off: a step's peak then does not depend on
    when the collector runs (the counted and the real step are measured under this same
    rule; any cyclic garbage a step makes stays in its peak)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def counting(tally, exclude_storages=(), resident=None):
    """Count everything run inside into ``tally`` (kernels recorded, not run). ``resident``:
    the tensors alive before (parameters, optimizer state, the batch...), or a function that
    returns them; given, the peak of live bytes goes to ``tally.peak``. Neither ``resident``
    nor a recorded launch's arguments are kept alive by the count: a tensor the step frees
    (the previous step's gradients at ``zero_grad(set_to_none=True)``, a kernel's output)
    leaves the live bytes when it is freed."""
    saved, seen = [0], {}
    exclude = set(exclude_storages)

    def pack(t):
        st = t.untyped_storage()
        key = st._cdata
        if key not in exclude and key not in seen:
            saved[0] += st.nbytes()
            # forgotten when freed: a new storage at the same address is another one
            seen[key] = weakref.ref(st, lambda _, key=key: seen.pop(key, None))
        # Not t itself: a saved output would then hold its own grad_fn (a reference cycle), and
        # a graph the step drops (the official step's detached mask_bb) would live on until
        # Python's cyclic collector ran, in the peak. The unpacked tensor gets its grad_fn back
        # from autograd, as without hooks.
        return t.detach()

    live = None
    if resident is not None:
        live = LiveBytes()
        for t in (resident() if callable(resident) else resident):
            live.track(t)
        resident = t = None                 # weak references only from here on
    flop_mode = FlopCounterMode(display=False)
    flop_mode.mod_tracker = _GlobalOnly()
    with recording() as log:
        done = 0

        def drain():
            """Count the launches recorded since the last call and drop their arguments (the
            log would otherwise keep every kernel's inputs and outputs alive to the end)."""
            nonlocal done
            while done < len(log):
                name, target, args, kwargs = log[done]
                log[done] = None
                nbytes, flops, dtype = kernel_counts(name, target, args, kwargs)
                tally.kernel_launches += 1
                tally.add_launch(name, nbytes, flops, dtype)
                done += 1

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                device_side_index_checks(), flop_mode, Counter(tally, live, drain):
            yield
        drain()
    if live is not None:
        tally.peak = live.peak
    tally.flops_counter += flop_mode.get_total_flops()
    tally.saved = saved[0]


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
# --vit: DeiT-S at 224 px on the CIFAR-100 recipe (OpenMixup's measured row: AutoMix 2.19x
# vanilla's time, 2.25x its memory), and AutoMix with switch_off's skipped Mix Block step
# ("automix-mbskip": the momentum encoder's pass on the MB's mixed batch left out).
VIT_METHODS = ("vanilla", "mixup", "automix", "automix-mbskip")
VIT_CONFIGS = ("faithful", "fused")
VIT_SHAPES = (("DeiT-S 224px", "cifar100-deit-s", 100),)
QUICK_VIT_SHAPES = (("tiny DeiT 224px", "cifar100-deit-s", 2),)
TINY_DEIT = "embed_dim=24,depth=6,num_heads=2,drop_path_rate=0.1"
# OpenMixup's CIFAR-100 DeiT-S table (Mixup_cifar.md:156, 168): memory GB, 600-epoch hours
AUTHORS_DEIT_S = {"vanilla": (8.1, 27), "automix": (18.2, 59)}
# Fixed draws (AutoMix's λ away from the Mixup fallback, so every step does the same work).
LAMS = {"lam_mb": 0.4, "lam_bb": 0.6}


def _config(method, preset, batch, config, quick):
    from fastmix.config import resolve
    flags = {"method": "automix" if method == "automix-mbskip" else method,
             "batch_size": batch, "eager": config != "fused",
             "amp": "none" if config == "faithful" else "bf16",
             "channels_last": config != "faithful", "compile": False, "cuda_graphs": False}
    if method == "automix-mbskip":
        flags["switch_off"] = 0.8
    vit = resolve({}, preset)[0].arch.startswith("timm:")
    if quick:
        flags.update({"timm_kwargs": TINY_DEIT} if vit else {"arch": "resnet_small"})
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


class _Step:
    """One method's training step as ``train.py`` runs it (``TrainStep``), built on fake tensors
    (``fm``: a ``FakeTensorMode``) or, with ``fm=None``, on real CPU tensors."""

    def __init__(self, method, preset, batch, config, quick=False, fm=None):
        from fastmix.engine import build_model, build_optimizer
        from fastmix.step import StepGuard, TrainStep
        from fastmix.runtime import autocast_context
        self.cfg = cfg = _config(method, preset, batch, config, quick)
        self.config, self.batch, self.fm = config, batch, fm
        self.method = method
        self.classes = 1000 if preset.startswith("imagenet") else 100
        self.size = cfg.image_size if cfg.dataset == "imagefolder" else 32
        device = torch.device("cpu")
        torch.manual_seed(0)
        model = build_model(cfg, 3, self.classes, seed=0)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if fm is not None:
            model = _fake_module(model, fm)
        self.model = model
        with self.mode():
            # AdamW is counted fused in every config: its per-parameter and foreach loops read
            # their step count on the host, which a fake tensor has not (the optimizer is the
            # same work for every method, a small share of a ViT step)
            adamw = cfg.optimizer == "adamw"
            self.opt = opt = build_optimizer(cfg, model, fused=config == "fused" or adamw)
            for g in ([] if adamw else opt.param_groups):  # faithful: per-parameter; eager: foreach
                g["foreach"] = {"faithful": False, "eager": True}.get(config)
            self.guard = StepGuard(model, device, enabled=config == "fused")
            runner = model
            if method.startswith("automix") and config == "faithful":
                from bench.official_step import OfficialAutoMix
                runner = OfficialAutoMix(model)
            self.step = TrainStep(runner, opt, self.guard, lambda: autocast_context(cfg, device))

    def mode(self):
        return self.fm if self.fm is not None else contextlib.nullcontext()

    def new_batch(self):
        x = torch.randn(self.batch, 3, self.size, self.size)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, self.classes, (self.batch,))

    def __call__(self, i, x, y):
        draw = self.model.draw(x)
        draw.update({k: v for k, v in LAMS.items() if k in draw})
        if "train_mb" in draw:                    # switch_off's coin, fixed per variant
            draw["train_mb"] = self.method != "automix-mbskip"
        loss, _, _ = self.step(x, y, i, 10 ** 6, draw=draw)
        if self.config == "faithful":             # the official NaN check: a read-back
            bool(torch.isnan(loss).any())

    def resident(self):
        """The tensors a step starts with: parameters, buffers, the previous step's gradients
        (``TrainStep`` drops them with ``zero_grad(set_to_none=True)`` after the forward,
        before the backward), optimizer state and the step guard's copies."""
        model, opt, guard = self.model, self.opt, self.guard
        ts = list(model.parameters()) + list(model.buffers())
        ts += [p.grad for p in model.parameters() if p.grad is not None]
        ts += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        ts += guard.backup + [guard.total, guard.run, guard.max_run]
        return ts


@contextlib.contextmanager
def _op_paths(config):
    from fastmix.functional import FUSED_OPS, set_op_paths
    previous = set_op_paths({op: config == "fused" for op in FUSED_OPS})
    try:
        yield
    finally:
        set_op_paths(previous)


def count_step(method, preset, batch, config, quick=False):
    """One steady-state training step (the second; the first creates the gradients and the
    optimizer state), counted on fake tensors: a Tally. Its ``peak`` is the most bytes of
    tensor storage alive at once from the step's start to its end: what is alive when it starts
    (``_Step.resident``, the batch included) and every tensor its ops create, each until it is
    freed (``measure_step`` measures the same on real tensors)."""
    with _op_paths(config):
        s = _Step(method, preset, batch, config, quick, FakeTensorMode(allow_non_fake_inputs=True))
        with s.mode():
            with counting(Tally()):
                s(0, *s.new_batch())
            x, y = s.new_batch()                      # a new batch, as from the loader
            tally = Tally()
            # resident: a function, so that no list here keeps the old gradients alive
            with _no_gc(), counting(tally, storages_of(s.model), lambda: [x, y] + s.resident()):
                s(1, x, y)
    return tally


STEP_MARK = "counts.measured_step"


def measure_step(method, preset, batch, config, quick=False):
    """The step of ``count_step`` run on real CPU tensors, its peak memory measured by the
    profiler (``profile_memory=True``): every allocation and free the CPU allocator makes, the
    kernels' own workspaces included, from before the model is built, so the bytes alive when
    the step starts are known too: ``profiled_peak``'s dict for the second step."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with _op_paths(config), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s = _Step(method, preset, batch, config, quick)
        s(0, *s.new_batch())
        x, y = s.new_batch()
        with _no_gc(), record_function(STEP_MARK):
            s(1, x, y)
        del s, x, y
    return profiled_peak(prof, STEP_MARK)


def profiled_peak(prof, mark):
    """The CPU allocator's bytes over the profiler's ``mark`` range, from its allocation events
    (+ bytes at an allocation, - at a free) summed in time order: ``{"at_start", "peak",
    "peak_tensors"}``. ``peak`` counts every allocation; ``peak_tensors`` leaves out the blocks
    an aten op allocates and frees before it returns (a kernel's own workspaces and scratch
    tensors: oneDNN's reordered weights and padded blocked-format copies, the fp32 temporaries
    of a bf16 batch norm backward, as cuDNN's workspaces on a GPU), which no op hands back.
    ``count_step`` counts what ``peak_tensors`` measures."""
    from torch._C._profiler import _EventType
    allocs, marks = [], []
    stack = [(e, None) for e in reversed(prof.profiler.kineto_results.experimental_event_tree())]
    while stack:                        # (event, the outermost aten op enclosing it), in order
        e, op = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu":
                allocs.append((e.start_time_ns, len(allocs), f.alloc_size, f.ptr,
                               op.end_time_ns if op is not None else None))
            continue
        if e.name == mark:
            marks.append(e)
        if op is None and e.name.startswith("aten::"):
            op = e
        stack.extend((c, op) for c in reversed(e.children))
    if len(marks) != 1:
        raise RuntimeError(f"expected one {mark!r} range in the profile, got {len(marks)}")
    t0, t1 = marks[0].start_time_ns, marks[0].end_time_ns
    allocs = [(t, nbytes, ptr, end) for t, _, nbytes, ptr, end in sorted(allocs)]
    internal, open_at = set(), {}       # blocks freed before the op that allocated them ends
    for i, (t, nbytes, ptr, _) in enumerate(allocs):
        if nbytes > 0:
            open_at[ptr] = i
        elif ptr in open_at:
            j = open_at.pop(ptr)
            if allocs[j][3] is not None and t <= allocs[j][3]:
                internal.update((i, j))
    now = tensors = 0
    out = None
    for i, (t, nbytes, _, _) in enumerate(allocs):
        if t > t1:
            break
        if t >= t0 and out is None:
            out = {"at_start": now, "peak": now, "peak_tensors": tensors}
        now += nbytes
        if i not in internal:
            tensors += nbytes
        if out is not None:
            out["peak"] = max(out["peak"], now)
            out["peak_tensors"] = max(out["peak_tensors"], tensors)
    if out is None:
        raise RuntimeError("no allocation in the measured step")
    return out


def step_rows(quick, methods=METHODS, configs=CONFIGS, shapes=None):
    rows = []
    for label, preset, batch in shapes or (QUICK_SHAPES if quick else SHAPES):
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


# ---- the counted peak against real CPU tensors -------------------------------------------------
CHECK_SHAPES = (("R-18 CIFAR 32px", "cifar100-r18", 32), ("R-18 CIFAR 32px", "cifar100-r18", 100))
CHECK_METHODS = ("vanilla", "automix")


def check_peak_rows(configs, quick=False, shapes=None, methods=CHECK_METHODS):
    """``count_step``'s peak against ``measure_step``'s, per shape, method and configuration
    (``quick``: the tiny ResNet). One intra-op thread: the profiler sees the allocations of
    the thread it runs on."""
    shapes = shapes or (QUICK_SHAPES if quick else CHECK_SHAPES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for label, preset, batch in shapes:
            for method in methods:
                for config in configs:
                    t0 = time.perf_counter()
                    counted = count_step(method, preset, batch, config, quick).peak
                    real = measure_step(method, preset, batch, config, quick)
                    rows.append({"shape": f"{label} b{batch}", "method": method,
                                 "config": config, "counted": counted, **real,
                                 "check_s": round(time.perf_counter() - t0, 1)})
                    print(f"  checked {label} b{batch} {method} {config} "
                          f"({rows[-1]['check_s']} s): counted {counted}, real {real}",
                          file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def check_peak_table(rows):
    lines = ["| shape | method | config | counted peak MiB | real peak MiB (tensors) | "
             "counted / real | real, all allocations MiB | counted / all | at step start MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['config']} | {_mb(r['counted'])} | "
            f"{_mb(r['peak_tensors'])} | {r['counted'] / r['peak_tensors']:.4f} | "
            f"{_mb(r['peak'])} | {r['counted'] / r['peak']:.4f} | {_mb(r['at_start'])} |")
    base = {(r["shape"], r["config"]): r for r in rows if r["method"] == "vanilla"}
    ratios = ["", "| shape | config | AutoMix/vanilla counted | real (tensors) | "
              "real (all allocations) |", "|---|---|---|---|---|"]
    for r in rows:
        v = base.get((r["shape"], r["config"]))
        if r["method"] == "vanilla" or v is None:
            continue
        ratios.append(f"| {r['shape']} | {r['config']} | {_x(r['counted'], v['counted'])} | "
                      f"{_x(r['peak_tensors'], v['peak_tensors'])} | {_x(r['peak'], v['peak'])} |")
    return "\n".join(lines + (ratios if len(ratios) > 3 else [])) + "\n"


def vit_comparison(rows):
    """AutoMix against vanilla per config: counted FLOPs and peak, the expected cost with
    switch_off 0.8 (0.8 x a full step + 0.2 x a skipped one), beside the authors' measured
    ratios (OpenMixup's CIFAR-100 DeiT-S: memory 18.2 / 8.1 GB, 600-epoch time 59 / 27 h)."""
    mem = AUTHORS_DEIT_S["automix"][0] / AUTHORS_DEIT_S["vanilla"][0]
    hours = AUTHORS_DEIT_S["automix"][1] / AUTHORS_DEIT_S["vanilla"][1]
    lines = ["| shape | config | AutoMix FLOPs / vanilla | switch_off 0.8: FLOPs / vanilla | "
             "AutoMix peak / vanilla | modelled time / vanilla | authors: time / vanilla | "
             "authors: memory / vanilla |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["shape"], r["method"], r["config"]): r for r in rows}
    for (shape, method, config), r in by.items():
        if method != "automix" or (shape, "vanilla", config) not in by:
            continue
        v, skip = by[shape, "vanilla", config], by.get((shape, "automix-mbskip", config))
        so = (0.8 * r["flops"] + 0.2 * skip["flops"]) / v["flops"] if skip else float("nan")
        lines.append(f"| {shape} | {config} | {_x(r['flops'], v['flops'])} | {so:.2f}x | "
                     f"{_x(r['peak'], v['peak'])} | {_x(r['model_ms'], v['model_ms'])} | "
                     f"{hours:.2f}x | {mem:.2f}x |")
    return "\n".join(lines) + "\n"


def _emit(args, text, data, section):
    """Print ``text``, write ``data`` to ``--json`` and ``text`` into ``--results``'s
    ``section`` markers."""
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.results:
        replace_section(args.results, text, section)
    return 0


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
    ap.add_argument("--check-peak", action="store_true",
                    help="only the counted peak memory against the same step on real CPU "
                         "tensors (the profiler's allocation events): R-18 CIFAR b32 and b100, "
                         "vanilla and AutoMix; --results puts the table between "
                         "<!-- counts-peak:begin/end --> markers")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="with --check-peak")
    ap.add_argument("--vit", action="store_true",
                    help="only the ViT steps: DeiT-S 224 px b100 on the CIFAR-100 ViT recipe "
                         "(vanilla, Mixup, AutoMix, AutoMix with a switched-off Mix Block step), "
                         "against OpenMixup's measured cost; --results puts the table between "
                         "<!-- counts-vit:begin/end --> markers")
    args = ap.parse_args(argv)
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    command = "python bench/counts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.check_peak:
        configs = tuple(args.configs.split(","))
        if set(configs) - set(CONFIGS):
            ap.error(f"unknown configs {sorted(set(configs) - set(CONFIGS))}; choose from "
                     f"{', '.join(CONFIGS)}")
        rows = check_peak_rows(configs, args.quick)
        text = (f"Measured by `{command.strip()}` ({time.strftime('%Y-%m-%d')}, torch "
                f"{torch.__version__}, {time.perf_counter() - t0:.0f} s on the CPU, one "
                f"intra-op thread): the counted peak (FakeTensorMode) against the same step "
                f"on real CPU tensors, the profiler's allocation events over the step.\n\n"
                + check_peak_table(rows))
        return _emit(args, text, {"check_peak": rows}, "counts-peak")
    if args.vit:
        rows = step_rows(args.quick, VIT_METHODS, VIT_CONFIGS,
                         QUICK_VIT_SHAPES if args.quick else VIT_SHAPES)
        text = (f"Counted by `{command.strip()}` ({time.strftime('%Y-%m-%d')}, torch "
                f"{torch.__version__}, {time.perf_counter() - t0:.0f} s on the CPU, "
                f"FakeTensorMode). Counts, not measurements; the authors' figures are "
                f"measurements (GPU memory and hours).\n\n" + step_table(rows) + "\n"
                + vit_comparison(rows))
        return _emit(args, text, {"vit_steps": rows}, "counts-vit")
    ops = [] if args.steps_only else op_rows(args.quick)
    steps = [] if args.ops_only else step_rows(args.quick, methods)
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
    return _emit(args, text, {"ops": ops, "steps": steps}, "counts")


if __name__ == "__main__":
    sys.exit(main())
