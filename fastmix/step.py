"""One training step, two ways: ``TrainStep`` (eager) and ``CUDAGraphStep`` (captured once, replayed).

Both are called as ``step_fn(x, y, step, total_steps) -> (loss, logs, finite)`` and do the same
work: the method's random draws, forward under autocast, backward, a guarded optimizer step
(``StepGuard``: a NaN/Inf step is skipped on the device by torch's fused optimizers, on the
host for an optimizer that ignores ``found_inf``) and the after-step update (AutoMix's
EMA of the momentum encoder). Neither reads device memory on the host.

``CUDAGraphStep`` keeps every per-step input in static device tensors updated in place before
each replay: the batch (``copy_``), the draws (λ, CutMix box: ``fill_`` of host values;
permutations: ``copy_`` of a device ``randperm``), the EMA weight and the learning rates
(``fill_`` when they change). The step body itself is the method's ``losses`` with tensors
where the eager step has host numbers; host branches on λ (AutoMix's ``lam_margin`` Mixup
fallback) become device selects. The draws are made on the host in the same order as the
eager step, so both see the same random stream.
"""
import contextlib

import os

import torch

from fastmix.runtime import autocast_context  # noqa: F401  (re-exported)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive training steps had a NaN/Inf loss."""


def _flat(buffers, out=None):
    """The buffers' values one after the other in one 1-d tensor (one ``cat`` launch)."""
    return torch.cat([b.detach().reshape(-1) for b in buffers], out=out)


def skips_on_device(optimizer) -> bool:
    """True when ``optimizer.step()`` reads ``found_inf`` and skips a bad step on the device:
    torch's fused optimizers (``fused=True``). Others (apex's FusedSGD, torch's foreach and
    for-loop paths) ignore it, so a guarded step must skip them on the host."""
    return isinstance(optimizer, torch.optim.Optimizer) and bool(
        optimizer.defaults.get("fused")) and type(optimizer).__module__.startswith("torch.optim")


def clip_gradients(optimizer, max_norm):
    """mmcv's ``clip_grad_norm_`` over every parameter with a gradient (one global L2 norm
    across the groups, the Mix Block included), as the official optimizer hook: device ops
    only, no host read; a non-finite norm leaves non-finite gradients, which the step guard
    skips."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def init_momentum_buffers(optimizer):
    """Create every SGD momentum buffer as zeros before the first step.

    torch's fused SGD creates missing buffers with ``torch.empty_like`` inside its first
    ``step()`` and fills them only if the kernel runs; a first step skipped through
    ``found_inf`` (a NaN batch, an fp16 overflow) leaves them uninitialised and the next good
    step reads garbage. With dampening 0, a zero buffer gives the same first update bit for bit
    (``buf = momentum * 0 + grad``). Buffers that exist (a resumed state) are kept."""
    if not isinstance(optimizer, torch.optim.SGD):
        return optimizer
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        if group.get("dampening", 0):
            raise ValueError("fastmix's step guard needs SGD with dampening 0 (a skipped first "
                             "step is only safe with zero-initialised momentum buffers, which "
                             "equal torch's first step only without dampening)")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


class StepGuard:
    """Skip a step whose loss is NaN/Inf without reading the device.

    The fused optimizer gets ``found_inf`` (it leaves parameters and momentum untouched), the EMA
    weight is multiplied by the finite flag, and the BatchNorm buffers the poisoned forward
    passes moved are put back. Bad steps are counted on the device (in place, so a captured
    step updates the same counters); ``check`` reads them (every ``log_every`` steps and at the
    end of an epoch).

    The float buffers are backed up and restored per dtype as one flat tensor: a ``cat`` before
    the step, and after it ``cat``, one ``where`` and one ``_foreach_copy_`` back, three
    launches whatever the number of BatchNorm layers (a ``where`` per buffer was 80 launches a
    step for AutoMix's two R-18s, 212 for two R-50s: bench/counts.py).
    """

    def __init__(self, model, device, enabled=True):
        self.enabled, self.device = enabled, device
        self.buffers = [b for b in model.buffers() if b.is_floating_point()] if enabled else []
        by_dtype = {}
        for b in self.buffers:
            by_dtype.setdefault(b.dtype, []).append(b)
        # dtype -> (its buffers, their flat backup)
        self.groups = {dt: (bs, _flat(bs)) for dt, bs in by_dtype.items()}
        z = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        self.total, self.run, self.max_run = z(), z(), z()

    @property
    def backup(self):
        return [flat for _, flat in self.groups.values()]

    def before(self):
        for bs, flat in self.groups.values():
            _flat(bs, out=flat)

    def after_backward(self, loss, optimizer, scaler=None):
        """Returns the 0-d bool ``finite`` flag of this step (a device tensor)."""
        ok = torch.isfinite(loss.detach())
        if not self.enabled:
            return ok
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A NaN on one rank reaches every rank's gradients through DDP's all-reduce: skip the
            # step on all ranks together (a one-element all-reduce, no host read).
            bad = (~ok).float()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            ok = bad == 0
        if (scaler is None or not scaler.is_enabled()) and skips_on_device(optimizer):
            # with fp16 the GradScaler does this; an optimizer that ignores found_inf is
            # skipped on the host by the step (TrainStep.host_skip)
            optimizer.found_inf = (~ok).float()
            optimizer.grad_scale = None
        for bs, flat in self.groups.values():
            now = _flat(bs)
            torch.where(ok, now, flat, out=now)
            parts = now.split([b.numel() for b in bs])
            torch._foreach_copy_([b.detach() for b in bs], [p.view_as(b) for p, b in zip(parts, bs)])
        bad = (~ok).long()
        self.total.add_(bad)
        self.run.add_(1).mul_(bad)
        torch.maximum(self.max_run, self.run, out=self.max_run)
        return ok

    def check(self, limit, step, ckpt_hint):
        if not self.enabled:
            return
        worst = int(self.max_run)
        if worst >= limit:
            raise NonFiniteLossError(
                f"{worst} consecutive training steps had a NaN/Inf loss (by step {step}; "
                f"{int(self.total)} bad steps in all); training stopped. Check the data for NaN "
                f"or lower --lr (or use --amp bf16 rather than fp16), then "
                + (f"resume from {ckpt_hint} (this run's last checkpoint; skipped steps change "
                   f"nothing) with --resume" if os.path.exists(ckpt_hint) else
                   "start again: this run wrote no checkpoint yet"))


class TrainStep:
    """The eager step. ``step_model`` is ``model`` or its DDP wrapper (DDP hooks ``forward``).

    ``draw``: use these draws (``model.losses``) rather than making new ones (``step_model``)."""

    def __init__(self, model, optimizer, guard, autocast, scaler=None, step_model=None,
                 set_to_none=True, clip=None):
        self.model, self.optimizer, self.guard, self.autocast = model, optimizer, guard, autocast
        self.clip = clip
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.step_model = step_model or model
        self.set_to_none = set_to_none
        init_momentum_buffers(optimizer)
        # An optimizer that ignores found_inf (apex FusedSGD, non-fused torch) is skipped on the
        # host: one read of the finite flag per step, the only host sync of such a step. With
        # an enabled GradScaler the scaler does that read itself.
        self.host_skip = guard.enabled and not skips_on_device(optimizer)

    def __call__(self, x, y, step, total_steps, draw=None):
        self.guard.before()
        self.model.set_progress(step, total_steps)
        with self.autocast():
            loss, logs = self.step_model(x, y) if draw is None else self.model.losses(x, y, draw)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.scaler.scale(loss).backward()
        if self.clip:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            clip_gradients(self.optimizer, self.clip)
        ok = self.guard.after_backward(loss, self.optimizer, self.scaler)
        if not (self.host_skip and not self.scaler.is_enabled() and not bool(ok)):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_step(step, total_steps, ok)
        return loss.detach(), logs, ok


class StaticDraw(dict):
    """Device tensors holding one step's draws, updated in place (``update_from``).

    Host floats become 0-d fp32 tensors, host bools 0-d bool tensors, tuples of ints 1-d int64
    tensors, device tensors static copies of the same shape and dtype.
    """

    def __init__(self, values, device):
        super().__init__()
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                self[k] = torch.empty_like(v, device=device)
            elif isinstance(v, bool):
                self[k] = torch.zeros((), dtype=torch.bool, device=device)
            elif isinstance(v, (int, float)):
                self[k] = torch.zeros((), dtype=torch.float32, device=device)
            elif isinstance(v, (tuple, list)):
                self[k] = torch.zeros(len(v), dtype=torch.int64, device=device)
            else:
                raise TypeError(f"cannot hold draw {k!r} of type {type(v).__name__} in a tensor")
        self.update_from(values)

    def update_from(self, values):
        if values.keys() != self.keys():
            raise ValueError(f"the draw changed its keys: {sorted(values)} vs {sorted(self)}")
        for k, v in values.items():
            t = self[k]
            if isinstance(v, torch.Tensor):
                if v.shape != t.shape:
                    raise ValueError(f"draw {k!r} changed shape: {tuple(v.shape)} vs {tuple(t.shape)}")
                # non_blocking: a pinned host mask (FMix, GridMix, SmoothMix) is copied
                # asynchronously (the host allocator keeps it alive until the copy is done)
                t.copy_(v, non_blocking=True)
            elif isinstance(v, (tuple, list)):
                for i, e in enumerate(v):
                    t[i].fill_(e)  # a fill with a host scalar: a kernel argument, no copy
            else:
                t.fill_(v)


class CUDAGraphStep:
    """The whole step captured in one CUDA graph and replayed (``--cuda-graphs``).

    The first ``warmup`` calls run the step body eagerly on a side stream (real training steps:
    they compile and autotune; the momentum buffers exist as zeros from the start,
    ``init_momentum_buffers``); the next call captures
    it and every later call replays it. With ``capture=False`` (any device, the CPU included)
    the same static-tensor body runs eagerly every call: that is what the CPU tests compare
    with ``TrainStep``. Before the capture a batch of another shape runs the body eagerly with
    the same semantics; after it, another shape is refused (its eager step would need a second
    step's memory beside the graph's pool): training loaders drop the last partial batch. Needs one process (no DDP) and no GradScaler (bf16 or fp32).
    """

    def __init__(self, model, optimizer, guard, autocast, device, warmup=3, capture=None,
                 clip=None):
        if not getattr(model, "graph_capturable", True):
            raise ValueError(f"{type(model).__name__} ({getattr(model, 'method', '')}) cannot be "
                             f"replayed from one recorded step: its draws change the step's work "
                             f"(ManifoldMix's stage, PuzzleMix's grid and graph cut); train it "
                             f"without --cuda-graphs")
        self.model, self.optimizer, self.guard, self.autocast = model, optimizer, guard, autocast
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graph capture needs a CUDA device")
        if guard.enabled and not skips_on_device(optimizer):
            raise ValueError(f"{type(optimizer).__module__}.{type(optimizer).__name__} ignores "
                             f"found_inf, so a captured step could not skip a NaN/Inf step on "
                             f"the device: use torch's fused optimizer (--optimizer-impl torch) "
                             f"with --cuda-graphs")
        init_momentum_buffers(optimizer)
        self.warmup = max(int(warmup), 1)
        self.calls = 0
        self.graph = None
        self.outputs = None
        self.x = self.y = self.draw = self.scalars = None
        self.lr = [torch.zeros((), dtype=torch.float32, device=self.device)
                   for _ in optimizer.param_groups]
        self.lr_value = [None] * len(self.lr)
        self.clip = clip
        self.uncaptured = TrainStep(model, optimizer, guard, autocast, set_to_none=False,
                                    clip=clip)

    # ---- static inputs ---------------------------------------------------------------
    def _load(self, x, y, draw, scalars):
        if self.x is None:
            self.x = torch.empty_like(x)  # keeps x's memory format (channels-last)
            self.y = torch.empty_like(y)
            self.draw = StaticDraw(draw, self.device)
            self.scalars = StaticDraw(scalars, self.device)
        else:
            self.draw.update_from(draw)
            self.scalars.update_from(scalars)
        self.x.copy_(x)
        self.y.copy_(y)
        for i, g in enumerate(self.optimizer.param_groups):
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                raise TypeError("CUDAGraphStep manages the learning rate tensors; set param "
                                "group lr values as floats")
            if lr != self.lr_value[i]:
                self.lr[i].fill_(lr)
                self.lr_value[i] = lr

    @contextlib.contextmanager
    def _tensor_lr(self):
        """The optimizer reads the static lr tensors inside the step and floats outside it
        (checkpoints, logs and schedules keep seeing floats)."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, t in zip(groups, self.lr):
            g["lr"] = t
        try:
            yield
        finally:
            for g, v in zip(groups, floats):
                g["lr"] = v

    def _body(self):
        self.guard.before()
        with self.autocast():
            loss, logs = self.model.losses(self.x, self.y, self.draw)
        loss.backward()
        if self.clip:
            clip_gradients(self.optimizer, self.clip)
        ok = self.guard.after_backward(loss, self.optimizer)
        with self._tensor_lr():
            self.optimizer.step()
        self.model.apply_step_scalars(self.scalars, ok)
        return loss.detach(), logs, ok  # the methods' logged values are already detached

    def _eager_body(self):
        self.optimizer.zero_grad(set_to_none=True)
        return self._body()

    # ---- the call ----------------------------------------------------------------------
    def __call__(self, x, y, step, total_steps):
        self.model.check_batch(x, y)
        self.model.set_progress(step, total_steps)
        draw = self.model.draw(x)
        if self.x is not None and (x.shape != self.x.shape or y.shape != self.y.shape):
            if self.graph is not None:
                # The eager step would allocate its activations beside the graph's reserved
                # pool (twice a step's memory) and run outside the graph.
                raise ValueError(
                    f"CUDAGraphStep captured batches of {tuple(self.x.shape)}; got "
                    f"{tuple(x.shape)}. Give a captured step batches of one shape (drop the "
                    f"last partial batch: drop_last=True, as fastmix's training loaders do)")
            # Before the capture (or with capture=False): the eager step with this draw. It
            # zeroes the static gradients rather than dropping them.
            return self.uncaptured(x, y, step, total_steps, draw)
        self._load(x, y, draw, self.model.step_scalars(step, total_steps))
        self.calls += 1
        if not self.capture:
            return self._eager_body()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        main = torch.cuda.current_stream(self.device)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self._eager_body()
            main.wait_stream(side)
            return out
        # Capture: grads are None so the captured backward writes (not adds) them, in the
        # graph's memory pool, where every replay finds them again. thread_local: CUDA calls
        # from other threads (DALI's prefetching) stay legal during the capture.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self._body()
        self.graph = graph
        graph.replay()  # the capture recorded the step without running it
        return self.outputs
