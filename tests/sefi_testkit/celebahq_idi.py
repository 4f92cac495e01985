"""A tiny CelebAHQ-IDI in its authors' published layout, written from scratch for the tests: image/<index>.jpg,
annotation/idi-5.json (their identity split, every key their annotation script writes), annotation/region_bbox.pth
(their face-region boxes: region -> (images, 4) rows of top, left, bottom, right in pixels of the 1024-px photo),
annotation/dialog/captions_hq.json (CelebA-Dialog's captions) and mask/*.png (random masks). Tests read back what
was written from the returned `Written`, never from the reader under test."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REGION_NAMES = ("leye", "reye", "eye", "eyebrow", "lowerface", "wholeface", "mouth", "nose")  # what their file holds
RESOLUTION = 1024
# identity -> its image indices (the first five its references); the split of each
IDENTITIES = {
    "train": {"0012": [3, 7, 11, 15, 19, 23, 27], "0031": [1, 5, 9, 13, 17, 21], "0047": [0, 4, 8, 12, 16, 20, 24, 28]},
    "val": {"0102": [2, 6, 10, 14, 18, 22]},
    "test": {"0205": [25, 26, 29, 30, 31, 32, 33], "0208": [34, 35, 36, 37, 38, 39]},
}
NO_CAPTION = 21  # an image without a caption, as 5380.jpg is in theirs
NO_LANDMARKS = 9  # an image whose landmarks were not found: its boxes are all zero


@dataclass
class Written:
    root: Path
    boxes: dict[str, torch.Tensor]  # region -> (images, 4) top, left, bottom, right in pixels at RESOLUTION
    captions: dict[int, str]
    identities: dict[str, dict[str, list[int]]] = field(default_factory=lambda: IDENTITIES)
    masks: list[Path] = field(default_factory=list)

    def images(self, split: str) -> list[int]:
        return sorted(i for indices in self.identities[split].values() for i in indices)

    def references(self, name: str) -> list[int]:
        return sorted(self._indices(name)[:5])

    def inferences(self, name: str) -> list[int]:
        return sorted(self._indices(name)[5:])

    def _indices(self, name: str) -> list[int]:
        return next(ids[name] for ids in self.identities.values() if name in ids)


def write_celebahq_idi(root: Path, size: int = 32, captions: bool = True, random_masks: bool = True) -> Written:
    """CelebAHQ-IDI-5 with the identities above, photos of `size` px (the boxes still in 1024-px pixels, as theirs)."""
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "annotation" / "dialog").mkdir(parents=True, exist_ok=True)
    count = 1 + max(i for ids in IDENTITIES.values() for indices in ids.values() for i in indices)
    for index in range(count):
        write_photo(root / "image" / f"{index}.jpg", index, size)
    boxes = region_boxes(count)
    torch.save({"landmarks": torch.zeros(count, 68, 2).long(), "bboxes": boxes}, root / "annotation" / "region_bbox.pth")
    (root / "annotation" / "idi-5.json").write_text(json.dumps(split_annotation(count), indent=2))
    texts = {i: f"Person {i} has short hair and is smiling." for i in range(count) if i != NO_CAPTION}
    if captions:
        entries = {f"{i}.jpg": {"attribute_wise_captions": {"Smiling": text}, "overall_caption": text}
                   for i, text in texts.items()}
        (root / "annotation" / "dialog" / "captions_hq.json").write_text(json.dumps(entries))
    written = Written(root, boxes, texts if captions else {})
    if random_masks:
        (root / "mask").mkdir(exist_ok=True)
        for k in range(3):  # mask k: white in row band k
            image = np.zeros((size, size), np.uint8)
            image[k * size // 4:(k + 1) * size // 4] = 255
            Image.fromarray(image).save(root / "mask" / f"{k:05d}.png")
            written.masks.append(root / "mask" / f"{k:05d}.png")
    return written


def write_photo(path: Path, index: int, size: int) -> None:
    """A photo told apart from its mirror: dark left half, bright right half, a shade of its own."""
    image = np.zeros((size, size, 3), np.uint8)
    image[:, :size // 2] = 20 + index
    image[:, size // 2:] = 200 + index % 50
    Image.fromarray(image).save(path, quality=95)


def region_boxes(count: int) -> dict[str, torch.Tensor]:
    """Distinct boxes per region and image, none symmetric left to right: (top, left, bottom, right) at 1024 px."""
    boxes = {}
    for r, name in enumerate(REGION_NAMES):
        rows = [[128 + 64 * (r % 4), 64 * (i % 4), 512 + 128 * (r % 3), 640 + 64 * (i % 3)] for i in range(count)]
        boxes[name] = torch.tensor(rows).long()
        boxes[name][NO_LANDMARKS] = 0
    return boxes


def split_annotation(count: int) -> dict:
    """idi-5.json as their annotation script writes it."""
    splits = ("train", "val", "test")
    annotation = {f"{s}_ids": sorted(IDENTITIES[s]) for s in splits}
    annotation.update(duplicate_images=[[37, 38]], discard_ids=["0999"], id2image={})
    image2id = [""] * count
    for s in splits:
        annotation[f"{s}_images"] = {"all": [], "infer": [], "ref": []}
        for name, indices in sorted(IDENTITIES[s].items()):
            ref = [f"{i}.jpg" for i in sorted(indices[:5])]
            infer = [f"{i}.jpg" for i in sorted(indices[5:])]
            annotation["id2image"][name] = {"infer": infer, "ref": ref}
            annotation[f"{s}_images"]["all"] += infer + ref
            annotation[f"{s}_images"]["infer"] += infer
            annotation[f"{s}_images"]["ref"] += ref
            for i in indices:
                image2id[i] = name
    annotation["image2id"] = image2id
    images = {s: len(annotation[f"{s}_images"]["all"]) for s in splits}
    annotation["meta"] = {"n_ref": 5, "n_images": sum(images.values()),
                          "n_infer_images": sum(len(annotation[f"{s}_images"]["infer"]) for s in splits),
                          "n_ids": sum(len(IDENTITIES[s]) for s in splits), "n_discard_ids": 1,
                          "n_discard_images": count - sum(images.values()),
                          **{f"n_{s}_ids": len(IDENTITIES[s]) for s in splits},
                          **{f"n_{s}_images": images[s] for s in splits}, "resolution": RESOLUTION}
    return annotation
