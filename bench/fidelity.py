#!/usr/bin/env python
"""How close fastmix's comparison methods are to OpenMixup's code: both run side by side on the
same scripted draws, and the differences are measured (not assumed).

    python bench/fidelity.py --openmixup DIR [--fmix FILE] [--opencv-python PY]
                             [--draws N] [--images N] [--json FILE]

``--openmixup DIR``: OpenMixup's mixing functions, *outside this repository* -- either a checkout
(``DIR/openmixup/models/augments/``) or a folder holding just ``cutmix.py``, ``mixup.py``,
``fmix.py``, ``gridmix.py``, ``resizemix.py``, ``saliencymix.py`` and ``smoothmix.py`` from
there. They are imported as they are, with stand-ins for what else they import (mmcv-free
stubs of ``openmixup.models.utils``, ``scipy.stats.beta``, ``cv2.saliency``) and their
``.cuda()`` calls made no-ops; nothing of them is copied into fastmix. The script prints the
git blob id of each file it loaded, to check against ``git ls-tree <commit>``.

``--fmix FILE``: the original FMix code (ecs-vlc/FMix ``fmix.py``), to check that OpenMixup's
``make_low_freq_image`` is the original's. ``--opencv-python PY``: a Python with
``opencv-contrib-python-headless`` (not a fastmix dependency), run as a child process to
locate the saliency peaks of OpenCV's detectors on Fashion-MNIST.

Scripted draws: every random number either side asks for (``np.random``, ``random``,
``torch.randperm/randint/rand``, ``scipy.stats.beta``; fastmix's ``numpy.random.Generator``) is
popped off a tape of values drawn once from a seeded generator, so the two sides see the same
λ, permutation, centres, noise arrays. The tape checks each call's kind and range, and the
report says when the two sides consume it in a different order.
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("cutmix", "mixup", "fmix", "gridmix", "resizemix", "saliencymix", "smoothmix")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


# ---- the tape of scripted draws -----------------------------------------------------------------
class Tape:
    """Values popped in order, each with its kind (``beta``, ``int``, ``uniform``, ``random``,
    ``normal``); permutations on a queue of their own (fastmix draws them from torch's
    generator, apart from its numpy stream). ``kinds`` records what was asked for."""

    def __init__(self, values, perms=()):
        self.values = list(values)
        self.perms = list(perms)
        self.kinds = []

    def take(self, kind, check=None):
        if not self.values:
            raise RuntimeError(f"the tape ran out at a {kind} draw (after {self.kinds})")
        have, value = self.values.pop(0)
        self.kinds.append(kind)
        if have != kind:
            raise RuntimeError(f"tape: asked for {kind}, the next value is a {have} "
                               f"(draws so far {self.kinds})")
        if check is not None and not check(value):
            raise RuntimeError(f"tape: {kind} value {value!r} is outside the caller's range")
        return value

    def perm(self, n):
        p = self.perms.pop(0)
        if len(p) != n:
            raise RuntimeError(f"tape: a permutation of {n} asked, {len(p)} scripted")
        return p


class TapeGenerator:
    """fastmix's side: the ``numpy.random.Generator`` methods fastmix.mixes calls."""

    def __init__(self, tape):
        self.tape = tape

    def beta(self, a, b, size=None):
        assert size is None
        return self.tape.take("beta", lambda v: 0 <= v <= 1)

    def integers(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        return self.tape.take("int", lambda v: low <= v < high)

    def uniform(self, low=0.0, high=1.0):
        return self.tape.take("uniform", lambda v: low <= v <= high)

    def random(self):
        return self.tape.take("random", lambda v: 0 <= v < 1)

    def standard_normal(self, shape):
        v = self.tape.take("normal")
        if tuple(np.shape(v)) != tuple(shape):
            raise RuntimeError(f"tape: normal draw of shape {tuple(shape)} asked, "
                               f"{np.shape(v)} scripted")
        return v.copy()


class TapeNumpyRandom:
    """OpenMixup's side: the ``np.random`` functions its files call."""

    def __init__(self, tape):
        self.tape = tape

    def beta(self, a, b, size=None):
        assert size is None
        return self.tape.take("beta", lambda v: 0 <= v <= 1)

    def randint(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        return self.tape.take("int", lambda v: low <= v < high)

    def uniform(self, low=0.0, high=1.0):
        return self.tape.take("uniform", lambda v: low <= v <= high)

    def random(self):
        return self.tape.take("random", lambda v: 0 <= v < 1)

    def randn(self, *shape):
        v = self.tape.take("normal")
        if tuple(np.shape(v)) != tuple(shape):
            raise RuntimeError(f"tape: randn{shape} asked, {np.shape(v)} scripted")
        return v.copy()


class TapePyRandom:
    """OpenMixup's side: Python's ``random`` module (``randint`` is inclusive)."""

    def __init__(self, tape):
        self.tape = tape

    def randint(self, a, b):
        return self.tape.take("int", lambda v: a <= v <= b)

    def random(self):
        return self.tape.take("random", lambda v: 0 <= v < 1)


class Proxy:
    """A module whose listed attributes are replaced, everything else the real module's."""

    def __init__(self, real, **overrides):
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._real, name)


def torch_proxy(tape):
    import torch

    def randperm(n, *args, **kwargs):
        return torch.as_tensor(tape.perm(n), dtype=torch.long)

    def randint(low, high, size, *args, **kwargs):
        assert tuple(size) == (1,)
        return torch.tensor([tape.take("int", lambda v: low <= v < high)])

    def rand(*size, **kwargs):
        assert size == (1,)
        return torch.tensor([tape.take("random", lambda v: 0 <= v < 1)], dtype=torch.float32)

    return Proxy(torch, randperm=randperm, randint=randint, rand=rand)


class ScriptedBeta:
    """``scipy.stats.beta`` as fmix.py uses it (``beta.rvs(a, b)``)."""

    def __init__(self, tape):
        self.tape = tape

    def rvs(self, a, b):
        return self.tape.take("beta", lambda v: 0 <= v <= 1)


def script(openmixup_module, tape):
    """Point one loaded OpenMixup module's random sources at ``tape``."""
    g = openmixup_module.__dict__
    g["np"] = Proxy(np, random=TapeNumpyRandom(tape))
    g["torch"] = torch_proxy(tape)
    if "random" in g:
        g["random"] = TapePyRandom(tape)
    if "beta" in g:
        g["beta"] = ScriptedBeta(tape)


class cuda_is_identity:
    """OpenMixup calls ``.cuda()``; on the CPU it is made the identity while it runs."""

    def __enter__(self):
        import torch
        self._saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        return self

    def __exit__(self, *exc):
        import torch
        torch.Tensor.cuda = self._saved


# ---- loading OpenMixup's files beside fastmix ---------------------------------------------------
def git_blob_id(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeSaliencyDetector:
    """``cv2.saliency.StaticSaliencyFineGrained_create()`` stand-in: returns the map the bench
    hands it (so OpenMixup's box logic runs on a known saliency map)."""
    next_map = None

    def computeSaliency(self, img):
        return True, FakeSaliencyDetector.next_map


def _stub_modules():
    utils = types.ModuleType("openmixup.models.utils")

    def batch_shuffle_ddp(*a, **k):
        raise NotImplementedError("dist_mode is not measured")

    utils.batch_shuffle_ddp = batch_shuffle_ddp
    utils.to_2tuple = lambda x: x if isinstance(x, (tuple, list)) else (x, x)
    pkg, models = types.ModuleType("openmixup"), types.ModuleType("openmixup.models")
    pkg.models, models.utils = models, utils
    stats = types.ModuleType("scipy.stats")
    stats.beta = None                       # replaced by a ScriptedBeta per run
    scipy = types.ModuleType("scipy")
    scipy.stats = stats
    saliency = types.ModuleType("cv2.saliency")
    saliency.StaticSaliencyFineGrained_create = FakeSaliencyDetector
    cv2 = types.ModuleType("cv2")
    cv2.saliency = saliency
    return {"openmixup": pkg, "openmixup.models": models, "openmixup.models.utils": utils,
            "scipy": scipy, "scipy.stats": stats, "cv2": cv2, "cv2.saliency": saliency}


def load_file(path, name, stubs):
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def load_openmixup(root):
    root = os.path.abspath(root)
    folder = os.path.join(root, "openmixup", "models", "augments")
    if not os.path.isdir(folder):
        folder = root
    missing = [f for f in FILES if not os.path.isfile(os.path.join(folder, f + ".py"))]
    if missing:
        raise SystemExit(f"--openmixup {root}: no {', '.join(m + '.py' for m in missing)} there "
                         f"(nor under openmixup/models/augments/)")
    if os.path.commonpath([folder, ROOT]) == ROOT:
        raise SystemExit("--openmixup must point outside the fastmix repository "
                         "(OpenMixup runs beside the project, it is never copied into it)")
    stubs = _stub_modules()
    mods, blobs = {}, {}
    for f in FILES:
        path = os.path.join(folder, f + ".py")
        mods[f] = load_file(path, f"openmixup_oracle_{f}", stubs)
        blobs[f + ".py"] = git_blob_id(path)
    return mods, blobs


# ---- helpers --------------------------------------------------------------------------------
def bits_equal(a, b):
    import torch
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def max_abs(a, b):
    import torch
    return float((torch.as_tensor(a, dtype=torch.float64)
                  - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def derangement(rng, n):
    while True:
        p = rng.permutation(n)
        if n < 2 or not (p == np.arange(n)).any():
            return p


def batch(rng, n, c, h, w):
    import torch
    return torch.from_numpy(rng.standard_normal((n, c, h, w)).astype(np.float32))


# ---- FMix ---------------------------------------------------------------------------------------
def _isotropic_low_freq_image(height, width, decay_power, param):
    """fastmix's FMix noise before this comparison (kept here only to measure it): the same
    scaled draw read along its last axis (real, imaginary) over the whole half spectrum."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[: width // 2 + 1 + (width % 2)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power
    spectrum = scale * param[..., 0] + 1j * scale * param[..., 1]
    img = np.real(np.fft.irfftn(spectrum, (height, width), axes=(-2, -1)))
    img = img - img.min()
    return img / img.max()


def measure_fmix(om, fmix_original, draws, seed):
    import torch
    from fastmix import mixes
    out = {}
    rng = np.random.default_rng(seed)
    for h, w in ((32, 32), (28, 28), (24, 20), (20, 24), (17, 23)):
        wf = w // 2 + 1 + (w % 2)
        img_equal = mask_equal = orig_equal = mixed_equal = 0
        before_px, lam_gap, mixed_gap, hi_energy_ref, hi_energy_before = [], [], [], [], []
        before_half = []
        for _ in range(draws):
            lam = float(rng.beta(0.2, 0.2))
            param = rng.standard_normal((1, h, wf, 2))
            u = float(rng.random())
            n = 4
            perm = derangement(rng, n)
            x = batch(rng, n, 3, h, w)
            # OpenMixup's fmix() end to end (λ from scipy's beta, noise, binarise, permutation)
            tape = Tape([("beta", lam), ("normal", param), ("random", u)], [perm])
            script(om["fmix"], tape)
            with cuda_is_identity():
                (x_om, mask_om), (_, _, lam_om) = om["fmix"].fmix(
                    x.clone(), torch.arange(n), alpha=0.2, decay_power=3, size=(h, w),
                    return_mask=True)
            # fastmix: the same draws through fmix_mask, mixed as MixupClassifier mixes masks
            ftape = Tape([("normal", param[0]), ("random", u)])
            m, lam_fm = mixes.fmix_mask(h, w, lam, TapeGenerator(ftape), decay_power=3.0)
            keep_fm = 1.0 - m
            mask_equal += bool(np.array_equal(keep_fm, mask_om[0, 0].numpy().astype(np.float64)))
            mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
            x_fm = torch.lerp(x, x[torch.as_tensor(perm)], mt)
            mixed_equal += bits_equal(x_fm, x_om)
            mixed_gap.append(max_abs(x_fm, x_om))
            lam_gap.append(abs(lam_fm - lam_om))
            # the noise images themselves, bit for bit
            np_img = om["fmix"].__dict__
            np_img["np"] = Proxy(np, random=TapeNumpyRandom(Tape([("normal", param)])))
            ref = om["fmix"].make_low_freq_image(3, (h, w))[0]
            mine = mixes.fourier_low_freq_image(h, w, 3.0, TapeGenerator(Tape([("normal",
                                                                               param[0])])))
            img_equal += bool(np.array_equal(ref, mine))
            if fmix_original is not None:
                fmix_original.np = Proxy(np, random=TapeNumpyRandom(Tape([("normal", param)])))
                orig_equal += bool(np.array_equal(fmix_original.make_low_freq_image(3, (h, w))[0],
                                                  ref))
            # fastmix before: the isotropic reading of the same draw, binarised the same way
            before = _isotropic_low_freq_image(h, w, 3.0, param[0])
            keep_before = mixes.binarise_top(before, lam, TapeGenerator(Tape([("random", u)])))
            before_px.append(float((keep_before != keep_fm).mean()))
            half = TapeGenerator(Tape([("random", u), ("random", u)]))
            before_half.append(float((mixes.binarise_top(before, 0.5, half)
                                      != mixes.binarise_top(mine, 0.5, half)).mean()))
            for store, im in ((hi_energy_ref, ref), (hi_energy_before, before)):
                s = np.abs(np.fft.fft2(im - im.mean())) ** 2
                kx = np.abs(np.fft.fftfreq(w) * w)[None, :]
                store.append(float(s[np.broadcast_to(kx >= 2, s.shape)].sum() / s.sum()))
        out[f"{h}x{w}"] = {
            "draws": draws,
            "noise_image_bit_identical": img_equal,
            "openmixup_equals_original_fmix": orig_equal if fmix_original is not None else None,
            "mask_identical": mask_equal,
            "mixed_images_bit_identical": mixed_equal,
            "mixed_max_abs_diff": max(mixed_gap),
            "label_lam_max_abs_diff (kept area vs sampled λ)": max(lam_gap),
            "bound 1/HW": 1.0 / (h * w),
            "before_fix_mean_fraction_of_mask_pixels_differing (lam ~ Beta(0.2, 0.2))": float(
                np.mean(before_px)),
            "before_fix_max_fraction_of_mask_pixels_differing": float(np.max(before_px)),
            "before_fix_mean_fraction_of_mask_pixels_differing at lam 0.5": float(
                np.mean(before_half)),
            "noise_energy_at_>=2_cycles_across_width: FMix code": float(np.mean(hi_energy_ref)),
            "noise_energy_at_>=2_cycles_across_width: fastmix before": float(
                np.mean(hi_energy_before)),
        }
    return out


# ---- GridMix ------------------------------------------------------------------------------------
def _gridmix_clamped(height, width, lam, rng, n_holes=(2, 6), hole_aspect_ratio=(1.0, 1.0),
                     cut_area_ratio=(0.5, 1.0), cut_aspect_ratio=(0.5, 2.0)):
    """fastmix's GridMix before this comparison (kept here only to measure it): the crop
    clamped to the image (``cut_w <= W`` first, then ``cut_h = min(int(cut_w * aspect), H)``)."""
    n = int(rng.integers(n_holes[0], n_holes[1] + 1))
    har = float(rng.uniform(*hole_aspect_ratio))
    car = float(rng.uniform(*cut_area_ratio))
    cas = float(rng.uniform(*cut_aspect_ratio))
    cut_w = min(int(math.sqrt(int(height * width * car) / cas)), width)
    cut_h = min(int(cut_w * cas), height)
    if not 1 <= n <= cut_w // 2:
        raise ValueError("too small")
    x0 = int((width - cut_w) * rng.random())
    y0 = int((height - cut_h) * rng.random())
    pw = math.ceil(cut_w / n)
    ph = max(int(pw * har), 2)
    ratio = math.sqrt(1.0 - lam)
    hw = min(max(int(pw * ratio), 1), pw - 1)
    hh = min(max(int(ph * ratio), 1), ph - 1)
    cols = np.arange(width) - x0
    rows = np.arange(height) - y0
    in_c = (cols >= 0) & (cols < cut_w) & (np.mod(cols, pw) < hw)
    in_r = (rows >= 0) & (rows < cut_h) & (np.mod(rows, ph) < hh)
    m = (in_r[:, None] & in_c[None, :]).astype(np.float64)
    return m, 1.0 - float(m.mean())


def _grid_marks_no_wrap(length, start, extent, patch, hole):
    """``mixes._grid_marks`` with the crop clipped at the image instead of wrapped: a slice
    that starts before the image starts at 0 (to measure how much of OpenMixup's behaviour is
    the wrap-around alone)."""
    marks = np.zeros(length, dtype=bool)
    for k in range(math.ceil(extent / patch) + 1):
        a = min(k * patch, extent)
        marks[max(start + a, 0):max(start + min(a + hole, extent), 0)] = True
    return marks


def gridmix_no_wrap(*args, **kwargs):
    from fastmix import mixes
    saved = mixes._grid_marks
    mixes._grid_marks = _grid_marks_no_wrap
    try:
        return mixes.gridmix_mask(*args, **kwargs)
    finally:
        mixes._grid_marks = saved


def measure_gridmix(om, draws, seed):
    import torch
    from fastmix import mixes
    out = {}
    for size, n_draws in ((32, draws), (64, max(draws // 4, 1)), (224, max(draws // 20, 1))):
        rng = np.random.default_rng(seed + size)
        h = w = size
        cases = {k: {"draws": 0, "mask_identical": 0, "lam_identical": 0, "px": [], "dlam": [],
                     "before_identical": 0, "before_px": [], "before_dlam": [],
                     "mixed_bit_identical": 0, "nowrap_identical": 0, "nowrap_px": [],
                     "nowrap_dlam": []}
                 for k in ("inside", "tall", "wide")}
        for _ in range(n_draws):
            lam = float(rng.beta(0.2, 0.2))
            nh = int(rng.integers(2, 7))
            har = float(rng.uniform(1.0, 1.0))
            car, cas = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 2.0))
            u1, u2 = float(rng.random()), float(rng.random())
            perm = derangement(rng, 2)
            cut_w = int(np.sqrt(int(h * w * car) / cas))
            cut_h = int(cut_w * cas)
            case = "wide" if cut_w > w else "tall" if cut_h > h else "inside"
            values = [("beta", lam), ("int", nh), ("uniform", har), ("uniform", car),
                      ("uniform", cas), ("random", u1), ("random", u2)]
            x = batch(rng, 2, 1, h, w)
            script(om["gridmix"], Tape(values, [perm]))
            with cuda_is_identity():
                (x_om, mask_om), (_, _, lam_om) = om["gridmix"].gridmix(
                    x.clone(), torch.arange(2), alpha=0.2, n_holes=(2, 6),
                    hole_aspect_ratio=1.0, cut_area_ratio=(0.5, 1), cut_aspect_ratio=(0.5, 2),
                    return_mask=True)
            mask_om = mask_om[0, 0].numpy().astype(np.float64)
            ftape = Tape(values[1:])
            m, lam_fm = mixes.gridmix_mask(h, w, lam, TapeGenerator(ftape))
            mb, lam_b = _gridmix_clamped(h, w, lam, TapeGenerator(Tape(values[1:])))
            mc, lam_c = gridmix_no_wrap(h, w, lam, TapeGenerator(Tape(values[1:])))
            c = cases[case]
            c["draws"] += 1
            c["mask_identical"] += bool(np.array_equal(m, mask_om))
            c["lam_identical"] += bool(abs(lam_fm - float(lam_om)) < 1e-6)
            c["px"].append(float((m != mask_om).mean()))
            c["dlam"].append(abs(lam_fm - float(lam_om)))
            c["before_identical"] += bool(np.array_equal(mb, mask_om))
            c["before_px"].append(float((mb != mask_om).mean()))
            c["before_dlam"].append(abs(lam_b - float(lam_om)))
            c["nowrap_identical"] += bool(np.array_equal(mc, mask_om))
            c["nowrap_px"].append(float((mc != mask_om).mean()))
            c["nowrap_dlam"].append(abs(lam_c - float(lam_om)))
            mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
            x_fm = torch.lerp(x, x[torch.as_tensor(perm)], mt)
            c["mixed_bit_identical"] += bits_equal(x_fm, x_om)
        res = {"draws": n_draws}
        for k, c in cases.items():
            d = c.pop("draws")
            if not d:
                res[k] = {"fraction_of_draws": 0.0}
                continue
            res[k] = {
                "fraction_of_draws": d / n_draws,
                "now: mask_identical": c["mask_identical"] / d,
                "now: mixed_images_bit_identical": c["mixed_bit_identical"] / d,
                "now: mean_fraction_of_pixels_differing": float(np.mean(c["px"])),
                "now: mean_abs_lam_diff": float(np.mean(c["dlam"])),
                "before (clamped): mask_identical": c["before_identical"] / d,
                "before (clamped): mean_fraction_of_pixels_differing": float(
                    np.mean(c["before_px"])),
                "before (clamped): max_fraction_of_pixels_differing": float(np.max(c["before_px"])),
                "before (clamped): mean_abs_lam_diff": float(np.mean(c["before_dlam"])),
                "before (clamped): max_abs_lam_diff": float(np.max(c["before_dlam"])),
                "crop clipped, not wrapped: mask_identical": c["nowrap_identical"] / d,
                "crop clipped, not wrapped: mean_fraction_of_pixels_differing": float(
                    np.mean(c["nowrap_px"])),
                "crop clipped, not wrapped: mean_abs_lam_diff": float(np.mean(c["nowrap_dlam"])),
            }
        out[f"{h}x{w}"] = res
    return out


# ---- Mixup, CutMix, ResizeMix, SmoothMix --------------------------------------------------------
def measure_mixup(om, draws, seed):
    import torch
    from fastmix.functional import mixup_images
    rng = np.random.default_rng(seed)
    equal, gap = 0, []
    for _ in range(draws):
        n = int(rng.integers(2, 9))
        lam = float(rng.beta(1.0, 1.0))
        perm = rng.permutation(n)
        x = batch(rng, n, 3, 8, 8)
        script(om["mixup"], Tape([], [perm]))
        with cuda_is_identity():
            x_om, (_, _, lam_om) = om["mixup"].mixup(x.clone(), torch.arange(n), lam=lam)
        x_fm = mixup_images(x, torch.as_tensor(perm), lam, fused=False)
        equal += bits_equal(x_fm, x_om)
        gap.append(max_abs(x_fm, x_om))
    return {"draws": draws, "mixed_images_bit_identical": equal, "max_abs_diff": max(gap),
            "lam_passed_through": True}


def measure_cutmix(om, draws, seed):
    import torch
    from fastmix.functional import cutmix_box, cutmix_images
    rng = np.random.default_rng(seed)
    res = {}
    for h, w in ((32, 32), (28, 28), (24, 20)):
        box_eq = img_eq = lam_eq = 0
        for _ in range(draws):
            n = 4
            lam = float(rng.beta(0.2, 0.2))
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            perm = derangement(rng, n)
            x = batch(rng, n, 3, h, w)
            script(om["cutmix"], Tape([("int", cy), ("int", cx)], [perm]))
            with cuda_is_identity():
                (x_om, mask_om), (_, _, lam_om) = om["cutmix"].cutmix(
                    x.clone(), torch.arange(n), lam=lam, return_mask=True)
            y0, y1, x0, x1, lam_fm = cutmix_box(h, w, lam, TapeGenerator(
                Tape([("int", cy), ("int", cx)])))
            want = np.zeros((h, w))
            want[y0:y1, x0:x1] = 1
            box_eq += bool(np.array_equal(want, mask_om[0, 0].numpy()))
            x_fm = cutmix_images(x, torch.as_tensor(perm), (y0, y1, x0, x1))
            img_eq += bits_equal(x_fm, x_om)
            lam_eq += lam_fm == float(lam_om)
        res[f"{h}x{w}"] = {"draws": draws, "box_identical": box_eq,
                           "mixed_images_bit_identical": img_eq, "lam_identical": lam_eq}
    # the side ratio: OpenMixup np.sqrt(1 - λ), fastmix (1 - λ) ** 0.5: same float?
    lams = np.random.default_rng(seed + 1).random(1_000_000)
    root = np.sqrt(1.0 - lams)
    power = np.array([(1.0 - float(v)) ** 0.5 for v in lams])
    res["1e6 uniform lams: np.sqrt(1 - lam) != (1 - lam) ** 0.5"] = int((root != power).sum())
    for size in (28, 32, 64, 224):
        res[f"1e6 uniform lams: int({size} * ratio) differs"] = int(
            (np.floor(size * root) != np.floor(size * power)).sum())
    return res


def measure_resizemix(om, draws, seed):
    """OpenMixup's ``resizemix`` pastes into ``img[:, :, bby1:bby2, bbx1:bbx2]``, its rows from
    its *second* ``randint`` (unlike its ``cutmix``); fastmix's first draw is the row. Both
    orders are fed to fastmix: the same tape, and the two centre draws swapped."""
    import torch
    from fastmix import mixes
    rng = np.random.default_rng(seed)
    res = {}
    for h, w in ((32, 32), (28, 28)):
        counts = {"same order": [0, 0, []], "centre draws swapped": [0, 0, []]}
        redraws = 0
        for _ in range(draws):
            n = 4
            tau0 = float(rng.beta(1.0, 1.0))
            values = [("beta", tau0)]
            if not 0.1 <= tau0 <= 0.8:
                values.append(("uniform", float(rng.uniform(0.1, 0.8))))
                redraws += 1
            k1, k2 = int(rng.integers(0, h)), int(rng.integers(0, w))
            perm = derangement(rng, n)
            x = batch(rng, n, 3, h, w)
            script(om["resizemix"], Tape(values + [("int", k1), ("int", k2)], [perm]))
            with cuda_is_identity():
                x_om, (_, _, lam_om) = om["resizemix"].resizemix(
                    x.clone(), torch.arange(n), scope=(0.1, 0.8), alpha=1.0, use_alpha=True)
            for label, order in (("same order", (k1, k2)), ("centre draws swapped", (k2, k1))):
                g = TapeGenerator(Tape(values + [("int", order[0]), ("int", order[1])]))
                tau = mixes.resizemix_tau(g, 1.0)
                y0, y1, x0, x1, lam_fm = mixes.resizemix_box(h, w, tau, g)
                x_fm = mixes.resizemix_images(x, torch.as_tensor(perm), (y0, y1, x0, x1))
                c = counts[label]
                c[0] += bits_equal(x_fm, x_om)
                c[1] += lam_fm == float(lam_om)
                c[2].append(max_abs(x_fm, x_om))
        res[f"{h}x{w}"] = {"draws": draws, "tau_redrawn_uniformly": redraws}
        for label, (img_eq, lam_eq, gap) in counts.items():
            res[f"{h}x{w}"][label] = {"mixed_images_bit_identical": img_eq,
                                      "lam_identical": lam_eq, "max_abs_diff": max(gap)}
    return res


def measure_smoothmix(om, draws, seed):
    import torch
    from fastmix import mixes
    rng = np.random.default_rng(seed)
    h = w = 32
    same_order = swapped = 0
    gap_same, gap_swapped, label_gap = [], [], []
    for _ in range(draws):
        n = 4
        k1, k2 = int(rng.integers(0, h)), int(rng.integers(0, w))
        u = float(np.float32(rng.random()))       # torch.rand(1) is float32
        perm = derangement(rng, n)
        x = batch(rng, n, 3, h, w)
        values = [("beta", 0.5), ("int", k1), ("int", k2), ("random", u)]
        script(om["smoothmix"], Tape(values, [perm]))
        with cuda_is_identity():
            (x_om, kernel), (_, _, lam_om) = om["smoothmix"].smoothmix(
                x.clone(), torch.arange(n), alpha=1.0, return_mask=True)
        k_om = kernel[0, 0].double().numpy()
        m_same, lam_fm = mixes.smoothmix_mask(h, w, TapeGenerator(Tape(values[1:])))
        m_swap, lam_sw = mixes.smoothmix_mask(h, w, TapeGenerator(
            Tape([("int", k2), ("int", k1), ("random", u)])))
        gap_same.append(float(np.abs(m_same - k_om).max()))
        gap_swapped.append(float(np.abs(m_swap - k_om).max()))
        same_order += bool(np.abs(m_same - k_om).max() < 1e-5)
        swapped += bool(np.abs(m_swap - k_om).max() < 1e-5)
        # OpenMixup's λ (the weight it gives y_a) against fastmix's: 1 - mean of the blob
        label_gap.append(abs(float(lam_om) - (1.0 - lam_sw)))
    return {"draws": draws, "image": "32x32",
            "blob_within_1e-5: draws fed in the same order": same_order,
            "blob_within_1e-5: the two centre draws swapped": swapped,
            "max_abs_diff: same order": max(gap_same),
            "max_abs_diff: swapped": max(gap_swapped),
            "openmixup_lam_minus_(1 - fastmix_lam): max abs": max(label_gap),
            "note": "OpenMixup's first torch.randint is the column of the centre, fastmix's "
                    "first draw the row; OpenMixup labels y_a with mean(kernel), the partner's "
                    "share"}


# ---- SaliencyMix --------------------------------------------------------------------------------
def measure_saliency_box(om, draws, seed):
    """OpenMixup's box logic on a known saliency map (the detector stubbed to return it)
    against fastmix's saliency_box on the same map."""
    import torch
    from fastmix import mixes
    rng = np.random.default_rng(seed)
    res = {}
    for h, w in ((32, 32), (28, 28), (24, 20)):
        box_eq = img_eq = 0
        lam_gap = []
        for _ in range(draws):
            n = 4
            lam = float(rng.beta(0.2, 0.2))
            # levels (k + 0.5) / 255: OpenMixup's uint8 cast keeps k, so both argmaxes see the
            # same ties and take the first maximum in row-major order
            sal = ((rng.integers(0, 200, (h, w)) + 0.5) / 255).astype(np.float32)
            py, px = int(rng.integers(0, h)), int(rng.integers(0, w))
            sal[py, px] = 254.5 / 255
            perm = derangement(rng, n)
            x = batch(rng, n, 3, h, w)
            FakeSaliencyDetector.next_map = sal
            script(om["saliencymix"], Tape([], [perm]))
            with cuda_is_identity():
                (x_om, mask_om), (_, _, lam_om) = om["saliencymix"].saliencymix(
                    x.clone(), torch.arange(n), lam=lam, return_mask=True)
            box, lam_fm = mixes.saliency_box(torch.from_numpy(sal), lam)
            y0, y1, x0, x1 = box.tolist()
            want = np.zeros((h, w))
            want[y0:y1, x0:x1] = 1
            box_eq += bool(np.array_equal(want, mask_om[0, 0].numpy()))
            from fastmix.functional import cutmix_images
            img_eq += bits_equal(cutmix_images(x, torch.as_tensor(perm), box), x_om)
            lam_gap.append(abs(float(lam_fm) - float(lam_om)))
        res[f"{h}x{w}"] = {"draws": draws, "box_identical": box_eq,
                           "mixed_images_bit_identical": img_eq,
                           "lam_max_abs_diff (float32 vs float64)": max(lam_gap)}
    return res


def load_fmnist(n, data_dir=None):
    """The first ``n`` Fashion-MNIST test images, ``uint8`` [n, 28, 28] (IDX, gzip)."""
    from fastmix.data.datasets import FASHION_MNIST_DIR
    path = os.path.join(data_dir or FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found (Debian's dataset-fashion-mnist, or --data-dir)")
    with gzip.open(path) as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise SystemExit(f"{path}: not an IDX image file")
    count, rows, cols = (int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in (1, 2, 3))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)[:n].copy()


def on_canvas(images, size, seed):
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    canvas = np.zeros((n, size, size), np.uint8)
    pos = rng.integers(0, size - h + 1, size=(n, 2))
    for i, (py, px) in enumerate(pos):
        canvas[i, py:py + h, px:px + w] = images[i]
    return canvas


def peak_stats(peaks, h, w, objects=None):
    peaks = np.asarray(peaks)
    by, bx = 0.1 * h, 0.1 * w
    near = ((peaks[:, 0] < by) | (peaks[:, 0] >= h - by)
            | (peaks[:, 1] < bx) | (peaks[:, 1] >= w - bx))
    edge = ((peaks[:, 0] == 0) | (peaks[:, 0] == h - 1)
            | (peaks[:, 1] == 0) | (peaks[:, 1] == w - 1))
    dist = np.hypot(peaks[:, 0] - (h - 1) / 2, peaks[:, 1] - (w - 1) / 2)
    out = {"within_10%_of_border": float(near.mean()), "on_the_edge_pixel": float(edge.mean()),
           "mean_distance_from_centre_px": float(dist.mean())}
    if objects is not None:
        out["on_the_object (within 2 px of its pixels)"] = float(
            objects[np.arange(len(peaks)), peaks[:, 0], peaks[:, 1]].mean())
    return out


def kept_box_ratio(peaks, h, w, lams):
    from fastmix.mixes import clip_box
    kept = []
    for (cy, cx), lam in zip(peaks, lams):
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        if cut_h // 2 == 0 or cut_w // 2 == 0:
            continue
        y0, y1, x0, x1 = clip_box(int(cy), int(cx), cut_h, cut_w, h, w)
        kept.append((y1 - y0) * (x1 - x0) / ((cut_h // 2 * 2) * (cut_w // 2 * 2)))
    return float(np.mean(kept))


def measure_saliency_peaks(opencv_python, n_images, seed, data_dir=None):
    import torch
    import torch.nn.functional as F
    from fastmix import mixes
    small = load_fmnist(n_images, data_dir)
    sets = {"fashion-mnist 28x28": small, "on a 64x64 black canvas": on_canvas(small, 64, seed)}
    lam_rng = np.random.default_rng(seed)
    lams = {"lam 0.5": np.full(n_images, 0.5), "lam ~ Beta(0.2, 0.2)": lam_rng.beta(0.2, 0.2,
                                                                                   n_images)}
    res = {"images": n_images, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        for name, imgs in sets.items():
            h, w = imgs.shape[-2:]
            objects = None
            if "canvas" in name:
                nz = torch.from_numpy(imgs > 0).float()[:, None]
                objects = (F.max_pool2d(nz, 5, 1, 2)[:, 0] > 0).numpy()
            peaks = {}
            x = (torch.from_numpy(imgs).float() / 255 - FMNIST_MEAN) / FMNIST_STD
            for label, pad in (("fastmix before (periodic FFT)", 0),
                               ("fastmix now (reflect padding)", None)):
                pk = []
                for im in x:
                    s = mixes.spectral_residual_saliency(im[None].expand(3, h, w), pad=pad)
                    p = int(torch.argmax(s))
                    pk.append((p // w, p % w))
                peaks[label] = np.array(pk)
            if opencv_python:
                src, dst = os.path.join(tmp, "in.npy"), os.path.join(tmp, "out.npz")
                np.save(src, imgs)
                subprocess.run([opencv_python, os.path.abspath(__file__), "--opencv-child", src,
                                dst], check=True)
                cv = np.load(dst)
                res["opencv_version"] = str(cv["version"])
                labels = {"sr_u8": "OpenCV spectral residual (uint8 image)",
                          "fg_u8": "OpenCV fine-grained (uint8 image)",
                          "fg_u8_q": "OpenCV fine-grained, uint8 image, OpenMixup's uint8 argmax",
                          "fg_norm_q": "OpenCV fine-grained on the normalised float image, "
                                       "OpenMixup's uint8 argmax (what OpenMixup runs)"}
                for k, label in labels.items():
                    peaks[label] = cv[k]
            res[name] = {}
            a, b = peaks["fastmix before (periodic FFT)"], peaks["fastmix now (reflect padding)"]
            res[name]["fastmix: peak moved by the padding"] = {
                "fraction_of_images": float((a != b).any(1).mean()),
                "mean_shift_px": float(np.hypot(*(a - b).T).mean())}
            fine = peaks.get("OpenCV fine-grained (uint8 image)")
            for label, pk in peaks.items():
                st = peak_stats(pk, h, w, objects)
                if fine is not None:
                    st["mean_distance_to_the_fine-grained_peak_px"] = float(
                        np.hypot(*(np.asarray(pk) - fine).T).mean())
                for lname, lam in lams.items():
                    st[f"kept box area / intended, {lname}"] = kept_box_ratio(pk, h, w, lam)
                res[name][label] = st
    return res


def opencv_child(src, dst):
    """Run in the OpenCV venv (numpy and cv2 only): the peaks of OpenCV's detectors."""
    import cv2
    imgs = np.load(src)
    out = {"version": np.array(cv2.__version__)}
    keys = ("sr_u8", "fg_u8", "fg_u8_q", "fg_norm_q")
    peaks = {k: [] for k in keys}
    for im in imgs:
        ok, sr = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(im)
        ok2, fg = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(im)
        norm = ((im.astype(np.float32) / 255 - FMNIST_MEAN) / FMNIST_STD)[..., None]
        ok3, fgn = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(norm)
        if not (ok and ok2 and ok3):
            raise SystemExit("an OpenCV saliency detector failed")
        for k, m in (("sr_u8", sr), ("fg_u8", fg)):
            peaks[k].append(np.unravel_index(np.argmax(m), m.shape))
        for k, m in (("fg_u8_q", fg), ("fg_norm_q", fgn)):
            q = (m * 255).astype("uint8")          # OpenMixup's cast before its argmax
            peaks[k].append(np.unravel_index(np.argmax(q), q.shape))
    out.update({k: np.array(v) for k, v in peaks.items()})
    np.savez(dst, **out)


# ---- main ---------------------------------------------------------------------------------------
def versions():
    import torch
    return {"python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--openmixup", metavar="DIR",
                   help="OpenMixup's checkout or a folder with its augments/*.py (required)")
    p.add_argument("--fmix", metavar="FILE", help="the original FMix fmix.py (optional)")
    p.add_argument("--opencv-python", metavar="PY",
                   help="a Python with opencv-contrib-python-headless, for the saliency peaks")
    p.add_argument("--draws", type=int, default=2000, help="scripted draws per case")
    p.add_argument("--images", type=int, default=1000, help="Fashion-MNIST test images")
    p.add_argument("--data-dir", metavar="DIR",
                   help="Fashion-MNIST's folder (default: fastmix's, Debian's package path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--opencv-child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.opencv_child:
        opencv_child(*args.opencv_child)
        return 0
    if not args.openmixup:
        p.error("--openmixup DIR is required: this script measures fastmix against OpenMixup's "
                "own code, run beside the project from a folder outside it "
                "(see the docstring: python bench/fidelity.py --help)")
    if not os.path.isdir(args.openmixup):
        p.error(f"--openmixup {args.openmixup}: not a directory")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    om, blobs = load_openmixup(args.openmixup)
    fmix_original = None
    if args.fmix:
        fmix_original = load_file(os.path.abspath(args.fmix), "fmix_original_oracle",
                                  _stub_modules())
        blobs["original fmix.py"] = git_blob_id(args.fmix)
    results = {"versions": versions(), "openmixup_git_blobs": blobs, "draws": args.draws,
               "seed": args.seed}
    n = args.draws
    steps = (("mixup", lambda: measure_mixup(om, n, args.seed)),
             ("cutmix", lambda: measure_cutmix(om, n, args.seed)),
             ("resizemix", lambda: measure_resizemix(om, n, args.seed)),
             ("smoothmix", lambda: measure_smoothmix(om, n, args.seed)),
             ("fmix", lambda: measure_fmix(om, fmix_original, n, args.seed)),
             ("gridmix", lambda: measure_gridmix(om, n, args.seed)),
             ("saliencymix_box", lambda: measure_saliency_box(om, n, args.seed)),
             ("saliencymix_peaks", lambda: measure_saliency_peaks(
                 args.opencv_python, args.images, args.seed, args.data_dir)))
    for name, run in steps:
        results[name] = run()
        print(f"== {name}\n{json.dumps(results[name], indent=1)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
