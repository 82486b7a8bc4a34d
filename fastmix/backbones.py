"""Backbones with a stage-3 tap, as AutoMix needs them.

A fastmix backbone is an ``nn.Module`` whose ``forward(x)`` returns ``[stage3, final]``:
the stage-3 feature map the Mix Block reads (spec §1.4: ``out_indices=(2, 3)``, element 0)
and the last feature map the classifier heads pool. It carries ``out_channels =
(C3, C_final)``. The ResNets below use torchvision's parameter names (``conv1``, ``bn1``,
``layer1``..``layer4``), so an exported state dict loads into ``torchvision.models.resnet*``
(ImageNet-style stems) with ``strict=False`` only missing ``fc``.

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
    """ResNet/ResNeXt returning ``[layer3, layer4]``.

    ``stem="cifar"``: 3x3 stride-1 conv, no max-pool (OpenMixup's ``ResNet_CIFAR``), so layer3
    has stride 4. ``stem="imagenet"``: 7x7 stride-2 conv + max-pool, layer3 stride 16.
    """

    def __init__(self, block, layers, widths=(64, 128, 256, 512), stem="cifar", in_chans=3,
                 groups=1, width_per_group=64, zero_init_residual=True):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
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
        self.out_channels = (widths[2] * block.expansion, widths[3] * block.expansion)
        self.stage3_stride = 4 if stem == "cifar" else 16
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

    def forward(self, x, stop_at_stage3=False):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        f3 = self.layer3(self.layer2(self.layer1(x)))
        if stop_at_stage3:
            return [f3]
        return [f3, self.layer4(f3)]


class FeatureTap(nn.Module):
    """Wrap any CNN: run it and return the outputs of two named submodules.

    ``FeatureTap(torchvision.models.resnet50(), "layer3", "layer4", (1024, 2048))``.
    The wrapped model's own classifier still runs (its output is discarded); pass a
    model without one (``num_classes=0`` in timm) to save that work.
    """

    def __init__(self, model, stage3, final, out_channels, stage3_stride=None):
        super().__init__()
        self.model = model
        self.out_channels = tuple(out_channels)
        self.stage3_stride = stage3_stride
        self._names = (stage3, final)
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
        self.stage3_stride = reductions[0]

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
    # A ResNet-10 of quarter width for quick CPU runs (CIFAR stem).
    "resnet_small": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), "cifar", 1, 64),
    # The same ResNet-10 at half width (1.2M parameters): the accuracy study's CPU network.
    "resnet10_half": (BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256), "cifar", 1, 64),
}

ARCH_NAMES = tuple(_ARCHS) + ("timm:<name>",)


def build_backbone(arch: str, in_chans: int = 3) -> nn.Module:
    """Build a backbone by name: one of ``ARCH_NAMES``, or ``timm:<model>``."""
    if arch.startswith("timm:"):
        return TimmBackbone(arch[len("timm:"):], in_chans=in_chans)
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_NAMES)}")
    block, layers, widths, stem, groups, wpg = _ARCHS[arch]
    return ResNet(block, layers, widths, stem=stem, in_chans=in_chans, groups=groups,
                  width_per_group=wpg)


class ClsHead(nn.Module):
    """Global average pooling + linear classifier, N(0, 0.01) weights and zero bias (spec §2.1)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))
