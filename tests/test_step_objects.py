"""The step objects: ``TrainStep`` (eager) and ``CUDAGraphStep`` (static tensors, captured on CUDA).

On the CPU ``CUDAGraphStep(capture=False)`` runs the very body a CUDA graph captures (λ, the
permutations, the CutMix box, the EMA weight and the learning rates in static device tensors;
the lam_margin fallback as a device select) and must train exactly like the eager step. The
capture itself, and the absence of host syncs, are checked in the tests marked ``gpu``.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone
from fastmix.engine import Config, build_optimizer, set_epoch_lr
from fastmix.functional import cutmix_box, cutmix_images
from fastmix.mixup import MixupClassifier
from fastmix.step import CUDAGraphStep, StaticDraw, StepGuard, TrainStep, autocast_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def make(method, fused=False, lam_margin=0.08, seed=0, device=CPU, **kw):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet_small", 3)
    if method == "automix":
        model = AutoMix(backbone, 10, seed=seed, fused=fused, lam_margin=lam_margin,
                        ema_momentum=0.9, ema_end=0.99, **kw)
    else:
        model = MixupClassifier(backbone, 10, method=method, seed=seed, fused=fused)
    return model.to(device)


def batches(k, n=6, size=16, seed=1, device=CPU):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, size, size, generator=g).to(device),
             torch.randint(0, 10, (n,), generator=g).to(device)) for _ in range(k)]


def twins(method, graph_kw=None, cfg=None, **kw):
    """The same model twice: one driven by TrainStep, one by CUDAGraphStep(capture=False)."""
    cfg = cfg or Config(lr=0.1, weight_decay=5e-4, amp="none")
    a = make(method, **kw)
    b = copy.deepcopy(a)
    steps = []
    for model, cls in ((a, TrainStep), (b, CUDAGraphStep)):
        opt = build_optimizer(cfg, model, fused=True)
        guard = StepGuard(model, CPU)
        ac = lambda: autocast_context(cfg, CPU)  # noqa: E731
        fn = (TrainStep(model, opt, guard, ac) if cls is TrainStep else
              CUDAGraphStep(model, opt, guard, ac, CPU, capture=False, **(graph_kw or {})))
        steps.append((model, opt, guard, fn))
    return steps


def assert_same_state(a, b, rtol=1e-5, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def run_both(steps, data, total=20):
    """Each step object over ``data`` from the same torch RNG state (the permutations)."""
    losses = [[], []]
    for j, (_, _, _, fn) in enumerate(steps):
        torch.manual_seed(1234)
        for i, (x, y) in enumerate(data):
            loss, logs, ok = fn(x, y, i, total)
            assert ok.dtype == torch.bool and ok.dim() == 0
            losses[j].append((loss.item(), {k: float(v) for k, v in logs.items()}))
    return losses


@pytest.mark.parametrize("method", ["automix", "mixup", "cutmix", "vanilla", "saliencymix",
                                    "fmix", "resizemix", "gridmix", "smoothmix"])
def test_static_step_trains_like_the_eager_step(method):
    steps = twins(method)
    la, lb = run_both(steps, batches(4))
    for (loss_a, logs_a), (loss_b, logs_b) in zip(la, lb):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert logs_b.keys() == logs_a.keys()
        for k in logs_a:
            assert logs_b[k] == pytest.approx(logs_a[k], rel=1e-5, abs=1e-6), k
    assert_same_state(steps[0][0], steps[1][0])
    # the optimizer's momentum buffers agree too, and the lr stays a float outside the step
    for pa, pb in zip(steps[0][1].param_groups[0]["params"], steps[1][1].param_groups[0]["params"]):
        torch.testing.assert_close(steps[1][1].state[pb]["momentum_buffer"],
                                   steps[0][1].state[pa]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    assert all(isinstance(g["lr"], float) for g in steps[1][1].param_groups)
    if method != "vanilla":  # the draws really changed from step to step
        assert len({round(l, 6) for l, _ in lb}) == len(lb)


@pytest.mark.parametrize("lam_margin", [0.0, 0.5])
def test_lam_margin_fallback_as_a_device_select(lam_margin):
    """lam_margin 0.5: every BB sample is the Mixup fallback; 0: never. The static step selects
    on the device what the eager step branches on the host."""
    steps = twins("automix", lam_margin=lam_margin)
    la, lb = run_both(steps, batches(3))
    for (loss_a, _), (loss_b, _) in zip(la, lb):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_same_state(steps[0][0], steps[1][0])


def test_fallback_select_is_the_mixup_blend():
    """The fallback as a mask (logit(1 - λ)) blends like mixup_images, also at λ = 0 and 1."""
    model = make("automix")
    x = torch.randn(5, 3, 16, 16)
    index = torch.tensor([1, 2, 3, 4, 0])
    z = model.backbone_k(x)[0]
    for lam in (0.0, 0.03, 0.5, 0.97, 1.0):
        _, want, _ = model._mix(x, z, 0.5, index, lam, index, True, False)
        flag = torch.tensor(True)
        _, got, _ = model._mix(x, z, 0.5, index, torch.tensor(lam), index, flag, False)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # flag False: the Mix Block mask, as in the eager non-fallback branch
        _, want, _ = model._mix(x, z, 0.5, index, lam, index, False, False)
        _, got, _ = model._mix(x, z, 0.5, index, torch.tensor(lam), index, torch.tensor(False), False)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam_margin", [0.0, 0.5])
def test_static_step_with_fused_kernels(lam_margin):
    """The fused path (Triton attention, pair mix, mixed CE) with tensor λ, interpreted on CPU."""
    steps = twins("automix", fused=True, lam_margin=lam_margin)
    la, lb = run_both(steps, batches(2, n=4, size=8))
    for (loss_a, _), (loss_b, _) in zip(la, lb):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_same_state(steps[0][0], steps[1][0], rtol=1e-4, atol=1e-5)


def test_learning_rate_changes_reach_the_static_step():
    cfg = Config(lr=0.1, min_lr=0.0, amp="none")
    steps = twins("automix", cfg=cfg)
    data = batches(4)
    for _, opt, _, fn in steps:
        torch.manual_seed(1234)
        for i, (x, y) in enumerate(data):
            set_epoch_lr(opt, i, 4)  # a new lr every step: 0.1, 0.085, 0.05, 0.015
            fn(x, y, i, 10)
    assert_same_state(steps[0][0], steps[1][0])
    graph_step = steps[1][3]
    assert graph_step.lr_value[0] == pytest.approx(0.1 * (1 + torch.cos(torch.tensor(0.75 * torch.pi)).item()) / 2)
    assert graph_step.lr[0].item() == pytest.approx(graph_step.lr_value[0])


def test_other_batch_shape_runs_uncaptured_with_the_same_semantics():
    steps = twins("automix")
    data = batches(2) + batches(1, n=4, seed=5) + batches(1, seed=6)  # a short batch in between
    la, lb = run_both(steps, data)
    for (loss_a, _), (loss_b, _) in zip(la, lb):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert_same_state(steps[0][0], steps[1][0])


def test_static_step_skips_a_nonfinite_step():
    (_, _, _, _), (model, opt, guard, fn) = twins("automix")
    x, y = batches(1)[0]
    fn(x, y, 0, 10)
    before = copy.deepcopy(model.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    loss, _, ok = fn(bad, y, 1, 10)
    assert not ok.item() and not torch.isfinite(loss)
    for k, v in model.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(v, before[k]), k
    fn(x, y, 2, 10)
    assert guard.total.item() == 1 and guard.max_run.item() == 1 and guard.run.item() == 0


def test_static_step_checks_the_batch():
    (_, _, _, _), (_, _, _, fn) = twins("automix")
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="labels"):
        fn(x, y[:3], 0, 10)
    with pytest.raises(TypeError, match="int64"):
        fn(x, y.int(), 0, 10)


def test_static_draw_holds_and_updates_values():
    d = StaticDraw({"lam": 0.25, "index": torch.tensor([2, 0, 1]), "box": (1, 5, 2, 6), "flag": True}, CPU)
    assert d["lam"].dtype == torch.float32 and d["lam"].item() == 0.25
    assert d["box"].tolist() == [1, 5, 2, 6] and d["flag"].item() is True
    index = d["index"]
    d.update_from({"lam": 0.5, "index": torch.tensor([1, 2, 0]), "box": (0, 3, 4, 7), "flag": False})
    assert d["index"] is index  # updated in place: a captured graph reads the same memory
    assert index.tolist() == [1, 2, 0] and d["lam"].item() == 0.5
    assert d["box"].tolist() == [0, 3, 4, 7] and d["flag"].item() is False
    with pytest.raises(ValueError, match="keys"):
        d.update_from({"lam": 0.5})
    with pytest.raises(ValueError, match="shape"):
        d.update_from({"lam": 0.5, "index": torch.tensor([0, 1]), "box": (0, 1, 2, 3), "flag": True})
    with pytest.raises(TypeError, match="cannot hold"):
        StaticDraw({"name": "x"}, CPU)


def test_cutmix_box_as_a_tensor_matches_slicing():
    import numpy as np
    rng = np.random.default_rng(0)
    x = torch.randn(4, 3, 11, 13).contiguous(memory_format=torch.channels_last)
    index = torch.tensor([3, 0, 1, 2])
    for lam in (0.1, 0.5, 0.9, 0.999):
        box = cutmix_box(11, 13, lam, rng)[:4]
        want = cutmix_images(x, index, box)
        got = cutmix_images(x, index, torch.tensor(box))
        assert torch.equal(got, want)


def test_ema_update_with_a_tensor_weight_matches_lerp():
    a = make("automix")
    a.backbone_q.apply(lambda m: [p.data.add_(1.0) for p in m.parameters(recurse=False)])
    b = copy.deepcopy(a)
    a.ema_update(1e-6)                                  # float: _foreach_lerp_
    b.ema_update(torch.tensor(1e-6), torch.tensor(True))  # tensor: sub, mul, add
    for pa, pb in zip(a.backbone_k.parameters(), b.backbone_k.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-7)
    c = copy.deepcopy(b)
    b.ema_update(torch.tensor(0.5), torch.tensor(False))  # a skipped step: no change
    for pb, pc in zip(b.parameters(), c.parameters()):
        assert torch.equal(pb, pc)


def test_ema_weight_is_computed_in_double_precision():
    """1 - 0.999999 in fp32 is 1.3% off; the static EMA weight is 1 - m taken on the host."""
    model = make("automix")
    model.ema_momentum = model.ema_end = 0.999999
    w = model.step_scalars(5, 10)["ema_weight"]
    assert isinstance(w, float) and abs(w - 1e-6) < 1e-15
    assert torch.tensor(w).item() == pytest.approx(1e-6, rel=1e-6)


def test_cuda_graphs_flag_is_refused_on_cpu():
    r = subprocess.run([sys.executable, "train.py", "--dataset", "synthetic", "--arch", "resnet_small",
                        "--device", "cpu", "--epochs", "1", "--cuda-graphs", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "--cuda-graphs needs a CUDA device" in r.stderr


def test_cuda_graphs_refuses_fp16_and_ddp(monkeypatch):
    from fastmix.engine import resolve_runtime
    cuda = torch.device("cuda")  # only the device type is read
    with pytest.raises(ValueError, match="bf16 or none"):
        resolve_runtime(Config(cuda_graphs=True, amp="fp16"), cuda)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        resolve_runtime(Config(cuda_graphs=True), cuda)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_runtime(Config(cuda_graphs=True), cuda).amp == "bf16"


def test_capture_needs_cuda():
    model = make("vanilla")
    opt = build_optimizer(Config(), model)
    with pytest.raises(ValueError, match="CUDA device"):
        CUDAGraphStep(model, opt, StepGuard(model, CPU), lambda: autocast_context(Config(amp="none"), CPU),
                      CPU, capture=True)


# ---- on a GPU ------------------------------------------------------------------------------
def gpu_twins(method, capture_warmup=2, fused=None):
    dev = torch.device("cuda")
    cfg = Config(lr=0.1, amp="bf16")
    a = make(method, fused=fused, device=dev).to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    out = []
    for model, capture in ((a, False), (b, True)):
        opt = build_optimizer(cfg, model, fused=True)
        guard = StepGuard(model, dev)
        fn = CUDAGraphStep(model, opt, guard, lambda: autocast_context(cfg, dev, False), dev,
                           warmup=capture_warmup, capture=capture)
        out.append((model, opt, guard, fn))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["automix", "mixup", "cutmix"])
def test_cuda_graph_replay_matches_the_uncaptured_step_gpu(method):
    dev = torch.device("cuda")
    steps = gpu_twins(method)
    data = [(x.contiguous(memory_format=torch.channels_last), y)
            for x, y in batches(6, n=32, size=32, device=dev)]
    la, lb = run_both(steps, data)
    assert steps[1][3].graph is not None  # captured at call 3, replayed after
    for (loss_a, _), (loss_b, _) in zip(la, lb):
        assert loss_b == pytest.approx(loss_a, rel=2e-2)
    assert_same_state(steps[0][0], steps[1][0], rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
def test_cuda_graph_step_skips_a_nonfinite_step_gpu():
    model, opt, guard, fn = gpu_twins("automix")[1]
    data = batches(4, n=16, size=32, device=torch.device("cuda"))
    for i, (x, y) in enumerate(data[:3]):
        fn(x, y, i, 10)
    assert fn.graph is not None
    before = copy.deepcopy(model.state_dict())
    bad = data[3][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    _, _, ok = fn(bad, data[3][1], 3, 10)
    assert not ok.item()
    for k, v in model.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(v, before[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["automix", "mixup", "cutmix", "vanilla"])
def test_eager_train_step_has_no_host_sync_gpu(method):
    """After warm-up, a whole TrainStep (fused kernels, fused SGD, guard, EMA) never syncs."""
    dev = torch.device("cuda")
    cfg = Config(lr=0.1, amp="bf16")
    model = make(method, fused=None, device=dev)
    opt = build_optimizer(cfg, model, fused=True)
    fn = TrainStep(model, opt, StepGuard(model, dev), lambda: autocast_context(cfg, dev))
    data = batches(3, n=16, size=32, device=dev)
    fn(*data[0], 0, 10)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y) in enumerate(data[1:], 1):
            fn(x, y, i, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.slow
def test_trainer_with_cuda_graphs_gpu(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--dataset", "synthetic", "--arch", "resnet_small",
                        "--epochs", "2", "--batch-size", "50", "--train-subset", "500",
                        "--test-subset", "100", "--cuda-graphs", "--no-progress",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- a skipped first step ------------------------------------------------------------------
def _first_step_runs(method, step_cls, good=3):
    """(model that saw a NaN first batch, then ``good`` batches; model that saw only those)."""
    cfg = Config(lr=0.1, weight_decay=5e-4, amp="none")
    data = batches(good + 1, seed=11)
    nan_x = data[0][0].clone()
    nan_x[:, :, :4, :4] = float("nan")         # a real non-finite batch through the real step
    a = make(method)
    b = copy.deepcopy(a)
    models = []
    for model, first in ((a, True), (b, False)):
        opt = build_optimizer(cfg, model, fused=True)
        guard = StepGuard(model, CPU)
        ac = lambda: autocast_context(cfg, CPU)  # noqa: E731
        fn = (TrainStep(model, opt, guard, ac) if step_cls is TrainStep else
              CUDAGraphStep(model, opt, guard, ac, CPU, capture=False))
        # Churn the allocator so that freshly allocated memory holds old values, as it does in
        # a real run (torch.empty_like then returns garbage, not zero pages).
        junk = [torch.full_like(p, 3.0e37) for p in model.parameters()]
        del junk
        if first:
            _, _, ok = fn(nan_x, data[0][1], 0, 10)
            assert not ok.item()
        torch.manual_seed(5)                   # the good steps draw the same permutations / λ
        if hasattr(model, "rng"):
            import numpy as np
            model.rng = np.random.default_rng(5)
        for i, (x, y) in enumerate(data[1:], start=1):
            _, _, ok = fn(x, y, i, 10)
            assert ok.item()
        models.append((model, opt, guard))
    return models


@pytest.mark.parametrize("step_cls", [TrainStep, CUDAGraphStep])
@pytest.mark.parametrize("method", ["vanilla", "automix"])
def test_a_skipped_first_step_leaves_no_trace(method, step_cls):
    """A NaN first batch is skipped; the weights then equal a run that never saw it (the
    optimizer's momentum buffers exist as zeros before the first step: torch's fused SGD would
    create them with empty_like inside the skipped step and leave them unwritten)."""
    (a, opt_a, guard_a), (b, opt_b, _) = _first_step_runs(method, step_cls)
    assert guard_a.total.item() == 1
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if "num_batches_tracked" not in k:
            assert torch.equal(sa[k], sb[k]), k
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])


def test_zero_momentum_buffers_give_torchs_first_step_bit_for_bit():
    torch.manual_seed(0)
    p0 = torch.randn(1000)
    g = torch.randn(1000)
    out = []
    for init in (False, True):
        p = p0.clone().requires_grad_()
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
        if init:
            from fastmix.step import init_momentum_buffers
            init_momentum_buffers(opt)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_dampening_is_refused_by_the_guarded_step():
    from fastmix.step import init_momentum_buffers
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="dampening 0"):
        init_momentum_buffers(torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1))


def test_an_optimizer_that_ignores_found_inf_is_skipped_on_the_host():
    """apex's FusedSGD (not installable here) ignores found_inf like torch's foreach SGD: the
    eager step then skips a bad step by reading the finite flag; the captured step refuses it."""
    from fastmix.step import skips_on_device
    cfg = Config(lr=0.1, amp="none")
    model = make("vanilla")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    assert not skips_on_device(opt) and skips_on_device(build_optimizer(cfg, make("vanilla"),
                                                                        fused=True))
    guard = StepGuard(model, CPU)
    fn = TrainStep(model, opt, guard, lambda: autocast_context(cfg, CPU))
    assert fn.host_skip
    (x, y), = batches(1)
    fn(x, y, 0, 10)
    before = copy.deepcopy(model.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    _, _, ok = fn(bad, y, 1, 10)
    assert not ok.item()
    for k, v in model.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(v, before[k]), k
    _, _, ok = fn(x, y, 2, 10)
    after = model.state_dict()
    assert ok.item() and any(not torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="ignores found_inf"):
        CUDAGraphStep(model, opt, guard, lambda: autocast_context(cfg, CPU), CPU, capture=False)


def test_cuda_graphs_with_apex_is_refused_before_any_work():
    from fastmix.config import validate_config
    with pytest.raises(ValueError, match="--cuda-graphs needs --optimizer-impl torch"):
        validate_config(Config(cuda_graphs=True, optimizer_impl="apex"))


@pytest.mark.gpu
def test_a_skipped_first_warmup_step_leaves_no_trace_gpu():
    """The CUDA-graph step's first warm-up step is NaN: after capture and replays the weights
    equal a run that never saw it."""
    dev = torch.device("cuda")
    data = [(x.contiguous(memory_format=torch.channels_last), y)
            for x, y in batches(6, n=16, size=32, device=dev)]
    nan_x = data[0][0].clone()
    nan_x[:, :, :4, :4] = float("nan")
    (a, _, _, fa), (b, _, _, fb) = gpu_twins("automix")   # b's step is captured
    _, _, ok = fb(nan_x, data[0][1], 0, 10)                # its first warm-up step
    assert not ok.item()
    for model, fn in ((a, fa), (b, fb)):
        torch.manual_seed(5)
        import numpy as np
        model.rng = np.random.default_rng(5)
        for i, (x, y) in enumerate(data[1:], start=1):
            fn(x, y, i, 10)
    assert fb.graph is not None
    assert_same_state(a, b, rtol=2e-2, atol=2e-3)


def test_a_captured_step_refuses_another_batch_shape():
    """After the capture, a batch of another shape is refused with the reason (its eager step
    would run beside the graph's reserved pool). The graph is stood in for on the CPU; the
    GPU test below captures a real one."""
    (_, _, _, _), (_, _, _, fn) = twins("vanilla")
    x, y = batches(1)[0]
    fn(x, y, 0, 10)
    fn.graph = object()                      # as after a capture
    with pytest.raises(ValueError, match="drop the last partial batch"):
        fn(x[:4], y[:4], 1, 10)


@pytest.mark.gpu
def test_a_captured_step_refuses_another_batch_shape_gpu():
    (_, _, _, _), (_, _, _, fn) = gpu_twins("mixup")
    data = batches(4, n=16, size=32, device=torch.device("cuda"))
    for i, (x, y) in enumerate(data):
        fn(x.contiguous(memory_format=torch.channels_last), y, i, 10)
    assert fn.graph is not None
    with pytest.raises(ValueError, match="drop the last partial batch"):
        fn(data[0][0][:8].contiguous(memory_format=torch.channels_last), data[0][1][:8], 5, 10)
