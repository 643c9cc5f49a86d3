"""The backbones as modules of our own: ResNet-18/50 and Wide-ResNet-50-2/101-2, the
architecture of He et al. (2016) and Zagoruyko & Komodakis (2016) as torchvision lays it out
(stride on the 3x3 convolution, the same parameter and buffer names, so its state_dicts load
unchanged), cut where SPADE reads it: ``layer1..3`` and the pooled ``layer4``.

Why not torchvision's own: importing ``torchvision`` imports ``torch._dynamo`` (1.7 of its
1.9 s here), more than building and loading the model. Its seeded random init is drawn here as
its constructor draws it (:func:`random_init`, equal bit for bit: ``tests/test_backbone.py``), and
its ImageNet files are read by URL (``backbone.IMAGENET_URLS``): no command imports it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# name -> (block, blocks per stage, width of the bottleneck per 64 planes)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128),
}


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, width_per_64: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width_per_64: int):
        super().__init__()
        width = planes * width_per_64 // 64
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """``forward(x)`` -> ``{"layer1", "layer2", "layer3": (B, C, h, w), "pool": (B, D)}``."""

    def __init__(self, name: str):
        super().__init__()
        kind, blocks, width_per_64 = ARCHITECTURES[name]
        block = Basic if kind == "basic" else Bottleneck
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layers = []
            for j in range(n):
                layers.append(block(cin, planes, 2 if i and not j else 1, width_per_64))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, 1000)  # unused; kept so that classifier state_dicts load strictly

    def fold_batchnorm(self) -> ResNet:
        """This module (in eval mode) with every batch norm folded into the convolution before
        it (its scale into the weights, its shift as the bias) and replaced by the identity: the
        same function up to rounding, two fewer passes over each activation. In place; returns
        ``self``."""
        for module in self.modules():
            if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[1], nn.BatchNorm2d):
                module[0], module[1] = fuse_conv_bn_eval(module[0], module[1]), nn.Identity()
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                if isinstance(getattr(module, bn, None), nn.BatchNorm2d):
                    setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
                    setattr(module, bn, nn.Identity())
        return self

    def forward(self, x) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        return {"layer1": l1, "layer2": l2, "layer3": l3, "pool": torch.flatten(self.avgpool(self.layer4(l3)), 1)}


def _materialize(model: nn.Module) -> None:
    """Uninitialised CPU tensors for a meta-device module's parameters and buffers, in place
    (``Module.to_empty`` does the same through torch's reference ``empty_like``, which imports
    sympy: 0.3 s of every process that builds a random-init model)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def random_init(name: str) -> dict[str, torch.Tensor]:
    """torchvision's random init of ``name`` as a state_dict, drawn from torch's global random
    state exactly as its constructor draws it: every module's own init at construction, in
    torchvision's order (a stage's shortcut convolution before its first block's), which
    ``kaiming_normal_`` then overwrites for every convolution in module order; the classifier
    keeps its construction draws; batch norms are ones and zeros."""
    with torch.device("meta"):
        model = ResNet(name)
    _materialize(model)
    uniform = lambda shape: nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))  # noqa: E731
    uniform(model.conv1.weight.shape)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            if block.downsample is not None:
                uniform(block.downsample[0].weight.shape)
            for conv in ("conv1", "conv2", "conv3"):
                if hasattr(block, conv):
                    uniform(getattr(block, conv).weight.shape)
    with torch.no_grad():
        nn.init.kaiming_uniform_(model.fc.weight, a=math.sqrt(5))
        nn.init.uniform_(model.fc.bias, -1 / math.sqrt(model.fc.in_features), 1 / math.sqrt(model.fc.in_features))
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, running mean 0 and variance 1, no batches
    return model.state_dict()
