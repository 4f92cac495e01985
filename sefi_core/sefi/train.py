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

from ..train_state import TrainState
from ..training import (NUM_TRAIN_TIMESTEPS, check_continuation, loss_scaler, optimizer_moments, raise_first_failed,
                        restore_optimizer)
from .identity import MAX_TOKEN_NORM
from .losses import ATTENTION_OPTIONS
from .mapper import TokenMapper
from .stages import even_boundaries, stage_of_timestep

LOSS_READBACK_STEPS = 25  # steps between reading the loss back from the device (each read waits for it)

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
             f"resolution must be a multiple of 64, at least 64 (got {self.resolution}); SD1.x trains at 512, SDXL at "
             "1024"),
            (self.stage_count in (1, 5, 10), f"K/V pairs must be 1, 5 or 10 (got {self.stage_count})"),
            (self.attention_option in ATTENTION_OPTIONS.values(),
             f"attention-loss option {self.attention_option!r} is not one of {list(ATTENTION_OPTIONS.values())}"),
        ]
        raise_first_failed(checks)

    def as_metadata(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    k_tokens: torch.Tensor  # (S, C)
    v_tokens: torch.Tensor
    losses: list[float]  # every step's, those of a continued run's earlier steps first
    state: TrainState | None = None  # what continuing needs (train_state.py)


EncodeKV = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Denoise = Callable[..., tuple[torch.Tensor, torch.Tensor]]
OnStep = Callable[[int, list[float]], None]
OnPreview = Callable[[int, torch.Tensor, torch.Tensor], None]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where mask (B, 1, h, w) is 1."""
    err = (prediction.float() - target.float()) ** 2 * mask
    return err.sum() / (mask.sum() * prediction.shape[1]).clamp(min=1)


@dataclass(frozen=True)
class Batch:
    """One step's draw: an augmented view, a timestep, a prompt template and the noise."""

    latent: torch.Tensor  # (1, 4, h, w)
    mask: torch.Tensor  # (1, 1, h, w): where the subject is
    t: int
    template: int
    noise: torch.Tensor


def draw_batch(samples: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator) -> Batch:
    latent, mask = samples[int(torch.randint(len(samples), (), generator=generator))]
    t = int(torch.randint(NUM_TRAIN_TIMESTEPS, (), generator=generator))
    template = int(torch.randint(len(PROMPT_TEMPLATES), (), generator=generator))
    noise = torch.randn(latent.shape, generator=generator).to(latent)
    return Batch(latent, mask, t, template, noise)


def loss_terms(mapper: TokenMapper, batch: Batch, encode_kv: EncodeKV, denoise: Denoise,
               boundaries: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_KV, L_attn) of one batch, both fp32 scalars: the denoising loss where the subject is, with keys from
    the stage's K token and values from its V token, and the face-wise attention loss."""
    stage = stage_of_timestep(batch.t, boundaries)
    k_tokens, v_tokens = mapper()
    k_context, v_context = encode_kv(batch.template, k_tokens[stage], v_tokens[stage])
    eps, attn_loss = denoise(batch.latent, batch.noise, batch.t, k_context, v_context, batch.template)
    return masked_mse(eps, batch.noise, batch.mask), attn_loss.float()


def make_optimizer(mapper: TokenMapper, learning_rate: float) -> torch.optim.Adam:
    """Adam; fused on CUDA: one kernel launch per step, and with a GradScaler it skips overflowed steps on the GPU
    instead of reading a flag back every step (on the CPU there is nothing to wait for)."""
    fused = next(mapper.parameters()).device.type == "cuda"
    return torch.optim.Adam(mapper.parameters(), lr=learning_rate, fused=fused)


def largest_token_norm(mapper: TokenMapper) -> float:
    with torch.no_grad():
        k_tokens, v_tokens = mapper()
        return float(torch.cat([k_tokens, v_tokens]).norm(dim=-1).max())


def check_progress(losses: list[float], first_step: int, mapper: TokenMapper, settings: TrainSettings) -> None:
    """Stops a run that diverged: a non-finite loss, or tokens grown far beyond any word embedding (they
    would give NaN or garbage images long before the loss shows it)."""
    advice = (f"Lower the learning rate (now {settings.learning_rate:g}), e.g. to {settings.learning_rate / 5:g}; "
              "nothing was saved.")
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            raise TrainingDiverged(f"The loss became {value} at step {first_step + i + 1}. {advice}")
    norm = largest_token_norm(mapper)
    if not norm <= MAX_TOKEN_NORM:
        raise TrainingDiverged(f"The identity's tokens grew to a size of {norm:.3g} by step {first_step + len(losses)} "
                               f"(a word embedding's is about 0.1-1; the limit is {MAX_TOKEN_NORM:g}). {advice}")


def train_tokens(settings: TrainSettings, class_embedding: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor]],
                 encode_kv: EncodeKV, denoise: Denoise, on_step: OnStep = lambda step, losses: None,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32,
                 readback_every: int = LOSS_READBACK_STEPS, preview_every: int = 0,
                 on_preview: OnPreview = lambda step, k_tokens, v_tokens: None,
                 resume: TrainState | None = None, widths: tuple[int, ...] | None = None) -> TrainResult:
    """samples: (latent (1, 4, h, w), mask (1, 1, h, w)) augmented views of the image(s).
    encode_kv(template_index, k_token, v_token) -> (k_context, v_context), differentiable in the tokens.
    denoise(latent, noise, t, k_context, v_context, template_index) -> (eps_prediction, attention_loss).
    compute_dtype: the dtype the UNet computes in (fp16 turns loss scaling on).
    on_step(step, losses) runs after every step; `losses` grows every `readback_every` steps, because reading
    the loss back from the GPU every step would make the CPU wait for it.
    on_preview(steps_done, k_tokens, v_tokens) runs every `preview_every` steps (0: never) with the current tokens,
    outside autograd; it draws nothing from the training's generator, so previews leave the result unchanged.
    resume: the state a run of the same settings ended with; training goes on from its step to settings.steps, as
    one run would have (same samples given).
    widths: each text encoder's part of a token (SDXL: (768, 1280)); None: one encoder (TokenMapper)."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the mapper's initial slots
    mapper = TokenMapper(class_embedding, settings.stage_count, widths=widths).to(device)
    optimizer = make_optimizer(mapper, settings.learning_rate)
    scaler = loss_scaler(device, compute_dtype)
    boundaries = even_boundaries(settings.stage_count)
    first_step, losses = restore(resume, mapper, optimizer, scaler, generator, settings) if resume else (0, [])
    pending = []
    for step in range(first_step, settings.steps):
        l_kv, l_attn = loss_terms(mapper, draw_batch(samples, generator), encode_kv, denoise, boundaries)
        loss = l_kv + settings.attention_weight * l_attn
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pending.append(loss.detach())
        if len(pending) == readback_every or step + 1 == settings.steps:
            new = torch.stack(pending).tolist()  # the one host synchronisation every `readback_every` steps
            check_progress(new, len(losses), mapper, settings)
            losses += new
            pending = []
        on_step(step, losses)
        if preview_every and (step + 1) % preview_every == 0:
            with torch.no_grad():
                on_preview(step + 1, *(t.detach() for t in mapper()))
    with torch.no_grad():
        k_tokens, v_tokens = mapper()
    state = TrainState(settings.steps, settings.as_metadata(), {k: v.detach().cpu().clone() for k, v in
                                                                 mapper.state_dict().items()},
                       optimizer_moments(optimizer, mapper.parameters()), generator.get_state(), scaler.state_dict(),
                       list(losses))
    return TrainResult(k_tokens.detach().cpu(), v_tokens.detach().cpu(), losses, state)


def restore(state: TrainState, mapper: TokenMapper, optimizer: torch.optim.Adam, scaler: torch.amp.GradScaler,
            generator: torch.Generator, settings: TrainSettings) -> tuple[int, list[float]]:
    """Puts a saved run's mapper, Adam, loss scale and generator back; (its step, its losses)."""
    check_continuation(state, settings.as_metadata(), settings.steps)
    mapper.load_state_dict(state.weights)
    return restore_optimizer(state, optimizer, scaler, generator)
