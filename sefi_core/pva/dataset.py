"""The dataset PVA's identity encoder trains on: a folder with one sub-folder per person, each holding two or more photos
of that person (aligned face crops, as CelebA-HQ's), and optionally a face mask beside a photo: `photo.mask.png` for
`photo.jpg`, white where the face is (what the training inpaints). Without a mask the face region is a box: the aligned
face box (the recognizer's crop region), a box given as fractions of the photo, or the whole photo. A caption may sit
beside a photo too: `photo.txt` (e.g. CelebA-Dialog's for CelebA-HQ); the paper prompts half the samples with it.
A folder of random masks (MaskBank) may widen every sample's face region, as the authors join one to each region.
The authors' own dataset, CelebAHQ-IDI in its published layout, is read by celebahq_idi.py; `open_dataset` tells the
two layouts apart and gives the reader of either (the same interface: people, names, draw, digest).

Each training sample is drawn as the authors draw it (their training dataset class): a person, one of their photos as the
target, and 1-5 of their other photos as the references (a random count), plus a flipped copy of the last reference
20% of the time. Photos are read when drawn: a dataset of thousands of people never sits in memory.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .encoder import MAX_REFERENCES
from .face import CROP_COLS, CROP_FROM, CROP_ROWS

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"
CAPTION_SUFFIX = ".txt"
FLIPPED_REFERENCE_CHANCE = 0.2
CAPTION_CHANCE = 0.5  # the authors' share of samples prompted with their photo's caption
ALIGNED_FACE_BOX = (CROP_COLS[0] / CROP_FROM, CROP_ROWS[0] / CROP_FROM, CROP_COLS[1] / CROP_FROM,
                    CROP_ROWS[1] / CROP_FROM)  # (left, top, right, bottom) as fractions
WHOLE_PHOTO = (0.0, 0.0, 1.0, 1.0)
ORIENTATION = 0x0112  # the EXIF tag: 5-8 turn the photo by 90 degrees


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message says what to change."""


@dataclass(frozen=True)
class Caption:
    """A caption given as text (an entry of CelebA-Dialog's captions file), not as a file beside the photo."""
    text: str


@dataclass(frozen=True)
class BoxMask:
    """A face region drawn for one sample, not painted in a file: a box (left, top, right, bottom as fractions of the
    photo), mirrored with its photo where the photo is drawn mirrored, joined with a random mask file where one is
    drawn (not mirrored: it is random anyway, as the authors join it after the flip)."""
    box: tuple[float, float, float, float]
    mirrored: bool = False
    random: str | None = None

    def read(self, size: int) -> torch.Tensor:
        mask = box_mask(self.box, size)
        mask = mask.flip(-1) if self.mirrored else mask
        return torch.maximum(mask, mask_square(self.random, size)) if self.random else mask


@dataclass(frozen=True)
class Photo:
    path: str
    mask: str | BoxMask | None  # its face mask file, or the region drawn for it, where there is one
    caption: str | Caption | None = None  # its caption file (or text), where there is one
    mirrored: bool = False  # drawn mirrored left to right (CelebAHQ-IDI's draws, as the authors train)


@dataclass
class Draw:
    target: Photo
    references: list[Photo]
    flip_last: bool  # add a mirrored copy of the last reference


class FaceDataset:
    def __init__(self, root: str):
        self.root = root
        if not os.path.isdir(root):
            raise DatasetError(f"The dataset folder {root!r} does not exist. Give a folder with one sub-folder per "
                               "person (two or more face photos each), e.g. under ComfyUI's input folder.")
        self.people: list[list[Photo]] = []
        self.names: list[str] = []
        self.too_few: list[str] = []  # people with one photo: nothing to be the target's reference
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder) or name.startswith("."):
                continue
            files = sorted(os.listdir(folder))
            photos = [Photo(os.path.join(folder, f), self._beside(folder, f, MASK_SUFFIX, files),
                            self._beside(folder, f, CAPTION_SUFFIX, files)) for f in files
                      if f.lower().endswith(PHOTO_SUFFIXES) and not f.lower().endswith(MASK_SUFFIX)]
            if len(photos) >= 2:
                self.people.append(photos)
                self.names.append(name)
            else:
                self.too_few.append(name)
        if len(self.people) < 2:
            raise DatasetError(
                f"The dataset folder {root!r} has {len(self.people)} person folder(s) with two or more photos "
                f"({len(self.too_few)} with fewer). The encoder learns what tells people apart: give a folder with one "
                "sub-folder per person, each with 2 or more photos (.png, .jpg, .webp); the paper used 1,963 people.")
        for photo in (p for person in self.people for p in person):
            check_mask_fits(photo)

    @staticmethod
    def _beside(folder: str, file: str, suffix: str, files: list[str]) -> str | None:
        """The photo's mask or caption file (photo.mask.png, photo.txt), where there is one."""
        name = os.path.splitext(file)[0] + suffix
        return os.path.join(folder, name) if name in files else None

    @property
    def photo_count(self) -> int:
        return sum(map(len, self.people))

    def draw(self, generator: torch.Generator) -> Draw:
        """A person, their target photo and 1-5 other photos of them (order free), from `generator` only."""
        person = self.people[int(torch.randint(len(self.people), (1,), generator=generator))]
        order = torch.randperm(len(person), generator=generator).tolist()
        count = int(torch.randint(1, min(MAX_REFERENCES, len(person) - 1) + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < FLIPPED_REFERENCE_CHANCE)
        return Draw(person[order[0]], [person[i] for i in order[1:1 + count]], flip)

    def digest(self) -> str:
        """Which files the dataset holds (names and sizes): a continued run on a changed dataset is told apart."""
        digest = hashlib.sha256()
        for person in self.people:
            for photo in person:
                for path in filter(None, (photo.path, photo.mask, photo.caption)):
                    digest.update(f"{os.path.relpath(path, self.root)}:{os.path.getsize(path)}".encode())
        return digest.hexdigest()[:32]


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'left, top, right, bottom' as fractions of the photo (0-1)."""
    try:
        box = tuple(float(part) for part in text.replace(";", ",").split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise DatasetError(f"The face box {text!r} is not 'left, top, right, bottom' as fractions of the photo with "
                           "left < right and top < bottom, e.g. '0.125, 0.137, 0.859, 0.871' (the aligned face box).")
    return box


def box_mask(box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """(size, size): 1 inside the box (fractions of the square photo)."""
    left, top, right, bottom = (round(v * size) for v in box)
    mask = torch.zeros(size, size)
    mask[top:max(bottom, top + 1), left:max(right, left + 1)] = 1
    return mask


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file it will not decode


def image_size(path: str, what: str = "an image") -> tuple[int, int]:
    """(width, height) as the file's header gives it (nothing decoded), upright as its EXIF orientation shows it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    except UNREADABLE as error:
        raise DatasetError(f"{path} could not be read as {what} ({error}). Remove or replace it.") from None
    return (height, width) if turned else (width, height)


def check_mask_fits(photo: Photo) -> None:
    """A photo and its face mask: both readable (no decompression bomb), the mask painted on the photo (its size)."""
    photo_size = image_size(photo.path)
    if photo.mask is not None:
        mask_size = image_size(photo.mask, "a mask image")
        if mask_size != photo_size:
            raise DatasetError(f"The face mask {photo.mask} is {mask_size[0]}x{mask_size[1]} pixels, its photo "
                               f"{photo_size[0]}x{photo_size[1]}: a mask must be painted on its photo, at its size. "
                               "Save the mask at the photo's size, or delete it to use the face box.")


def read_photo(path: str, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: the photo's centre square, resized."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except UNREADABLE as error:
        raise DatasetError(f"{path} could not be read as an image ({error}). Remove or replace it.") from None
    square = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_drawn_photo(photo: Photo, size: int) -> torch.Tensor:
    """(3, size, size): a drawn photo's centre square, mirrored where it was drawn mirrored."""
    square = read_photo(photo.path, size)
    return square.flip(-1) if photo.mirrored else square


class MaskBank:
    """A folder of random inpainting masks (.png, white = inpaint; e.g. the irregular masks of inpainting
    benchmarks): each sample's face region is joined with one, drawn from the run's generator."""

    def __init__(self, folder: str):
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png")) if os.path.isdir(folder) else []
        if not files:
            state = "has no .png masks" if os.path.isdir(folder) else "does not exist"
            raise DatasetError(f"The random masks folder {folder!r} {state}. Give a folder of mask images (white = "
                               "inpaint), or leave random_masks_folder empty.")
        self.folder, self.paths = folder, [os.path.join(folder, f) for f in files]

    def draw(self, generator: torch.Generator, size: int) -> torch.Tensor:
        """(size, size) in {0, 1}: one of the masks, its centre square resized."""
        return mask_square(self.paths[int(torch.randint(len(self.paths), (1,), generator=generator))], size)


def read_caption(path: str | Caption) -> str:
    """A caption file's text (or a caption's text) on one line; refused where it is empty or not UTF-8 text."""
    if isinstance(path, Caption):
        return " ".join(path.text.split())
    try:
        with open(path, encoding="utf-8") as file:
            text = " ".join(file.read().split())
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} could not be read as a UTF-8 caption ({error}). Save it as UTF-8 text, or delete "
                           "it.") from None
    if not text:
        raise DatasetError(f"The caption {path} is empty. Write what the photo shows (e.g. 'She has long blond hair "
                           "and is smiling.'), or delete it.")
    return text


def mask_square(path: str, size: int) -> torch.Tensor:
    """(size, size) in {0, 1}: a mask image's centre square (white = 1), resized."""
    try:
        with Image.open(path) as image:
            mask = ImageOps.fit(ImageOps.exif_transpose(image).convert("L"), (size, size), Image.Resampling.NEAREST)
    except UNREADABLE as error:
        raise DatasetError(f"{path} could not be read as a mask image ({error}). Remove or replace it.") from None
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


def read_mask(path: str | BoxMask, size: int) -> torch.Tensor:
    """(size, size) in {0, 1}: a face mask's centre square (white = face), or the region drawn for the photo; refused
    where it covers nothing."""
    if isinstance(path, BoxMask):
        return path.read(size)
    mask = mask_square(path, size)
    if not bool(mask.any()):
        raise DatasetError(f"The face mask {path} is black in its photo's centre square: nothing to inpaint. Paint the "
                           "face white, or delete the mask to use the face box.")
    return mask


SPLITS = ("train", "val", "test")  # CelebAHQ-IDI's identity splits; a folder of people is all "train"


def open_dataset(root: str, split: str = "train"):
    """The reader of the dataset at `root`, of either layout: CelebAHQ-IDI as its authors publish it (a folder holding
    image/ and annotation/, or the folder above it, celebahq/) gives the identities of `split`; a folder with one
    sub-folder per person has only "train"."""
    from .celebahq_idi import CelebAHQIDI, celebahq_idi_root  # a local import: that module builds on this one

    if split not in SPLITS:
        raise DatasetError(f"The split {split!r} is not one of {', '.join(SPLITS)} (CelebAHQ-IDI's identity splits).")
    if not os.path.isdir(root):
        raise DatasetError(f"The dataset folder {root!r} does not exist. Give a folder with one sub-folder per person "
                           "(two or more face photos each), or CelebAHQ-IDI as downloaded (the folder holding image/ "
                           "and annotation/), e.g. under ComfyUI's input folder.")
    idi_root = celebahq_idi_root(root)
    if idi_root is not None:
        return CelebAHQIDI(idi_root, split)
    if split != "train":
        raise DatasetError(f"The dataset folder {root!r} is a folder of people: it has no {split!r} split, only 'train' "
                           "(every person in it). Held-out identities come with CelebAHQ-IDI's split annotation "
                           "(annotation/idi-5.json).")
    return FaceDataset(root)
