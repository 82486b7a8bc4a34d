"""PuzzleMix (Kim, Choo, Song, ICML 2020), as OpenMixup's CIFAR benchmark runs it (spec §5).

Per step, for the batch ``x`` and its partner ``x[index]``:

1. **Saliency**: the input gradient of the classifier's clean loss, with the network in eval
   mode (BN running statistics) and no parameter gradient kept: ``s = sqrt(mean_c(∂L/∂x²))``
   (:func:`input_saliency`). An extra forward and backward per step.
2. **Optimal mask** on a ``B x B`` grid of blocks (``B = 2^k``, k uniform in [1, 5), only the
   ``B`` that divide the image): each block takes one of ``n_labels`` mixing levels by a
   multi-label graph cut (α-β swap, ``gco.cut_grid_graph`` from ``gco-wrapper``, on the host)
   of a unary term (the saliency each level gives up, plus a prior that pulls the mean level
   towards λ ~ Beta(α, α)) and a pairwise term (label smoothness β, and the local data
   smoothness γ of the pixels across block borders) (:func:`graphcut_masks`).
3. **Transport**: each image's salient blocks move to where the mask keeps that image, by
   PuzzleMix's greedy assignment on a ``t_size`` grid (:func:`mask_transport`, on the device)
   applied as a block permutation (:func:`transport_blocks`).
4. ``mixed = m x' + (1 - m) x[index]'`` with the mask upsampled (nearest); the label weight of
   ``y`` is each sample's kept area ``λ_i = mean(m_i)`` (a per-sample soft target).

The graph cut needs the unary and pairwise terms on the host, and its labels back: PuzzleMix is
the one method here with device read-backs in the step (one copy each way), so it cannot be
captured in a CUDA graph.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# OpenMixup's CIFAR settings (configs/classification/cifar100/mixups/basic/r18_mixups_CE_none.py)
DEFAULTS = dict(block_num=(1, 5), beta=1.2, gamma=0.5, eta=0.2, neigh_size=4, n_labels=3,
                t_eps=0.8, t_size=4, transport=True)


def _gco():
    try:
        import gco
    except ImportError as e:
        raise ImportError("--method puzzlemix needs the graph-cut package gco-wrapper "
                          "(`pip install gco-wrapper`, or `pip install -e .[puzzlemix]`)") from e
    return gco


def input_saliency(logits_fn, model_modules, x, y):
    """``sqrt(mean over channels of (∂CE/∂x)²)`` per pixel, ``[N, H, W]``, computed with the
    modules in eval mode (then restored) and without touching any parameter's ``.grad``."""
    modes = [m.training for m in model_modules]
    for m in model_modules:
        m.eval()
    try:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            loss = F.cross_entropy(logits_fn(xr).float(), y)
            (grad,) = torch.autograd.grad(loss, xr)
    finally:
        for m, mode in zip(model_modules, modes):
            m.train(mode)
    return torch.sqrt(torch.mean(grad.float() ** 2, dim=1))


def block_choices(width, block_num=(1, 5)):
    """The grid sizes ``2^k`` (k in ``[block_num[0], block_num[1])``) that divide ``width``."""
    out = [2 ** k for k in range(*block_num) if width % (2 ** k) == 0]
    if not out:
        raise ValueError(f"PuzzleMix: no grid of 2^k blocks (k in {list(range(*block_num))}) "
                         f"divides a {width}-pixel image")
    return out


def _neighbour_size(block_size, neigh_size):
    """``min(neigh_size, block size)`` as PuzzleMix, lowered to a divisor of the block size
    when it is not one (PuzzleMix's images are powers of two; 28 px ones are not)."""
    n = min(neigh_size, block_size)
    while block_size % n:
        n -= 1
    return n


def _neigh_penalty(a, b, k):
    """Mean absolute pixel difference across block borders (PuzzleMix's data smoothness)."""
    pw_x = (a[:, :, :-1, :] - b[:, :, 1:, :])[:, :, k - 1::k, :]
    pw_y = (a[:, :, :, :-1] - b[:, :, :, 1:])[:, :, :, k - 1::k]
    return (F.avg_pool2d(pw_x.abs().mean(1), kernel_size=(1, k)),
            F.avg_pool2d(pw_y.abs().mean(1), kernel_size=(k, 1)))


def graph_terms(saliency, x, index, block_num, beta, gamma, neigh_size, mean, std):
    """The graph cut's unary terms (own, partner) ``[N, B, B]`` and pairwise weights
    ``pw_x [N, B-1, B]``, ``pw_y [N, B, B-1]``, on the device (PuzzleMix's construction)."""
    n, _, _, width = x.shape
    block_size = width // block_num
    neigh = _neighbour_size(block_size, neigh_size)
    beta = beta / block_num / 16
    pool = F.avg_pool2d(saliency[:, None], block_size)[:, 0]
    unary1 = pool / pool.reshape(n, -1).sum(1).clamp_min(1e-12).reshape(n, 1, 1)
    unary2 = unary1[index]
    img = x.float() * std + mean
    p1 = F.avg_pool2d(img, neigh)
    p2 = p1[index]
    k = block_size // neigh
    pw = {}
    for (i, j), (a, b) in {(0, 0): (p2, p2), (0, 1): (p2, p1), (1, 0): (p1, p2),
                           (1, 1): (p1, p1)}.items():
        px, py = _neigh_penalty(a, b, k)
        pw[i, j] = (beta * gamma * px, beta * gamma * py)
    px = {key: v[0] for key, v in pw.items()}
    py = {key: v[1] for key, v in pw.items()}
    u1, u2 = unary1.clone(), unary2.clone()
    u2[:, :-1, :] += (px[1, 0] + px[1, 1]) / 2
    u1[:, :-1, :] += (px[0, 1] + px[0, 0]) / 2
    u2[:, 1:, :] += (px[0, 1] + px[1, 1]) / 2
    u1[:, 1:, :] += (px[1, 0] + px[0, 0]) / 2
    u2[:, :, :-1] += (py[1, 0] + py[1, 1]) / 2
    u1[:, :, :-1] += (py[0, 1] + py[0, 0]) / 2
    u2[:, :, 1:] += (py[0, 1] + py[1, 1]) / 2
    u1[:, :, 1:] += (py[1, 0] + py[0, 0]) / 2
    pw_x = (px[1, 0] + px[0, 1] - px[1, 1] - px[0, 0]) / 2
    pw_y = (py[1, 0] + py[0, 1] - py[1, 1] - py[0, 0]) / 2
    return u1, u2, pw_x, pw_y, unary1, beta


def graphcut_mask(cost_keep, cost_give, pw_x, pw_y, lam, beta, eta, n_labels=3, eps=1e-8):
    """One sample's ``[B, B]`` mask in ``{0, 1/(L-1), ..., 1}`` (the weight of its own image).

    Label ``l`` keeps ``1 - t`` of the block, ``t = l / (L - 1)``, and costs ``(1 - t)
    cost_keep + t cost_give + prior_l``: ``cost_keep`` is what keeping the own image gives up
    (the partner's saliency and smoothness terms), ``cost_give`` what giving the block away
    gives up (the own ones) -- PuzzleMix's ``graphcut_multi(unary2, unary1, ...)``. ``prior``
    is ``-log`` of the binomial probability of ``l`` under λ, times ``eta / B²``; the pairwise
    cost is ``(l - l')² / (L - 1)²`` times each edge's weight ``pw + β``."""
    gco = _gco()
    b = cost_keep.shape[0]
    large = 1000 * b ** 2
    if n_labels == 2:
        prior = np.array([-np.log(lam + eps), -np.log(1 - lam + eps)])
    elif n_labels == 3:
        prior = np.array([-np.log(lam ** 2 + eps), -np.log(2 * lam * (1 - lam) + eps),
                          -np.log((1 - lam) ** 2 + eps)])
    elif n_labels == 4:
        prior = np.array([-np.log(lam ** 3 + eps), -np.log(3 * lam ** 2 * (1 - lam) + eps),
                          -np.log(3 * lam * (1 - lam) ** 2 + eps), -np.log((1 - lam) ** 3 + eps)])
    else:
        raise ValueError(f"n_labels must be 2, 3 or 4, got {n_labels}")
    prior = eta * prior / b ** 2
    unary = (large * np.stack([(1 - t) * cost_keep + t * cost_give + prior[i]
                               for i, t in enumerate(np.linspace(0, 1, n_labels))], -1))
    levels = np.arange(n_labels)
    pairwise = ((levels[:, None] - levels[None, :]) ** 2 / (n_labels - 1) ** 2).astype(np.float32)
    labels = gco.cut_grid_graph(unary.astype(np.int32), pairwise,
                                (large * (pw_x + beta)).astype(np.int32),
                                (large * (pw_y + beta)).astype(np.int32), algorithm="swap")
    return 1.0 - labels.reshape(b, b) / (n_labels - 1)


@functools.lru_cache(maxsize=16)
def _cost_matrix(width):
    """Squared grid distance between blocks, over ``(width - 1)²``: ``[width², width²]``."""
    i = np.arange(width * width)
    r, c = i // width, i % width
    cost = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    return torch.tensor(cost / max(width - 1, 1) ** 2, dtype=torch.float32)


def mask_transport(mask, saliency_pool, eps):
    """PuzzleMix's transport plan ``[N, B², B²]`` (0/1, at most one 1 per row and column):
    block ``i`` of the image moves to block ``j``, greedily trading the move's distance
    (times ``eps``) against the saliency it brings where the mask keeps the image."""
    b = mask.shape[-1]
    c = _cost_matrix(b).to(mask.device)[None]
    z = (mask > 0).float()
    cost = eps * c - saliency_pool.reshape(-1, b * b, 1) * z.reshape(-1, 1, b * b)
    plan_win = None
    for _ in range(b):
        row_best = cost.min(-1)[1]
        plan = torch.zeros_like(cost).scatter_(-1, row_best.unsqueeze(-1), 1)
        fight = plan * cost
        col_best = fight.min(-2)[1]
        plan_win = torch.zeros_like(cost).scatter_(-2, col_best.unsqueeze(-2), 1) * plan
        cost = cost + (1 - plan_win) * plan
    return plan_win


def transport_blocks(img, plan, block_num):
    """Move the ``block_num x block_num`` blocks of ``img`` by ``plan``: output block ``j`` is
    ``sum_i plan[i, j] * block i`` (blocks numbered row-major)."""
    n, ch, h, w = img.shape
    bs = h // block_num
    blocks = img.reshape(n, ch, block_num, bs, block_num, bs).permute(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(n, ch, block_num * block_num, bs, bs)
    moved = torch.einsum("nij,ncihw->ncjhw", plan.to(img.dtype), blocks)
    moved = moved.reshape(n, ch, block_num, block_num, bs, bs).permute(0, 1, 2, 4, 3, 5)
    return moved.reshape(n, ch, h, w)


def puzzle_mix(x, index, saliency, lam, block_num, beta=1.2, gamma=0.5, eta=0.2, neigh_size=4,
               n_labels=3, t_eps=0.8, t_size=4, transport=True, mean=None, std=None):
    """The mixed batch and the per-sample λ ``[N]`` (the kept area of each sample's mask).

    ``mean``/``std`` undo the normalisation for the data-smoothness term (default: CIFAR's
    below 64 px, ImageNet's from 64 px, as OpenMixup; no change for non-RGB inputs)."""
    n, ch, h, width = x.shape
    if h != width:
        raise ValueError(f"PuzzleMix needs square images, got {h} x {width}")
    if mean is None:
        mean, std = ((CIFAR_MEAN, CIFAR_STD) if width < 64 else (IMAGENET_MEAN, IMAGENET_STD)) \
            if ch == 3 else ((0.0,) * ch, (1.0,) * ch)
    mean_t = torch.tensor(mean, device=x.device).view(1, ch, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, ch, 1, 1)
    block_size = width // block_num
    u1, u2, pw_x, pw_y, unary1, beta_n = graph_terms(saliency, x, index, block_num, beta, gamma,
                                                     neigh_size, mean_t, std_t)
    host = [t.detach().cpu().numpy().astype(np.float64) for t in (u1, u2, pw_x, pw_y)]  # read-back
    masks = np.stack([graphcut_mask(host[1][i], host[0][i], host[2][i], host[3][i], lam, beta_n,
                                    eta, n_labels) for i in range(n)])
    mask = torch.tensor(masks, dtype=torch.float32, device=x.device)[:, None]
    x1, x2 = x, x[index]
    if transport:
        ts = min(t_size, block_size)
        if ts < block_size and width % ts == 0:
            t_blocks = width // ts
            mask_t = F.interpolate(mask, size=t_blocks, mode="nearest")
            pool = F.avg_pool2d(saliency[:, None], ts)[:, 0]
            unary1 = pool / pool.reshape(n, -1).sum(1).clamp_min(1e-12).reshape(n, 1, 1)
        else:
            t_blocks, mask_t = block_num, mask
        unary2 = unary1[index]
        plan1 = mask_transport(mask_t, unary1, t_eps)
        plan2 = mask_transport(1 - mask_t, unary2, t_eps)
        x1 = transport_blocks(x1, plan1, t_blocks)
        x2 = transport_blocks(x2, plan2, t_blocks)
    mask = F.interpolate(mask, size=width, mode="nearest")
    lam_i = mask.reshape(n, -1).mean(-1)
    mixed = (mask * x1 + (1 - mask) * x2).to(x.dtype)
    return mixed, lam_i


# ---- the method ------------------------------------------------------------------------------
from fastmix.methods.base import Mixer  # noqa: E402


class PuzzleMix(Mixer):
    """PuzzleMix as a method: it needs the classifier for its saliency, so ``mix`` and
    ``mixer(x, y)`` take ``model=`` (a ``fastmix.methods.Classifier``, or anything with
    ``logits(x)`` and a ``backbone`` and ``head``); λ is per sample (each image's kept area)."""
    name = "puzzlemix"
    default_alpha = 1.0
    capturable = False      # its grid size is a host draw and its graph cut reads the device
    needs = ("model",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _gco()                  # a clear ImportError now, not at the first step

    def draw(self, x):
        """λ (the graph cut's prior), the permutation and the grid size 2^k."""
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(f"PuzzleMix needs square images, got {h} x {w}")
        index = self.permutation(x.shape[0], x.device)
        lam = self.sample_lam()
        return {"lam": lam, "index": index,
                "block_num": int(self.rng.choice(block_choices(w, DEFAULTS["block_num"])))}

    def mix_with(self, x, y, draw, model=None):
        """``(mixed images, y, y[index], per-sample λ [N])``: the input-gradient saliency of
        ``model`` (an extra forward and backward in eval mode), the graph-cut masks, the
        transport."""
        if model is None:
            raise ValueError("PuzzleMix needs the classifier for its saliency: "
                             "mix(x, y, model=classifier)")
        saliency = input_saliency(model.logits, [model.backbone, model.head], x, y)
        kw = {k: v for k, v in DEFAULTS.items() if k != "block_num"}
        with torch.no_grad():
            x_mix, lam = puzzle_mix(x, draw["index"], saliency, draw["lam"], draw["block_num"],
                                    **kw)
        return x_mix, y, y[draw["index"]], lam

    def losses(self, model, x, y, draw):
        x_mix, y_a, y_b, lam = self.mix_with(x, y, draw, model)
        logits = model.logits(x_mix).float()
        ls = self.label_smoothing
        ce_a = F.cross_entropy(logits, y_a, reduction="none", label_smoothing=ls)
        ce_b = F.cross_entropy(logits, y_b, reduction="none", label_smoothing=ls)
        loss = (lam * ce_a + (1 - lam) * ce_b).mean()   # the soft target λ_i y + (1 - λ_i) y'
        return loss, {"loss_cls": loss.detach()}
