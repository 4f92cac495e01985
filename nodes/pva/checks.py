"""What PVA's nodes check of the models and networks connected to them (SD1.5 or SD2 inpainting, its own CLIP, an
encoder or identity made for that base, the feature source), and which base a MODEL is (sefi_core/pva/bases.py).

SD2 is PVA's alone (its authors' base): SeFi's nodes stay SD1.x (nodes/checks.py)."""
from __future__ import annotations

from ...sefi_core.pva.bases import BASES, SD2_INPAINTING, SD15_INPAINTING, Base
from ...sefi_core.pva.encoder import IdentityEncoder
from ...sefi_core.pva.model_files import PVAEncoder
from ..clip_tokens import token_embedding_table
from .patch import check_projections_fit

# The host's names for each base: its model config (comfy/supported_models.py; SD15's fine-tunes and variants are its
# subclasses, SD2's unCLIP, upscaler and Lotus are other models) and the key of its one text encoder.
HOST_CONFIG = {SD15_INPAINTING: "SD15", SD2_INPAINTING: "SD20"}
TEXT_ENCODERS = {"l": "CLIP-L (SD1.x)", "h": "OpenCLIP ViT-H (SD2)"}
TEXT_ENCODER = {SD15_INPAINTING: "l", SD2_INPAINTING: "h"}
CHECKPOINTS = " or ".join(base.checkpoint for base in BASES.values())


def model_base(model) -> Base | None:
    """The base family of a MODEL as the host detected it (inpainting or not), or None for any other model."""
    config = model.model.model_config
    width = config.unet_config.get("context_dim")
    if "SD15" in {c.__name__ for c in type(config).__mro__} and width == SD15_INPAINTING.context_dim:
        return SD15_INPAINTING
    if type(config).__name__ == HOST_CONFIG[SD2_INPAINTING] and width == SD2_INPAINTING.context_dim:
        return SD2_INPAINTING
    return None


def check_pva_model(model, node: str) -> Base:
    """An SD1.5 or SD2 MODEL (PVA Apply also takes their non-inpainting models); its base."""
    base = model_base(model)
    if base is None:
        config = model.model.model_config
        raise ValueError(f"{node} works on SD1.5 or SD2 inpainting models (768-d CLIP-L or 1024-d OpenCLIP ViT-H text "
                         f"context). This model is {type(config).__name__} with a "
                         f"{config.unet_config.get('context_dim')}-d text context. Load {CHECKPOINTS}.")
    return base


def check_inpainting_model(model, clip, node: str) -> Base:
    """An SD1.5 or SD2 inpainting MODEL and its own CLIP; their base."""
    base = check_pva_model(model, node)
    if not model.model.concat_keys:
        raise ValueError(f"{node} works on an inpainting model: this MODEL ({base.family}) has 4 input channels. "
                         f"Load the {base.title} checkpoint ({base.checkpoint}) and use it here and in PVA Apply.")
    check_clip_fits(clip, base, node)
    return base


def check_clip_fits(clip, base: Base, node: str) -> None:
    """The CLIP of the MODEL's base: its one text encoder, whose word embeddings are the base's context width (where
    PVA's learned word goes)."""
    encoder = clip.cond_stage_model
    name = getattr(encoder, "clip_name", None)
    wanted = TEXT_ENCODER[base]
    if name != wanted or not hasattr(encoder, f"clip_{wanted}"):
        found = TEXT_ENCODERS.get(name) or type(encoder).__name__
        raise ValueError(f"{node}: the MODEL is {base.family}, whose text encoder is {TEXT_ENCODERS[wanted]}; this "
                         f"CLIP is {found}. Connect the CLIP of the Load Checkpoint that gives the MODEL.")
    width = token_embedding_table(clip).shape[1]
    if width != base.context_dim:
        raise ValueError(f"{node} needs {base.context_dim}-d {TEXT_ENCODERS[wanted]} word embeddings; this CLIP's are "
                         f"{width}-d. Connect the CLIP of the Load Checkpoint that gives the MODEL.")


def check_base_fits(made_for: Base, base: Base, what: str, advice: str) -> None:
    """A file made for one base on a MODEL of another: refused naming both (`what`: "The PVA encoder x.safetensors")."""
    if made_for != base:
        raise ValueError(f"{what} was made for {made_for.describe()}; this MODEL is {base.family} "
                         f"({base.context_dim}-d). {advice} "
                         f"(or load {made_for.checkpoint} to use it).")


def check_features_fit(encoder: IdentityEncoder, width: int, source: str) -> None:
    """An encoder reads features of the width it was trained on (ArcFace's 512, a CLIP vision's embedding width)."""
    if width != encoder.queries.shape[-1]:
        raise ValueError(f"This PVA encoder reads {encoder.queries.shape[-1]}-d face features; {source} gives "
                         f"{width}-d ones. Connect the face recognizer (or CLIP vision) the encoder was trained with.")


def check_encoder_fits(encoder: PVAEncoder, model) -> None:
    """An encoder made for the MODEL's base (checked already: check_pva_model), whose trained projections fit the
    model's cross-attention."""
    what, base = f"The PVA encoder {encoder.file}".rstrip(), model_base(model)
    check_base_fits(encoder.base, base, what, f"Use an encoder trained for {base.title}")
    if encoder.projections:
        check_projections_fit(encoder.projections, model, what)
