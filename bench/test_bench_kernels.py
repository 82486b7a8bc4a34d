"""The kernel benchmark cases (bench/cases_<op>.py) through pytest-benchmark.

    pytest bench/ --benchmark-only [--benchmark-json OUT.json]
    pytest bench/ --benchmark-disable -q        # each function once, as plain tests

Quick cases under the Triton interpreter on the CPU (a smoke run: one round each, no speed
claim), the full CIFAR / ImageNet cases on CUDA. Each test first asserts that the fused op
matches its eager twin on the case (outputs and input gradients; bench/kernels.py's check,
run once per case), then times one variant: eager, torch.compile(eager) (CUDA only, or with
FASTMIX_BENCH_COMPILE=1) or fused, forward or forward + backward. Benchmarks are grouped per
case and pass, so eager, compile and fused sit side by side. On CUDA the timed function
ends with torch.cuda.synchronize(); input sets rotate as in bench/kernels.py.
"""
import os

import pytest
import torch

from bench import kernels as K      # bench/conftest.py set TRITON_INTERPRET and sys.path

DEVICE = K.default_device()
CUDA = DEVICE == "cuda"
QUICK = not CUDA
COMPILE = CUDA or os.environ.get("FASTMIX_BENCH_COMPILE", "") not in ("", "0")
CASES = K.load_cases(DEVICE, quick=QUICK)

if QUICK:
    # The interpreter is slow: one round per benchmark, whatever the command line says.
    pytestmark = pytest.mark.benchmark(min_rounds=1, max_time=0.0, warmup=False)


def _params():
    out = []
    for i, case in enumerate(CASES):
        cid = f"{case.op}-{case.shape.replace(' ', '_')}"
        passes = ["fwd"] + (["fwd_bwd"] if case.bytes_fwd_bwd is not None else [])
        impls = ["eager"] + (["compile"] if COMPILE else []) + ["fused"]
        for p in passes:
            for impl in impls:
                out.append(pytest.param(i, impl, p, id=f"{cid}-{impl}-{p}"))
    return out


_prepared, _checks, _compiled = {}, {}, {}


def _prep(i):
    if i not in _prepared:
        _prepared.clear()               # keep one case's inputs alive at a time
        _prepared[i] = K.Prepared(CASES[i], n_sets=4 if CUDA else 1)
    return _prepared[i]


def _compiled_eager(i):
    if i not in _compiled:
        _compiled[i] = K.make_compiled(CASES[i].eager)
    return _compiled[i]


def _checked(i, impl):
    """fused (or compiled eager) vs eager, once per case."""
    key = (i, impl)
    if key not in _checks:
        prep = _prep(i)
        fn = CASES[i].fused if impl == "fused" else _compiled_eager(i)
        _checks[key] = K.check(prep, fn)
    return _checks[key]


@pytest.mark.parametrize("i, impl, pass_", _params())
def test_kernel(benchmark, i, impl, pass_):
    case = CASES[i]
    res = _checked(i, "fused")
    assert res["ok"], f"fused != eager on {K.case_id(case)}: {res['msg']}"
    if impl == "compile":
        res_c = _checked(i, "compile")
        assert res_c["ok"], f"torch.compile(eager) != eager on {K.case_id(case)}: {res_c['msg']}"
    prep = _prep(i)
    fn = {"eager": case.eager, "fused": case.fused}.get(impl) or _compiled_eager(i)
    bwd = pass_ == "fwd_bwd"
    benchmark.group = f"{case.op} | {case.shape} | {K.PASS_LABEL[pass_]}"
    nbytes = case.bytes_fwd_bwd if bwd else case.bytes_fwd
    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "impl": impl,
                                 "pass": pass_, "bytes": nbytes, "device": DEVICE,
                                 "interpreter": not CUDA, "max_rel_err": res["max_rel_err"]})
    benchmark(prep.timed_fn(fn, bwd, zero_grads=bwd, sync=CUDA))
    prep.zero_grads()
