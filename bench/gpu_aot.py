#!/usr/bin/env python
"""Compile every fused kernel for real GPUs, ahead of time, on a machine without one.

Triton's compiler runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX) and the ``ptxas``
that ships in the triton wheel (``ptxas-blackwell`` for sm_100) without a device. This script:

1. **records the launches the library itself makes**: it swaps each launched kernel object
   (``kernel[grid](...)``) of ``kernels/*.py`` for a recorder and calls the modules' own
   launchers (``_launch_forward`` / ``_launch_backward`` / ``_launch_scale``) on CPU tensors of
   the real shapes, with the GPU launch configuration (no ``TRITON_INTERPRET``): the tile
   sizes, warps and constexpr flags come from the launchers' code, and for an autotuned
   kernel the candidate configs are the autotuner's own list after its own pruning
   (``Autotuner.prune_configs``), as a GPU would time them;
2. **compiles each distinct (kernel, specialisation, config)** for each architecture with the
   same argument specialisation the JIT would apply (``create_function_from_signature``), and
   reads the resource use of the cubin with ``cuobjdump --dump-resource-usage``;
3. **checks the limits**: registers x threads <= 65,536, shared memory <= the architecture's
   per-block maximum, and no register spills on sm_80 / sm_90 (a spilling config must never
   reach the autotuner: it would be timed, and could even win); sm_100's spills are reported.

``--all-configs --spill-table`` compiles every autotune config, pruned or not, and writes the
spilling ones per architecture to ``kernels/autotune_spills.json``, which the pruning reads.

``python bench/gpu_aot.py`` runs the sample CI uses (every kernel and dtype); ``--full`` the
whole sweep of the issue's shapes; ``--json PATH`` and ``--markdown PATH`` write the table.
Exit status 1 when any compile fails or a limit is broken. Run it without TRITON_INTERPRET.
"""
import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/gpu_aot.py compiles for real GPUs: run it without TRITON_INTERPRET")
# A private kernel cache: every run compiles for real (and leaves the user's cache alone). It is
# removed at exit (a full sweep leaves over 1 GB of compiled kernels; the workers inherit it).
if "TRITON_CACHE_DIR" not in os.environ:
    import atexit
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastmix-aot-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import fastmix  # noqa: E402,F401  (registers fastmix.kernels in a source checkout)
from fastmix.kernels import mask_mix, mixblock_attn, mixed_ce  # noqa: E402

from bench.common import replace_section  # noqa: E402
from bench.launches import recording  # noqa: E402

# Per-block shared memory maxima (opt-in), bytes: A100 / H100 / B200.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
REGS_PER_SM = 65536
# A spill fails the check on these; elsewhere (sm_100, whose ptxas-blackwell is newer than any
# GPU this project has) it is reported in the table, not failed.
SPILL_FREE_ARCHS = (80, 90)
ARCHS = (80, 90, 100)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---- 1. recording the library's launches: bench/launches.py ---------------------------------
def _variants(name, target, args, kwargs, arch, all_configs=False):
    """The compiles one recorded launch stands for on ``arch``: one, or one per autotune
    config the pruning keeps for that GPU (``all_configs``: every config, before pruning)."""
    if not isinstance(target, Autotuner):
        yield target, args, dict(kwargs), ""
        return
    target.nargs = dict(zip(target.arg_names, args))
    mixblock_attn.PRUNE_ARCH = f"sm_{arch}"
    try:
        configs = target.configs if all_configs else target.prune_configs(dict(kwargs))
    finally:
        mixblock_attn.PRUNE_ARCH = None
    for cfg in configs:
        kw = {**kwargs, **cfg.all_kwargs()}
        label = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
        yield target.fn, args, kw, f"{label},warps={cfg.num_warps},stages={cfg.num_stages}"


# ---- the shapes ----------------------------------------------------------------------------
def _t(shape, dtype=torch.float32, **kw):
    return torch.randn(shape, **kw).to(dtype)


def attention_cases(full):
    """Mix Block attention: stage-3 maps 7x7 / 8x8 / 14x14, d = 128 / 256 / 512 (R-18's
    C3 = 256 and R-50's 1024 at reduction 2), and the ViT token grids: 14x14 of C = 384
    (DeiT-S, Swin-T stage 3: d = 192) and C = 768 (DeiT-B: d = 384), 7x7 of C = 768 (Swin-T
    stage 4: d = 384); with and without the λ-concat biases."""
    vit = ((14, 192), (14, 384), (7, 384))
    shapes = (tuple(itertools.product((7, 8, 14), (128, 256, 512))) + vit if full
              else ((8, 128), (14, 512)))   # CI, every dtype
    cases = list(itertools.product(shapes, DTYPES, (False, True)))
    if not full:   # CI: the ViT presets' grids (DeiT-S 14x14, Swin-T 7x7), bf16 with λ-concat
        cases += [((14, 192), torch.bfloat16, True), ((7, 384), torch.bfloat16, True)]
    for (hw, d), dtype, bias in cases:
        n, L = 4, hw * hw
        qk, v = _t((n, L, d), dtype), _t((n, L), dtype)
        idx = torch.randperm(n)
        qb = kb = _t((d,)) if bias else None
        vb = torch.tensor(0.1) if bias else None
        out, lse = mixblock_attn._launch_forward(qk, v, idx, qb, kb, vb, 0.1)
        need_dk = (True, False) if full else (True,)
        for dk in need_dk:
            mixblock_attn._launch_backward(qk, v, idx, qb, kb, vb, out, lse, torch.randn(n, L),
                                           0.1, True, dk)
        yield f"attention {hw}x{hw} d={d} {SHORT[dtype]}{' bias' if bias else ''}"


def mask_mix_cases(full):
    """Mask mix: 32 px (CIFAR, 8x8 masks, batch 100) and 224 px (ImageNet, 14x14 masks,
    batch 64), NCHW and channels_last, nearest and bilinear; the AutoMix pair (masked or
    constant second mix) forward, the single (Mixup) forward, and the backward."""
    sizes = ((100, 32, 8), (64, 224, 14)) if full else ((100, 32, 8), (8, 224, 14))
    for (n, px, m), dtype, cl, bilinear in itertools.product(sizes, DTYPES, (False, True),
                                                             (False, True)):
        x = _t((n, 3, px, px), dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        ia, ib = torch.randperm(n), torch.randperm(n)
        ma, mb = torch.randn(n, 1, m, m), torch.randn(n, 1, m, m)
        mask_mix._launch_forward(x, ia, ma, None, ib, mb, None, bilinear)
        mask_mix._launch_forward(x, ia, ma, None, ib, None, torch.tensor(0.3), bilinear)
        mask_mix._launch_forward(x, ia, None, 0.4, None, None, None, bilinear)
        mask_mix._launch_backward(x, ia, ma, torch.randn_like(x), bilinear)
        yield (f"mask mix {px}px {SHORT[dtype]} {'channels_last' if cl else 'NCHW'} "
               f"{'bilinear' if bilinear else 'nearest'}")


def cross_entropy_cases(full):
    """Mixed CE: K = 10 / 100 / 1000 (CIFAR-10, CIFAR-100, ImageNet) at their batches, mixed
    and plain, with and without the gradient; and the backward's scaling kernel."""
    for (n, k), dtype in itertools.product(((100, 10), (256, 100), (64, 1000)), DTYPES):
        logits = _t((n, k), dtype)
        a, b = torch.randint(0, k, (n,)), torch.randint(0, k, (n,))
        lam = torch.tensor(0.3)
        for has_b, grad in itertools.product((True, False), (True, False)):
            if not full and not grad:
                continue
            mixed_ce._launch_forward(logits, a, b if has_b else None, lam if has_b else None,
                                     0.1, write_grad=grad)
        mixed_ce._launch_scale(logits.clone(), torch.tensor(1.0), 1.0 / n)
        yield f"mixed CE N={n} K={k} {SHORT[dtype]}"


CASES = (attention_cases, mask_mix_cases, cross_entropy_cases)


def record(full, archs):
    """The cases' launches for each GPU: ``(names, [(launch, arch)])``. The launch
    configurations that depend on the architecture (``mask_mix.TARGET_ARCH``) are recorded for
    each one."""
    out = []
    for arch in archs:
        mask_mix.TARGET_ARCH = f"sm_{arch}"
        try:
            with recording() as log:
                names = [c for make in CASES for c in make(full)]
        finally:
            mask_mix.TARGET_ARCH = None
        out += [(launch, arch) for launch in log]
    return names, out


# ---- 2. compiling --------------------------------------------------------------------------
def _specialise(fn, args, kwargs, arch):
    """What the JIT would hand the compiler on a GPU of ``arch`` for this call."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return target, signature, constexprs, attrs, options


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump():
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else shutil.which("cuobjdump")


def compile_one(job):
    """Compile one job ``(kernel, fn, args, kwargs, label, arch)``; returns a result row."""
    kernel, fn, args, kwargs, label, arch = job
    row = {"kernel": kernel, "config": label, "arch": f"sm_{arch}"}
    t0 = time.perf_counter()
    try:
        target, signature, constexprs, attrs, options = _specialise(fn, args, kwargs, arch)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as e:  # a compile error is a result, reported and failed on
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        return row
    meta = compiled.metadata
    row["dtypes"] = sorted({t[1:] for t in signature.values() if isinstance(t, str)
                            and t[1:] in ("fp32", "fp16", "bf16") and t.startswith("*")})
    row.update(num_warps=meta.num_warps, threads=32 * meta.num_warps * meta.num_ctas,
               shared=int(meta.shared), compile_s=round(time.perf_counter() - t0, 2))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    m = _RES.search(out)
    if m is None:
        row.update(error=f"no resource usage in cuobjdump output: {out[-200:]!r}")
        return row
    regs, stack, shared, local = map(int, m.groups())
    # ptxas spills to local memory: LOCAL > 0 (spill stores show up as local use).
    # ptxas spills registers to the stack frame (Triton kernels use no other stack or local
    # memory), so its size is the spill figure: `ptxas -v` reports the same bytes as spill
    # stores (e.g. "240 bytes stack frame, 240 bytes spill stores, 300 bytes spill loads").
    row.update(regs=regs, stack=stack, local=local, spills=stack + local,
               shared=max(shared, row["shared"]))
    return row


_JOBS = []


def _compile_index(i):
    return compile_one(_JOBS[i])


def _constexpr_key(fn, args, kwargs, arch):
    target, signature, constexprs, attrs, options = _specialise(fn, args, kwargs, arch)
    return (fn.__name__, arch, tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())),
            tuple(sorted((k, str(v)) for k, v in options.__dict__.items())))


def jobs(log, all_configs=False):
    """Distinct compiles of the ``(launch, arch)`` pairs: kernels share a binary whenever the
    specialisation is the same."""
    seen = {}
    for (name, target, args, kwargs), arch in log:
        for fn, a, kw, label in _variants(name, target, args, kwargs, arch, all_configs):
            key = _constexpr_key(fn, a, kw, arch)
            if key not in seen:
                shown = set(re.findall(r"(\w+)=", label)) | {"num_warps", "num_stages",
                                                               "num_ctas", "maxnreg"}
                flags = ",".join(f"{k}={v}" for k, v in sorted(kw.items()) if k not in shown)
                if "warps=" not in label:
                    flags += f",warps={kw.get('num_warps', 4)}"
                seen[key] = (name, fn, a, kw, ",".join(x for x in (label, flags) if x), arch)
    return list(seen.values())


# ---- 3. checking ---------------------------------------------------------------------------
def problems(row):
    if "error" in row:
        return [f"compile error: {row['error']}"]
    out = []
    arch = int(row["arch"][3:])
    if row["regs"] * row["threads"] > REGS_PER_SM:
        out.append(f"{row['regs']} registers x {row['threads']} threads > {REGS_PER_SM}")
    if row["shared"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['shared']} B > {SMEM_LIMIT[arch]} B")
    if row["spills"] and arch in SPILL_FREE_ARCHS:
        out.append(f"spills {row['spills']} B per thread (stack frame)")
    return out


SPILL_TABLE = os.path.join(ROOT, "kernels", "autotune_spills.json")


def write_spill_table(rows, archs, command):
    """The autotuned configs ptxas spilled registers for, per triton version and architecture,
    in any dtype: ``{"3.7.1": {"sm_90": {launcher: [{constexpr: value, ..., "num_warps": w},
    ...]}}}``, read by the kernels' pruning (``kernels/mixblock_attn._prune``) so no spilling
    config is timed. This run's triton version replaces its entry; the others are kept."""
    table = {f"sm_{a}": {} for a in archs}
    for r in rows:
        if not r.get("spills") or "stages=" not in r["config"]:   # autotuned kernels only
            continue
        cfg = dict(kv.split("=") for kv in r["config"].split(","))
        entry = {k: (v == "True" if v in ("True", "False") else int(v)) for k, v in cfg.items()
                 if k not in ("warps", "stages")}
        entry["num_warps"] = int(cfg["warps"])
        entries = table[r["arch"]].setdefault(r["kernel"].split(".")[-1], [])
        if entry not in entries:
            entries.append(entry)
    try:                                  # other triton versions' tables are kept
        with open(SPILL_TABLE) as f:
            versions = json.load(f)["spilling_configs"]
    except (OSError, ValueError, KeyError):
        versions = {}
    versions[triton.__version__] = table

    def lines(per_arch, pad):             # one config a line, so a diff reads
        return ",\n".join(
            f'{pad}"{arch}": {{\n' + ",\n".join(
                f"{pad}  {json.dumps(k)}: [\n" + ",\n".join(
                    f"{pad}    " + json.dumps(e, sort_keys=True)
                    for e in sorted(v, key=lambda e: sorted(e.items()))) + f"\n{pad}  ]"
                for k, v in sorted(per.items())) + f"\n{pad}}}"
            for arch, per in sorted(per_arch.items()))
    with open(SPILL_TABLE + ".tmp", "w") as f:
        f.write(json.dumps({"command": command})[:-1] + ', "spilling_configs": {\n')
        f.write(",\n".join(f'  "{v}": {{\n' + lines(per_arch, "    ") + "\n  }"
                           for v, per_arch in sorted(versions.items())))
        f.write("\n}}\n")
    os.replace(SPILL_TABLE + ".tmp", SPILL_TABLE)
    print(f"wrote {SPILL_TABLE}: " + "; ".join(
        f"{arch} " + ", ".join(f"{k} {len(v)}" for k, v in sorted(per.items()))
        for arch, per in sorted(table.items())))


def markdown(rows, command, elapsed):
    lines = [f"Command: `{command}` ({len(rows)} compiles, {elapsed:.0f} s on this machine; "
             f"triton {triton.__version__})", "",
             "| kernel | config | arch | regs | threads | spills (B) | smem (B) | problems |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["config"])):
        p = "; ".join(problems(r)) or ("spills (reported, not failed)" if r.get("spills")
                                        else "-")
        lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | {r.get('regs', '-')} | "
                     f"{r.get('threads', '-')} | {r.get('spills', '-')} | {r.get('shared', '-')} | "
                     f"{p} |")
    return "\n".join(lines) + "\n"


def summary_markdown(rows, command, elapsed, table_path=None):
    """Per kernel and architecture: compiles, register range, most shared memory, spills."""
    per = {}
    for r in rows:
        per.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = [f"Command: `{command}` — {len(rows)} compiles in {elapsed:.0f} s on this 2-core "
             f"machine, triton {triton.__version__}, no GPU (Triton's compiler and ptxas only)."
             + (f" Every config: [{os.path.relpath(table_path, os.path.join(ROOT, 'bench'))}]"
                f"({os.path.relpath(table_path, os.path.join(ROOT, 'bench'))})." if table_path
                else ""), "",
             "| kernel | arch | configs compiled | registers / thread | max threads x regs "
             "| max shared memory (B) | spilling | errors |", "|---|---|---|---|---|---|---|---|"]
    for (k, a), rs in sorted(per.items()):
        ok = [r for r in rs if "regs" in r]
        lines.append(
            f"| {k} | {a} | {len(rs)} | {min(r['regs'] for r in ok)}–{max(r['regs'] for r in ok)}"
            f" | {max(r['regs'] * r['threads'] for r in ok)} | {max(r['shared'] for r in ok)} | "
            f"{sum(1 for r in ok if r['spills'])} | {sum(1 for r in rs if 'error' in r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole sweep (else the CI sample)")
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS,
                    help="compute capability x 10 (repeatable; default: 80 and 90, and 100 "
                         "with --full)")
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every autotune config, not only those the pruning keeps "
                         "(to find the spilling ones; limits are then reported, not failed)")
    ap.add_argument("--spill-table", action="store_true",
                    help="with --all-configs: write the spilling autotune configs to "
                         "kernels/autotune_spills.json, which the kernels' pruning drops")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--markdown", help="write the table of every compile here")
    ap.add_argument("--results", help="put the per-kernel summary into this markdown file "
                                      "(between <!-- gpu-aot:begin/end --> markers)")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or ((80, 90, 100) if args.full else (80, 90)))
    t0 = time.perf_counter()
    names, log = record(args.full, archs)
    todo = jobs(log, args.all_configs)
    print(f"{len(names)} cases, {len(log)} launches, {len(todo)} distinct compiles for "
          f"{', '.join(f'sm_{a}' for a in archs)}", flush=True)
    global _JOBS
    _JOBS = todo       # forked workers inherit the jobs (kernel objects do not pickle)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.workers), mp_context=ctx) as pool:
        rows = list(pool.map(_compile_index, range(len(todo)), chunksize=4))
    elapsed = time.perf_counter() - t0
    bad = [(r, p) for r in rows for p in problems(r)]
    for r, p in bad:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['arch']}: {p}")
    per_kernel = {}
    for r in rows:
        per_kernel.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (k, a), rs in sorted(per_kernel.items()):
        regs = [r["regs"] for r in rs if "regs" in r]
        print(f"{k:34s} {a}: {len(rs):4d} compiled, regs {min(regs, default=0)}-"
              f"{max(regs, default=0)}, max smem {max((r.get('shared', 0) for r in rs), default=0)}"
              f" B, spilling {sum(1 for r in rs if r.get('spills'))}")
    command = "python bench/gpu_aot.py" + "".join(
        f" --{k.replace('_', '-')}" for k in ("full", "all_configs", "spill_table")
        if getattr(args, k)) + "".join(f" --arch {a}" for a in (args.arch or ()))
    if args.spill_table:
        if not args.all_configs:
            ap.error("--spill-table needs --all-configs (the table lists what pruning drops)")
        write_spill_table(rows, archs, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "archs": archs, "elapsed_s": elapsed, "cases": names,
                       "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, command, elapsed))
    if args.results:
        replace_section(args.results, summary_markdown(rows, command, elapsed, args.markdown),
                        "gpu-aot")
    print(f"{len(rows)} compiles in {elapsed:.0f} s; {len(bad)} problems")
    return 1 if bad and not args.all_configs else 0


if __name__ == "__main__":
    sys.exit(main())
