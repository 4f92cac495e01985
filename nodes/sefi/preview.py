"""Train Identity's previews: one small image with the tokens as they are at a step, sampled through the same path
SeFi Apply Stage Tokens gives the sampler (its CLIP's encode, its MODEL's K/V injector), with the same seed each time
so the images are comparable."""
from __future__ import annotations

import numpy as np
import torch

import comfy.model_management
import comfy.sample

from ...sefi_core.sefi.identity import Identity
from .apply_stage_tokens import apply_identity

PREVIEW_SIZE = {"sd1": 256, "sdxl": 512}  # pixels (at most the training resolution): half each family's own; SD1.x's
# 4 previews cost 1.6% of a 1000-step run (bench_preview.py). SDXL draws no face at 256 px.
PREVIEW_STEPS = 16  # Euler steps: enough to see a face take shape
PREVIEW_CFG = 6.0
PREVIEW_NEGATIVE = "blurry, low quality, deformed"
DEFAULT_PREVIEW_PROMPT = "a portrait photo of {trigger}, looking at the camera"


class TrainingPreview:
    """Samples on the trainer's own resident clones, then makes them the loaded ones again (the preview's patched clones
    of the same weights took their place in the host's model management)."""

    def __init__(self, trainer, vae, prompt: str, trigger: str, class_word: str, resolution: int, seed: int,
                 family: str = "sd1"):
        self.trainer, self.vae, self.prompt, self.trigger, self.class_word = trainer, vae, prompt, trigger, class_word
        self.size, self.seed, self.family = min(resolution, PREVIEW_SIZE[family]), seed, family
        self.images: list[np.ndarray] = []
        self.steps: list[int] = []

    def __call__(self, step: int, k_tokens: torch.Tensor, v_tokens: torch.Tensor) -> np.ndarray:
        identity = Identity(k_tokens.float().cpu(), v_tokens.float().cpu(), self.trigger, self.class_word,
                            family=self.family)
        model, clip = apply_identity(self.trainer.model, self.trainer.clip, identity, self.trigger)
        with torch.no_grad():
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(self.prompt))
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(PREVIEW_NEGATIVE))
            latent = torch.zeros(1, 4, self.size // 8, self.size // 8)
            noise = comfy.sample.prepare_noise(latent, self.seed)
            samples = comfy.sample.sample(model, noise, PREVIEW_STEPS, PREVIEW_CFG, "euler", "normal", positive,
                                          negative, latent, disable_pbar=True, seed=self.seed)
            pixels = self.vae.decode(samples)[0].clamp(0, 1)
        self.trainer.load()  # the training clones loaded again, the preview's clones let go
        image = (pixels.float().cpu().numpy() * 255).round().astype(np.uint8)
        while self.steps and self.steps[-1] >= step:  # training started again (out of memory in 'auto')
            self.steps.pop(), self.images.pop()
        self.images.append(image)
        self.steps.append(step)
        return image
