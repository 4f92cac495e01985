"""The face recognizer PVA reads identities with: ArcFace's iresnet (Deng et al.; InsightFace's arcface_torch layout,
so its published `.pth` state dicts load by name), and the authors' preprocessing of a face photo for it.

One 512-d feature per photo, not normalised (PVA feeds the raw feature to its encoder). Defined here, reimplemented from
the architecture's description; the weights come from a file the user provides (nodes/ loads it without unpickling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)
FEATURE_DIM = 512
INPUT_SIZE = 112
CROP_FROM = 256  # the photo is resized to 256x256, then rows 35:223, columns 32:220 are the face (aligned faces)
CROP_ROWS, CROP_COLS = (35, 223), (32, 220)


class Block(nn.Module):
    """iresnet's residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (strided), BN, plus the shortcut."""

    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels_in, eps=1e-5)
        self.conv1 = nn.Conv2d(channels_in, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or channels_in != channels:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """(B, 3, 112, 112) in [-1, 1] -> (B, 512) face features."""

    def __init__(self, depth: str = "r50"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"iresnet depth {depth!r} is not one of {sorted(DEPTHS)}")
        self.depth = depth
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(WIDTHS[0])
        channels = WIDTHS[0]
        for index, (blocks, width) in enumerate(zip(DEPTHS[depth], WIDTHS), 1):
            layer = [Block(channels, width, 2)] + [Block(width, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.fc = nn.Linear(channels * 7 * 7, FEATURE_DIM)
        self.features = nn.BatchNorm1d(FEATURE_DIM, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)  # fixed at 1 in ArcFace's training

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def face_crop(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) square face photos in [0, 1] -> the recognizer's (B, 3, 112, 112) input in [-1, 1], as the PVA
    authors prepare it: resize to 256, keep rows 35:223 and columns 32:220, average-pool to 112."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected face photos of shape (batch, 3, height, width); got {tuple(images.shape)}")
    x = images.float() * 2 - 1
    if x.shape[-2:] != (CROP_FROM, CROP_FROM):
        x = F.interpolate(x, (CROP_FROM, CROP_FROM), mode="bilinear", align_corners=True)
    x = x[:, :, CROP_ROWS[0]:CROP_ROWS[1], CROP_COLS[0]:CROP_COLS[1]]
    return F.adaptive_avg_pool2d(x, INPUT_SIZE)


def depth_of(state_dict: dict) -> str:
    """Which iresnet a state dict is, from its blocks per layer; ValueError when it is none."""
    counts = tuple(1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    for depth, blocks in DEPTHS.items():
        if counts == blocks:
            return depth
    raise ValueError(f"blocks per layer {counts} are none of the iresnets {DEPTHS}")
