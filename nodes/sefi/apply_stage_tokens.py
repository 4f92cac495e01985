"""SeFi Apply Stage Tokens: MODEL + CLIP + identity -> patched clones that put the identity wherever the
trigger word appears in a prompt."""
import logging

from comfy_api.latest import io

from ...sefi_core.names import validate_trigger
from ...sefi_core.sefi.prompt_tokens import IdentitySlot, blend_toward_class
from ...sefi_core.sefi.stages import ActiveRange
from ..checks import check_number
from ..clip_tokens import model_fingerprint, split_by_encoder, token_keys, token_widths, word_embedding, word_token_ids
from ..node_ui import schema
from .family import check_identity_fits, sefi_family
from .patches import SefiIdentity, patch_clip, patch_model

log = logging.getLogger(__name__)
NODE = "SeFi Apply Stage Tokens"


class SefiApplyStageTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SefiApplyStageTokens",
            display_name="SeFi Apply Stage Tokens",
            search_aliases=["apply identity", "identity", "personalize", "face id", "trigger word", "sefi"],
            category="SeFi-IDE",
            description="Makes the trigger word in your prompts mean this identity. Feed the returned CLIP to "
                        "your CLIP Text Encode nodes and the returned MODEL to the sampler. Prompts without the "
                        "trigger are unchanged. Chain two of these (different triggers) for two people in one image.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x model (SD 1.4/1.5, fine-tunes, SD1.5 inpainting) or an SDXL "
                                                "one (SDXL base, Pony, Illustrious, NoobAI, merges)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                SefiIdentity.Input("identity", tooltip="From SeFi Load Identity or SeFi Train Identity, trained on the "
                                                       "same family (SD1.x or SDXL) as the model."),
                io.String.Input("trigger", default="",
                                tooltip="The word your prompts use for this identity, e.g. 'sks' in 'a photo of sks "
                                        "laughing'. Leave empty to use the identity's own trigger."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = the class word ('person'), 1 = the trained identity, above 1 exaggerates "
                                       "it. Lower (0.7-0.9) gives the prompt more freedom; 1.0 is the paper's setting."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the denoising process the identity starts acting (0 = first step). "
                                       "Starting later (0.1-0.3) leaves layout and pose to the prompt."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops acting (1 = last step). Outside the range the trigger reads "
                                       "as the class word."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with SeFi's K/V injector; to the sampler."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP that knows the trigger; to CLIP Text Encode."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, identity, trigger, strength, start_percent, end_percent) -> io.NodeOutput:
        check_identity_fits(identity, sefi_family(model, clip, NODE), NODE)
        strength = check_number(NODE, "strength", strength, 0.0, 2.0)
        if not 0.0 <= start_percent < end_percent <= 1.0:
            raise ValueError(f"start_percent {start_percent} must be below end_percent {end_percent} (both 0-1); "
                             "otherwise the identity never acts.")
        trigger = validate_trigger(trigger, identity.class_word) if trigger.strip() else identity.trigger
        if identity.base_model and identity.base_model != model_fingerprint(clip):
            log.info("SeFi: identity %r was trained on another %s text encoder; it usually transfers, "
                     "retrain on this model if likeness suffers.", identity.trigger, identity.family_name)
        return io.NodeOutput(*apply_identity(model, clip, identity, trigger, strength, start_percent, end_percent))


def apply_identity(model, clip, identity, trigger: str, strength: float = 1.0, start_percent: float = 0.0,
                   end_percent: float = 1.0):
    """(MODEL, CLIP) clones through which `trigger` in a prompt means `identity`: what this node returns, and what
    Train Identity's previews sample with."""
    keys, widths = token_keys(clip), token_widths(clip)
    class_embedding = word_embedding(clip, identity.class_word)
    k_tokens = blend_toward_class(identity.k_tokens, class_embedding, strength)
    v_tokens = blend_toward_class(identity.v_tokens, class_embedding, strength)
    parts = [split_by_encoder(keys, widths, t) for t in (k_tokens, v_tokens, class_embedding)]
    active = ActiveRange.from_percent(start_percent, end_percent)
    slots = {key: IdentitySlot(trigger, parts[0][key], parts[1][key], parts[2][key], identity.boundaries, active)
             for key in keys}  # each text encoder reads its part of the identity (SDXL: CLIP-L's, bigG's)
    return patch_model(model), patch_clip(clip, word_token_ids(clip, trigger), slots)
