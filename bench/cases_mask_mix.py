"""Benchmark cases for the fused mask mix (kernels/mask_mix.py).

Ops (``extra["variant"]``):
  * "single": ``mix_images(x, index, mask_logits, mode=)``, one mixed batch, differentiable
    mask logits (returns a tensor).
  * "pair": ``mix_images_pair(x, index_a, logits_a, index_b, mask_logits_b=...)``: both mixed
    batches of an AutoMix step in one launch (returns a tuple; only out_a has a gradient,
    through logits_a).
  * "pair_lam": the same with the constant-λ fallback for the second batch (``lam_b=``).
  * "mixup": ``mix_images(x, index, lam=)``, the constant mix alone (no backward).

Byte counts (the fewest bytes each pass must move; P = N*C*H*W image elements, L = the mask
logits' bytes, both in their own dtypes):
  * single: bytes_fwd = x read twice (x and x[index]) + out written + L + the index.
  * pair: x, x[index_a], x[index_b] read + two outputs written + both logits + two indices
    (pair_lam: one logits tensor and a 0-d lam).
  * mixup: x read twice + out written + the index.
  * bytes_fwd_bwd adds the backward of the logits: grad_out, x and x[index] read, the logits
    read and their gradient written (+ the index).
"""
import torch

from bench.common import Case
from fastmix import functional as E   # the eager twins
from fastmix.kernels import mask_mix

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case(n, c, size, msize, dtype, device, channels_last, mode="nearest", variant="single"):
    height, width = size
    h, w = msize
    pair = variant in ("pair", "pair_lam")

    def logits():
        return (torch.randn(n, 1, h, w, device=device) * 2).to(dtype)

    def make():
        x = torch.randn(n, c, height, width, device=device).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        index_a = torch.randperm(n, device=device)
        if variant == "mixup":
            return (x, index_a), {"lam": torch.rand((), device=device)}
        logits_a = logits().requires_grad_()
        if not pair:
            return (x, index_a, logits_a), {"mode": mode}
        index_b = torch.randperm(n, device=device)
        if variant == "pair_lam":
            return (x, index_a, logits_a, index_b), {"lam_b": torch.rand((), device=device),
                                                      "mode": mode}
        return (x, index_a, logits_a, index_b), {"mask_logits_b": logits(), "mode": mode}

    elt = torch.empty((), dtype=dtype).element_size()
    img = n * c * height * width * elt
    mask = n * h * w * elt
    idx = n * 8
    if variant == "mixup":
        bytes_fwd = 3 * img + idx
    elif variant == "single":
        bytes_fwd = 3 * img + mask + idx
    elif variant == "pair":
        bytes_fwd = 5 * img + 2 * mask + 2 * idx
    else:                                                     # pair_lam
        bytes_fwd = 5 * img + mask + 2 * idx + 4
    bytes_bwd = 3 * img + 2 * mask + idx
    bytes_fwd_bwd = None if variant == "mixup" else bytes_fwd + bytes_bwd

    layout = "cl" if channels_last else "nchw"
    src = "lam" if variant == "mixup" else f"{h}x{w} {mode}"
    shape = f"N={n} C={c} {height}x{width}<-{src} {_SHORT[dtype]} {layout} {variant}"
    single = variant in ("single", "mixup")
    return Case(
        op="mask_mix",
        shape=shape,
        make=make,
        eager=E.mix_images_eager if single else E.mix_images_pair_eager,
        fused=mask_mix.mix_images if single else mask_mix.mix_images_pair,
        bytes_fwd=bytes_fwd,
        bytes_fwd_bwd=bytes_fwd_bwd,
        flops_fwd=None,
        extra={"variant": variant, "outputs": 2 if pair else 1, "bytes_bwd": bytes_bwd},
    )


def cases(device: str, quick: bool) -> list:
    if quick:
        out = []
        for cl in (False, True):
            for variant in ("single", "pair", "pair_lam", "mixup"):
                out.append(_case(4, 3, (16, 16), (4, 4), torch.float32, device, cl,
                                 variant=variant))
            out.append(_case(4, 3, (16, 16), (4, 4), torch.float32, device, cl, "bilinear"))
        return out
    out = []
    datasets = [((32, 32), (8, 8)), ((224, 224), (14, 14))]     # CIFAR, ImageNet
    for size, msize in datasets:
        for n in (128, 256):
            for dtype in (torch.bfloat16, torch.float32):
                for cl in (True, False):
                    for variant in ("single", "pair"):
                        out.append(_case(n, 3, size, msize, dtype, device, cl, "nearest",
                                         variant))
    # Bilinear upsampling, the constant-λ fallback and plain mixup at the headline shape.
    for cl in (True, False):
        for variant in ("single", "pair"):
            out.append(_case(256, 3, (224, 224), (14, 14), torch.bfloat16, device, cl,
                             "bilinear", variant))
        for variant in ("pair_lam", "mixup"):
            out.append(_case(256, 3, (224, 224), (14, 14), torch.bfloat16, device, cl,
                             "nearest", variant))
    return out
