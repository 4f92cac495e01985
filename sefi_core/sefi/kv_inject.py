"""Stage-aware K/V injection: in every cross-attention layer, keys come from the K context and values
from the V context of the stage the current step falls in, per batch row (paper §3.2, Fig. 10).

Per conditioning, the text encoder produced `contexts` (G, 2, L, C): for each segment of the denoising
process (see stages.SegmentPlan) the K context and the V context. Rows without an identity (a negative
prompt, a prompt without the trigger) keep the context the host gave them, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stages import segment_of_timestep


@dataclass(frozen=True)
class StageContextBatch:
    """One UNet call's worth of stage contexts, rows aligned with the latent batch."""

    contexts: torch.Tensor  # (B, G, 2, L, C)
    cuts: torch.Tensor  # (B, G-1) descending timesteps, padded with -inf
    has_identity: torch.Tensor  # (B,) bool, kept on the CPU so checking it never waits for the GPU

    def to(self, device, dtype) -> "StageContextBatch":
        return StageContextBatch(self.contexts.to(device, dtype), self.cuts.to(device), self.has_identity)

    def identity_rows(self, device) -> torch.Tensor | None:
        """None when every row has an identity (the common case: swap whole tensors), else a (B,) mask."""
        return None if bool(self.has_identity.all()) else self.has_identity.to(device)


@dataclass(frozen=True)
class RowContexts:
    """What one conditioning contributes to a batch: `rows` rows of `length` tokens, contexts or None."""

    rows: int
    length: int
    contexts: torch.Tensor | None = None  # (rows, G, 2, length, C)
    cuts: tuple[float, ...] = ()


def concat_rows(parts: list[RowContexts], channels: int) -> StageContextBatch:
    """Batch conditionings the way the host batches their cross-attention: token lengths are tiled to
    their least common multiple (repeating a context does not change attention), segment counts padded."""
    length = math.lcm(*(p.length for p in parts))
    segments = max(len(p.cuts) + 1 for p in parts)
    contexts, cuts, flags = [], [], []
    for p in parts:
        if p.contexts is None:
            ref = next((q.contexts for q in parts if q.contexts is not None), None)
            dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, "cpu")
            contexts.append(torch.zeros(p.rows, segments, 2, length, channels, dtype=dtype, device=device))
        else:
            c = p.contexts.repeat(1, 1, 1, length // p.length, 1)  # (rows, G, 2, length, C)
            pad = segments - c.shape[1]
            contexts.append(torch.cat([c, c[:, -1:].expand(-1, pad, -1, -1, -1)], 1) if pad else c)
        padded = list(p.cuts) + [-math.inf] * (segments - 1 - len(p.cuts))
        cuts.append(torch.tensor([padded] * p.rows, dtype=torch.float32).reshape(p.rows, segments - 1))
        flags.append(torch.full((p.rows,), p.contexts is not None))
    device = contexts[0].device
    return StageContextBatch(torch.cat(contexts), torch.cat(cuts).to(device), torch.cat(flags))


def select_kv(batch: StageContextBatch, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V contexts (B, L, C) of each row's current segment; timesteps (B,) as the UNet sees them."""
    seg = segment_of_timestep(timesteps.to(batch.cuts.dtype), batch.cuts)  # (B,)
    picked = batch.contexts[torch.arange(seg.shape[0], device=seg.device), seg]  # (B, 2, L, C)
    return picked[:, 0], picked[:, 1]


def inject_kv(context: torch.Tensor, value: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
              rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap in the stage K/V contexts on identity rows (all rows when `rows` is None); other rows are
    returned untouched."""
    if k_ctx.shape != context.shape:
        raise RuntimeError(f"SeFi: the cross-attention context has shape {tuple(context.shape)} but the identity's "
                           f"stage contexts have {tuple(k_ctx.shape)}. Another patch changed the context before "
                           "SeFi; put SeFi Apply Stage Tokens first in the model chain.")
    if rows is None:
        return k_ctx, v_ctx
    rows = rows.view(-1, 1, 1)
    return torch.where(rows, k_ctx, context), torch.where(rows, v_ctx, value)
