"""Timestep stages. The 1000 DDPM training timesteps split into S stages; stage 0 is the noisiest
(layout and pose), stage S-1 the cleanest (identity detail), paper §3.2 and Fig. 5.

Training and generation share `stage_of_timestep`. A sampler's sigma becomes a timestep through the
model's own sigma->timestep map (done by the host), so any scheduler lands in the right stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..training import NUM_TRAIN_TIMESTEPS


def even_boundaries(stage_count: int) -> tuple[float, ...]:
    """S+1 boundaries from 1000 down to 0: stage i covers timesteps [b[i+1], b[i])."""
    return tuple(NUM_TRAIN_TIMESTEPS * (stage_count - i) / stage_count for i in range(stage_count + 1))


def validate_boundaries(boundaries: Sequence[float], stage_count: int) -> None:
    b = list(boundaries)
    if len(b) != stage_count + 1 or b[0] != NUM_TRAIN_TIMESTEPS or b[-1] != 0:
        raise ValueError(f"stage boundaries {b} must be {stage_count + 1} timesteps from "
                         f"{NUM_TRAIN_TIMESTEPS} down to 0")
    if any(hi <= lo for hi, lo in zip(b, b[1:])):
        raise ValueError(f"stage boundaries {b} must strictly decrease")


def stage_of_timestep(t, boundaries: Sequence[float]):
    """Stage index of timestep t (a float or a tensor of them): the number of inner boundaries above t.
    Timesteps at or above b[1] are stage 0, below b[S-1] the last stage."""
    inner = boundaries[1:-1]
    if torch.is_tensor(t):
        cuts = torch.tensor(inner, dtype=t.dtype, device=t.device)
        return (t.unsqueeze(-1) < cuts).sum(-1)
    return sum(1 for c in inner if t < c)


def percent_to_timestep(percent: float) -> float:
    """Position in the denoising process (0 = start, 1 = end) as a timestep, the host's convention
    (ComfyUI's percent_to_sigma goes through timestep (1-p)*999). The ends are open."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return -math.inf
    return (1.0 - percent) * (NUM_TRAIN_TIMESTEPS - 1)


@dataclass(frozen=True)
class ActiveRange:
    """Timesteps [low, high) in which an identity acts; outside it the trigger reads as the class word."""

    high: float = math.inf
    low: float = -math.inf

    @classmethod
    def from_percent(cls, start: float, end: float) -> "ActiveRange":
        return cls(high=percent_to_timestep(start), low=percent_to_timestep(end))

    def contains(self, t: float) -> bool:
        return self.low <= t < self.high


@dataclass(frozen=True)
class SegmentPlan:
    """The denoising process cut where any identity changes stage or switches on/off.

    cuts: descending timesteps; segment g holds timesteps in [cuts[g], cuts[g-1]) (segment 0 is the noisiest).
    stages[g][j]: the stage identity j uses in segment g, or None where j is outside its active range.
    """

    cuts: tuple[float, ...]
    stages: tuple[tuple[int | None, ...], ...]


def plan_segments(identities: Sequence[tuple[Sequence[float], ActiveRange]]) -> SegmentPlan:
    """identities: (stage boundaries, active range) per identity in the prompt."""
    cut_set = set()
    for boundaries, active in identities:
        cut_set.update(boundaries[1:-1])
        cut_set.update(c for c in (active.high, active.low) if 0 < c < NUM_TRAIN_TIMESTEPS)
    cuts = tuple(sorted(cut_set, reverse=True))
    edges = (math.inf, *cuts, -math.inf)
    stages = []
    for upper, lower in zip(edges, edges[1:]):
        t = lower if math.isfinite(lower) else min(upper, NUM_TRAIN_TIMESTEPS) - 0.5
        stages.append(tuple(stage_of_timestep(t, b) if active.contains(t) else None for b, active in identities))
    return SegmentPlan(cuts=cuts, stages=tuple(stages))


def segment_of_timestep(t: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Per-row segment index: t (B,), cuts (B, G-1) descending, padded with -inf."""
    return (t.unsqueeze(-1) < cuts).sum(-1)
