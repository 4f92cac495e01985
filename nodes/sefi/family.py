"""Which model family SeFi is working on: SD1.x or SDXL, read from the connected MODEL and CLIP, and whether an
identity fits it. Everything else is refused by name, with what to connect instead."""
from __future__ import annotations

from ...sefi_core.sefi.identity import FAMILIES, FAMILY_NAMES
from ..clip_tokens import token_keys, token_widths

SUPPORTED = ("Load an SD1.x checkpoint (SD 1.4/1.5, their fine-tunes, SD1.5 inpainting) or an SDXL one (SDXL 1.0 base "
             "and its fine-tunes and merges: Pony, Illustrious, NoobAI, ...).")
TEXT_ENCODER_KEYS = {"sd1": ("l",), "sdxl": ("l", "g")}  # the host's token keys of each family's text encoders
TEXT_ENCODERS = {"sd1": "CLIP-L", "sdxl": "CLIP-L and OpenCLIP bigG"}


def model_family(model, node: str) -> str:
    """"sd1" or "sdxl" for the MODEL's architecture (the host's detected model config)."""
    config = model.model.model_config
    name = type(config).__name__
    context = config.unet_config.get("context_dim")
    if "SD15" in {c.__name__ for c in type(config).__mro__} and context == 768:
        return "sd1"
    if name == "SDXL" and context == 2048:
        return "sdxl"
    if name == "SDXLRefiner":
        raise ValueError(f"{node} cannot use the SDXL refiner: it has only the bigG text encoder and is made for the "
                         "last steps of an SDXL image. Connect the SDXL base model (or a fine-tune of it); a refiner "
                         "pass may follow SeFi's sampler.")
    raise ValueError(f"{node} works on SD1.x and SDXL models. This model is {name} with a {context}-d text context. "
                     f"{SUPPORTED}")


def sefi_family(model, clip, node: str) -> str:
    """The family of the connected MODEL, checked against the CLIP: both from one checkpoint's family."""
    family = model_family(model, node)
    keys = token_keys(clip)
    if keys != TEXT_ENCODER_KEYS[family] or token_widths(clip) != FAMILIES[family]:
        found = type(clip.cond_stage_model).__name__
        raise ValueError(f"{node}: the MODEL is {FAMILY_NAMES[family]}, whose text encoders are "
                         f"{TEXT_ENCODERS[family]}, but the CLIP is {found}. Connect the CLIP output of the same {FAMILY_NAMES[family]} "
                         "checkpoint as the MODEL.")
    return family


def check_identity_fits(identity, family: str, node: str) -> None:
    """An identity's tokens are words of its family's text encoders: on another family they mean nothing."""
    if identity.family != family:
        raise ValueError(f"{node}: identity {identity.trigger!r} was trained on {identity.family_name}, but the model "
                         f"is {FAMILY_NAMES[family]}; an identity works only on the family it was trained on. Load a "
                         f"{identity.family_name} checkpoint, or train the identity again on this model.")
