"""bench/counts.py: its arithmetic on cases counted by hand, the fused kernels' counted bytes
against the formulas of the bench cases, the CI run on tiny shapes, and the official step it
counts against fastmix's AutoMix."""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench import counts as C
from bench.official_step import OfficialAutoMix
from fastmix.automix import AutoMix
from fastmix.backbones import build_backbone

F32 = 4


def _count(fn, fake, resident=None):
    tally = C.Tally()
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True):
            args = fn.make()
            with C.counting(tally, resident=resident(args) if resident else None):
                fn(*args)
    else:
        args = fn.make()
        with C.counting(tally, resident=resident(args) if resident else None):
            fn(*args)
    return tally


class Case:
    def __init__(self, make, body):
        self.make, self.body = make, body

    def __call__(self, *args):
        return self.body(*args)


@pytest.mark.parametrize("fake", [False, True])
def test_a_masked_product_moves_what_it_reads_and_writes(fake):
    """x * mask, x [N, C, H, W] and mask [N, 1, H, W] fp32: one launch that reads x and the mask
    once each and writes N*C*H*W floats (the mask's broadcast over C is not re-read)."""
    n, c, h, w = 3, 5, 7, 9
    case = Case(lambda: (torch.randn(n, c, h, w), torch.rand(n, 1, h, w)), lambda x, m: x * m)
    t = _count(case, fake)
    assert t.launches == 1 and t.kernel_launches == 0
    assert t.bytes == (n * c * h * w + n * h * w + n * c * h * w) * F32
    assert t.flops == 0 and t.read_backs == []


@pytest.mark.parametrize("fake", [False, True])
def test_views_in_place_ops_copies_and_broadcasts(fake):
    n = 1000

    def body(x, y, b):
        x.mul_(2)                          # reads and writes x: 2n floats
        v = x.view(10, 100).t()            # views: no launch, no traffic
        y.copy_(v.reshape(-1))             # reshape of a transposed view copies (n + n)...
        z = x + b.expand(n)                # ...; b counted once: n + 1 + n
        return z

    t = _count(Case(lambda: (torch.randn(n), torch.empty(n), torch.randn(1)), body), fake)
    ops = {k: v[0] for k, v in t.by_op.items()}
    assert t.bytes == (2 * n + 2 * n + 2 * n + 2 * n + 1) * F32, t.by_op
    assert t.launches == 4 and ops == {"mul_": 1, "clone": 1, "copy_": 1, "add": 1}, ops


@pytest.mark.parametrize("fake", [False, True])
def test_matmul_flops_and_bytes(fake):
    """[m, k] @ [k, n]: 2mkn FLOPs (FlopCounterMode's count, which the tally equals), the
    operands read once and the product written once."""
    m, k, n = 6, 11, 13
    t = _count(Case(lambda: (torch.randn(m, k), torch.randn(k, n)), torch.mm), fake)
    assert t.flops == t.flops_counter == 2 * m * k * n
    assert t.bytes == (m * k + k * n + m * n) * F32 and t.launches == 1
    # the roofline model: fp32 matmul, bandwidth-bound at this size
    assert t.roofline_s == pytest.approx(max(t.bytes / C.HBM_BYTES_PER_S, t.flops / C.PEAK_FP32))
    assert t.model_ms == pytest.approx(1e3 * t.roofline_s + C.LAUNCH_US / 1e3)


@pytest.mark.parametrize("fake", [False, True])
def test_saved_for_backward(fake):
    """sigmoid keeps its output for backward (n floats); an add keeps nothing."""
    n = 1000
    t = _count(Case(lambda: (torch.randn(n, requires_grad=True),),
                    lambda x: torch.sigmoid(x) + 1), fake)
    assert t.saved == n * F32 and t.launches == 2


@pytest.mark.parametrize("fake", [False, True])
def test_peak_of_live_storage(fake):
    """x is resident; a, b, then c with a freed before c exists: 3n floats at most."""
    n = 1000

    def body(x):
        a = x + 1
        b = a + 1
        del a
        c = b + 1
        return c

    t = _count(Case(lambda: (torch.randn(n),), body), fake, resident=lambda args: list(args))
    assert t.peak == 3 * n * F32 and t.launches == 3


@pytest.mark.parametrize("fake", [False, True])
def test_the_peak_forgets_what_the_body_frees(fake):
    """A resident tensor the body drops (the previous step's gradients at zero_grad) leaves
    the live bytes: the count keeps no reference to it. x and g resident, g dropped, then a
    and b: 3n floats at most (4n if g were kept alive)."""
    n = 1000
    held = {}

    def make():
        held["g"] = torch.randn(n)
        return (torch.randn(n),)

    def body(x):
        del held["g"]
        a = x + 1
        b = a + 1
        return b

    t = _count(Case(make, body), fake, resident=lambda args: lambda: list(args) + [held["g"]])
    assert t.peak == 3 * n * F32


def test_the_count_does_not_keep_a_dropped_graph_alive():
    """Nothing the count adds makes a reference cycle that keeps a graph the body drops (the
    official step's detached mask) alive until Python's cyclic collector runs (held off
    here): not the saved-tensor hook (a saved output holding its own grad_fn), not the FLOP
    counter's module tracker (grad hooks whose closures hold grad_fns). x resident; the
    sigmoid module saves its output s; d; s dropped with its graph before c: 3n floats at
    most (4n if s lived on to c)."""
    n = 1000
    x = torch.randn(n, requires_grad=True)
    t = C.Tally()
    with C._no_gc(), C.counting(t, resident=[x]):
        s = torch.nn.Sigmoid()(x)
        d = s.detach() * 2             # n more
        del s                          # the graph (and s) go
        c = d + 1                      # x + d + c
        del c, d
    assert t.peak == 3 * n * F32 and t.saved == n * F32


@pytest.mark.parametrize("method,config", [("vanilla", "faithful"), ("automix", "faithful"),
                                           ("vanilla", "eager"), ("automix", "eager"),
                                           ("automix", "fused")])
def test_counted_peak_equals_real_cpu_tensors(method, config):
    """The counted peak of a training step (fake tensors) against the same step on real CPU
    tensors, measured by the profiler's allocation events (tiny ResNet, batch 8): within 1%
    of the real tensors' peak (the kernels' own workspaces, oneDNN's, left out; with them the
    real peak is higher, by what no count of tensors sees)."""
    if config == "fused" and torch.cuda.is_available():
        pytest.skip("the fused step runs its kernels on CPU tensors only under the Triton "
                    "interpreter, which conftest.py turns on only without a GPU")
    (row,) = C.check_peak_rows((config,), quick=True, shapes=(("tiny", "cifar100-r18", 8),),
                               methods=(method,))
    assert row["counted"] == pytest.approx(row["peak_tensors"], rel=0.01), row
    assert row["at_start"] < row["counted"] and row["peak_tensors"] <= row["peak"], row


def test_read_backs_are_counted_and_index_checks_are_not():
    x = torch.randn(5)
    t = C.Tally()
    with C.counting(t):
        x.sum().item()                    # a read-back
        torch.nn.functional.nll_loss(x.view(1, 5).log_softmax(1), torch.tensor([2]))
    assert [op for op, _ in t.read_backs] == ["_local_scalar_dense"]
    assert t.read_backs[0][1].startswith("bench/test_counts.py:")
    # fastmix's own index check takes the device path inside counting(): no read-back
    from fastmix.functional import mixed_cross_entropy
    t = C.Tally()
    with C.counting(t):
        mixed_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), fused=False)
    assert t.read_backs == [] and t.cpu_checks == 0 and t.by_op["_assert_async"][0] == 1


def test_fused_kernel_bytes_equal_the_bench_cases_formulas():
    """The counted traffic of each recorded mask-mix kernel is the byte formula
    bench/cases_mask_mix.py derives by hand (forward and backward); the mixed CE forward's
    counted bytes equal its formula's to the label and loss vectors."""
    from bench import cases_mask_mix, cases_mixed_ce
    fm = lambda: FakeTensorMode(allow_non_fake_inputs=True)  # noqa: E731
    for case in cases_mask_mix.cases("cpu", quick=False)[:8]:
        fwd, bwd = C.count_op(case, "fused", fm())
        kb = sum(v[1] for k, v in fwd.by_op.items() if k.startswith("mask_mix."))
        assert kb == case.bytes_fwd, case.shape
        assert bwd.launches == bwd.kernel_launches == 1, (case.shape, bwd.by_op)
        assert bwd.bytes == case.extra["bytes_bwd"], case.shape
    for case in cases_mixed_ce.cases("cpu", quick=False)[:3]:
        fwd, bwd = C.count_op(case, "fused", fm())
        kb = sum(v[1] for k, v in fwd.by_op.items() if k.startswith("mixed_ce."))
        assert case.bytes_fwd <= kb <= case.bytes_fwd + 8 * 1024, case.shape


def test_quick_run_tables_and_invariants(tmp_path):
    """The CI run: every op and every method's step on tiny shapes. The fused path moves and
    launches no more than the eager one per op; AutoMix's FLOPs are ~3x vanilla's (4 forwards
    + 2 backwards + an activation-only backward); fastmix's steps read nothing back, the
    official AutoMix step does (its NaN/Inf checks and the NaN check on the loss)."""
    out = tmp_path / "counts.json"
    md = tmp_path / "RESULTS.md"
    md.write_text("# results\n\nkept\n")
    assert C.main(["--quick", "--json", str(out), "--results", str(md)]) == 0
    data = json.loads(out.read_text())
    assert len(data["ops"]) == len(C._op_cases(True))
    for r in data["ops"]:
        assert r["fused"]["bytes"] <= r["eager"]["bytes"], r
        assert r["fused"]["launches"] <= r["eager"]["launches"], r
        assert r["fused"]["kernels"] >= 1 and r["eager"]["kernels"] == 0, r
    steps = {(r["method"], r["config"]): r for r in data["steps"]}
    assert set(m for m, _ in steps) == set(C.METHODS)
    for config in C.CONFIGS:
        ratio = steps["automix", config]["flops"] / steps["vanilla", config]["flops"]
        assert 2.9 < ratio < 3.2, (config, ratio)
    for (method, config), r in steps.items():
        if config != "faithful":
            assert r["read_backs"] == [], (method, config, r["read_backs"])
        assert r["bytes"] > 0 and r["launches"] > 0 and r["peak"] >= r["saved"] > 0
    assert len(steps["automix", "faithful"]["read_backs"]) == 8     # 3 per Mix Block call,
    assert len(steps["mixup", "faithful"]["read_backs"]) == 1       # + mask loss + loss
    assert steps["automix", "fused"]["kernels"] > 0 == steps["automix", "eager"]["kernels"]
    text = md.read_text()
    assert text.startswith("# results\n\nkept\n") and "<!-- counts:begin -->" in text
    assert "roofline model, not a measurement" in text


def test_the_official_step_computes_fastmixs_loss_and_gradients():
    """bench/official_step.py (the spec's data flow) and fastmix's AutoMix give the same loss
    and the same Mix Block and online-encoder gradients on one draw, fp32."""
    torch.manual_seed(0)
    model = AutoMix(build_backbone("resnet_small", 3), 10, seed=0, fused=False)
    for p in model.mix_block.parameters():            # a non-trivial mask
        p.data.normal_(0, 0.3)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    draw = model.draw(x)
    draw.update(lam_mb=0.35, lam_bb=0.7)
    results = []
    for runner in (model, OfficialAutoMix(model)):
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        loss, _ = runner.losses(x, y, draw)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.mix_block.parameters()],
                        [p.grad.clone() for p in model.backbone_q.parameters()]))
        model.load_state_dict(state)                   # the same BN statistics for both
    (la, mb_a, q_a), (lb, mb_b, q_b) = results
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6), (la, lb)
    for a, b in zip(mb_a + q_a, mb_b + q_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in mb_a)


def test_the_official_ema_is_fastmixs():
    torch.manual_seed(0)
    a = AutoMix(build_backbone("resnet_small", 3), 10, seed=0, fused=False)
    for p in a.backbone_q.parameters():
        p.data.add_(torch.randn_like(p))
    b = AutoMix(build_backbone("resnet_small", 3), 10, seed=0, fused=False)
    b.load_state_dict(a.state_dict())
    a.after_step(5, 100)
    OfficialAutoMix(b).after_step(5, 100)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-6, atol=1e-7), k


def test_quick_vit_counts_and_the_switch_off_saving(tmp_path):
    """--vit --quick: a tiny DeiT at 224 px on the CIFAR-100 ViT recipe. AutoMix's step is
    ~3x vanilla's FLOPs (4 forwards, 2 full backwards and one through activations only); a
    step whose switch_off coin skips the Mix Block's classification drops the momentum
    encoder's pass on the mixed batch and its backward, so it costs less; the official flow
    reads back, fastmix's steps do not."""
    out, md = tmp_path / "vit.json", tmp_path / "RESULTS.md"
    md.write_text("# results\n")
    assert C.main(["--vit", "--quick", "--json", str(out), "--results", str(md)]) == 0
    rows = {(r["method"], r["config"]): r for r in json.loads(out.read_text())["vit_steps"]}
    assert set(rows) == {(m, c) for m in C.VIT_METHODS for c in C.VIT_CONFIGS}
    for config in C.VIT_CONFIGS:
        v, a, s = (rows[m, config] for m in ("vanilla", "automix", "automix-mbskip"))
        assert 2.9 < a["flops"] / v["flops"] < 3.4, config
        assert v["flops"] < s["flops"] < a["flops"] and s["peak"] < a["peak"], config
    assert rows["automix", "fused"]["read_backs"] == [] == rows["automix-mbskip", "fused"]["read_backs"]
    assert len(rows["automix", "faithful"]["read_backs"]) == 8
    assert len(rows["automix-mbskip", "faithful"]["read_backs"]) == 8
    text = md.read_text()
    assert "<!-- counts-vit:begin -->" in text and "authors: time / vanilla" in text
