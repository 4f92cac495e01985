"""PVA's trainings (Xu et al., WACV 2024, §3.2-3.3), host-free: the per-identity fine-tune (paper §3.3), and below it the
encoder training on a dataset of many people (paper §3.2), which shares its loss and its trainable identity.

With the encoder and the face recognizer frozen, the 10 visual tokens of the person's photos are computed once (from
all of them: the tokens the identity file stores and Apply uses). Each step one photo is the target, in turn: its
latent noised at two stratified timesteps (one UNet batch), the inpainting model given the photo with its face masked
out, the prompt "photo of a S* person"; the loss is the plain denoising MSE. AdamW trains the visual projections of
every cross-attention layer (lr 2e-5) and an offset added to the learned word's embedding (lr 1e-3); nothing else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..train_state import TrainState
from ..training import (NUM_TRAIN_TIMESTEPS, check_continuation, loss_scaler, optimizer_moments, raise_first_failed,
                        restore_optimizer)
from .attention import VisualProjections
from .distributed import World, sum_gradients
from .face import face_crop

PROMPT = "photo of a {} person"  # the paper's; {} is the learned word S*


def shared_checks(word_learning_rate: float, weight_decay: float, resolution: int) -> list[tuple[bool, str]]:
    """The settings checks both PVA trainings make."""
    return [
        (math.isfinite(word_learning_rate) and word_learning_rate >= 0,
         f"the word's learning rate must be 0 or more (got {word_learning_rate}); the paper uses 1e-3"),
        (math.isfinite(weight_decay) and weight_decay >= 0, f"weight decay must be 0 or more (got {weight_decay})"),
        (resolution >= 64 and resolution % 64 == 0,
         f"resolution must be a multiple of 64, at least 64 (got {resolution}); SD1.5 inpainting is made for 512"),
    ]


@dataclass(frozen=True)
class FineTuneSettings:
    steps: int = 40
    timesteps: int = 2  # per step, stratified, in one UNet batch: 80 UNet passes at the defaults
    projection_learning_rate: float = 2e-5
    word_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    resolution: int = 512

    def __post_init__(self):
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be at least 1 (got {self.steps}); the "
                                                               "paper uses 40"),
            (isinstance(self.timesteps, int) and 1 <= self.timesteps <= 16,
             f"timesteps per step must be 1-16 (got {self.timesteps}); the paper uses 2"),
            (math.isfinite(self.projection_learning_rate) and self.projection_learning_rate > 0,
             f"the projections' learning rate must be above 0 (got {self.projection_learning_rate}); the paper uses 2e-5"),
            *shared_checks(self.word_learning_rate, self.weight_decay, self.resolution),
        ]
        raise_first_failed(checks)

    def as_metadata(self) -> dict:
        return asdict(self)


@dataclass
class InpaintSample:
    """One photo as the inpainting model sees it: its latent (1, 4, h, w) and the extra input channels (1, c, h, w):
    the face mask and the latent of the photo with the face masked out."""

    latent: torch.Tensor
    concat: torch.Tensor


class TrainableIdentity:
    """What the fine-tune trains: fp32 leaf copies of every layer's visual projections on `device`, and an offset on
    the learned word's initial embedding. Hand `projections` to the UNet patch: the same tensors are trained."""

    def __init__(self, projections: dict[str, VisualProjections], word: torch.Tensor, device):
        leaf = lambda t: t.detach().to(device, torch.float32).clone().requires_grad_(True)
        self.projections = {name: VisualProjections(*(leaf(t) for t in p.tensors())) for name, p in projections.items()}
        self.word_base = word.detach().to(device, torch.float32).clone()
        self.word_offset = torch.zeros_like(self.word_base, requires_grad=True)

    def word(self) -> torch.Tensor:
        return self.word_base + self.word_offset

    def projection_tensors(self) -> list[torch.Tensor]:
        return [t for p in self.projections.values() for t in p.tensors()]

    def frozen_copy(self) -> tuple[dict[str, VisualProjections], torch.Tensor]:
        """(projections, word) detached on the CPU: what the identity file keeps."""
        cpu = lambda t: t.detach().to("cpu", torch.float32).clone()
        return ({name: VisualProjections(*(cpu(t) for t in p.tensors())) for name, p in self.projections.items()},
                cpu(self.word()))


@dataclass
class FineTuneResult:
    projections: dict[str, VisualProjections]
    word: torch.Tensor
    losses: list[float]


Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stratified_timesteps(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` timesteps, one drawn uniformly in each of `count` equal slices of [0, 1000)."""
    offsets = torch.rand(count, generator=generator)
    return ((torch.arange(count) + offsets) * (NUM_TRAIN_TIMESTEPS / count)).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def denoising_loss(sample: InpaintSample, identity: TrainableIdentity, denoise: Denoise, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """MSE between the noise and the model's prediction of it, at `count` stratified timesteps of one photo."""
    timesteps = stratified_timesteps(count, generator)
    noise = torch.randn((count, *sample.latent.shape[1:]), generator=generator).to(sample.latent)
    batch = lambda t: t.expand(count, *t.shape[1:])
    eps = denoise(batch(sample.latent), noise, timesteps, batch(sample.concat), identity.word())
    return F.mse_loss(eps.float(), noise.float())


def fine_tune(settings: FineTuneSettings, identity: TrainableIdentity, samples: list[InpaintSample], denoise: Denoise,
              on_step: Callable[[int, list[float]], None] = lambda step, losses: None,
              compute_dtype: torch.dtype = torch.float32) -> FineTuneResult:
    """denoise(latents, noise, timesteps, concat, word) -> eps, differentiable in the word and in the projections of
    `identity` (which the caller's UNet patch uses). fp16 compute gets loss scaling (sefi_core/training.py)."""
    if not samples:
        raise ValueError("the fine-tune needs at least one photo")
    generator = torch.Generator().manual_seed(settings.seed)
    device = identity.word_base.device
    optimizer = torch.optim.AdamW(
        [{"params": identity.projection_tensors(), "lr": settings.projection_learning_rate},
         {"params": [identity.word_offset], "lr": settings.word_learning_rate}],
        weight_decay=settings.weight_decay, fused=device.type == "cuda")
    scaler = loss_scaler(device, compute_dtype)
    losses = []
    for step in range(settings.steps):
        loss = denoising_loss(samples[step % len(samples)], identity, denoise, settings.timesteps, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))  # 40 steps: one read-back each costs nothing next to the UNet passes
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"The fine-tune's loss became {losses[-1]} at step {step + 1}. Lower the learning "
                                     "rates (or use bf16 / fp32); nothing was saved.")
        on_step(step, losses)
    projections, word = identity.frozen_copy()
    return FineTuneResult(projections, word, losses)


# Encoder training (paper §3.2). Each sample: one person's target photo with its face masked out, and 1-5 of their
# other photos as references; the recognizer's features of the references through the encoder are the visual tokens
# the patched UNet attends to, and the loss is the same denoising MSE as the fine-tune's (4 stratified timesteps).
# Stage 1 trains the encoder, every layer's visual projections and the learned word; stage 2 also the recognizer
# (kept in eval mode, as the authors keep it: its batch-norm statistics stay the pretrained ones).
# One optimiser step averages `batch_size x accumulation` samples (the paper: 2 x 4), here one sample per UNet batch,
# whatever the number of processes computing them (sefi_core/pva/distributed.py).


@dataclass(frozen=True)
class EncoderTrainingSettings:
    stage: int = 1
    steps: int = 1000  # optimiser steps; the paper runs up to 50k per stage
    batch_size: int = 2
    accumulation: int = 4
    timesteps: int = 4  # per sample, stratified, in one UNet batch
    encoder_learning_rate: float = 3.2e-5
    projection_learning_rate: float = 8e-6  # the paper's 1e-6 x the total batch (2 x 4)
    word_learning_rate: float = 1e-3
    recognizer_learning_rate: float = 8e-6  # stage 2; the authors' optimiser gives it the attention weights' rate
    weight_decay: float = 0.01
    seed: int = 0
    resolution: int = 512

    def __post_init__(self):
        rates = {"encoder's": self.encoder_learning_rate, "projections'": self.projection_learning_rate,
                 "recognizer's": self.recognizer_learning_rate}
        raise_first_failed([
            (self.stage in (1, 2), f"stage must be 1 or 2 (got {self.stage}): 1 trains the encoder, the visual "
                                   "projections and the word; 2 also the face recognizer"),
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1 and self.accumulation >= 1,
             f"batch size and accumulation must be at least 1 (got {self.batch_size} and {self.accumulation}); the "
             "paper uses 2 and 4"),
            (1 <= self.timesteps <= 16, f"timesteps per sample must be 1-16 (got {self.timesteps}); the paper uses 4"),
            *((math.isfinite(rate) and rate > 0, f"the {whose} learning rate must be above 0 (got {rate})")
              for whose, rate in rates.items()),
            *shared_checks(self.word_learning_rate, self.weight_decay, self.resolution),
        ])

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulation

    def as_metadata(self) -> dict:
        return asdict(self)


@dataclass
class EncoderSample:
    target: InpaintSample
    references: torch.Tensor | None  # (N, 3, H, W) square face photos in [0, 1], on the training device
    features: torch.Tensor | None = None  # or their (N, D) features, from a frozen source computed beforehand
    prompt: str | None = None  # this sample's prompt (the target's caption after PROMPT); None: PROMPT alone


EncoderDenoise = Callable[..., torch.Tensor]  # Denoise's arguments, then the visual tokens (10, width), and prompt=


class EncoderTrainables:
    """What a stage trains, fp32 on the training device: the encoder (train mode: its dropout acts), the visual
    projections and the word (a TrainableIdentity, handed to the UNet patch), and in stage 2 the recognizer.
    Without a recognizer (None) the samples carry their references' features, and there is no stage 2."""

    def __init__(self, encoder: torch.nn.Module, recognizer: torch.nn.Module | None, identity: TrainableIdentity,
                 stage: int):
        if recognizer is None and stage == 2:
            raise ValueError("stage 2 tunes the face recognizer: it needs one (an ArcFace iresnet), not features "
                             "computed beforehand")
        device = identity.word_base.device
        self.encoder = encoder.to(device, torch.float32).train()
        self.recognizer = (recognizer or torch.nn.Identity()).to(device, torch.float32).eval()
        self.identity, self.stage = identity, stage
        self.encoder.requires_grad_(True)
        trained = [name for name, p in self.recognizer.named_parameters() if p.requires_grad]  # not ArcFace's fixed ones
        self.recognizer.requires_grad_(False)
        if stage == 2:
            for name, p in self.recognizer.named_parameters():
                p.requires_grad_(name in trained)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Everything the optimiser moves, in its order (the training state's moments follow it)."""
        named = [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()]
        named += [(f"projections.{layer}.{kind}", t) for layer, p in self.identity.projections.items()
                  for kind, t in zip(("to_q", "to_k", "to_v"), p.tensors())]
        named.append(("word_offset", self.identity.word_offset))
        named += [(f"recognizer.{n}", p) for n, p in self.recognizer.named_parameters() if p.requires_grad]
        return named

    def parameter_groups(self, settings: EncoderTrainingSettings) -> list[dict]:
        groups = [{"params": list(self.encoder.parameters()), "lr": settings.encoder_learning_rate},
                  {"params": self.identity.projection_tensors(), "lr": settings.projection_learning_rate},
                  {"params": [self.identity.word_offset], "lr": settings.word_learning_rate}]
        if self.stage == 2:
            groups.append({"params": [p for p in self.recognizer.parameters() if p.requires_grad],
                           "lr": settings.recognizer_learning_rate})
        return groups

    def weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trained weights and the word's base: what a training state keeps."""
        out = {name: p.detach().cpu().clone() for name, p in self.named_parameters()}
        out["word_base"] = self.identity.word_base.detach().cpu().clone()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        problem = weights_mismatch(self.weights(), weights)
        if problem:
            raise StateMismatch(f"the training state holds other weights than stage {self.stage} trains with this "
                                f"encoder and model: {problem}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(weights[name])
            self.identity.word_base.copy_(weights["word_base"])

    def tokens(self, sample: EncoderSample) -> torch.Tensor:
        """(10, width): the visual tokens of the sample's references; differentiable in what the stage trains."""
        features = sample.features
        if features is None:
            with torch.set_grad_enabled(self.stage == 2):
                features = self.recognizer(face_crop(sample.references))
        return self.encoder(features.to(self.identity.word_base.device, torch.float32).unsqueeze(0))[0]


class StateMismatch(ValueError):
    """A saved run's weights that do not fit what this run trains (names or shapes)."""


def weights_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """What tells two sets of named weights apart (the first few names missing or extra, or the first shape that
    differs), or None where they fit."""
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        return (f"{len(missing)} missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}), "
                f"{len(extra)} not trained here ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})")
    for name, tensor in expected.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            return f"{name} is {tuple(saved[name].shape)} there and {tuple(tensor.shape)} here"
    return None


@dataclass
class EncoderTrainingResult:
    losses: list[float]  # one per optimiser step, the mean over its samples
    state: TrainState
    bytes_summed: int = 0  # per step, what each rank sent into the gradients' all-reduce (0 on one process)


def sample_generators(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """A step's samples' own generators, seeded from the run's: a sample is the same whichever rank draws it."""
    seeds = torch.randint(2**62, (count,), generator=generator).tolist()
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def sample_loss(sample_generator: torch.Generator, trainables: EncoderTrainables,
                draw: Callable[[torch.Generator], EncoderSample], denoise: EncoderDenoise, timesteps: int,
                when: str) -> torch.Tensor:
    """One sample's denoising loss, everything random in it from its own generator: the encoder's dropout (through
    the default generators, seeded from it), the draw, the timesteps and the noise."""
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=sample_generator)))
    sample = draw(sample_generator)
    tokens = trainables.tokens(sample)
    if not torch.isfinite(tokens).all():  # not the optimiser's fault: the advice on a non-finite loss would mislead
        raise FloatingPointError(
            f"The visual tokens of a sample are not finite {when}: the face recognizer's features or the "
            "encoder's output hold NaN or infinite numbers. Load the recognizer again (a damaged file?), or start "
            "from another encoder; the last save is kept.")
    return denoising_loss(sample.target, trainables.identity, lambda *args: denoise(*args, tokens, prompt=sample.prompt),
                          timesteps, sample_generator)


def train_encoder(settings: EncoderTrainingSettings, trainables: EncoderTrainables,
                  draw: Callable[[torch.Generator], EncoderSample], denoise: EncoderDenoise,
                  on_step: Callable[[int, list[float]], None] = lambda step, losses: None,
                  on_save: Callable[[TrainState], None] = lambda state: None, save_every: int = 0,
                  resume: TrainState | None = None, compute_dtype: torch.dtype = torch.float32,
                  world: World = World()) -> EncoderTrainingResult:
    """AdamW over `settings.steps` steps of `samples_per_step` samples each, drawn by draw(generator). The state
    goes to on_save every `save_every` steps and at the end (on the world's writing rank only); from a saved state a
    run ends exactly where one uninterrupted run ends. Across processes (`world`, sefi_core/pva/distributed.py) each
    rank computes its share of every step's samples and the gradients are summed before the step."""
    device = trainables.identity.word_base.device
    named = trainables.named_parameters()
    optimizer = torch.optim.AdamW(trainables.parameter_groups(settings), weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scaler = loss_scaler(device, compute_dtype)
    generator = torch.Generator().manual_seed(settings.seed)
    mine = world.share(settings.samples_per_step)
    first, losses, sent = 0, [], 0
    if resume is not None:
        check_continuation(resume, settings.as_metadata(), settings.steps)
        trainables.load_weights(resume.weights)
        first, losses = restore_optimizer(resume, optimizer, scaler, generator)

    def state(steps_done: int) -> TrainState:
        return TrainState(steps_done, {**settings.as_metadata(), "steps": steps_done}, trainables.weights(),
                          optimizer_moments(optimizer, [p for _, p in named]), generator.get_state(),
                          scaler.state_dict(), list(losses))

    # The samples' dropout draws from the default generators, seeded per sample: forked, so that the process's
    # generators are as they were afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for step in range(first, settings.steps):
            generators = sample_generators(generator, settings.samples_per_step)
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for index in mine:
                loss = sample_loss(generators[index], trainables, draw, denoise, settings.timesteps, f"at step {step + 1}")
                scaler.scale(loss / settings.samples_per_step).backward()
                total += loss.detach() / settings.samples_per_step
            sent = sum_gradients(world, [p for _, p in named], total)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(total))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"The encoder training's loss became {losses[-1]} at step {step + 1}. Lower "
                                         "the learning rates (or use bf16 / fp32); the last save is kept.")
            on_step(step, losses)
            if world.writes and (step + 1 == settings.steps or (save_every and (step + 1) % save_every == 0)):
                on_save(state(step + 1))
    return EncoderTrainingResult(losses, state(settings.steps), sent)


def validation_loss(trainables: EncoderTrainables, draw: Callable[[torch.Generator], EncoderSample],
                    denoise: EncoderDenoise, timesteps: int, count: int, seed: int, world: World = World()) -> float:
    """The mean denoising loss of `count` held-out samples (drawn by `draw` from held-out people), the same samples,
    timesteps and noise at every call (from `seed`), the encoder without dropout and nothing trained; the run's
    generators untouched. Each rank computes its share."""
    device = trainables.identity.word_base.device
    generators = sample_generators(torch.Generator().manual_seed(seed), count)
    total = torch.zeros((), device=device)
    trainables.encoder.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for index in world.share(count):
                total += sample_loss(generators[index], trainables, draw, denoise, timesteps, "in validation").float() / count
    finally:
        trainables.encoder.train()
    return float(world.sum(total))
