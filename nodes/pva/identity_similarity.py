"""PVA Identity Similarity: repainted pictures + photos of the person + a face recognizer -> how alike the faces are,
as the PVA paper measures identity (sefi_core/pva/metric.py): the cosine of the recognizer's normalised features, per
picture, shown on the node. Works on any IMAGE, after SeFi's, PVA's or any other generation."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ...sefi_core.images import as_rgb
from ...sefi_core.pva.metric import face_square, identity_similarity, metric_input, square_input
from ..node_ui import schema, show_text_on_node
from .sockets import FaceRecognizerType

NODE = "PVA Identity Similarity"
SHOWN = 16  # pictures listed one by one on the node; beyond them only the mean


def pictures_of(batches: list, name: str, advice: str) -> list[torch.Tensor]:
    """The pictures (3, H, W) of an IMAGE list (each entry a batch, sizes may differ between entries)."""
    if not batches or any(not isinstance(b, torch.Tensor) or b.ndim != 4 or b.shape[0] == 0 or b.shape[-1] not in (1, 3, 4)
                          for b in batches):
        shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in batches]
        raise ValueError(f"{NODE}: '{name}' holds no pictures ({shapes}). {advice}")
    pictures = [as_rgb(picture) for batch in batches for picture in batch]
    for number, picture in enumerate(pictures, 1):
        if not torch.isfinite(picture).all():
            raise ValueError(f"{NODE}: picture {number} of {len(pictures)} in '{name}' has NaN or infinite pixel values. "
                             "Check the node that made it (a decode gone wrong?).")
    return pictures


def masks_of(batches: list | None, pictures: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """One (H, W) face mask per picture: one per picture, or one for pictures all of its size; none empty."""
    if batches is None:
        return None
    masks = [m for batch in batches for m in (batch if batch.ndim == 3 else batch[None])]
    if len(masks) == 1:
        masks = masks * len(pictures)
    sizes = lambda shapes: ", ".join(f"{w}x{h}" for h, w in shapes[:4]) + (" ..." if len(shapes) > 4 else "")
    picture_sizes, mask_sizes = [tuple(p.shape[-2:]) for p in pictures], [tuple(m.shape[-2:]) for m in masks]
    if len(masks) != len(pictures) or mask_sizes != picture_sizes:
        raise ValueError(f"{NODE}: the face_mask ({len(masks)}: {sizes(mask_sizes)}) does not fit the image "
                         f"({len(pictures)}: {sizes(picture_sizes)}). Give one mask of the pictures' size for all of "
                         "them, or one per picture, each painted over the face on that picture.")
    for number, mask in enumerate(masks, 1):
        if not bool((mask > 0.5).any()):
            raise ValueError(f"{NODE}: face_mask {number} of {len(masks)} is empty. Paint it over the whole face "
                             "(forehead to chin), or disconnect it for aligned face crops.")
    return masks


def centre_square(picture: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> its central square, not resized (the metric reads it at 256)."""
    _, height, width = picture.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return picture[:, top:top + side, left:left + side]


def recognizer_inputs(pictures: list[torch.Tensor], masks: list[torch.Tensor] | None) -> torch.Tensor:
    """(B, 3, 112, 112): each picture's centre square read as an aligned face, or the square around its face mask."""
    if masks is None:
        return torch.cat([metric_input(centre_square(p)[None]) for p in pictures])
    return torch.stack([square_input(p, face_square(m)) for p, m in zip(pictures, masks)])


def report(scores: list[float], references: int, recognizer: str) -> str:
    """The node's text: each picture's similarity (the first SHOWN), and their mean."""
    lines = [f"{k}: {s:.3f}" for k, s in enumerate(scores[:SHOWN], 1)] + (["..."] if len(scores) > SHOWN else [])
    values = torch.tensor(scores, dtype=torch.float64)
    spread = f" ± {float(values.std(correction=0)):.3f}" if len(scores) > 1 else ""
    photos = f"{references} reference photo{'s' if references > 1 else ''}"
    return "\n".join(lines + [f"mean {float(values.mean()):.3f}{spread} over {len(scores)} picture"
                              f"{'s' if len(scores) > 1 else ''} ({photos}, {recognizer})"])


class PVAIdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVAIdentitySimilarity",
            display_name="PVA Identity Similarity",
            search_aliases=["face similarity", "id similarity", "identity score", "arcface", "cosine similarity"],
            category="PVA",
            description="How much repainted faces look like the person, as the PVA paper measures it: the cosine "
                        "similarity of a face recognizer's features (1: the same face; other people score far lower). "
                        "Each picture is compared with the reference photos (the mean of its cosines to them); the "
                        "numbers are shown on the node.",
            is_output_node=True,
            is_input_list=True,  # reference photos of different sizes arrive as a list
            inputs=[
                io.Image.Input("image", tooltip="The pictures to measure: a batch or a list, e.g. VAE Decode after any "
                                                "inpainting or generation. Read as aligned face crops (the face centred "
                                                "and filling the middle, as in CelebA-HQ; the centre square of other "
                                                "shapes); for other framings connect face_mask."),
                io.Image.Input("reference", tooltip="Photos of the person, aligned face crops like PVA Fine-tune "
                                                    "Identity's (the centre square of each), a batch or a list. For the "
                                                    "paper's number: the original photo, before it was masked and "
                                                    "repainted, alone."),
                FaceRecognizerType.Input("face_recognizer",
                                         tooltip="From PVA Load Face Recognizer. glint360k CosFace r100 gives numbers "
                                                 "comparable with the paper's (0.741 for PVA); the ArcFace r50 PVA "
                                                 "reads identities with gives its own."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Optional, for pictures that are not aligned face crops: a mask over the whole "
                                      "face (forehead to chin), one for all pictures or one per picture. The square "
                                      "around it is read as an aligned crop's face. Without it, each picture's centre "
                                      "square is read."),
            ],
            outputs=[io.Float.Output(display_name="similarity", is_output_list=True,
                                     tooltip="Each picture's identity similarity, -1 to 1 (1: the same face)."),
                     io.Float.Output(display_name="mean_similarity", tooltip="The pictures' mean similarity.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, reference, face_recognizer, face_mask=None) -> io.NodeOutput:
        if len(face_recognizer) != 1:
            raise ValueError(f"{NODE}: 'face_recognizer' received a list of {len(face_recognizer)}; connect one "
                             "recognizer (one PVA Load Face Recognizer), and measure with another in a second node.")
        recognizer = face_recognizer[0]
        if getattr(recognizer, "network", None) is None:
            raise ValueError(f"{NODE} measures with a face recognizer: connect PVA Load Face Recognizer ({recognizer.name}"
                             " gives CLIP embeddings, whose cosines are not the paper's identity similarity).")
        pictures = pictures_of(image, "image", "Connect the generated pictures (e.g. a VAE Decode).")
        references = pictures_of(reference, "reference", "Connect photos of the person (e.g. Load Image).")
        faces = recognizer_inputs(pictures, masks_of(face_mask, pictures))
        scores = identity_similarity(recognizer.network, faces, recognizer_inputs(references, None)).tolist()
        text = report(scores, len(references), recognizer.name)
        show_text_on_node(cls.hidden.unique_id if cls.hidden else None, text)
        return io.NodeOutput(scores, sum(scores) / len(scores), ui=ui.PreviewText(text))
