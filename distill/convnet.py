"""ConvNet-3, the backbone that dataset-condensation papers (DC, DSA, DM, MTT, FYI) distil with and
report on.

Follows `ConvNet` in VICO-UoE/DatasetCondensation `networks.py` with its default setting
(`get_default_convnet_setting`: width 128, depth 3, ReLU, 'instancenorm', average pooling):
each block is conv3x3 → GroupNorm(C, C, affine) → ReLU → AvgPool2d(2), then one linear classifier.
GroupNorm with one group per channel is the reference's 'instancenorm': it normalises each sample on
its own, so embeddings do not depend on which other images share the batch (DM relies on this).

Kept from the reference: a 1-channel input gets padding 3 in the first conv (so MNIST's 28 px become
32 px and the feature map matches CIFAR's), module names `features` / `classifier`, and `embed`.
Our choice where it is open: the classifier's input size is computed from the real spatial sizes,
so inputs the reference never combined (e.g. 3 channels at 28 px) also work.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _feature_size(size: int, depth: int, first_pad: int) -> int:
    """Spatial size after `depth` blocks: a 3x3 conv with padding p maps s to s + 2p - 2, pooling halves."""
    for d in range(depth):
        size = (size + 2 * (first_pad if d == 0 else 1) - 2) // 2
    if size < 1:
        raise ValueError(f"image too small for a depth-{depth} ConvNet")
    return size


class ConvNet(nn.Module):
    """ConvNet-`depth` of width `width` for `in_chans` x `image_size` inputs."""

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        width: int = 128,
        depth: int = 3,
    ):
        super().__init__()
        height, wide = (image_size, image_size) if isinstance(image_size, int) else image_size
        first_pad = 3 if in_chans == 1 else 1  # reference: grey 28 px → 32 px after the first conv
        layers: list[nn.Module] = []
        chans = in_chans
        for d in range(depth):
            layers += [
                nn.Conv2d(chans, width, kernel_size=3, padding=first_pad if d == 0 else 1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            chans = width
        self.features = nn.Sequential(*layers)
        self.num_features = width * _feature_size(height, depth, first_pad) * _feature_size(wide, depth, first_pad)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features before the classifier (the embedding DM matches)."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))

