"""PVA's training through the host, shared by PVA Fine-tune Identity and PVA Train Encoder: resident training clones
of the host's MODEL and CLIP (nodes/training.py: dynamic VRAM, inference tensors, the host's flags restored, loss
scaling in fp16, checkpointing, out-of-memory advice) whose cross-attention layers carry the same parallel-visual-
attention patch PVA Apply puts on a MODEL, with the trained projections in it. Each photo reaches the UNet as ComfyUI's
InpaintModelConditioning gives it (the face greyed out, the host's own extra_conds for the mask and masked-image
channels): training computes what Apply and the host's sampler compute.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension

from ...sefi_core.pva.attention import VisualProjections
from ...sefi_core.pva.model_files import PVAEncoder
from ...sefi_core.pva.train import (PROMPT, FineTuneResult, FineTuneSettings, InpaintSample, TrainableIdentity,
                                     fine_tune)
from ..clip_tokens import word_embedding
from ..training import TrainingClones, fp32_weight
from .patch import CONDITIONAL, VisualIdentity, cross_attention_layers, patch_layers


class PVAFineTuner(TrainingClones):
    """The callables PVA's trainings (sefi_core/pva/train.py) need, on training clones whose attn2 layers carry PVA.
    The visual projections and the word start from what the encoder was trained with, else from the layers' own
    projections (PVA's initialisation) and the trigger's embedding. `node`: the training node's display name."""

    def __init__(self, model, clip, trigger: str, tokens: torch.Tensor, node: str, checkpointing: bool = False,
                 encoder: PVAEncoder | None = None):
        self.visual = VisualIdentity(tokens, {}, on_negative=True)  # its projections are set once loaded
        super().__init__(model, clip, trigger, node, checkpointing,
                         patch_model=lambda clone: patch_layers(clone, self.visual))
        trained_word = encoder is not None and encoder.word is not None
        self.initial_word = encoder.word if trained_word else word_embedding(clip, trigger)
        self.initial_projections = encoder.projections if encoder is not None else {}
        self.prompt = PROMPT.format(trigger)
        self.identity = None

    def load(self) -> None:
        super().load()
        self.start_identity()
        self.visual.tokens = self.visual.tokens.to(self.device)

    def start_identity(self) -> None:
        """What is trained, as it starts (again, on an out-of-memory retry); else the layers' own projections, as
        loaded (LoRAs included)."""
        start = self.initial_projections or {
            name: VisualProjections(*(fp32_weight(getattr(layer, kind), self.device)
                                      for kind in ("to_q", "to_k", "to_v")))
            for name, layer in cross_attention_layers(self.model).items()}
        self.identity = TrainableIdentity(start, self.initial_word, self.device)
        self.visual.projections = self.identity.projections  # the patch uses the very tensors being trained

    def fine_tune(self, settings: FineTuneSettings, samples: list[InpaintSample], on_step) -> FineTuneResult:
        """PVA Fine-tune Identity's run, from the start (again, on an out-of-memory retry)."""
        self.start_identity()
        return fine_tune(settings, self.identity, samples, self.denoise, on_step, self.dtype)

    def samples(self, squares, vae) -> list[InpaintSample]:
        """Each photo encoded once: its latent, and the inpainting channels as InpaintModelConditioning makes them
        (the masked pixels grey, then the host's extra_conds)."""
        out = []
        for square, mask in squares:
            pixels = square.permute(1, 2, 0).unsqueeze(0)
            keep = (1.0 - mask.round())[None, :, :, None]
            with torch.no_grad():
                latent = vae.encode(pixels)
                masked = vae.encode((pixels - 0.5) * keep + 0.5)
                latent = self.model.model.process_latent_in(latent).to(self.device).float()
                conds = self.model.model.extra_conds(concat_latent_image=masked, concat_mask=mask[None], noise=latent,
                                                     device=self.device)
            out.append(InpaintSample(latent, conds["c_concat"].cond.float()))
        return out

    def denoise(self, latents, noise, timesteps, concat, word, tokens=None, prompt=None) -> torch.Tensor:
        """eps of the patched UNet; `tokens`: the visual tokens of this call (the encoder training's), else the
        fixed ones; `prompt`: this sample's (a caption after the learned word's), else "photo of a sks person"."""
        if tokens is not None:
            self.visual.tokens = tokens
        text = prompt or self.prompt
        context = self.clip.encode_from_tokens(self.with_token(text, word)).to(self.device, self.dtype)
        sigma = self.sampling.sigma(timesteps.to(self.device).float())
        x = self.sampling.noise_scaling(sigma, noise, latents)
        options = {"cond_or_uncond": [CONDITIONAL],
                   "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"pva_train": [self.checkpointing]}}}
        denoised = self.model.model.apply_model(x, sigma, c_concat=concat.to(self.dtype),
                                                c_crossattn=context.expand(len(timesteps), -1, -1),
                                                transformer_options=options)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)

    def release(self) -> None:
        super().release()
        self.visual.tokens = self.visual.tokens.cpu()
