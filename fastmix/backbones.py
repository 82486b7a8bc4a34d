"""Backbones with a Mix Block tap, as AutoMix needs them.

A fastmix backbone is an ``nn.Module`` whose ``forward(x)`` returns ``[tap, final]``: the
feature map the Mix Block reads and the last feature map the classifier heads pool. It
carries ``out_channels = (C_tap, C_final)``. The tapped stage is the official ``mask_layer``
(0-based stage index; spec §3): 2 for the ResNets (``layer3``, ``out_indices=(2, 3)``), 1 for
WRN-28-8 (stage 2 of 3, ``out_indices=(1, 2)``); ``build_backbone(arch, mask_layer=...)``
moves it. The ResNets use torchvision's parameter names (``conv1``, ``bn1``,
``layer1``..``layer4``), so an exported state dict loads into ``torchvision.models.resnet*`` /
``resnext*`` (ImageNet-style stems) with ``strict=False`` only missing ``fc``, and a
torchvision state dict loads into them (``load_torchvision_weights``).

Any other CNN plugs in through :class:`FeatureTap` (pick two submodules by name) or
``timm:<model_name>`` (``timm.create_model(..., features_only=True, out_indices=(-2, -1))``:
the last two stages).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, groups=1, base_width=64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def last_bn(self):
        return self.bn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def last_bn(self):
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity, inplace=True)


class ResNet(nn.Module):
    """ResNet/ResNeXt returning ``[layer{mask_layer + 1}, layer4]`` (default ``[layer3, layer4]``).

    ``stem="cifar"``: 3x3 stride-1 conv, no max-pool (OpenMixup's ``ResNet_CIFAR``), so layer3
    has stride 4. ``stem="imagenet"``: 7x7 stride-2 conv + max-pool, layer3 stride 16.
    """

    def __init__(self, block, layers, widths=(64, 128, 256, 512), stem="cifar", in_chans=3,
                 groups=1, width_per_group=64, zero_init_residual=True, mask_layer=2):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if mask_layer not in (0, 1, 2, 3):
            raise ValueError(f"a ResNet has stages 0-3 (layer1-layer4); mask_layer {mask_layer!r} "
                             f"is not one")
        self.stem = stem
        self.groups, self.base_width = groups, width_per_group
        c0 = widths[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, c0, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, c0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c0)
        self.inplanes = c0
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.mask_layer = mask_layer
        self.out_channels = (widths[mask_layer] * block.expansion, widths[3] * block.expansion)
        self.tap_stride = (1 if stem == "cifar" else 4) * 2 ** mask_layer
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block, planes, blocks, stride):
        layers = [block(self.inplanes, planes, stride, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, self.groups, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, tap_only=False, mix_at=None, mix_fn=None):
        """``[tap, final]``; ``tap_only``: stop after the tapped stage and return ``[tap]``.

        ``mix_at``/``mix_fn`` (ManifoldMix): apply ``mix_fn`` to the input (``mix_at=0``) or to
        the output of stage ``mix_at`` (1 = ``layer1``, ...), OpenMixup's ``ResNet_Mix``."""
        if mix_at == 0:
            x = mix_fn(x)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return _run_stages(x, (self.layer1, self.layer2, self.layer3, self.layer4),
                           self.mask_layer, tap_only, mix_at, mix_fn)


def _run_stages(x, stages, mask_layer, tap_only=False, mix_at=None, mix_fn=None):
    """``[tap, final]`` of running ``stages`` in order: ``mix_fn`` after stage ``mix_at``
    (1-based; ``mix_at=0`` is the caller's, on the input), the tap after stage ``mask_layer``
    (0-based); ``tap_only`` stops there and returns ``[tap]``."""
    tap = None
    for i, stage in enumerate(stages):
        x = stage(x)
        if mix_at == i + 1:
            x = mix_fn(x)
        if i == mask_layer:
            tap = x
            if tap_only:
                return [tap]
    return [tap, x]


class _WideBlock(nn.Module):
    """A pre-activation WRN block: BN-LeakyReLU-conv3x3-BN-LeakyReLU-conv3x3 plus the input
    (or a biased 1x1 conv of it when the shape changes). ``activate_shortcut``: the stage's
    first block in the first stage also feeds the activated input to the shortcut, which makes
    up the stem's missing BN-ReLU."""

    def __init__(self, cin, cout, stride, activate_shortcut=False):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=1e-3)  # noqa: E731
        self.bn1, self.conv1 = bn(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        self.bn2, self.conv2 = bn(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.shortcut = None if (stride == 1 and cin == cout) else \
            nn.Conv2d(cin, cout, 1, stride, 0, bias=True)
        self.activate_shortcut = activate_shortcut and self.shortcut is not None

    def forward(self, x):
        a = F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(a)), 0.1))
        if self.shortcut is None:
            return out + x
        return out + self.shortcut(a if self.activate_shortcut else x)


class WideResNet(nn.Module):
    """WRN-depth-k (CIFAR): a 3x3 stem of 16 channels, three stages of ``(depth - 4) / 6``
    pre-activation blocks of widths 16k, 32k, 64k (strides ``first_stride``, 2, 2) and a final
    BN + LeakyReLU(0.1); BN momentum 1e-3 and eps 1e-3, biased convs (the official WRN
    backbone of the spec's WRN-28-8 config). Returns ``[stage mask_layer, final]``:
    ``mask_layer=1`` (the config's ``out_indices=(1, 2)``) taps stage 2, 32k channels at
    stride 2 for ``first_stride=1``."""

    def __init__(self, depth=28, widen=8, first_stride=1, in_chans=3, mask_layer=1):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if mask_layer not in (0, 1, 2):
            raise ValueError(f"WideResNet has stages 0-2; mask_layer {mask_layer} is not one")
        n, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=True)
        stages, cin = [], 16
        for i, (w, s) in enumerate(zip(widths, (first_stride, 2, 2))):
            stages.append(nn.Sequential(*[_WideBlock(cin if j == 0 else w, w, s if j == 0 else 1,
                                                     activate_shortcut=i == 0) for j in range(n)]))
            cin = w
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(widths[-1], eps=1e-3, momentum=1e-3)
        self.mask_layer = mask_layer
        self.out_channels = (widths[mask_layer], widths[-1])
        self.tap_stride = first_stride * 2 ** mask_layer
        for m in self.modules():
            if isinstance(m, nn.Conv2d):   # mmcv's kaiming_init: fan_out, zero bias
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, tap_only=False, mix_at=None, mix_fn=None):
        """``[tap, final]``; ``mix_at``/``mix_fn`` as :meth:`ResNet.forward` (stages 1-3)."""
        if mix_at == 0:
            x = mix_fn(x)
        last = lambda h: F.leaky_relu(self.bn1(self.block3(h)), 0.1)  # noqa: E731  (+ final BN-ReLU)
        return _run_stages(self.conv1(x), (self.block1, self.block2, last), self.mask_layer,
                           tap_only, mix_at, mix_fn)


class FeatureTap(nn.Module):
    """Wrap any CNN: run it and return the outputs of two named submodules.

    ``FeatureTap(torchvision.models.resnet50(), "layer3", "layer4", (1024, 2048))``.
    The wrapped model's own classifier still runs (its output is discarded); pass a
    model without one (``num_classes=0`` in timm) to save that work.
    """

    def __init__(self, model, tap, final, out_channels, tap_stride=None):
        super().__init__()
        self.model = model
        self.out_channels = tuple(out_channels)
        self.tap_stride = tap_stride
        self._names = (tap, final)
        modules = dict(model.named_modules())
        for name in self._names:
            if name not in modules:
                raise ValueError(f"FeatureTap: the model has no submodule named {name!r}")
            modules[name].register_forward_hook(_keep_output)

    def forward(self, x):
        self.model(x)
        modules = [self.model.get_submodule(name) for name in self._names]
        outs = [m.__dict__.get("_fastmix_tap") for m in modules]
        for m in modules:
            m.__dict__.pop("_fastmix_tap", None)  # do not keep activations alive
        return outs


def _keep_output(module, _inputs, output):
    # Stateless, so a deepcopy of the tapped model (AutoMix's momentum encoder) keeps its own.
    module.__dict__["_fastmix_tap"] = output


class TimmBackbone(nn.Module):
    """``timm.create_model(name, features_only=True)``, tapping the last two stages.

    ``out_indices=(-2, -1)``: timm counts its stem as feature 0, so (2, 3) would be a ResNet's
    ``layer2``/``layer3`` and ``layer4`` would never be built. (-2, -1) is the spec's
    (stage 3, stage 4) of a ResNet (``layer3``/``layer4``) and the last two stages of any
    family (EfficientNet ``blocks.4``/``blocks.6``, ConvNeXt ``stages.2``/``stages.3``, ...;
    ``tests/test_peers.py`` asserts each tested family's). ``pretrained`` stays False unless
    asked: fastmix never fetches weights on its own."""

    def __init__(self, name, in_chans=3, out_indices=(-2, -1), pretrained=False, **kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("timm backbones need `pip install timm`") from e
        self.model = timm.create_model(name, features_only=True, out_indices=out_indices,
                                       in_chans=in_chans, pretrained=pretrained, **kwargs)
        channels = self.model.feature_info.channels()
        reductions = self.model.feature_info.reduction()
        self.out_channels = (channels[0], channels[-1])
        self.tap_stride = reductions[0]

    def forward(self, x):
        feats = self.model(x)
        return [feats[0], feats[-1]]


_ARCHS = {
    # name: (block, layers, widths, stem, groups, width_per_group)
    "resnet18_cifar": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "cifar", 1, 64),
    "resnet34_cifar": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "cifar", 1, 64),
    "resnext50_cifar": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "cifar", 32, 4),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet", 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), "imagenet", 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 32, 4),
    "resnext101_32x4d": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), "imagenet", 32, 4),
    # A ResNet-10 of quarter width for quick CPU runs (CIFAR stem).
    "resnet_small": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), "cifar", 1, 64),
    # The same ResNet-10 at half width (1.2M parameters): the accuracy study's CPU network.
    "resnet10_half": (BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256), "cifar", 1, 64),
}
# name: (depth, widen factor); CIFAR stem (first stride 1), default tap stage 2 (mask_layer 1).
_WRNS = {"wrn28_8": (28, 8), "wrn28_2": (28, 2), "wrn16_1": (16, 1)}
DEFAULT_MASK_LAYER = {**{name: 2 for name in _ARCHS}, **{name: 1 for name in _WRNS}}

ARCH_NAMES = tuple(_ARCHS) + tuple(_WRNS) + ("timm:<name>",)


def build_backbone(arch: str, in_chans: int = 3, mask_layer=None) -> nn.Module:
    """Build a backbone by name: one of ``ARCH_NAMES``, or ``timm:<model>``.

    ``mask_layer``: the 0-based stage whose output feeds the Mix Block (None: the official
    choice, 2 for the ResNets, 1 for the WideResNets). timm backbones tap their second-last
    feature stage and take no ``mask_layer``."""
    if arch.startswith("timm:"):
        if mask_layer is not None:
            raise ValueError("--mask-layer applies to fastmix's ResNets and WideResNets; a timm "
                             "backbone taps its second-last feature stage (or wrap the model in "
                             "FeatureTap to choose the stage)")
        return TimmBackbone(arch[len("timm:"):], in_chans=in_chans)
    if arch not in DEFAULT_MASK_LAYER:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_NAMES)}")
    mask_layer = DEFAULT_MASK_LAYER[arch] if mask_layer is None else mask_layer
    if arch in _WRNS:
        depth, widen = _WRNS[arch]
        return WideResNet(depth, widen, first_stride=1, in_chans=in_chans, mask_layer=mask_layer)
    block, layers, widths, stem, groups, wpg = _ARCHS[arch]
    return ResNet(block, layers, widths, stem=stem, in_chans=in_chans, groups=groups,
                  width_per_group=wpg, mask_layer=mask_layer)


def load_torchvision_weights(backbone, path):
    """Load a torchvision-format ImageNet state dict (``torchvision.models.resnet18(weights=...)
    .state_dict()`` saved with ``torch.save``) into a fastmix ImageNet-stem ResNet/ResNeXt.

    Read with ``torch.load(weights_only=True)`` (a file cannot run code). The classifier
    (``fc.*``) is dropped: fastmix's heads are new. Every other tensor must match a parameter or
    buffer of ``backbone`` by name and shape, and every backbone tensor must be in the file;
    otherwise a ``ValueError`` names what differs, before anything is changed. Returns the
    number of tensors loaded."""
    import os
    if not isinstance(backbone, ResNet) or backbone.stem != "imagenet":
        raise ValueError("--init-weights loads torchvision ImageNet weights into an ImageNet-stem "
                         "ResNet/ResNeXt (resnet18/34/50/101, resnext50_32x4d, resnext101_32x4d)")
    if not os.path.isfile(path):
        raise ValueError(f"--init-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--init-weights {path}: not a loadable state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init-weights {path}: expected a state dict of tensors (a torchvision "
                         f"model's .state_dict()), got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]))
        raise ValueError(f"--init-weights {path} does not fit this backbone: {detail}; it must be "
                         f"the torchvision state dict of the same architecture")
    backbone.load_state_dict(state, strict=True)
    return len(state)


class ClsHead(nn.Module):
    """Global average pooling + linear classifier, N(0, 0.01) weights and zero bias (spec §2.1)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))
