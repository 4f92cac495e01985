"""PVA's parallel visual attention in ComfyUI's UNet, on a MODEL clone.

Each transformer block's cross-attention (16 in SD1.x and SD2) gets an object patch on its `forward` (the module, its weights
and their names stay the host's, so loading, LoRAs and casting are untouched). The patched forward runs the host's own
CrossAttention.forward wherever no visual tokens act: for batch rows that get none (the negative, unless asked), outside
start/end, at strength 0. Where they act, it takes the layer's own Q, K, V (so SeFi's K/V injector and other attn2
patches, which change the context and value before the layer, act on the text half as usual) and the identity's visual
logit map and values (formed once per device and dtype while sampling, at every call while training), and takes one
softmax over the text and visual keys (sefi_core/pva/attention.py); rows without visual tokens in the same call get the
host's attention function.

Two things cannot share a layer with it: an attn2 *replace* patch (e.g. IPAdapter's), with which the block bypasses
the layer's forward, and another object patch on the same forward. Both are refused by name, when applying and, for a
replace patch added later, when sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention as host_attention
import comfy.patcher_extension

from ...sefi_core.pva.attention import VisualProjections, joint_attention
from ..sampling import check_inpainting_masks

WRAPPER_KEY = "pva"
CONDITIONAL, UNCONDITIONAL = 0, 1  # the host's cond_or_uncond entries


def cross_attention_layers(model) -> dict[str, torch.nn.Module]:
    """The attn2 of every transformer block, by name in diffusion_model (16 in SD1.x and SD2)."""
    unet = model.get_model_object("diffusion_model")
    return {name: module for name, module in unet.named_modules()
            if name.endswith(".attn2") and isinstance(module, host_attention.CrossAttention)}


@dataclass
class VisualIdentity:
    """What acts in every patched layer: the visual tokens (M, context width), per layer its projections, and where."""

    tokens: torch.Tensor
    projections: dict[str, VisualProjections]  # by layer name in diffusion_model
    strength: float = 1.0
    sigma_start: float = float("inf")  # acts while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    on_negative: bool = False  # the paper's switch: visual tokens on the unconditional branch too

    def rows(self, batch: int, transformer_options: dict) -> torch.Tensor | None:
        """Which rows of this UNet call get visual tokens (bool (batch,)), or None where none do."""
        if self.strength == 0 or self.tokens.shape[0] == 0:
            return None
        chunks = transformer_options.get("cond_or_uncond") or [CONDITIONAL]
        wanted = torch.tensor([c == CONDITIONAL or (self.on_negative and c == UNCONDITIONAL) for c in chunks])
        active = wanted.repeat_interleave(batch // len(chunks))
        sigmas = transformer_options.get("sigmas")
        if sigmas is not None:
            sigmas = sigmas.detach().float().cpu().reshape(-1)
            in_range = (sigmas <= self.sigma_start) & (sigmas >= self.sigma_end)
            active &= in_range if len(in_range) == batch else in_range.all()
        return active if bool(active.any()) else None


class ParallelVisualForward:
    """The patched forward of one attn2 layer (see the module docstring)."""

    def __init__(self, layer, name: str, identity: VisualIdentity):
        self.layer, self.name, self.identity = layer, name, identity

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):
        layer = self.layer
        rows = self.identity.rows(x.shape[0], transformer_options)
        if rows is None or mask is not None:  # a masked cross-attention is not SD's; leave it as the host has it
            return type(layer).forward(layer, x, context=context, value=value, mask=mask,
                                       transformer_options=transformer_options)
        context = x if context is None else context
        q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context if value is None else value)
        visual = self.identity.projections[self.name].visual_keys(self.identity.tokens, layer.heads, x.device, x.dtype)
        joint = lambda *tensors: joint_attention(*tensors, visual, layer.heads, strength=self.identity.strength)
        if bool(rows.all()):
            return layer.to_out(joint(q, k, v, x))
        rows = rows.to(x.device)
        out = torch.empty_like(q)
        off = ~rows
        out[off] = host_attention.optimized_attention(q[off], k[off], v[off], layer.heads,
                                                      attn_precision=layer.attn_precision,
                                                      transformer_options=transformer_options)
        out[rows] = joint(q[rows], k[rows], v[rows], x[rows])
        return layer.to_out(out)


def refuse_replace_patches(model_options: dict, where: str) -> None:
    replaced = sorted(map(str, model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})))
    if replaced:
        raise RuntimeError(
            f"PVA cannot share cross-attention with the attn2 replace patch{'es' if len(replaced) > 1 else ''} "
            f"{where} (blocks {', '.join(replaced[:4])}{' ...' if len(replaced) > 4 else ''}; IPAdapter and similar "
            "nodes install one): with it the UNet skips PVA's layers. Apply that node on another MODEL, or leave it "
            "out where PVA is used.")


def guard_replace_patches(executor, x, timesteps, context=None, y=None, control=None, transformer_options={},
                          **kwargs):
    """DIFFUSION_MODEL wrapper: a replace patch added after PVA would silently switch it off; say so instead."""
    refuse_replace_patches({"transformer_options": transformer_options}, "added to this MODEL after PVA")
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def check_projections_fit(projections: dict[str, VisualProjections], model, source: str) -> None:
    """Visual projections (an identity's, an encoder's) for exactly the MODEL's cross-attention layers, each of the
    shapes of the layer's own to_q, to_k, to_v; `source` names what holds them ("The PVA identity anna.safetensors")."""
    layers = cross_attention_layers(model)
    missing, extra = sorted(set(layers) - set(projections)), sorted(set(projections) - set(layers))
    advice = "Use it with the model it was trained for (SD1.5 or SD2 inpainting)."
    if missing or extra or not layers:
        which = f" (none for {missing[0]})" if missing else f" ({extra[0]} is not in it)" if extra else ""
        raise ValueError(f"{source} has visual projections for {len(projections)} cross-attention layers, but this "
                         f"MODEL has {len(layers)}{which}. {advice}")
    for name, layer in layers.items():
        have = [tuple(t.shape) for t in projections[name].tensors()]
        want = [tuple(getattr(layer, kind).weight.shape) for kind in ("to_q", "to_k", "to_v")]
        if have != want:
            raise ValueError(f"{source}: the visual projections of layer {name} are {have} (to_q, to_k, to_v), and "
                             f"this MODEL's layer takes {want}. {advice}")


def apply_visual_identity(model, identity: VisualIdentity, source: str = "The PVA identity"):
    """A clone of `model` whose cross-attention layers attend to the identity's visual tokens (see module docstring),
    for sampling: an empty inpainting mask is refused."""
    check_projections_fit(identity.projections, model, source)
    patched = patch_layers(model, identity)
    check_inpainting_masks(patched)
    return patched


def patch_layers(model, identity: VisualIdentity):
    """The clone with every attn2 forward patched. The identity's projections are looked up at each call, so a
    training may fill them in once the model is loaded."""
    refuse_replace_patches(model.model_options, "already on this MODEL")
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        raise ValueError("This MODEL already carries a PVA identity (it comes out of a PVA Apply node): a MODEL "
                         "carries one. Connect the MODEL of Load Checkpoint here. To repaint two faces with two "
                         "identities, inpaint one face, then the other, each pass with its own PVA Apply.")
    patched = model.clone()
    for name, layer in cross_attention_layers(model).items():
        key = f"diffusion_model.{name}.forward"
        if key in patched.object_patches:
            raise RuntimeError(f"Another node already replaced {name}.forward on this MODEL (an object patch); PVA "
                               "cannot share that layer with it. Apply PVA on the MODEL before that node, or without it.")
        patched.add_object_patch(key, ParallelVisualForward(layer, name, identity))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                 guard_replace_patches)
    return patched
