"""What both systems' trainings share, host-free: SD's timesteps, settings checks, fp16 loss scaling, and the optimiser
state a training state keeps so that a run can be continued exactly."""
from __future__ import annotations

import torch

from .train_state import TrainState

NUM_TRAIN_TIMESTEPS = 1000  # SD's DDPM training timesteps: SeFi's stages and PVA's stratified draws divide them
INITIAL_LOSS_SCALE = 2.0 ** 16  # fp16 only; the GradScaler adapts it


def raise_first_failed(checks: list[tuple[bool, str]]) -> None:
    """Settings validation: ValueError with the message of the first (ok, message) check that failed."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def loss_scaler(device: torch.device | str, compute_dtype: torch.dtype) -> torch.amp.GradScaler:
    """Dynamic loss scaling where the UNet computes in fp16: the denoising loss's gradients (and more so SeFi's
    lambda * L_attn) are small enough to underflow in fp16 on their way back through the UNet. bf16 has fp32's
    range and needs none; where it is disabled the scaler is a no-op."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=INITIAL_LOSS_SCALE,
                                enabled=compute_dtype == torch.float16)


def check_continuation(state: TrainState, settings: dict, steps: int) -> None:
    """A saved run goes on only with its own settings (`steps` aside) and to more steps than it has done."""
    same = {k: v for k, v in settings.items() if k != "steps"}
    saved = {k: v for k, v in state.settings.items() if k != "steps"}
    if saved != same or not 0 < state.steps_done < steps:
        raise ValueError(f"cannot continue a run of {state.settings} at step {state.steps_done} with {settings}: the "
                         "settings other than steps must be the run's, and steps beyond its step")


def restore_optimizer(state: TrainState, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      generator: torch.Generator) -> tuple[int, list[float]]:
    """A saved run's optimiser moments (one entry per parameter, in order), loss scale and generator put back; (its
    step, its losses). SeFi's and PVA's trainings both continue through it."""
    groups = optimizer.state_dict()["param_groups"]
    moments = {i: {k: v.clone() for k, v in m.items()} for i, m in enumerate(state.adam)}  # Adam updates in place
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    if state.scaler and scaler.is_enabled():
        scaler.load_state_dict(state.scaler)  # fp16 before and now; otherwise the scaler starts fresh (or stays off)
    generator.set_state(state.generator)
    return state.steps_done, list(state.losses)


def optimizer_moments(optimizer: torch.optim.Optimizer, parameters) -> list[dict[str, torch.Tensor]]:
    """The optimiser's state of each parameter, in order, on the CPU: what a TrainState keeps."""
    return [{key: value.detach().cpu().clone() for key, value in optimizer.state[p].items()} for p in parameters]
