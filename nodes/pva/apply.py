"""PVA Apply: an (inpainting) MODEL and its CLIP + a PVA identity -> clones through which the prompt's learned word and
the person's visual tokens act. The MODEL gets parallel visual attention on every cross-attention layer (patch.py);
the CLIP reads the identity's trigger as its learned word, exactly as the fine-tune trained it. Feed the outputs to
ComfyUI's own inpainting nodes."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..checks import check_number
from ..clip_tokens import TriggerTokenizer, model_fingerprint, token_key, word_token_ids
from ..node_ui import schema
from .checks import check_base_fits, check_clip_fits, check_pva_model
from .patch import VisualIdentity, apply_visual_identity
from .sockets import PVAIdentityType

log = logging.getLogger(__name__)
NODE = "PVA Apply"


def clip_with_word(clip, trigger: str, word: torch.Tensor):
    """A clone of `clip` in which `trigger` means the learned word: its tokens become one embedding entry holding the
    word (what the fine-tune put in the trigger's slot). `clip` itself is not changed."""
    patched = clip.clone()
    patched.tokenizer = TriggerTokenizer.with_trigger(
        clip.tokenizer, word_token_ids(clip, trigger), {token_key(clip): {"type": "embedding", "data": word}},
        trigger,
        "PVA Apply teaches a CLIP one learned word per trigger: connect a CLIP that does not know this one yet (the "
        "CLIP of Load Checkpoint), and give a SeFi identity on the same CLIP another trigger word.")
    return patched


class PVAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVAApply",
            display_name="PVA Apply",
            search_aliases=["inpaint face", "face id", "identity", "personalize", "parallel visual attention"],
            category="PVA",
            description="Parallel visual attention: the inpainting MODEL attends to the person's visual tokens beside "
                        "the prompt, and the CLIP knows their learned word. Then use ComfyUI's InpaintModelConditioning "
                        "or VAE Encode (for Inpainting) with a mask over the face, and prompt 'photo of a sks person'.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SD2 inpainting model the identity was fine-tuned on."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                PVAIdentityType.Input("pva_identity", tooltip="From PVA Load Identity."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="The visual tokens' weight in the attention: 1 is the paper's, 0 turns PVA off "
                                       "(the original model), above 1 weighs the photos more than the prompt."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the denoising the visual tokens start acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where they stop (1 = last step)."),
                io.Boolean.Input("on_negative", default=True,
                                 tooltip="Visual tokens on the negative prompt too, as the paper samples. Off: the "
                                         "negative stays the plain model's."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with parallel visual attention."),
                     io.Clip.Output(display_name="CLIP", tooltip="The CLIP that knows the learned word.")],
        )

    @classmethod
    def execute(cls, model, clip, pva_identity, strength, start_percent, end_percent, on_negative) -> io.NodeOutput:
        strength = check_number(NODE, "strength", strength, 0.0, 2.0)
        if not 0.0 <= start_percent < end_percent <= 1.0:
            raise ValueError(f"start_percent {start_percent} must be below end_percent {end_percent} (both 0-1); "
                             "otherwise the visual tokens never act.")
        source = f"The PVA identity {pva_identity.file}" if pva_identity.file else "The PVA identity"
        base = check_pva_model(model, NODE)
        check_clip_fits(clip, base, NODE)
        check_base_fits(pva_identity.base, base, source, "Use an identity fine-tuned on this model")
        if pva_identity.base_model and pva_identity.base_model != model_fingerprint(clip):
            log.warning("%s: identity %r was fine-tuned on another model; its projections may not fit this one.", NODE,
                        pva_identity.trigger)
        sampling = model.get_model_object("model_sampling")
        visual = VisualIdentity(pva_identity.visual_tokens, pva_identity.projections, strength,
                                sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent),
                                on_negative)
        return io.NodeOutput(apply_visual_identity(model, visual, source),
                             clip_with_word(clip, pva_identity.trigger, pva_identity.word))
