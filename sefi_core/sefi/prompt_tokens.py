"""SeFi's identities in tokenized prompts, and the per-stage prompt variants the text encoder runs.

A tokenized prompt is a list of chunks (77 entries each for CLIP-L; sefi_core/tokens.py); a trigger occurrence is
marked by one entry holding its IdentitySlot. For stage i the prompt is encoded twice: with P_i^K in every trigger slot (-> keys) and with P_i^V
(-> values); paper §3.2, §6.2. The words around the trigger are contextualised with the identity
because the vectors go through the frozen text transformer like any word.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .stages import ActiveRange, SegmentPlan, plan_segments


@dataclass(frozen=True, eq=False)
class IdentitySlot:
    """Everything a trigger occurrence needs at encode time (strength already applied)."""

    trigger: str
    k_tokens: torch.Tensor  # (S, C)
    v_tokens: torch.Tensor  # (S, C)
    class_embedding: torch.Tensor  # (C,) what the trigger reads as outside the active range
    boundaries: tuple[float, ...]
    active: ActiveRange = ActiveRange()


def blend_toward_class(tokens: torch.Tensor, class_embedding: torch.Tensor, strength: float) -> torch.Tensor:
    """strength 0 gives the class word, 1 the identity, above 1 exaggerates it."""
    return class_embedding + strength * (tokens - class_embedding)


def identity_slots(chunks: list[list[tuple]], slot_of: Callable[[object], IdentitySlot | None]) -> list[IdentitySlot]:
    """The distinct identities marked in a tokenized prompt, in order of first appearance."""
    found = {}
    for chunk in chunks:
        for entry in chunk:
            slot = slot_of(entry[0])
            if slot is not None:
                found.setdefault(id(slot), slot)
    return list(found.values())


@dataclass(frozen=True)
class VariantPlan:
    segments: SegmentPlan
    base: list[list[tuple]]  # the class word in every slot: what a host without SeFi sees
    keys: list[list[list[tuple]]]  # per segment, the prompt that makes the keys
    values: list[list[list[tuple]]]  # per segment, the prompt that makes the values


def plan_variants(chunks: list[list[tuple]], slot_of: Callable[[object], IdentitySlot | None]) -> VariantPlan | None:
    """The prompts to encode for a tokenized prompt with marked triggers; None when it has none."""
    slots = identity_slots(chunks, slot_of)
    if not slots:
        return None
    plan = plan_segments([(s.boundaries, s.active) for s in slots])
    index = {id(s): j for j, s in enumerate(slots)}

    def variant(pick: Callable[[int, IdentitySlot], torch.Tensor]) -> list[list[tuple]]:
        return [[(pick(index[id(slot_of(e[0]))], slot_of(e[0])), *e[1:]) if slot_of(e[0]) is not None else e
                 for e in chunk] for chunk in chunks]

    def stage_token(g: int, which: str):
        def pick(j: int, slot: IdentitySlot) -> torch.Tensor:
            stage = plan.stages[g][j]
            if stage is None:
                return slot.class_embedding
            return (slot.k_tokens if which == "k" else slot.v_tokens)[stage]
        return pick

    return VariantPlan(
        segments=plan,
        base=variant(lambda j, slot: slot.class_embedding),
        keys=[variant(stage_token(g, "k")) for g in range(len(plan.stages))],
        values=[variant(stage_token(g, "v")) for g in range(len(plan.stages))],
    )
