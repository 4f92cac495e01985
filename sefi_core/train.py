"""Training an identity from one image (paper §3, §6.4, Algorithm 1), host-agnostic.

Per step: one of seven prompt templates with the trigger, an augmented image latent, a timestep t and
its stage i, noise. The mapper gives (P_i^K, P_i^V); the host encodes the template with each (keys and
values contexts) and denoises with keys from C_i^K and values from C_i^V, also returning the face-wise
attention loss against the reference prompt (class word in the trigger's place).
L = L_KV + lambda * L_attn; Adam on the mapper only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .losses import ATTENTION_OPTIONS
from .mapper import TokenMapper
from .stages import NUM_TRAIN_TIMESTEPS, even_boundaries, stage_of_timestep

PROMPT_TEMPLATES = (  # paper §6.4; {} is the trigger (V*)
    "a photo of a face of {}",
    "a photo of a rendering of a face of {}",
    "a close-up photo of the face of {}",
    "a photo of the cool face of {}",
    "a rendition of the face of {}",
    "an illustration of a face of {}",
    "a depiction of a face of {}",
)


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    learning_rate: float = 0.005
    attention_weight: float = 0.003  # lambda; the paper found 0.01 and 0.05 underfit
    seed: int = 0
    resolution: int = 512
    stage_count: int = 5
    attention_option: str = "all"  # see losses.ATTENTION_OPTIONS

    def __post_init__(self):
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be at least 1 (got {self.steps})"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning rate must be a positive number (got {self.learning_rate}); the paper uses 0.005"),
            (math.isfinite(self.attention_weight) and self.attention_weight >= 0,
             f"attention-loss weight must be 0 or more (got {self.attention_weight}); the paper uses 0.003"),
            (self.resolution >= 64 and self.resolution % 64 == 0,
             f"resolution must be a multiple of 64, at least 64 (got {self.resolution}); SD1.x trains at 512"),
            (self.stage_count in (1, 5, 10), f"K/V pairs must be 1, 5 or 10 (got {self.stage_count})"),
            (self.attention_option in ATTENTION_OPTIONS.values(),
             f"attention-loss option {self.attention_option!r} is not one of {list(ATTENTION_OPTIONS.values())}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def as_metadata(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    k_tokens: torch.Tensor  # (S, C)
    v_tokens: torch.Tensor
    losses: list[float]


EncodeKV = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Denoise = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where mask (B, 1, h, w) is 1."""
    err = (prediction.float() - target.float()) ** 2 * mask
    return err.sum() / (mask.sum() * prediction.shape[1]).clamp(min=1)


def train_tokens(settings: TrainSettings, class_embedding: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor]],
                 encode_kv: EncodeKV, denoise: Denoise, on_step: Callable[[int, float], None] = lambda s, l: None,
                 device: torch.device | str = "cpu") -> TrainResult:
    """samples: (latent (1, 4, h, w), mask (1, 1, h, w)) augmented views of the image(s).
    encode_kv(template_index, k_token, v_token) -> (k_context, v_context), differentiable in the tokens.
    denoise(latent, noise, t, k_context, v_context, template_index) -> (eps_prediction, attention_loss)."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the mapper's initial slots
    mapper = TokenMapper(class_embedding, settings.stage_count).to(device)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=settings.learning_rate)
    boundaries = even_boundaries(settings.stage_count)
    losses = []
    for step in range(settings.steps):
        latent, mask = samples[int(torch.randint(len(samples), (), generator=generator))]
        t = int(torch.randint(NUM_TRAIN_TIMESTEPS, (), generator=generator))
        template = int(torch.randint(len(PROMPT_TEMPLATES), (), generator=generator))
        noise = torch.randn(latent.shape, generator=generator).to(latent)
        stage = stage_of_timestep(t, boundaries)
        k_tokens, v_tokens = mapper()
        k_context, v_context = encode_kv(template, k_tokens[stage], v_tokens[stage])
        eps, attn_loss = denoise(latent, noise, t, k_context, v_context, template)
        loss = masked_mse(eps, noise, mask) + settings.attention_weight * attn_loss
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"The loss became {loss.item()} at step {step + 1}. Lower the learning rate "
                                   f"(now {settings.learning_rate}), e.g. to {settings.learning_rate / 5:g}; nothing was saved.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        on_step(step, losses[-1])
    with torch.no_grad():
        k_tokens, v_tokens = mapper()
    return TrainResult(k_tokens.detach().cpu(), v_tokens.detach().cpu(), losses)
