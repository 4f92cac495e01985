"""What the pack checks of what is connected to it (the SD1.x family), and how a node's validator reports a check."""
from __future__ import annotations

from .clip_tokens import token_embedding_table


def validation_result(check, *args, **kwargs):
    """A node's `validate_inputs` answer: True, or the check's error message (the host shows it for the input and
    runs nothing). The host then skips its own check of those inputs, whose message would not say what to do."""
    try:
        check(*args, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return True


def check_sd1_model(model) -> None:
    config = model.model.model_config
    context_dim = config.unet_config.get("context_dim")
    family = type(config).__name__
    if context_dim != 768 or "SD15" not in {c.__name__ for c in type(config).__mro__}:
        raise ValueError(f"SeFi identities are for SD1.x models (768-d CLIP-L text context). This model is "
                         f"{family} with a {context_dim}-d text context. Load an SD1.x checkpoint "
                         "(SD 1.4/1.5, their fine-tunes or the SD1.5 inpainting model).")


def check_sd1_clip(clip) -> None:
    encoder = clip.cond_stage_model
    if getattr(encoder, "clip_name", None) != "l" or not hasattr(encoder, "clip_l"):
        raise ValueError(f"SeFi identities are for the SD1.x text encoder (CLIP-L). This CLIP is "
                         f"{type(encoder).__name__}; use the CLIP output of an SD1.x Load Checkpoint.")
    width = token_embedding_table(clip).shape[1]
    if width != 768:
        raise ValueError(f"SeFi identities need 768-d CLIP-L word embeddings; this CLIP's are {width}-d.")
