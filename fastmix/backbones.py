"""Backbones with a Mix Block tap, as AutoMix needs them.

A fastmix backbone is an ``nn.Module`` whose ``forward(x)`` returns ``[tap, final]``: the
feature map the Mix Block reads and the features the classifier heads (``ClsHead``: global
average pool + Linear) take. It carries ``out_channels = (C_tap, C_final)``. Four families:

- **fastmix's own** CIFAR-stem ResNets (``resnet*_cifar``, ``resnext50_cifar``, ``resnet_small``,
  ``resnet10_half``: :class:`ResNet`) and WideResNets (:class:`WideResNet`), which have no
  torchvision counterpart. ``forward(x, tap_only=False, mix_at=None, mix_fn=None)``.
- **torchvision's** ImageNet-stem ResNets/ResNeXts (``resnet18/34/50/101``, ``resnext50_32x4d``,
  ``resnext101_32x4d``: :class:`TorchvisionResNet`): the network ``torchvision.models.<name>()``
  builds (``weights=None``), its modules (``conv1``, ``bn1``, ``relu``, ``maxpool``,
  ``layer1``..``layer4``) adopted under their own names and run stage by stage, so the state
  dict is torchvision's less ``fc`` and ``tap_only``/``mix_at``/``mask_layer`` work as for
  fastmix's ResNets. ``resnext101_32x4d`` has no torchvision builder: it is torchvision's
  ``ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)``.
- **timm** (``timm:<name>``: :class:`TimmBackbone`): the unaltered ``timm.create_model(name,
  num_classes=0)`` (every module but the classifier, which fastmix's heads replace), tapped
  with ``forward_intermediates`` at its second-last feature stage; ``final`` is timm's
  pre-logits ``forward_head(forward_features(x), pre_logits=True)`` as an [N, C, 1, 1] map.
- **any model** through :class:`FeatureTap` (two submodules by name, forward hooks).

The tapped stage is the official ``mask_layer`` (0-based stage index; spec §3): 2 for the
ResNets (``layer3``), 1 for WRN-28-8 (stage 2 of 3); ``build_backbone(arch, mask_layer=...)``
moves it.

**Exports** (``fastmix.checkpoint.export_classifier`` -> :func:`classifier_state_dict`): a
backbone and a ``ClsHead`` become the state dict of a plain classifier that loads with
``strict=True`` and gives the same logits (:func:`plain_model` builds it):
``timm.create_model(name, num_classes=K)`` for ``timm:<name>`` (the head is written under
timm's classifier name: ``fc``, ``classifier``, ``head.fc``, ...);
``torchvision.models.<name>(num_classes=K)`` for the ImageNet-stem archs; the wrapped model
for a ``FeatureTap`` (the head under its ``classifier`` name, default ``fc``); for fastmix's own
networks the backbone keys + ``fc.*``, which load into :class:`PlainClassifier`.
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
    """fastmix's CIFAR-stem ResNet/ResNeXt (OpenMixup's ``ResNet_CIFAR``: a 3x3 stride-1 conv,
    no max-pool, so layer3 has stride 4), returning ``[layer{mask_layer + 1}, layer4]``
    (default ``[layer3, layer4]``). Module names are torchvision's (``conv1``, ``bn1``,
    ``layer1``..``layer4``); the ImageNet-stem ResNets are torchvision's own networks
    (:class:`TorchvisionResNet`)."""

    stem = "cifar"

    def __init__(self, block, layers, widths=(64, 128, 256, 512), in_chans=3, groups=1,
                 width_per_group=64, zero_init_residual=True, mask_layer=2):
        super().__init__()
        _check_resnet_mask_layer(mask_layer)
        self.groups, self.base_width = groups, width_per_group
        c0 = widths[0]
        self.conv1 = nn.Conv2d(in_chans, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.inplanes = c0
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.mask_layer = mask_layer
        self.out_channels = (widths[mask_layer] * block.expansion, widths[3] * block.expansion)
        self.tap_stride = 2 ** mask_layer
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

    def forward(self, x: torch.Tensor, tap_only: bool = False, mix_at=None,
                mix_fn=None) -> list:
        """``[tap, final]``; ``tap_only``: stop after the tapped stage and return ``[tap]``.

        ``mix_at``/``mix_fn`` (ManifoldMix): apply ``mix_fn`` to the input (``mix_at=0``) or to
        the output of stage ``mix_at`` (1 = ``layer1``, ...), OpenMixup's ``ResNet_Mix``."""
        if mix_at == 0:
            x = mix_fn(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return _run_stages(x, (self.layer1, self.layer2, self.layer3, self.layer4),
                           self.mask_layer, tap_only, mix_at, mix_fn)


def _check_resnet_mask_layer(mask_layer):
    if mask_layer not in (0, 1, 2, 3):
        raise ValueError(f"a ResNet has stages 0-3 (layer1-layer4); mask_layer {mask_layer!r} "
                         f"is not one")


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

    def forward(self, x: torch.Tensor, tap_only: bool = False, mix_at=None,
                mix_fn=None) -> list:
        """``[tap, final]``; ``mix_at``/``mix_fn`` as :meth:`ResNet.forward` (stages 1-3)."""
        if mix_at == 0:
            x = mix_fn(x)
        last = lambda h: F.leaky_relu(self.bn1(self.block3(h)), 0.1)  # noqa: E731  (+ final BN-ReLU)
        return _run_stages(self.conv1(x), (self.block1, self.block2, last), self.mask_layer,
                           tap_only, mix_at, mix_fn)


# ---- torchvision's ImageNet-stem ResNets ------------------------------------------------------
# arch: the torchvision.models builder, or (block, layers, kwargs) of torchvision's ResNet class
# for the one torchvision has no builder for (ResNeXt-101 32x4d, the spec's ImageNet config).
_TORCHVISION_RESNETS = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
    "resnet101": "resnet101", "resnext50_32x4d": "resnext50_32x4d",
    "resnext101_32x4d": ("Bottleneck", (3, 4, 23, 3), dict(groups=32, width_per_group=4)),
}


def torchvision_resnet(arch, num_classes=1000, in_chans=3, **kwargs):
    """The plain torchvision network of an ImageNet-stem ``arch`` (``weights=None``: fastmix never
    downloads): ``torchvision.models.<arch>(num_classes=...)``, or for ``resnext101_32x4d``
    ``torchvision.models.resnet.ResNet(Bottleneck, [3, 4, 23, 3], groups=32,
    width_per_group=4)``. ``in_chans != 3`` replaces ``conv1`` by a 7x7 stride-2 conv of
    ``in_chans`` inputs (torchvision's init); ``kwargs`` go to torchvision's ``ResNet``."""
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{arch} is torchvision's network: pip install torchvision") from e
    spec = _TORCHVISION_RESNETS.get(arch)
    if spec is None:
        raise ValueError(f"{arch!r} is not one of the ImageNet-stem archs "
                         f"{', '.join(_TORCHVISION_RESNETS)}")
    if isinstance(spec, str):
        net = getattr(torchvision.models, spec)(weights=None, num_classes=num_classes, **kwargs)
    else:
        block, layers, extra = spec
        net = torchvision.models.resnet.ResNet(getattr(torchvision.models.resnet, block),
                                               list(layers), num_classes=num_classes,
                                               **extra, **kwargs)
    if in_chans != 3:
        c = net.conv1
        net.conv1 = nn.Conv2d(in_chans, c.out_channels, c.kernel_size, c.stride, c.padding,
                              bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def _stage_channels(layer):
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


class TorchvisionResNet(nn.Module):
    """torchvision's ImageNet-stem ResNet/ResNeXt (:func:`torchvision_resnet`), run stage by
    stage: ``[layer{mask_layer + 1}, layer4]`` (default ``[layer3, layer4]``, strides 16/32).

    The torchvision network's own modules ``conv1, bn1, relu, maxpool, layer1..layer4`` are
    adopted under their names (its ``avgpool`` has no state, its ``fc`` is dropped: fastmix's
    heads replace it), so ``state_dict()`` is torchvision's less ``fc.*``: a torchvision state
    dict loads into it (``load_torchvision_weights``) and an export (backbone + ``fc.*``) loads
    strictly into ``torchvision.models.<arch>(num_classes=K)``. The forward is torchvision's
    ``_forward_impl`` up to ``layer4``, with fastmix's ``tap_only`` / ``mix_at`` / ``mix_fn``.
    ``zero_init_residual=True`` as fastmix's ResNets (the last BN of each block starts at 0)."""

    stem = "imagenet"
    _MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, arch, in_chans=3, mask_layer=2, zero_init_residual=True):
        super().__init__()
        _check_resnet_mask_layer(mask_layer)
        net = torchvision_resnet(arch, in_chans=in_chans, zero_init_residual=zero_init_residual)
        for name in self._MODULES:
            self.add_module(name, getattr(net, name))
        self.arch, self.in_chans = arch, in_chans
        self.mask_layer = mask_layer
        widths = [_stage_channels(getattr(self, f"layer{i}")) for i in range(1, 5)]
        self.out_channels = (widths[mask_layer], widths[3])
        self.tap_stride = 4 * 2 ** mask_layer

    def forward(self, x: torch.Tensor, tap_only: bool = False, mix_at=None,
                mix_fn=None) -> list:
        """``[tap, final]``; ``tap_only``/``mix_at``/``mix_fn`` as :meth:`ResNet.forward`."""
        if mix_at == 0:
            x = mix_fn(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return _run_stages(x, (self.layer1, self.layer2, self.layer3, self.layer4),
                           self.mask_layer, tap_only, mix_at, mix_fn)

    def plain_model(self, num_classes: int) -> nn.Module:
        """The plain torchvision classifier an export of this backbone loads into."""
        return torchvision_resnet(self.arch, num_classes, self.in_chans)


# ---- any model: FeatureTap ----------------------------------------------------------------------
class FeatureTap(nn.Module):
    """Wrap any CNN: run it and return the outputs of two named submodules.

    ``FeatureTap(torchvision.models.resnet50(num_classes=K), "layer3", "layer4", (1024, 2048))``.
    The wrapped model's own classifier still runs (its output is discarded). ``classifier``:
    the name of the wrapped model's classifier (a ``Linear``; default ``"fc"``): an export
    writes the wrapped model's state dict (no ``model.`` prefix) with fastmix's head under
    ``<classifier>.weight`` / ``.bias`` (replacing that module's, or added where the model has
    none or an ``Identity``), so it loads strictly into the same model built with K classes.
    Its logits are fastmix's head's when the model's head is global average pooling + that
    ``Linear`` on the ``final`` module's output (torchvision's ResNets/ResNeXts, ...).
    """

    def __init__(self, model, tap, final, out_channels, tap_stride=None, classifier="fc"):
        super().__init__()
        self.model = model
        self.out_channels = tuple(out_channels)
        self.tap_stride = tap_stride
        if not isinstance(classifier, str) or not classifier:
            raise ValueError(f"FeatureTap: classifier must name the model's classifier module, "
                             f"got {classifier!r}")
        self.classifier_name = classifier
        self._names = (tap, final)
        modules = dict(model.named_modules())
        for name in self._names:
            if name not in modules:
                raise ValueError(f"FeatureTap: the model has no submodule named {name!r}")
            modules[name].register_forward_hook(_keep_output)

    def forward(self, x: torch.Tensor) -> list:
        self.model(x)
        modules = [self.model.get_submodule(name) for name in self._names]
        outs = [m.__dict__.get("_fastmix_tap") for m in modules]
        for m in modules:
            m.__dict__.pop("_fastmix_tap", None)  # do not keep activations alive
        return outs

    def classifier_state_dict(self, head: nn.Module) -> dict:
        """The wrapped model's state dict with ``head`` as its classifier (see the class doc)."""
        name = self.classifier_name
        module = dict(self.model.named_modules()).get(name)
        if module is not None and not isinstance(module, nn.Linear) and \
                next(module.parameters(), None) is not None:
            raise ValueError(f"FeatureTap(classifier={name!r}): the wrapped model's {name!r} is a "
                             f"{type(module).__name__}, not a Linear, so fastmix's head cannot "
                             f"take its place; name the Linear (e.g. 'classifier.1')")
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(name + ".")}
        return _with_head(state, name, head)


def _keep_output(module, _inputs, output):
    # Stateless, so a deepcopy of the tapped model (AutoMix's momentum encoder) keeps its own.
    module.__dict__["_fastmix_tap"] = output


# ---- timm --------------------------------------------------------------------------------------
class TimmBackbone(nn.Module):
    """The unaltered timm network ``timm.create_model(name, num_classes=0)``: every module of
    ``timm.create_model(name, num_classes=K)`` but the classifier (``fc``, ``classifier``,
    ``head.fc``, ...), which fastmix's heads replace.

    - ``tap``: ``forward_intermediates`` at feature stage ``tap`` (an index into
      ``model.feature_info``; -2: the second-last stage: a ResNet's ``layer3``, EfficientNet's
      ``blocks.4``, ConvNeXt's ``stages.2``, ...); ``tap_only=True`` stops there
      (``stop_early``), for AutoMix's ``k_early_exit``;
    - ``final``: timm's pre-logits ``forward_head(forward_features(x), pre_logits=True)`` (its
      global pool, and whatever timm puts between pool and classifier: ConvNeXt's ``head.norm``,
      MobileNetV3's ``conv_head``) as an [N, C, 1, 1] map, so fastmix's ``ClsHead`` (its average
      pool is then the identity, + Linear) computes exactly timm's ``forward_head``.
      ``forward_features`` is the whole trunk (EfficientNet's ``conv_head``/``bn2``: 1280
      channels for B0).

    ``out_channels = (feature_info[tap] channels, model.head_hidden_size)`` (=
    ``model.num_features`` but where timm's head widens the pooled features, as MobileNetV3's
    ``conv_head``). An export is the model's state dict (no ``model.`` prefix) plus the head under
    timm's classifier name (``pretrained_cfg["classifier"]``): it loads strictly into
    ``timm.create_model(name, num_classes=K)`` (same ``in_chans`` and ``kwargs``) and gives the
    same logits. ``pretrained`` stays False unless asked: fastmix never fetches weights."""

    def __init__(self, name, in_chans=3, tap=-2, pretrained=False, tap_module=None, **kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("timm backbones need `pip install timm`") from e
        self.name, self.in_chans, self.kwargs = name, in_chans, dict(kwargs)
        self.model = timm.create_model(name, num_classes=0, in_chans=in_chans,
                                       pretrained=pretrained, **kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm:{name} has no forward_intermediates (timm >= 1.0 CNNs have "
                             f"it); wrap it in FeatureTap to tap it by module name")
        info = self.model.feature_info
        if not -len(info) <= tap < len(info):
            raise ValueError(f"timm:{name} has {len(info)} feature stages; tap {tap} is not one")
        self.tap = tap if tap < 0 else tap - len(info)     # negative: forward_intermediates'
        self.tap_module = info[tap]["module"]
        self.tap_stride = info[tap]["reduction"]
        width = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.out_channels = (info[tap]["num_chs"], width)
        self.classifier_name = self._find_classifier()
        self.tap_module_spec = tap_module
        if tap_module:
            self._hook_tap(tap_module)

    def _hook_tap(self, spec):
        """``tap_module`` ("MODULE" or "MODULE+ln"): the Mix Block reads this module's output,
        as an [N, C, h, w] map: NHWC outputs (Swin) are permuted, token sequences (a ViT block)
        lose their prefix tokens and fold to the patch grid; ``+ln`` applies a LayerNorm over
        C without parameters (eps 1e-5). The channel count comes from one forward pass of a
        zero image at the model's input size."""
        name, _, post = spec.partition("+")
        if post not in ("", "ln"):
            raise ValueError(f"--mask-tap {spec!r}: the only suffix is '+ln'")
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"--mask-tap {spec!r}: timm:{self.name} has no module {name!r} "
                             f"(its modules: model.named_modules())") from None
        self.tap_module, self._tap_ln = name, post == "ln"
        module.register_forward_hook(_keep_output)      # FeatureTap's stateless hook
        size = getattr(getattr(self.model, "patch_embed", None), "img_size", None) or \
            self.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            self.model.forward_features(torch.zeros(1, self.in_chans, *size))
            self.model.train(was)
        tapped = self._take_tap()
        self.out_channels = (tapped.shape[1], self.out_channels[1])
        self.tap_stride = size[0] // tapped.shape[2]

    def _take_tap(self):
        """The hooked module's last output as an [N, C, h, w] map, no longer held there."""
        t = self.model.get_submodule(self.tap_module).__dict__.pop("_fastmix_tap")
        if t.dim() == 3:                       # tokens [N, T, C]
            t = t[:, getattr(self.model, "num_prefix_tokens", 0):]
            side = int(round(t.shape[1] ** 0.5))
            t = t.reshape(t.shape[0], side, side, t.shape[2])
            t = t.permute(0, 3, 1, 2)
        elif getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            t = t.permute(0, 3, 1, 2)
        if self._tap_ln:
            t = F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2)
        return t

    def _find_classifier(self):
        """timm's classifier name, checked: an ``Identity`` (no parameters) in this
        ``num_classes=0`` model. None when timm's head is not one Linear fastmix can replace
        (a distilled two-head model, ...): then an export is refused."""
        name = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier")
        if not isinstance(name, str):
            return None
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            return None
        return name if next(module.parameters(), None) is None else None

    def forward(self, x: torch.Tensor, tap_only: bool = False) -> list:
        """``[tap, final]`` (see the class doc); ``tap_only``: ``[tap]``, stopping there."""
        if self.tap_module_spec:
            if tap_only:
                raise ValueError("a --mask-tap module tap cannot stop early (--k-early-exit)")
            final = self.model.forward_features(x)
            tapped = self._take_tap()
            pre = self.model.forward_head(final, pre_logits=True)
            return [tapped, pre.reshape(pre.shape[0], -1, 1, 1)]
        if tap_only:
            return self._checked(self.model.forward_intermediates(
                x, indices=[self.tap], stop_early=True, intermediates_only=True))
        final, taps = self.model.forward_intermediates(x, indices=[self.tap])
        pre = self.model.forward_head(final, pre_logits=True)
        return self._checked(taps) + [pre.reshape(pre.shape[0], -1, 1, 1)]

    def _checked(self, taps):
        if len(taps) != 1 or taps[0].shape[1] != self.out_channels[0]:
            raise RuntimeError(f"timm:{self.name}: forward_intermediates returned "
                               f"{[tuple(t.shape) for t in taps]}, not the {self.out_channels[0]}"
                               f"-channel map of feature stage {self.tap_module!r}")
        return list(taps)

    def classifier_state_dict(self, head: nn.Module) -> dict:
        """The state dict of ``timm.create_model(name, num_classes=K)`` with ``head``."""
        if self.classifier_name is None:
            raise ValueError(f"timm:{self.name}: its classifier is not one Linear that "
                             f"fastmix's head can replace, so no export loads into "
                             f"timm.create_model({self.name!r}, num_classes=K)")
        return _with_head(self.model.state_dict(), self.classifier_name, head)

    def plain_model(self, num_classes: int) -> nn.Module:
        """The plain timm classifier an export of this backbone loads into."""
        import timm
        return timm.create_model(self.name, num_classes=num_classes, in_chans=self.in_chans,
                                 **self.kwargs)


# ---- the plain classifiers an export loads into ----------------------------------------------
class PlainClassifier(nn.Module):
    """fastmix's own network (CIFAR-stem ResNet, WideResNet) + ``fc``: global average pooling of
    its final map and a Linear, as ``ClsHead``. Its state dict is the backbone's keys + ``fc.*``
    (the backbone's modules adopted under their names), what ``export_classifier`` writes for
    these archs: ``PlainClassifier(build_backbone(arch), K).load_state_dict(export,
    strict=True)``; ``forward(x)`` gives the logits."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        if backbone._parameters or backbone._buffers:
            raise ValueError("PlainClassifier adopts the backbone's submodules; this one holds "
                             "tensors of its own")
        for name, child in backbone.named_children():
            self.add_module(name, child)
        self.fc = nn.Linear(backbone.out_channels[1], num_classes)
        self.__dict__["_backbone"] = backbone     # not a submodule: its children are ours

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self._backbone(x)[-1], 1), 1))


def _with_head(state, name, head):
    """``state`` (detached CPU copies) plus ``head``'s Linear as ``<name>.weight`` / ``.bias``."""
    out = {k: v.detach().cpu().clone() for k, v in state.items()}
    linear = head.fc if isinstance(head, ClsHead) else head
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"the head must be a ClsHead or a Linear, got {type(head).__name__}")
    out.update({f"{name}.{k}": v.detach().cpu().clone() for k, v in linear.state_dict().items()})
    return out


def classifier_state_dict(backbone, head):
    """The plain classifier's state dict of ``backbone`` + ``head`` (a ``ClsHead``): what
    ``export_classifier`` writes. ``timm:`` -> ``timm.create_model(name, num_classes=K)``'s;
    ImageNet-stem ResNets -> ``torchvision.models.<arch>(num_classes=K)``'s; ``FeatureTap`` ->
    the wrapped model's (head under its ``classifier`` name); any other backbone (fastmix's
    CIFAR ResNets and WideResNets) -> its keys + ``fc.*`` (:class:`PlainClassifier`). Each
    loads with ``strict=True``, keys as they are."""
    backbone = getattr(backbone, "_orig_mod", backbone)       # a torch.compile'd module
    own = getattr(backbone, "classifier_state_dict", None)
    if own is not None:
        return own(head)
    return _with_head(backbone.state_dict(), "fc", head)


def plain_model(arch, num_classes, in_chans=3, **timm_kwargs):
    """The plain classifier an export of ``build_backbone(arch, in_chans)`` loads into (strictly),
    with the same logits: ``timm.create_model(name, num_classes=K)`` for ``timm:<name>``,
    torchvision's network for the ImageNet-stem archs, :class:`PlainClassifier` for fastmix's
    own. No weights are downloaded."""
    if arch.startswith("timm:"):
        import timm
        return timm.create_model(arch[len("timm:"):], num_classes=num_classes, in_chans=in_chans,
                                 **timm_kwargs)
    if arch in _TORCHVISION_RESNETS:
        return torchvision_resnet(arch, num_classes, in_chans)
    return PlainClassifier(build_backbone(arch, in_chans), num_classes)


_ARCHS = {
    # fastmix's CIFAR-stem ResNets: name: (block, layers, widths, groups, width_per_group)
    "resnet18_cifar": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 1, 64),
    "resnet34_cifar": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), 1, 64),
    "resnext50_cifar": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 32, 4),
    # A ResNet-10 of quarter width for quick CPU runs.
    "resnet_small": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), 1, 64),
    # The same ResNet-10 at half width (1.2M parameters): the accuracy study's CPU network.
    "resnet10_half": (BasicBlock, (1, 1, 1, 1), (32, 64, 128, 256), 1, 64),
}
# name: (depth, widen factor); CIFAR stem (first stride 1), default tap stage 2 (mask_layer 1).
_WRNS = {"wrn28_8": (28, 8), "wrn28_2": (28, 2), "wrn16_1": (16, 1)}
DEFAULT_MASK_LAYER = {**{name: 2 for name in (*_ARCHS, *_TORCHVISION_RESNETS)},
                      **{name: 1 for name in _WRNS}}

ARCH_NAMES = ("resnet18_cifar", "resnet34_cifar", "resnext50_cifar", *_TORCHVISION_RESNETS,
              "resnet_small", "resnet10_half", *_WRNS, "timm:<name>")


def parse_timm_kwargs(text) -> dict:
    """``"img_size=32,patch_size=4,depth=4"`` -> ``{"img_size": 32, ...}``: the extra keywords
    of ``timm.create_model``, each value a Python literal (number, bool, None, string, tuple)
    read with ``ast.literal_eval`` (never run), else kept as a plain string."""
    import ast
    out = {}
    if not text:
        return out
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--timm-kwargs takes key=value pairs separated by commas, e.g. "
                             f"img_size=32,patch_size=4; got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def _split_top_level(text):
    """Split on commas outside brackets (``window_size=(7,7)`` stays one item)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [i for i in items + [cur] if i.strip()]


def build_backbone(arch: str, in_chans: int = 3, mask_layer=None, timm_kwargs=None,
                   mask_tap=None) -> nn.Module:
    """Build a backbone by name: one of ``ARCH_NAMES``, or ``timm:<model>``.

    ``mask_layer``: the 0-based stage whose output feeds the Mix Block (None: the official
    choice, 2 for the ResNets, 1 for the WideResNets). For a timm backbone it indexes
    ``feature_info`` (None: the second-last stage); a ViT's feature_info lists its blocks, so
    ``mask_layer=5`` taps DeiT's sixth block as the official ViT configs do (``out_indices=(5,
    11)``). ``timm_kwargs``: ``timm.create_model`` keywords (``img_size``, ``patch_size``, ...).
    ``mask_tap``: a timm module's output instead (``TimmBackbone._hook_tap``: Swin's official tap
    is ``layers.3.downsample+ln``)."""
    if arch.startswith("timm:"):
        return TimmBackbone(arch[len("timm:"):], in_chans=in_chans,
                            tap=-2 if mask_layer is None else mask_layer, tap_module=mask_tap,
                            **(timm_kwargs or {}))
    if mask_tap:
        raise ValueError("--mask-tap applies to timm:<name> backbones")
    if timm_kwargs:
        raise ValueError("--timm-kwargs applies to timm:<name> backbones")
    if arch not in DEFAULT_MASK_LAYER:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_NAMES)}")
    mask_layer = DEFAULT_MASK_LAYER[arch] if mask_layer is None else mask_layer
    if arch in _WRNS:
        depth, widen = _WRNS[arch]
        return WideResNet(depth, widen, first_stride=1, in_chans=in_chans, mask_layer=mask_layer)
    if arch in _TORCHVISION_RESNETS:
        return TorchvisionResNet(arch, in_chans=in_chans, mask_layer=mask_layer)
    block, layers, widths, groups, wpg = _ARCHS[arch]
    return ResNet(block, layers, widths, in_chans=in_chans, groups=groups, width_per_group=wpg,
                  mask_layer=mask_layer)


def load_torchvision_weights(backbone: nn.Module, path: str) -> int:
    """Load a torchvision-format ImageNet state dict (``torchvision.models.resnet18(weights=...)
    .state_dict()`` saved with ``torch.save``) into an ImageNet-stem ResNet/ResNeXt
    (:class:`TorchvisionResNet`: torchvision's own network).

    Read with ``torch.load(weights_only=True)`` (a file cannot run code). The classifier
    (``fc.*``) is dropped: fastmix's heads are new. Every other tensor must match a parameter or
    buffer of ``backbone`` by name and shape, and every backbone tensor must be in the file;
    otherwise a ``ValueError`` names what differs, before anything is changed. Returns the
    number of tensors loaded."""
    import os
    backbone = getattr(backbone, "_orig_mod", backbone)       # a torch.compile'd module
    if not isinstance(backbone, TorchvisionResNet):
        raise ValueError("--init-weights loads torchvision ImageNet weights into an ImageNet-stem "
                         "ResNet/ResNeXt (resnet18/34/50/101, resnext50_32x4d, resnext101_32x4d)")
    if not os.path.isfile(path):
        raise ValueError(f"--init-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        from fastmix.checkpoint import load_failure_reason   # (fastmix.checkpoint imports this)
        raise ValueError(f"--init-weights {path} is not a loadable state dict (truncated, "
                         f"corrupt, or not a torch.save file): "
                         f"{load_failure_reason(e, path)}") from None
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

    def forward(self, feat) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(feat, 1), 1))
