"""What PVA's nodes check of the models and networks connected to them (the SD1.5 inpainting family, an encoder that
fits the model and the feature source)."""
from __future__ import annotations

from ...sefi_core.pva.encoder import IdentityEncoder
from ...sefi_core.pva.model_files import PVAEncoder
from ..checks import check_sd1_model
from .patch import check_projections_fit

INPAINTING_CHECKPOINT = "Load the SD1.5 inpainting checkpoint (sd-v1-5-inpainting)."


def check_inpainting_model(model, node: str) -> None:
    check_sd1_model(model, node, INPAINTING_CHECKPOINT)
    if not model.model.concat_keys:
        raise ValueError(f"{node} works on an inpainting model: this MODEL has 4 input channels. "
                         f"{INPAINTING_CHECKPOINT[:-1]} and use it here and in PVA Apply.")


def check_features_fit(encoder: IdentityEncoder, width: int, source: str) -> None:
    """An encoder reads features of the width it was trained on (ArcFace's 512, a CLIP vision's embedding width)."""
    if width != encoder.queries.shape[-1]:
        raise ValueError(f"This PVA encoder reads {encoder.queries.shape[-1]}-d face features; {source} gives "
                         f"{width}-d ones. Connect the face recognizer (or CLIP vision) the encoder was trained with.")


def check_encoder_fits(encoder: PVAEncoder, model) -> None:
    """An encoder's tokens and trained projections must fit the model's cross-attention."""
    context_dim = model.model.model_config.unet_config.get("context_dim")
    if encoder.network.project.out_features != context_dim:
        raise ValueError(f"The PVA encoder {encoder.file} makes {encoder.network.project.out_features}-d visual "
                         f"tokens; the model's text context is {context_dim}-d. Use an encoder trained for this model "
                         "family.")
    if encoder.projections:
        check_projections_fit(encoder.projections, model, f"The PVA encoder {encoder.file}".rstrip())
