"""The photos a training node receives: an IMAGE list (each entry a batch, sizes may differ between entries), each
photo checked, and the masks painted on them matched to them. Messages name the node and its mask input."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
MIN_IMAGE_SIDE = 64  # pixels; below this there is no face to learn
MAX_ASPECT = 4.0


def photos_of(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The photos (H, W, C) of an IMAGE list (each entry a batch; sizes may differ between entries)."""
    if not images or any(not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[0] == 0
                         for batch in images):
        shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in images]
        raise ValueError(f"The image input holds {shapes}; connect a Load Image node (one photo), a batch, or a list "
                         "of photos (e.g. Load Image (from Folder)).")
    return [photo for batch in images for photo in batch]


def check_photo(photo: torch.Tensor, number: int, count: int, node: str) -> None:
    """Each photo must be a real picture: finite pixels, big enough to learn from."""
    which = f"Photo {number} of {count}" if count > 1 else "The image"
    if not torch.isfinite(photo).all():
        raise ValueError(f"{which} has NaN or infinite pixel values, so there is nothing to learn from. Check the node "
                         "that made it (a decode or an upscale gone wrong?) or load the photo directly with Load Image.")
    height, width = photo.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{which} is {width}x{height} pixels; {node} needs at least {MIN_IMAGE_SIDE} on the short "
                         "side (512 or more is best). Use a larger photo of the subject.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        log.warning("%s: %s is %dx%d; training uses its centre square, which holds little of so thin a picture. "
                    "Crop the photo around the subject for a better identity.", node, which.lower(), width, height)


def masks_for_photos(masks: list[torch.Tensor] | None, photos: list[torch.Tensor], kind: str,
                     when_empty: str) -> list[torch.Tensor] | None:
    """One mask (H, W) per photo: the masks given one per photo, or one mask for photos all of its size; none empty.
    `kind` names the node's mask ("subject mask", "face mask"); `when_empty` is the message for an empty one (what
    the node does without a mask differs)."""
    if masks is None:
        return None
    masks = [m for batch in masks for m in (batch if batch.ndim == 3 else batch[None])]
    sizes = lambda shapes: ", ".join(f"{w}x{h}" for h, w in shapes)
    photo_sizes, mask_sizes = [tuple(p.shape[:2]) for p in photos], [tuple(m.shape[-2:]) for m in masks]
    if len(masks) == 1 and len(photos) > 1:
        masks, mask_sizes = masks * len(photos), mask_sizes * len(photos)
    if len(masks) != len(photos) or mask_sizes != photo_sizes:
        raise ValueError(f"The {kind}(s) ({len(masks)}: {sizes(mask_sizes[:4])}) do not fit the photo(s) "
                         f"({len(photos)}: {sizes(photo_sizes[:4])}). Paint the mask on this photo (right-click Load "
                         "Image > Open in MaskEditor and use that node's MASK output), and give one mask per photo, or "
                         "one mask for photos all of its size.")
    for number, mask in enumerate(masks, 1):
        if not bool((mask > 0.5).any()):
            raise ValueError(when_empty + (f" (mask {number} of {len(masks)})" if len(masks) > 1 else ""))
    return masks
