#!/usr/bin/env python
"""Mask diagnostics of a study grid: how each method's masks treat the objects they mix.

    python bench/mask_diagnostics.py --study runs/study-mismatch      # after bench/accuracy.py

For every mixing method of the grid that blends two images through a pixel mask (Mixup, CutMix,
SaliencyMix, AutoMix; FMix, GridMix, SmoothMix, ResizeMix's box where present), on the same
``--pairs`` test images of the study's dataset, each paired with a partner from a fixed
derangement inside batches of the training batch size, with the method's own λ draws (its α,
one λ per batch as in training) and, for AutoMix, the trained Mix Block of the ``--seed`` run:

- ``softness``: mean 4m(1−m) (1 = a flat 50/50 blend, 0 = binary);
- ``area_err``: |kept area of the image − λ|, λ the weight its label gets;
- ``survival_a`` / ``survival_b``: the share of each image's object (its non-zero pixels: the
  datasets here have black backgrounds) that the mask keeps from it, for the image and for its
  partner;
- ``label_mismatch``: |s_a / (s_a + s_b) − λ|: how far the label weight is from the share of
  the two objects the mixed image shows (0 for Mixup by construction);
- ``label_on_missing_object``: the fraction of samples where an image whose label weight is at
  least 0.25 keeps less than 10 % of its object (the label names something the image lost).

PuzzleMix is left out: it moves pixels (its transport), so no mask describes its sample. Writes
``OUT/mask_diagnostics.json`` (with the provenance of ``bench/accuracy.py``), ``.md`` and
``OUT/mask_diagnostics.png`` (each method's mask and mixed image on the first test pairs).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

BOXES = ("cutmix", "saliencymix", "fmix", "gridmix", "smoothmix", "resizemix")
MASKED = ("mixup",) + BOXES + ("automix",)


def derangement(n, g):
    """A permutation of ``n`` without fixed points (n >= 2), from the torch generator ``g``."""
    while True:
        p = torch.randperm(n, generator=g)
        if not (p == torch.arange(n)).any():
            return p


def load_run(folder):
    """``(cfg, model)`` of a finished run (its last.pt), in eval mode on the CPU."""
    from fastmix.checkpoint import load_checkpoint
    from fastmix.config import config_from_dict
    from fastmix.data import load_dataset
    from fastmix.engine import build_model
    state = load_checkpoint(os.path.join(folder, "last.pt"))
    cfg = config_from_dict(state["config"])
    probe = load_dataset(cfg.dataset, cfg.data_dir, train=False)
    model = build_model(cfg, probe.images.shape[1], probe.num_classes)
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def weights_of_a(method, x, index, lam_draw, model=None, rng=None):
    """``(m_a [N, 1, H, W], λ [N])``: the weight of each image (``x``'s, normalised) in its
    mixed sample, and its label weight, for one batch with one λ as the method draws it."""
    from fastmix import mixes
    n, _, h, w = x.shape
    if method == "mixup":
        return torch.full((n, 1, h, w), lam_draw), torch.full((n,), lam_draw)
    if method in ("cutmix", "saliencymix"):
        if method == "cutmix":
            from fastmix.functional import cutmix_box
            y0, y1, x0, x1, lam = cutmix_box(h, w, lam_draw, rng)
        else:   # one box per batch, centred on the first partner's saliency peak (as training)
            box, lam = mixes.saliency_box(mixes.spectral_residual_saliency(x[index[0]]), lam_draw)
            y0, y1, x0, x1 = (int(v) for v in box)
            lam = float(lam)
        m = torch.ones(n, 1, h, w)
        m[:, :, y0:y1, x0:x1] = 0.0
        return m, torch.full((n,), float(lam))
    if method == "automix":
        from fastmix.methods.automix import _tap_and_final
        with torch.no_grad():
            z = _tap_and_final(model.backbone_k(x))[0]
            logits = model.mix_block.mask_logits(z, lam_draw, index, fused=False)
            m = model.mix_block.mask_from_logits(logits, (h, w))[:, :1]
        return m, torch.full((n,), lam_draw)
    raise ValueError(method)


def measure(m, lam, fg_a, fg_b):
    """Per-sample diagnostics of masks ``m`` (image a's weight) and label weights ``lam``."""
    flat = lambda t: t.flatten(1).float()   # noqa: E731
    m, fa, fb = flat(m), flat(fg_a), flat(fg_b)
    s_a = (m * fa).sum(1) / fa.sum(1).clamp_min(1)
    s_b = ((1 - m) * fb).sum(1) / fb.sum(1).clamp_min(1)
    share = s_a / (s_a + s_b).clamp_min(1e-6)
    missing = ((lam >= 0.25) & (s_a < 0.1)) | ((1 - lam >= 0.25) & (s_b < 0.1))
    return {"softness": (4 * m * (1 - m)).mean(1), "area_err": (m.mean(1) - lam).abs(),
            "survival_a": s_a, "survival_b": s_b, "label_mismatch": (share - lam).abs(),
            "label_on_missing_object": missing.float(), "lam": lam}


def diagnose(study, methods, seed, pairs, batch):
    """{method: {metric: mean}} and the first batch's masks for the picture."""
    from fastmix.data import load_dataset
    from fastmix.config import DEFAULT_ALPHA
    from fastmix.checkpoint import load_checkpoint
    from fastmix.config import config_from_dict
    folder = lambda m: os.path.join(study, m, f"seed{seed}")   # noqa: E731
    cfgs = {m: config_from_dict(load_checkpoint(os.path.join(folder(m), "last.pt"))["config"])
            for m in methods}
    cfg = cfgs[methods[0]]
    test = load_dataset(cfg.dataset, cfg.data_dir, train=False).subset(pairs, 0)
    raw = test.images
    x_all = (raw.float() / 255 - torch.tensor(test.mean).view(1, -1, 1, 1)) / \
        torch.tensor(test.std).view(1, -1, 1, 1)
    fg_all = raw.amax(1, keepdim=True) > 0
    out, pictures = {}, {}
    for method in methods:
        model = load_run(folder(method))[1] if method == "automix" else None
        alpha = cfgs[method].alpha or DEFAULT_ALPHA[method]
        g = torch.Generator().manual_seed(0)                   # the same pairs for every method
        lam_rng = np.random.default_rng(1000 + seed)           # the method's own λ, seeded
        box_rng = np.random.default_rng(2000 + seed)           # CutMix's box centres
        stats = []
        for start in range(0, len(raw) - batch + 1, batch):
            sl = slice(start, start + batch)
            index = derangement(batch, g)
            lam = float(lam_rng.beta(alpha, alpha))
            m, lam_t = weights_of_a(method, x_all[sl], index, lam, model, box_rng)
            fg = fg_all[sl]
            stats.append(measure(m, lam_t, fg, fg[index]))
            if start == 0:
                x = x_all[sl]
                pictures[method] = (m[:8], (m * x + (1 - m) * x[index])[:8], index[:8], lam)
        merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
        out[method] = {k: float(v.mean()) for k, v in merged.items()}
        out[method]["alpha"] = alpha
        out[method]["samples"] = len(merged["lam"])
    return out, pictures, x_all[:batch]


def plot(pictures, first, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(pictures)
    n = 8
    index = next(iter(pictures.values()))[2]
    rows = 2 + 2 * len(methods)
    fig, axes = plt.subplots(rows, n, figsize=(n * 1.1, rows * 1.15), dpi=100)
    show = lambda ax, img, cmap="gray", vmin=None, vmax=None: (  # noqa: E731
        ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax), ax.set_xticks([]), ax.set_yticks([]))
    for j in range(n):
        show(axes[0, j], first[j, 0])
        show(axes[1, j], first[index[j], 0])
        for i, mth in enumerate(methods):
            m, mixed, _, _ = pictures[mth]
            show(axes[2 + 2 * i, j], m[j, 0], "viridis", 0, 1)
            show(axes[3 + 2 * i, j], mixed[j, 0])
    axes[0, 0].set_ylabel("image a", fontsize=7)
    axes[1, 0].set_ylabel("partner b", fontsize=7)
    for i, mth in enumerate(methods):
        axes[2 + 2 * i, 0].set_ylabel(f"{mth}\nmask of a\nλ={pictures[mth][3]:.2f}", fontsize=6)
        axes[3 + 2 * i, 0].set_ylabel(f"{mth} mixed", fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def markdown(results, meta):
    lines = [f"Mask diagnostics on {meta['pairs']} test pairs of `{meta['dataset']}` (seed "
             f"{meta['seed']} runs; each method's own α, one λ per batch of {meta['batch']}): "
             "means over samples.", "",
             "| method | α | softness | abs(area − λ) | object kept of a | object kept of b | "
             "label mismatch | label on a missing object |", "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['alpha']:g} | {r['softness']:.3f} | {r['area_err']:.3f} | "
                     f"{r['survival_a']:.3f} | {r['survival_b']:.3f} | {r['label_mismatch']:.3f} | "
                     f"{100 * r['label_on_missing_object']:.1f} % |")
    lines += ["", "softness: mean 4m(1−m), 1 = a flat 50/50 blend, 0 = binary. object kept: the "
              "share of an image's object pixels the mask keeps from it. label mismatch: "
              "abs(s_a / (s_a + s_b) − λ). label on a missing object: an image whose label weight "
              "is at least 0.25 keeps under 10 % of its object."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="a bench/accuracy.py output folder")
    p.add_argument("--out", help="where the diagnostics go (default: --study)")
    p.add_argument("--seed", type=int, default=0, help="the runs whose checkpoints are read")
    p.add_argument("--pairs", type=int, default=2000, help="test images (each with a partner)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.study):
        p.error(f"--study: no folder {args.study}")
    if args.pairs < 16:
        p.error("--pairs must be at least 16")
    args.out = args.out or args.study
    methods = [m for m in MASKED if os.path.exists(os.path.join(args.study, m, f"seed{args.seed}",
                                                                "summary.json"))]
    if not methods:
        p.error(f"no finished run of {', '.join(MASKED)} with seed {args.seed} under {args.study}")
    from accuracy import _write_json, provenance
    from fastmix.checkpoint import load_checkpoint
    from fastmix.config import config_from_dict
    cfg = config_from_dict(load_checkpoint(os.path.join(args.study, methods[0], f"seed{args.seed}",
                                                        "last.pt"))["config"])
    batch = cfg.batch_size
    torch.manual_seed(0)
    results, pictures, first = diagnose(args.study, methods, args.seed, args.pairs, batch)
    meta = {"dataset": cfg.dataset, "seed": args.seed, "pairs": args.pairs, "batch": batch}
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "mask_diagnostics.json"),
                {"provenance": provenance(sys.argv[1:] if argv is None else argv,
                                          "bench/mask_diagnostics.py"), **meta,
                 "methods": results}, indent=1)
    with open(os.path.join(args.out, "mask_diagnostics.md"), "w") as f:
        f.write(markdown(results, meta))
    plot(pictures, first, os.path.join(args.out, "mask_diagnostics.png"))
    print(markdown(results, meta))
    return results


if __name__ == "__main__":
    main()
