"""The base models PVA's files are made for, as the files record them ("pva.base"): SD1.5 inpainting, the pack's port
(768-d CLIP-L text context), and SD2 inpainting, the authors' own base in every config (1024-d OpenCLIP ViT-H text
context). Between the two only the widths differ: the encoder's tokens, the learned word and the visual projections'
inputs are of the base's context width. A file without the record was made before SD2 was supported: SD1.5.
"""
from __future__ import annotations

from dataclasses import dataclass

BASE_KEY = "pva.base"  # metadata entry of encoders and identities


@dataclass(frozen=True)
class Base:
    name: str  # as files record it
    family: str  # as messages say it: "SD1.5"
    context_dim: int  # the text context's width: visual tokens, learned word, visual K/V projections' inputs
    checkpoint: str  # the file to load, for advice

    @property
    def title(self) -> str:
        return f"{self.family} inpainting"

    def describe(self) -> str:
        return f"{self.title} ({self.context_dim}-d)"


SD15_INPAINTING = Base("sd15-inpainting", "SD1.5", 768, "sd-v1-5-inpainting")
SD2_INPAINTING = Base("sd2-inpainting", "SD2", 1024, "512-inpainting-ema (stable-diffusion-2-inpainting)")
BASES = {base.name: base for base in (SD15_INPAINTING, SD2_INPAINTING)}
UNRECORDED = SD15_INPAINTING  # files from before the record


def base_named(name: str | None, context_dim: int) -> Base:
    """The base a file records (`name`; None: none recorded, SD1.5), checked against the width of its tensors
    (ValueError naming both where they disagree, or where the name is unknown)."""
    if name is None:
        base = UNRECORDED
    elif name in BASES:
        base = BASES[name]
    else:
        raise ValueError(f"metadata {BASE_KEY} is {name!r}; this pack knows {', '.join(BASES)}")
    if base.context_dim != context_dim:
        recorded = f"records base {base.name}" if name is not None else f"records no base (so {base.name})"
        raise ValueError(f"it {recorded}, whose context is {base.context_dim}-d, but its tensors are "
                         f"{context_dim}-d")
    return base
