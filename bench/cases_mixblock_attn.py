"""Bench cases for the fused Mix Block attention (kernels/mixblock_attn.py).

Shapes are the Mix Block inputs of the AutoMix backbones: qk = [N, h*w, C // 2] (the shared
query/key projection of the stage-3 features), v = [N, h*w], a random permutation index and
the λ-channel biases (fixed tensors here, no grad).
"""
import torch

from bench.common import Case
from fastmix import functional as E   # the eager twin
from fastmix.kernels import mixblock_attn as M

_ITEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _case(device, name, n, h, d, dtype):
    L = h * h
    item = _ITEM[dtype]

    def make():
        qk = (torch.randn(n, L, d, device=device) * 2).to(dtype).requires_grad_()
        v = torch.randn(n, L, device=device).to(dtype).requires_grad_()
        index = torch.randperm(n, device=device)
        q_bias = torch.randn(d, device=device) * 0.3
        k_bias = torch.randn(d, device=device) * 0.3
        v_bias = torch.tensor(0.2, device=device)
        return (qk, v, index), {"q_bias": q_bias, "k_bias": k_bias, "v_bias": v_bias}

    qk_bytes = n * L * d * item
    v_bytes = n * L * item
    out_bytes = n * L * 4                       # fp32 output / upstream gradient
    bytes_fwd = qk_bytes + v_bytes + out_bytes
    # + backward: read qk, v and dout once, write grad_qk and grad_v once
    bytes_fwd_bwd = bytes_fwd + (qk_bytes + v_bytes + out_bytes) + (qk_bytes + v_bytes)
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return Case(
        op="mixblock_attn",
        shape=f"{name} N={n} L={h}x{h} D={d} {dt}",
        make=make,
        eager=E.mixblock_attention_eager,
        fused=M.mixblock_attention,
        bytes_fwd=bytes_fwd,
        bytes_fwd_bwd=bytes_fwd_bwd,
        flops_fwd=4 * n * L * L * d,            # S = q k^T (2 L^2 D) + softmax-weighted sum
        extra={"N": n, "L": L, "D": d, "dtype": dt},
    )


def cases(device: str, quick: bool) -> list:
    if quick:  # the CPU interpreter smoke run
        return [_case(device, "tiny", 4, 4, 16, torch.float32),
                _case(device, "tiny", 3, 7, 24, torch.float32)]
    dtypes = [torch.float32, torch.bfloat16]
    shapes = [
        ("CIFAR R-18", 128, 8, 128),
        ("CIFAR R-18", 256, 8, 128),
        ("Tiny-ImageNet", 128, 16, 128),
        ("Tiny-ImageNet", 256, 16, 128),
        ("ImageNet R-50", 128, 14, 512),
        ("ImageNet R-50", 256, 14, 512),
        ("ImageNet R-50 stage-4 tap", 64, 7, 1024),
    ]
    return [_case(device, name, n, h, d, dt) for dt in dtypes for name, n, h, d in shapes]
