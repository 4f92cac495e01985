"""A conditioning tensor that carries its identity with it, through whatever is done to it.

For a prompt with a trigger the text encoder gives the ordinary conditioning (the class word in the trigger's
slot: what a model without SeFi sees) and, per segment of the denoising process, the prompt encoded with the
stage's K token and with its V token (paper §3.2). Conditioning nodes (average, concatenate, zero out, style
tokens, ... and any custom node) transform the conditioning tensor and know nothing of the identity.

`IdentityContext` is that tensor, holding the stage contexts as `variants` (G, 2, *shape). Every tensor operation
that gives a conditioning-like result (floating point, 2-D or more) is applied to each variant as well, so the
identity follows exactly what the node did: averaged with the same weight, concatenated with the same tokens,
zeroed. Where it meets a model's computation (a linear layer, a convolution, attention) it raises instead: only
SeFi's K/V injector may consume it, and anything else would silently lose the identity.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

# Where a conditioning tensor meets a model. A prompt with a trigger must not get there on its own.
MODEL_OPS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.scaled_dot_product_attention, F.layer_norm, F.group_norm,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm, torch.bmm,
    torch.Tensor.mm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum,
})
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__"}


class IdentityReachedModel(RuntimeError):
    """A conditioning with a SeFi identity reached a model that has no SeFi K/V injector."""


class IdentityContext(torch.Tensor):
    """The class-word conditioning (B, L, C), with `variants` (G, 2, B, L, C): per segment the K and V context.
    Segment g covers timesteps [cuts[g], cuts[g-1]), cuts descending, segment 0 the noisiest.
    `pooled`: this is the prompt's pooled embedding instead, which the identity does not change (its variants
    equal it); it only says where an identity would be lost."""

    variants: torch.Tensor
    cuts: tuple[float, ...]
    triggers: tuple[str, ...]
    pooled: bool

    @staticmethod
    def __new__(cls, base: torch.Tensor, variants: torch.Tensor, cuts: Sequence[float], triggers: Sequence[str],
                pooled: bool = False):
        if tuple(variants.shape[2:]) != tuple(base.shape) or variants.shape[1] != 2 or variants.shape[0] != len(cuts) + 1:
            raise ValueError(f"variants {tuple(variants.shape)} do not fit base {tuple(base.shape)} and {len(cuts)} cuts")
        with torch._C.DisableTorchFunctionSubclass():
            tensor = base.as_subclass(cls)
        tensor.variants, tensor.cuts, tensor.triggers, tensor.pooled = variants, tuple(cuts), tuple(triggers), pooled
        return tensor

    @classmethod
    def pooled_output(cls, pooled: torch.Tensor, cuts: Sequence[float], triggers: Sequence[str]) -> "IdentityContext":
        variants = pooled.expand(len(cuts) + 1, 2, *pooled.shape)
        return cls(pooled, variants, cuts, triggers, pooled=True)

    def plain(self) -> torch.Tensor:
        """The class-word conditioning as an ordinary tensor (shares memory)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    def stage_contexts(self) -> torch.Tensor:
        """(B, G, 2, L, C): per batch row, per segment, the K and the V context."""
        if self.ndim != 3:
            raise ValueError(f"a SeFi conditioning must stay (batch, tokens, channels); it is {tuple(self.shape)}")
        with torch._C.DisableTorchFunctionSubclass():
            return self.variants.permute(2, 0, 1, 3, 4)

    def __reduce_ex__(self, protocol):  # pickles (and deep-copies) as what it is
        return IdentityContext, (self.plain().clone(), self.variants.clone(), self.cuts, self.triggers, self.pooled)

    def __deepcopy__(self, memo):
        return IdentityContext(self.plain().clone(), self.variants.clone(), self.cuts, self.triggers, self.pooled)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        carriers = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, IdentityContext)]
        if func in MODEL_OPS:
            raise IdentityReachedModel(_reached_model_message(carriers))
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunctionSubclass():
            if name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
                return _in_place_on_variants(func, args, kwargs, carriers)
            result = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
            if not (isinstance(result, torch.Tensor) and result.is_floating_point() and result.ndim >= 2):
                return result  # sizes, flags, scalars: the class word's answer
            cuts = merged_cuts(carriers)
            variants = torch.stack([torch.stack([func(*tree_map(pick, args), **tree_map(pick, kwargs)) for pick in pair])
                                    for pair in _pickers(carriers, cuts)])
        triggers = tuple(dict.fromkeys(t for c in carriers for t in c.triggers))
        return IdentityContext(result, variants, cuts, triggers, pooled=all(c.pooled for c in carriers))


def _reached_model_message(carriers) -> str:
    triggers = ", ".join(repr(t) for t in sorted({t for c in carriers for t in c.triggers}))
    if all(c.pooled for c in carriers):
        return (f"The pooled text embedding of a prompt with the trigger {triggers} was given to a model (a GLIGEN "
                "text box, or another node that reads the pooled output). SeFi identities act through cross-attention "
                "only, so there the trigger would read as the class word: write the class word (e.g. 'person') there, "
                "and the trigger in the main prompt.")
    return (f"A prompt with the trigger {triggers} reached a model without SeFi's K/V injector, where the identity would "
            "be lost. Connect the MODEL output of SeFi Apply Stage Tokens (the node whose CLIP encoded this prompt) to "
            "the sampler, instead of the checkpoint's MODEL; other models (e.g. a custom node's own) cannot take it.")


def _plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, IdentityContext) else x


def merged_cuts(carriers: Sequence[IdentityContext]) -> tuple[float, ...]:
    """Every cut of every operand: the segments in which none of them changes stage."""
    return tuple(sorted({c for carrier in carriers for c in carrier.cuts}, reverse=True))


def segment_index(cuts: Sequence[float], lower_edge: float) -> int:
    """Which of an operand's segments holds the merged segment starting at `lower_edge`."""
    return sum(1 for c in cuts if c > lower_edge)


def _pickers(carriers, cuts):
    """Per merged segment, a K picker and a V picker: each replaces every operand by its variant for that segment."""
    segments = []
    for m in range(len(cuts) + 1):
        lower = cuts[m] if m < len(cuts) else -math.inf
        index = {id(c): segment_index(c.cuts, lower) for c in carriers}
        segments.append([_picker(index, kv) for kv in (0, 1)])
    return segments


def _in_place_on_variants(func, args, kwargs, carriers):
    """An in-place op (x *= m, x[...] = v, x.copy_(y)) changes each of the target's variants in place too."""
    target = args[0]
    if not isinstance(target, IdentityContext):  # writing an identity's tensor into a plain one would drop it
        raise ValueError("SeFi: a conditioning with an identity was written into a plain tensor in place; the "
                         "identity would be lost. Use the conditioning itself (or ConditioningConcat/Average).")
    if merged_cuts(carriers) != target.cuts:
        raise ValueError("SeFi: two identities with different stage boundaries were combined in place; combine them "
                         "with ConditioningConcat or ConditioningAverage instead.")
    func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
    for pair in _pickers(carriers, target.cuts):
        for pick in pair:
            func(*tree_map(pick, args), **tree_map(pick, kwargs))
    return target


def _picker(index, kv):
    def pick(x):
        return x.variants[index[id(x)], kv] if isinstance(x, IdentityContext) else x
    return pick
