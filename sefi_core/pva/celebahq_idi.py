"""CelebAHQ-IDI, the dataset PVA's authors trained and evaluated on, read in the layout they publish it in (their
repository's README links the download; unpacked, it is their `data/celebahq`):

    image/<index>.jpg                         the CelebA-HQ photos (1024 px, aligned faces), named by their index
    annotation/idi-5.json                     the identity split: train/val/test identities, each identity's
                                              reference ("ref", 5) and inference ("infer") images
    annotation/region_bbox.pth                face-region boxes per image index, found from face landmarks
                                              (lowerface, eyebrow, wholeface, ...), each (top, left, bottom, right)
                                              in pixels of the 1024-px photo; read weights-only
    annotation/dialog/captions_hq.json        optional: CelebA-Dialog's captions, {"<index>.jpg": {"overall_caption"}}
    mask/*.png                                optional: random inpainting masks, white = inpaint

Without captions every prompt is the plain one, and without the mask folder the face region alone is inpainted: the
authors' code does the same. Everything else missing or damaged is refused when the dataset is opened, before any
training, naming the part.

A draw is the authors' (their training dataset over all images of the split, and their training loop): a target image
of the split, any of them equally likely; 1-5 (a random count) other images of its identity as references, in random
order; each of them and the target mirrored half of the time (the target's region with it), and 20% of the time a
mirrored copy of the last reference added; the target's face region one of lowerface, eyebrow and wholeface, equally
likely, joined with one random mask where the folder is there; the target's caption after the prompt half of the time
(drawn by the training, as for captions beside photos). An image whose landmarks were not found has empty boxes: its
region is the aligned face box instead (CelebA-HQ's faces are aligned).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

import torch

from .dataset import (ALIGNED_FACE_BOX, FLIPPED_REFERENCE_CHANCE, BoxMask, Caption, DatasetError, Draw, Photo,
                      SPLITS)
from .encoder import MAX_REFERENCES

IMAGES = "image"
ANNOTATION = "annotation"
RANDOM_MASKS = "mask"
SPLIT_FILE = os.path.join(ANNOTATION, "idi-5.json")  # 5 references per identity: the paper's CelebAHQ-IDI-5
REGION_FILE = os.path.join(ANNOTATION, "region_bbox.pth")
CAPTIONS_FILE = os.path.join(ANNOTATION, "dialog", "captions_hq.json")
REGIONS = ("lowerface", "eyebrow", "wholeface")  # the regions the authors' training draws from
EVALUATION_REGION = "wholeface"  # the region their validation and language-control evaluation inpaint
MIRROR_CHANCE = 0.5  # their training dataset's flip_p
BOX_RESOLUTION = 1024  # the photo size the region boxes were found at, where the split annotation does not say
MISSING_SHOWN = 5


class Identity(NamedTuple):
    name: str
    references: list[Photo]  # the photos a personalisation learns from
    inferences: list[Photo]  # the photos to inpaint, each with the evaluation region as its mask


def celebahq_idi_root(root: str) -> str | None:
    """The CelebAHQ-IDI folder at `root` (or in its celebahq/ sub-folder, the folder the download unpacks to), None for
    a folder of people. It holds annotation/ or image/: a broken download is still told apart from a folder of people,
    and refused naming the part missing."""
    for folder in (root, os.path.join(root, "celebahq")):
        if any(os.path.isdir(os.path.join(folder, part)) for part in (ANNOTATION, IMAGES)):
            return folder
    return None


def image_index(name: str) -> int:
    """The CelebA-HQ index of an image name ("3562.jpg"; the authors also allow "3562_<anything>.jpg")."""
    stem = os.path.splitext(os.path.basename(name))[0].split("_")[0]
    if not stem.isdigit():
        raise DatasetError(f"{SPLIT_FILE} names the image {name!r}, not '<index>.jpg' as CelebAHQ-IDI names them: the "
                           "annotation is damaged. Download it again.")
    return int(stem)


class CelebAHQIDI:
    """The identities of one split of CelebAHQ-IDI, drawn from as FaceDataset is (people, names, draw, digest)."""

    def __init__(self, root: str, split: str = "train"):
        if split not in SPLITS:
            raise DatasetError(f"The split {split!r} is not one of {', '.join(SPLITS)} (CelebAHQ-IDI's splits).")
        self.root, self.split = root, split
        annotation = read_split_annotation(root, split)
        self.box_resolution = int(annotation.get("meta", {}).get("resolution", BOX_RESOLUTION))
        self.identities_listed = [(name, annotation["id2image"][name]) for name in annotation[f"{split}_ids"]]
        if not any(len(files["ref"] + files["infer"]) >= 2 for _, files in self.identities_listed):
            raise DatasetError(f"{SPLIT_FILE} lists no identity of two or more images in the {split!r} split: nothing "
                               f"to train or evaluate on. {redownload(SPLIT_FILE)}")
        check_images(root, split, [f for _, files in self.identities_listed for f in files["ref"] + files["infer"]])
        self.boxes = read_region_boxes(root, max(image_index(f) for _, files in self.identities_listed
                                                 for f in files["ref"] + files["infer"]))
        captions = read_captions(root)
        self.random_masks = random_mask_paths(root)
        self.absent = [what for what, there in (("captions", captions is not None),
                                                ("random masks", bool(self.random_masks))) if not there]
        self.index: dict[str, int] = {}  # photo path -> its image index (its boxes, its caption)
        self.people: list[list[Photo]] = []
        self.names: list[str] = []
        self.too_few: list[str] = []
        for name, files in self.identities_listed:
            photos = [self._photo(f, captions) for f in sorted(files["ref"] + files["infer"], key=image_index)]
            if len(photos) >= 2:
                self.people.append(photos)
                self.names.append(name)
            else:
                self.too_few.append(name)
        self.targets = [(p, k) for p, person in enumerate(self.people) for k in range(len(person))]

    def _photo(self, name: str, captions: dict[int, str] | None) -> Photo:
        path = os.path.join(self.root, IMAGES, name)
        index = self.index[path] = image_index(name)
        text = captions.get(index) if captions is not None else None
        return Photo(path, BoxMask(self.region_box(index, EVALUATION_REGION)), Caption(text) if text else None)

    @property
    def photo_count(self) -> int:
        return len(self.targets)

    def region_box(self, index: int, region: str) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as fractions of the photo: the image's box of `region`, or the aligned face box
        where its landmarks were not found (an empty box)."""
        top, left, bottom, right = (min(max(int(v), 0), self.box_resolution) / self.box_resolution
                                    for v in self.boxes[region][index].tolist())
        return (left, top, right, bottom) if left < right and top < bottom else ALIGNED_FACE_BOX

    def region_masks(self, photo: Photo) -> dict[str, BoxMask]:
        """Each face region of a photo of this split (the authors evaluate every inference image in each)."""
        return {region: BoxMask(self.region_box(self.index[photo.path], region), photo.mirrored) for region in REGIONS}

    def draw(self, generator: torch.Generator) -> Draw:
        """A target image of the split, its region, 1-5 other images of its identity and their mirroring, from
        `generator` only, in a fixed order: resumed runs draw bit for bit what one long run draws."""
        person_index, target_index = self.targets[int(torch.randint(len(self.targets), (1,), generator=generator))]
        person = self.people[person_index]
        others = [photo for k, photo in enumerate(person) if k != target_index]
        order = torch.randperm(len(others), generator=generator).tolist()
        count = int(torch.randint(1, min(MAX_REFERENCES, len(others)) + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < FLIPPED_REFERENCE_CHANCE)
        mirrored = (torch.rand(1 + count, generator=generator) < MIRROR_CHANCE).tolist()
        region = REGIONS[int(torch.randint(len(REGIONS), (1,), generator=generator))]
        random = (self.random_masks[int(torch.randint(len(self.random_masks), (1,), generator=generator))]
                  if self.random_masks else None)
        target = person[target_index]
        mask = BoxMask(self.region_box(self.index[target.path], region), mirrored[0], random)
        target = Photo(target.path, mask, target.caption, mirrored[0])
        references = [Photo(others[i].path, others[i].mask, others[i].caption, m)
                      for i, m in zip(order[:count], mirrored[1:])]
        return Draw(target, references, flip)

    def identities(self) -> list[Identity]:
        """Each identity of the split with its reference and inference photos, as the split annotation assigns them
        (for the test split: personalise on the references, inpaint the inferences)."""
        photos = {photo.path: photo for person in self.people for photo in person}

        def pick(names: list[str]) -> list[Photo]:
            return [photos[os.path.join(self.root, IMAGES, name)] for name in sorted(names, key=image_index)]
        return [Identity(name, pick(files["ref"]), pick(files["infer"])) for name, files in self.identities_listed
                if name in self.names]

    def digest(self) -> str:
        """Which files the split holds (names and sizes), with the annotation files: a continued run on a changed
        dataset is told apart."""
        digest = hashlib.sha256(self.split.encode())
        for part in (SPLIT_FILE, REGION_FILE, CAPTIONS_FILE):
            path = os.path.join(self.root, part)
            digest.update(f"{part}:{os.path.getsize(path) if os.path.exists(path) else -1}".encode())
        for person in self.people:
            for photo in person:
                digest.update(f"{os.path.relpath(photo.path, self.root)}:{os.path.getsize(photo.path)}".encode())
        return digest.hexdigest()[:32]


def redownload(part: str) -> str:
    return (f"Download CelebAHQ-IDI again (the link in the PVA authors' README) and unpack it whole, so that {part} "
            "sits in the dataset folder.")


def read_json(path: str, what: str, advice: str):
    """A JSON file of the download; a damaged or cut-short one is refused naming it, then `advice`."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{what} {path} could not be read ({error}): it is damaged or cut short. {advice}") from None


def read_split_annotation(root: str, split: str) -> dict:
    """The identity split file, its parts this split needs checked."""
    path = os.path.join(root, SPLIT_FILE)
    if not os.path.isfile(path):
        others = sorted(f for f in os.listdir(os.path.join(root, ANNOTATION)) if f.startswith("idi-")) \
            if os.path.isdir(os.path.join(root, ANNOTATION)) else []
        found = f" (found: {', '.join(others)})" if others else ""
        raise DatasetError(f"The CelebAHQ-IDI annotation file {SPLIT_FILE} is missing in {root}{found}: it holds the "
                           f"identity split. {redownload(SPLIT_FILE)} (A folder of people is taken for CelebAHQ-IDI "
                           f"where it has a person folder named {ANNOTATION!r} or {IMAGES!r}: rename that one.)")
    annotation = read_json(path, "The CelebAHQ-IDI annotation file", redownload(SPLIT_FILE))
    for key in (f"{split}_ids", "id2image"):
        if not isinstance(annotation, dict) or key not in annotation:
            raise DatasetError(f"The annotation file {path} has no {key!r}: it is not CelebAHQ-IDI's identity split. "
                               f"{redownload(SPLIT_FILE)}")
    for name in annotation[f"{split}_ids"]:
        files = annotation["id2image"].get(name)
        if not isinstance(files, dict) or not all(isinstance(files.get(k), list) for k in ("ref", "infer")):
            raise DatasetError(f"The annotation file {path} lists identity {name!r} in its {split} split without its "
                               f"reference and inference images: it is damaged. {redownload(SPLIT_FILE)}")
    return annotation


def check_images(root: str, split: str, names: list[str]) -> None:
    """Every image the split lists is there: a partial download is refused before training, naming the first few."""
    folder = os.path.join(root, IMAGES)
    if not os.path.isdir(folder):
        raise DatasetError(f"The CelebAHQ-IDI images folder {IMAGES}/ is missing in {root}. {redownload(IMAGES + '/')}")
    present = set(os.listdir(folder))
    missing = [name for name in names if name not in present]
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise DatasetError(f"{len(missing)} of the {len(names)} images the {split} split lists are missing in "
                           f"{folder}: {shown}. The image download is incomplete. {redownload('every image')}")


def read_region_boxes(root: str, largest_index: int) -> dict[str, torch.Tensor]:
    """The face-region boxes (region -> (images, 4) top, left, bottom, right in pixels), read weights-only: a file that
    needs code to unpickle is refused."""
    path = os.path.join(root, REGION_FILE)
    if not os.path.isfile(path):
        raise DatasetError(f"The CelebAHQ-IDI annotation file {REGION_FILE} is missing in {root}: it holds the face "
                           f"regions training inpaints. {redownload(REGION_FILE)}")
    try:
        boxes = torch.load(path, map_location="cpu", weights_only=True)["bboxes"]
    except Exception as error:  # torch raises many kinds for a damaged or code-holding file; all mean the same here
        raise DatasetError(f"The face-region file {path} could not be read as plain tensors ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}): it is damaged or not CelebAHQ-IDI's. "
                           f"{redownload(REGION_FILE)}") from None
    for region in REGIONS:
        table = boxes.get(region) if isinstance(boxes, dict) else None
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != 4:
            raise DatasetError(f"The face-region file {path} has no (images, 4) table of {region!r} boxes. "
                               f"{redownload(REGION_FILE)}")
        if table.shape[0] <= largest_index:
            raise DatasetError(f"The face-region file {path} holds boxes for {table.shape[0]} images; the split names "
                               f"image {largest_index}. {redownload(REGION_FILE)}")
    return {region: boxes[region] for region in REGIONS}


def read_captions(root: str) -> dict[int, str] | None:
    """image index -> CelebA-Dialog's overall caption; None without the captions file (optional). An image without an
    entry has no caption (the authors': 5380.jpg)."""
    path = os.path.join(root, CAPTIONS_FILE)
    if not os.path.isfile(path):
        return None
    entries = read_json(path, "The captions file",
                        f"{redownload(CAPTIONS_FILE)} Or delete it to train without captions.")
    if not isinstance(entries, dict):
        raise DatasetError(f"The captions file {path} is not CelebA-Dialog's ({{'<index>.jpg': {{'overall_caption': "
                           f"...}}}}). {redownload(CAPTIONS_FILE)} Or delete it to train without captions.")
    captions = {}
    for name, entry in entries.items():
        text = entry.get("overall_caption") if isinstance(entry, dict) else None
        stem = os.path.splitext(name)[0]
        if isinstance(text, str) and text.strip() and stem.isdigit():
            captions[int(stem)] = text
    return captions


def random_mask_paths(root: str) -> list[str]:
    """The random masks (optional); a mask folder without masks is a broken download, not a choice."""
    folder = os.path.join(root, RANDOM_MASKS)
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(".png")]
    if not paths:
        raise DatasetError(f"The random masks folder {folder} has no .png masks. {redownload(RANDOM_MASKS + '/')} Or "
                           "delete the folder to train on the face regions alone.")
    return paths
