"""The PVA paper's identity similarity (its "ID" column: 0.741 for PVA on CelebAHQ-IDI), host-free: how close a
repainted face is to a person, as the cosine of a face recognizer's L2-normalised features; and what the paper reports
of it (mean and standard deviation per inpainting region, and the mean of the region means).

As the authors measure it (reimplemented from their description and their evaluation code):
- each picture is resized to 256x256 (bilinear, as PIL does), rows 35:223 and columns 35:223 are the face, average-pooled
  to the recognizer's 112x112 input in [-1, 1]. The columns differ from the crop PVA's encoder reads features with
  (face.py: 32:220): the metric's crop is square, 3 pixels further right;
- a repainted picture is compared with ONE picture: the original photo that was masked and repainted (their ground
  truth; one feature per photo of the dataset), not with the references the method was given;
- the recognizer is glint360k CosFace iresnet r100, another network than the ArcFace r50 PVA reads identities with;
- per region (lowerface, eyebrow, wholeface, random): the mean and the population standard deviation (ddof 0) of the
  cosines; then the plain mean of the region means.

Several reference photos (a person's photos, where no original exists): the score is the mean of the cosines to each,
i.e. the dot product with the mean of their unit features (not renormalised). With one photo it is the paper's
cosine; a picture scores 1 against itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .face import INPUT_SIZE

METRIC_SIZE = 256  # every picture is read at 256x256
METRIC_ROWS, METRIC_COLS = (35, 223), (35, 223)  # the face in it: a 188-pixel square
METRIC_SIDE = METRIC_ROWS[1] - METRIC_ROWS[0]
REGIONS = ("lowerface", "eyebrow", "wholeface", "random")  # the paper's inpainting regions, in its table's order
BATCH = 16  # pictures per recognizer pass


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear with PIL's antialiasing when shrinking (the authors resize with
    PIL); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)


def check_pictures(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected pictures of shape (batch, 3, height, width); got {tuple(images.shape)}")


def metric_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) square, aligned face pictures in [0, 1] -> the recognizer's (B, 3, 112, 112) input in [-1, 1], as
    the paper's metric reads them."""
    check_pictures(images)
    x = resized(images.float() * 2 - 1, METRIC_SIZE)
    return F.adaptive_avg_pool2d(x[:, :, METRIC_ROWS[0]:METRIC_ROWS[1], METRIC_COLS[0]:METRIC_COLS[1]], INPUT_SIZE)


def face_square(mask: torch.Tensor) -> tuple[int, int, int]:
    """(H, W) mask over a face -> (top, left, side): the square around its bounding box (values > 0.5), centred on it,
    as large as its longer side (at most the picture's shorter side), shifted inside the picture."""
    rows, cols = torch.nonzero(mask > 0.5, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("the mask covers nothing (no value above 0.5)")
    height, width = mask.shape
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    side = min(max(bottom - top, right - left), height, width)
    top = min(max((top + bottom - side) // 2, 0), height - side)
    left = min(max((left + right - side) // 2, 0), width - side)
    return top, left, side


def square_input(image: torch.Tensor, square: tuple[int, int, int]) -> torch.Tensor:
    """(3, H, W) picture in [0, 1] and a (top, left, side) square on its face -> the recognizer's (3, 112, 112) input:
    the square is read as the metric's face crop of an aligned picture (rows and columns 35:223 of 256), so a square
    exactly there gives what metric_input gives."""
    top, left, side = square
    face = image[None, :3, top:top + side, left:left + side].float() * 2 - 1
    return F.adaptive_avg_pool2d(resized(face, METRIC_SIDE), INPUT_SIZE)[0]


def unit_features(network: nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """(B, 3, 112, 112) recognizer inputs -> (B, 512) L2-normalised fp32 features, on the CPU (computed on the network's
    device and dtype, BATCH at a time)."""
    weight = next(network.parameters())
    with torch.no_grad():
        features = torch.cat([network(faces[i:i + BATCH].to(weight.device, weight.dtype)).float().cpu()
                              for i in range(0, faces.shape[0], BATCH)])
    return F.normalize(features, dim=1)


def person_feature(reference_features: torch.Tensor) -> torch.Tensor:
    """(N, 512) unit features of a person's reference photos -> (512,) their mean, not renormalised: a dot product
    with it is the mean of the cosines to each photo (with one photo, the cosine to it)."""
    if reference_features.ndim != 2 or reference_features.shape[0] == 0:
        raise ValueError(f"expected (photos, features) of at least one photo; got {tuple(reference_features.shape)}")
    return reference_features.mean(0)


def identity_similarity(network: nn.Module, faces: torch.Tensor, reference_faces: torch.Tensor) -> torch.Tensor:
    """Recognizer inputs of B pictures and of N reference photos of the person -> (B,) the paper's identity
    similarity of each picture (with N > 1, the mean of its cosines to the photos)."""
    return unit_features(network, faces) @ person_feature(unit_features(network, reference_faces))


@dataclass(frozen=True)
class RegionScore:
    mean: float
    std: float  # population standard deviation (ddof 0), as the paper's table
    count: int


@dataclass(frozen=True)
class IdentityReport:
    """The paper's table row: each region's mean ± std, and the mean of the region means (its "ID" figure)."""
    regions: dict[str, RegionScore]
    mean_of_means: float

    def lines(self) -> list[str]:
        return ([f"{name}: {s.mean:.3f} ± {s.std:.3f} ({s.count} pictures)" for name, s in self.regions.items()]
                + [f"mean of region means: {self.mean_of_means:.3f}"])


def summarize(scores: Mapping[str, Sequence[float]]) -> IdentityReport:
    """Similarities by inpainting region -> the report, regions in the order given."""
    if not scores:
        raise ValueError("no region has any score")
    regions = {}
    for name, values in scores.items():
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if values.numel() == 0 or not bool(torch.isfinite(values).all()):
            raise ValueError(f"region {name!r} has no scores or a NaN/infinite one: {values.tolist()[:8]}")
        regions[name] = RegionScore(float(values.mean()), float(values.std(correction=0)), values.numel())
    return IdentityReport(regions, math.fsum(s.mean for s in regions.values()) / len(regions))


@dataclass
class Case:
    """One inpainting of an evaluation: the photo (3, H, W) in [0, 1] that is masked, repainted and then compared with
    (the paper's ground truth), the mask (H, W) of what is repainted (1: repaint), its region's name, and the other
    photos (N, 3, H, W) of the person, which the method is given."""
    region: str
    photo: torch.Tensor
    mask: torch.Tensor
    references: torch.Tensor


def evaluate(repaint: Callable[[Case], torch.Tensor], cases: Iterable[Case], network: nn.Module) -> IdentityReport:
    """The paper's protocol: repaint each case ((3, H, W) in [0, 1], as its photo), score it against its own photo with
    the recognizer network (glint360k CosFace r100 for the paper's figures), report by region."""
    scores: dict[str, list[float]] = {}
    for case in cases:
        repainted = metric_input(repaint(case)[None])  # its size may differ from the photo's
        score = identity_similarity(network, repainted, metric_input(case.photo[None]))
        scores.setdefault(case.region, []).append(float(score[0]))
    return summarize(scores)
