"""SeFi Attention Map Preview: where each word of a prompt attends in an image, as labelled heatmaps on a
shared scale (paper Fig. 1, Fig. 6), plus the maps as masks."""
import re

import torch

import comfy.ldm.modules.attention
import comfy.sample
import comfy.samplers
from comfy_api.latest import io, ui

from ...sefi_core.sefi.attention_maps import head_mean_probs, prompt_words, render_grid, word_maps, word_positions
from ..checks import check_choices, validation_result
from ..clip_tokens import word_token_ids
from ..node_ui import schema
from .family import sefi_family
from .patches import slot_of

NODE = "SeFi Attention Map Preview"

LAYER_CHOICES = {  # layer grid as a fraction of the latent grid
    "1/2 latent (32x32 at 512 px, the paper's)": 2,
    "1/4 latent (16x16 at 512 px)": 4,
    "1/8 latent (8x8 at 512 px)": 8,
    "full latent (64x64 at 512 px)": 1,
    "all layers": 0,
}


def attn2_keys(model) -> list[tuple]:
    """The host's attn2 replace keys, derived from the model's own module names."""
    keys = []
    for name, _ in model.model.diffusion_model.named_modules():
        m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+\.transformer_blocks\.(\d+)\.attn2", name)
        if m:
            block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m[1]]
            keys.append((block, int(m[2] or 0), int(m[3])))
    return keys


class MapRecorder:
    """attn2 replace patch: computes attention as usual and keeps the head-mean maps of the first row."""

    def __init__(self, tokens_per_map: int | None, existing=None):
        self.tokens_per_map, self.existing, self.maps = tokens_per_map, existing, []

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if self.tokens_per_map in (None, q.shape[1]):
            self.maps.append(head_mean_probs(q[:1], k[:1], heads)[0].cpu())  # (N, T)
        if self.existing is not None:
            return self.existing(q, k, v, extra_options)
        # As the layer itself attends: its precision, and the transformer options through the host's attention
        # wrapper (@wrap_attn on v0.33), so another pack's attention override still applies.
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get(
            "attn_precision"), transformer_options=extra_options)


class SefiAttentionMapPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SefiAttentionMapPreview",
            display_name="SeFi Attention Map Preview",
            search_aliases=["attention map", "cross attention", "heatmap", "word attention"],
            category="SeFi-IDE",
            is_output_node=True,  # its maps show on the node; no Preview Image needed
            description="Shows where each word of a prompt looks in an image: one heatmap per word, on one shared "
                        "scale. Run it on the model with and without SeFi Apply Stage Tokens to see what an identity "
                        "changes: a good identity attends to the face and leaves other words their own regions.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x or SDXL model, patched by SeFi Apply Stage Tokens or not."),
                io.Clip.Input("clip", tooltip="The CLIP that goes with the model (the SeFi one to see the trigger)."),
                io.String.Input("prompt", default="a photo of sks enjoying a cup of latte",
                                tooltip="The prompt whose words you want to see."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words to show, e.g. 'sks, cup'. Empty: every word of the prompt."),
                io.Float.Input("at_percent", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Where in the denoising process to look: 0 = first (noisiest) step, 1 = last."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default=list(LAYER_CHOICES)[0],
                               tooltip="Which cross-attention layers to average, by their grid size."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed of the noise added to the image."),
                io.Image.Input("image", optional=True, tooltip="The image to analyse (needs the VAE), e.g. a generated one."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the image."),
                io.Latent.Input("latent", optional=True, tooltip="Or analyse a latent directly (image and VAE not needed)."),
            ],
            outputs=[
                io.Image.Output(display_name="preview", tooltip="One labelled heatmap per word over the image, with the "
                                                                "colour scale (also shown on this node)."),
                io.Mask.Output(display_name="maps", tooltip="The maps as masks (one per word, shared 0-1 scale)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, layers=None):
        """Runs in the host's validator, before anything executes, in place of its own 'Value not in list'."""
        return validation_result(check_choices, {"layers": LAYER_CHOICES}, layers=layers)

    @classmethod
    def execute(cls, model, clip, prompt, words, at_percent, layers, seed, image=None, vae=None, latent=None) -> io.NodeOutput:
        sefi_family(model, clip, NODE)
        check_choices({"layers": LAYER_CHOICES}, layers=layers)
        samples, picture = cls.inputs_to_latent(image, vae, latent)
        tokens = clip.tokenize(prompt)
        wanted = [w.strip() for w in words.split(",") if w.strip()] or prompt_words(prompt)
        found = [cls.locate(clip, tokens, w) for w in wanted]
        missing = [w.word for w in found if not w.positions]
        if missing:
            raise ValueError(f"{', '.join(repr(w) for w in missing)} not in the prompt. Words in it: "
                             f"{', '.join(prompt_words(prompt))}. Fix the 'words' input or leave it empty.")
        layer_maps = cls.record_maps(model, clip.encode_from_tokens_scheduled(tokens), samples, at_percent,
                                     LAYER_CHOICES[layers], seed)
        height, width = picture.shape[:2]
        maps = word_maps(layer_maps, found, height, width)
        preview = torch.from_numpy(render_grid(picture.numpy(), maps.numpy(), [w.label for w in found])).unsqueeze(0)
        return io.NodeOutput(preview, maps, ui=ui.PreviewImage(preview, cls=cls))

    @staticmethod
    def inputs_to_latent(image, vae, latent):
        if latent is not None:
            samples = latent["samples"][:1]
            if image is not None:
                return samples, image[0, ..., :3].cpu().float()
            h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
            return samples, (vae.decode(samples)[0, ..., :3].cpu().float() if vae is not None else torch.full((h, w, 3), 0.5))
        if image is None or vae is None:
            raise ValueError("Connect an image together with its VAE, or a latent, for the preview to analyse.")
        return vae.encode(image[:1, ..., :3]), image[0, ..., :3].cpu().float()

    @staticmethod
    def locate(clip, tokens, word):
        trigger = lambda t: (slot_of(t) is not None and slot_of(t).trigger.lower() == word.lower())
        return word_positions(tokens["l"], word, word_token_ids(clip, word), trigger)  # SDXL's "g": same positions

    @staticmethod
    def record_maps(model, positive, samples, at_percent, layer_factor, seed):
        probe = model.clone()
        h, w = samples.shape[-2:]
        tokens_per_map = (h // layer_factor) * (w // layer_factor) if layer_factor else None
        replaces = probe.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
        recorders = []
        for key in attn2_keys(probe):
            recorder = MapRecorder(tokens_per_map, replaces.get(key, replaces.get(key[:2])))
            probe.set_model_attn2_replace(recorder, *key)
            recorders.append(recorder)
        sampling = probe.get_model_object("model_sampling")
        sigma = min(sampling.percent_to_sigma(at_percent), float(sampling.sigma_max))
        guider = comfy.samplers.CFGGuider(probe)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)  # the positive alone: one UNet call
        samples = comfy.sample.fix_empty_latent_channels(probe, samples)
        noise = comfy.sample.prepare_noise(samples, seed)
        guider.sample(noise, samples, comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                      disable_pbar=True, seed=seed)
        maps = [m for r in recorders for m in r.maps]
        if not maps:
            raise ValueError(f"This model has no cross-attention layers with a {h // layer_factor}x{w // layer_factor} "
                             "grid for this image. Choose another 'layers' option, e.g. 'all layers'.")
        return maps
