"""AutoMix on Vision Transformers from timm: the Mix Block reads a ViT's patch tokens as a map
(the class token dropped, no norm: the official ViT configs' tap), the official ViT options
(switch_off, mask_adjust: tests/test_automix.py), and a tiny DeiT that learns on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmix.backbones import build_backbone, parse_timm_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = "img_size=28,patch_size=4,depth=2,embed_dim=32,num_heads=2"


def test_timm_kwargs_are_literals_or_strings():
    assert parse_timm_kwargs(TINY_VIT) == dict(img_size=28, patch_size=4, depth=2, embed_dim=32,
                                               num_heads=2)
    assert parse_timm_kwargs("window_size=(7,7),global_pool=token,qkv_bias=False") == \
        dict(window_size=(7, 7), global_pool="token", qkv_bias=False)
    assert parse_timm_kwargs("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_timm_kwargs("img_size")
    # a value is never run: a call is kept as the plain string it is
    assert parse_timm_kwargs("x=__import__('os').system('true')")["x"].startswith("__import__")


@pytest.mark.parametrize("tap", [0, 1])
def test_the_mix_block_reads_a_blocks_patch_tokens_without_the_class_token(tap):
    """The official DeiT tap (``out_indices=(5, 11)``): block ``tap``'s output, class token
    dropped, no LayerNorm, [N, C, h, w]; the heads read the final-norm class token."""
    torch.manual_seed(0)
    b = build_backbone("timm:deit_tiny_patch16_224", 1, tap, parse_timm_kwargs(TINY_VIT)).eval()
    x = torch.randn(3, 1, 28, 28)
    seen = {}
    b.model.blocks[tap].register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o))
    tap_map, final = b(x)
    tokens = seen["tokens"]                         # [N, 1 + 49, C]: the class token first
    assert tokens.shape == (3, 50, 32) and tap_map.shape == (3, 32, 7, 7)
    expect = tokens[:, 1:].reshape(3, 7, 7, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(tap_map, expect)
    cls = b.model.forward_features(x)[:, 0]        # forward_features ends with the final norm
    torch.testing.assert_close(final.flatten(1), cls)
    assert b.out_channels == (32, 32)


def test_a_tiny_deit_learns_with_automix_on_the_cpu(tmp_path):
    """train.py, AutoMix, a two-block DeiT (patch 4, 7x7 tokens of 32 channels) tapped at its
    first block, 15 epochs of 1,000 Fashion-MNIST images: the loss falls and the online
    encoder clears 25 % top-1 (chance: 10 %), with the mask picture written. One thread: on
    two busy cores the OpenMP threads of small matmuls wait on each other (30x slower)."""
    out = tmp_path / "vit"
    r = subprocess.run([sys.executable, "train.py", "--preset", "cpu-small", "--arch",
                        "timm:deit_tiny_patch16_224", "--timm-kwargs", TINY_VIT, "--mask-layer", "0",
                        "--epochs", "15", "--batch-size", "50", "--train-subset", "1000",
                        "--test-subset", "500", "--val-split", "0", "--eval-every", "5",
                        "--grid-every", "15", "--out", str(out), "--no-progress"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["losses"]["loss"] for e in epochs]
    assert losses[-1] < losses[0] - 0.3, losses
    assert epochs[-1]["top1"]["one_q"] > 25, epochs[-1]["top1"]
    assert (out / "mix_epoch0015.png").stat().st_size > 1000
