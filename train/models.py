"""Backbones: torchvision ResNets without their classifier (paper App. A.1).

The encoder is a ResNet-50 "without the final classification layer" (2048-d pooled
features); ResNet-18/34 (512-d) serve small runs. ``fc`` becomes ``nn.Identity`` and
nothing else is renamed, so the backbone's state_dict loads into
``torchvision.models.resnetXX()`` with only ``fc.weight``/``fc.bias`` missing; that is
what the evaluation suite relies on (``ckpt["backbone"]``).
"""
from __future__ import annotations

import torchvision
from torch import nn

from mscn.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50")


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet returning pooled features, and their width."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch = {arch!r}: must be one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim
