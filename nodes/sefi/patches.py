"""SeFi's patches on MODEL and CLIP clones: they carry the stage contexts from the text encoder into
cross-attention.

How a prompt with a trigger flows (see README "How it works"):
1. The CLIP clone's `TriggerTokenizer` (nodes/clip_tokens.py) replaces each trigger's tokens by one marker
   entry: a host embedding entry holding the class word's embedding (so a host without SeFi reads "person") and
   the identity's IdentitySlot.
2. `SefiEncode` (an object patch on the text encoder) sees markers and encodes, in one batch, the base
   prompt plus, per segment of the denoising process, the K prompt and the V prompt. The conditioning
   tensor is the base, as an `IdentityContext` carrying the stage contexts: conditioning nodes transform
   them along with it (sefi_core/sefi/identity_context.py).
3. On the MODEL clone, a CALC_COND_BATCH wrapper takes the stage contexts out of each conditioning into a
   model cond (`StageContextCond`), giving conds without an identity a neutral one (so positive and
   negative still batch into one UNet call); a DIFFUSION_MODEL wrapper picks each row's K/V context from
   its timestep, and `StageKVInjector`, first among attn2 patches, swaps them in.
"""
from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.patcher_extension
from comfy_api.latest import io

from ...sefi_core.sefi.identity_context import IdentityContext
from ...sefi_core.sefi.kv_inject import RowContexts, StageContextBatch, concat_rows, inject_kv, select_kv
from ...sefi_core.sefi.prompt_tokens import IdentitySlot, identity_slots, plan_variants
from ..clip_tokens import TriggerTokenizer
from ..sampling import check_inpainting_masks

log = logging.getLogger(__name__)

COND_KEY = "sefi_stage_contexts"  # model cond / apply_model kwarg carrying StageContextCond (set while sampling)
OPTIONS_KEY = "sefi_stage_kv"  # transformer_options entry: this UNet call's (k_ctx, v_ctx, rows)
WRAPPER_KEY = "sefi_ide"
MARKER_KEY = "sefi_identity"  # key in the host embedding entry that marks a trigger slot

SefiIdentity = io.Custom("SEFI_IDENTITY")


def slot_of(token) -> IdentitySlot | None:
    return token.get(MARKER_KEY) if isinstance(token, dict) else None


# ---------------------------------------------------------------- text encoder patch

class SefiEncode:
    """Object patch for `encode_token_weights`. Prompts without markers go straight to the original,
    so it is harmless if the host leaves it on the shared encoder after the clone is unloaded.

    SDXL's encoder takes two token lists, CLIP-L's ("l") and bigG's ("g"), and concatenates their outputs per token:
    both are batched the same way, so that the K and V contexts hold each encoder's part of the identity. An encoder
    whose prompt has no trigger (CLIPTextEncodeSDXL lets each have its own) encodes its prompt unchanged in every
    variant. The pooled output is the class-word prompt's, as the host pools the batch's first chunk (why that is right:
    nodes/sefi/training.py)."""

    def __init__(self, original, keys: tuple[str, ...]):
        self.original, self.keys = original, keys

    def __call__(self, token_weight_pairs):
        present = [key for key in self.keys if key in token_weight_pairs]
        plans = {key: plan_variants(token_weight_pairs[key], slot_of) for key in present}
        planned = [plan for plan in plans.values() if plan is not None]
        if not planned:
            return self.original(token_weight_pairs)
        segments = _shared_segments(plans, token_weight_pairs)
        count = len(segments.stages)
        chunk_count = min(len(token_weight_pairs[key]) for key in present)  # SDXL's encoder cuts to the shorter
        batch = {key: _variant_chunks(token_weight_pairs[key], plans[key], count, chunk_count) for key in present}
        out = self.original({**token_weight_pairs, **batch})
        cond, pooled = out[:2]  # cond (1, (1 + 2G) * L, C): base, then per segment its K and V prompts
        length = cond.shape[1] // (1 + 2 * count)
        variants = cond[:, length:].reshape(1, count, 2, length, cond.shape[2])
        variants = variants.permute(1, 2, 0, 3, 4)  # (G, 2, 1, L, C)
        extra = {k: (v[:, :length] if torch.is_tensor(v) and v.ndim >= 2 and v.shape[1] == cond.shape[1] else v)
                 for k, v in (out[2] if len(out) > 2 else {}).items()}
        triggers = list(dict.fromkeys(slot.trigger for key in present for slot in
                                      identity_slots(token_weight_pairs[key], slot_of)))
        if pooled is not None:
            pooled = IdentityContext.pooled_output(pooled, segments.cuts, triggers)
        return (IdentityContext(cond[:, :length], variants, segments.cuts, triggers), pooled,
                *([extra] if extra else []))


def _variant_chunks(chunks: list, plan, segments: int, chunk_count: int) -> list:
    """One encoder's batch: the base prompt, then per segment its K and V prompts (the prompt itself in each, for an
    encoder whose prompt has no trigger), each cut to `chunk_count` chunks."""
    if plan is None:
        parts = [chunks] * (1 + 2 * segments)
    else:
        parts = [plan.base] + [c for g in range(segments) for c in (plan.keys[g], plan.values[g])]
    return [chunk for part in parts for chunk in part[:chunk_count]]


def _shared_segments(plans: dict, token_weight_pairs: dict):
    """The segments every encoder's prompt is split into: one plan for all, as SDXL's two prompts must name the same
    identities wherever both name one."""
    planned = {key: plan for key, plan in plans.items() if plan is not None}
    triggers = {key: [s.trigger for s in identity_slots(token_weight_pairs[key], slot_of)] for key in planned}
    first_key = next(iter(planned))
    for key, plan in planned.items():
        if triggers[key] != triggers[first_key] or plan.segments != planned[first_key].segments:
            raise ValueError(f"SeFi Apply Stage Tokens: the CLIP-L prompt (text_l) and the bigG prompt (text_g) name "
                             f"different identities ({', '.join(triggers['l'])} against {', '.join(triggers['g'])}). "
                             "Write the same trigger words in both, or a trigger in one of them only.")
    return planned[first_key].segments


def patch_clip(clip, ids: tuple[int, ...], slots: dict[str, IdentitySlot]):
    """A clone of `clip` that encodes the trigger (token ids `ids`) as the identity: `slots` holds, per text encoder's
    token key, the identity's part that encoder reads. `clip` itself is not changed."""
    patched = clip.clone()
    markers = {key: {"type": "embedding", "data": slot.class_embedding, MARKER_KEY: slot}
               for key, slot in slots.items()}
    trigger = next(iter(slots.values())).trigger
    patched.tokenizer = TriggerTokenizer.with_trigger(
        clip.tokenizer, ids, markers, trigger,
        "Give the second SeFi Apply Stage Tokens node another trigger word (e.g. 'zwx') and use it in the prompt.")
    if not isinstance(patched.patcher.get_model_object("encode_token_weights"), SefiEncode):
        original = type(patched.cond_stage_model).encode_token_weights.__get__(patched.cond_stage_model)
        existing = patched.patcher.object_patches.get("encode_token_weights", original)
        patched.patcher.add_object_patch("encode_token_weights", SefiEncode(existing, tuple(slots)))
    return patched


# ---------------------------------------------------------------- conds and batching

class StageContextCond(comfy.conds.CONDRegular):
    """A conditioning's stage contexts (rows, G, 2, L, C) and segment cuts, or a neutral entry (None)
    for conds without an identity, so that they still batch together."""

    def __init__(self, contexts: torch.Tensor | None, cuts: tuple[float, ...], length: int | None = None):
        self.contexts, self.cuts = contexts, tuple(cuts)
        self.length = contexts.shape[3] if contexts is not None else length
        self.cond = contexts if contexts is not None else torch.zeros(1, 1)  # for the host's generic code
        self._on_device = {}  # process_cond runs every step: copy to the sampling device once

    def process_cond(self, batch_size, device=None, **kwargs):
        if self.contexts is None:
            return _Rows(RowContexts(batch_size, self.length))
        if device is not None and device not in self._on_device:
            self._on_device[device] = self.contexts.to(device)
        contexts = self._on_device.get(device, self.contexts)
        repeats = -(-batch_size // contexts.shape[0])
        return _Rows(RowContexts(batch_size, self.length, contexts.repeat(repeats, 1, 1, 1, 1)[:batch_size], self.cuts))

    def can_concat(self, other):
        return isinstance(other, (StageContextCond, _Rows))

    def concat(self, others):
        raise RuntimeError("StageContextCond must be processed before batching")

    def size(self):
        return list(self.contexts.shape) if self.contexts is not None else [1, 1]


class _Rows(comfy.conds.CONDRegular):
    """A processed StageContextCond: one conditioning's rows, batched by `concat_rows`."""

    def __init__(self, part: RowContexts):
        self.part = part
        self.cond = part.contexts if part.contexts is not None else torch.zeros(part.rows, 1)

    def can_concat(self, other):
        return isinstance(other, _Rows)

    def concat(self, others):
        parts = [self.part, *(o.part for o in others)]
        channels = next((p.contexts.shape[-1] for p in parts if p.contexts is not None), 768)
        return concat_rows(parts, channels)

    def size(self):
        return list(self.cond.shape)


def _stage_cond(context: IdentityContext) -> StageContextCond:
    """The model cond of a conditioning's identity; made once per conditioning tensor (it caches device copies)."""
    cond = getattr(context, "_sefi_stage_cond", None)
    if cond is None:
        cond = StageContextCond(context.stage_contexts(), context.cuts)
        context._sefi_stage_cond = cond
    return cond


def _with_stage_entry(cond: dict) -> dict:
    """The cond with its identity (if its cross-attention tensor carries one) as a model cond, and a plain
    cross-attention tensor; or with a neutral entry, so that it still batches with conds that have one."""
    model_conds = cond.get("model_conds", {})
    context = getattr(model_conds.get("c_crossattn"), "cond", None)
    if isinstance(context, IdentityContext):
        entries = {COND_KEY: _stage_cond(context)}
    else:
        length = context.shape[1] if context is not None else 77
        entries = {COND_KEY: StageContextCond(None, (), length)}
    # Every cross-attention tensor goes on plain: the UNet gets the identity through the injector, other consumers
    # (a ControlNet's crossattn_controlnet) see the class word.
    plain = {key: entry._copy_with(entry.cond.plain()) for key, entry in model_conds.items()
             if isinstance(getattr(entry, "cond", None), IdentityContext)}
    return {**cond, "model_conds": {**model_conds, **plain, **entries}}


def _has_identity(conds) -> bool:
    return any(isinstance(getattr(entry, "cond", None), IdentityContext)
               for group in conds if group for c in group for entry in c.get("model_conds", {}).values())


def batch_with_neutral_entries(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: each identity moves from its conditioning tensor into a model cond; conds
    without one get a neutral entry (conds need identical keys to share a UNet call)."""
    if _has_identity(conds):
        conds = [None if group is None else [_with_stage_entry(c) for c in group] for group in conds]
    return executor(model, conds, x_in, timestep, model_options)


def select_stage_kv(executor, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
    """DIFFUSION_MODEL wrapper: picks each row's K/V context once per UNet call (not per layer)."""
    batch: StageContextBatch | None = kwargs.pop(COND_KEY, None)
    if batch is None or context is None or not bool(batch.has_identity.any()):
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    batch = batch.to(context.device, context.dtype)
    k_ctx, v_ctx = select_kv(batch, timesteps)
    options = {**transformer_options, OPTIONS_KEY: (k_ctx, v_ctx, batch.identity_rows(context.device))}
    return executor(x, timesteps, context, y, control, options, **kwargs)


class StageKVInjector:
    """attn2 patch: keys from the K context, values from the V context of the row's current stage."""

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        picked = extra_options.get(OPTIONS_KEY)
        if picked is None:
            return n, context_attn2, value_attn2
        k_ctx, v_ctx, rows = picked
        context_attn2, value_attn2 = inject_kv(context_attn2, value_attn2, k_ctx, v_ctx, rows)
        return n, context_attn2, value_attn2


def patch_model(model):
    """A clone of `model` with the stage K/V injector installed once (chained Apply nodes share it).
    The injector runs first among attn2 patches, so patches added before or after it see SeFi's K/V."""
    patched = model.clone()
    wrappers = comfy.patcher_extension.WrappersMP
    if not patched.get_wrappers(wrappers.DIFFUSION_MODEL, WRAPPER_KEY):
        check_inpainting_masks(patched)
        patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, batch_with_neutral_entries)
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, select_stage_kv)
        patches = patched.model_options["transformer_options"].setdefault("patches", {})
        patches["attn2_patch"] = [StageKVInjector(), *patches.get("attn2_patch", [])]
    return patched
