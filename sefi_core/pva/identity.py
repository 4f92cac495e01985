"""A PVA identity and its `.safetensors` file: what applying PVA for one person needs once the encoder has run.

After the per-identity fine-tune the encoder and recognizer are frozen, so the 10 visual tokens are computed once and
stored; beside them the fine-tuned visual projections of every cross-attention layer (W'_q, W'_k, W'_v; ~31.6M numbers
for SD1.5, ~63 MB in fp16) and the learned word of "photo of a S* person". Versioned metadata: the base model's
fingerprint, the recognizer and encoder it came from, the trigger and the settings. Validated on load like SeFi
identities (sefi_core/sefi/identity.py); never unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..files import format_metadata, read_versioned, save_atomically
from ..names import InvalidName, validate_trigger
from .attention import VisualProjections

FORMAT_NAME = "pva-identity"
FORMAT_VERSION = 1
PROJECTION_KINDS = ("to_q", "to_k", "to_v")
STORAGE_DTYPE = torch.float16  # the projections' storage (fp32 in training); tokens and word stay fp32


class PVAIdentityError(ValueError):
    """Bad PVA identity data or file; the message says what is wrong and how to fix it."""


@dataclass
class PVAIdentity:
    visual_tokens: torch.Tensor  # (10, context width)
    projections: dict[str, VisualProjections]  # by cross-attention layer name in the UNet
    word: torch.Tensor  # (context width,) the learned word's input embedding
    trigger: str = "sks"
    base_model: str = ""  # fingerprint of the model it was fine-tuned on
    recognizer: str = ""  # which face recognizer made the features (e.g. "iresnet r50")
    encoder: str = ""  # hash of the identity encoder's weights
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        width = self.visual_tokens.shape[-1] if self.visual_tokens.ndim == 2 else None
        if width is None or self.visual_tokens.shape[0] == 0:
            raise PVAIdentityError(f"PVA visual tokens have shape {tuple(self.visual_tokens.shape)}; expected "
                                   "(tokens, context width), e.g. (10, 768).")
        if self.word.shape != (width,):
            raise PVAIdentityError(f"The learned word has shape {tuple(self.word.shape)}; expected ({width},).")
        if not self.projections:
            raise PVAIdentityError("A PVA identity needs the visual projections of the cross-attention layers.")
        for name, p in self.projections.items():
            if p.to_k.shape[1] != width or p.to_v.shape[1] != width or p.to_q.shape[0] != p.to_k.shape[0]:
                raise PVAIdentityError(f"The visual projections of {name} have shapes "
                                       f"{[tuple(t.shape) for t in p.tensors()]}; they do not fit {width}-d tokens.")
        tensors = [self.visual_tokens, self.word, *(t for p in self.projections.values() for t in p.tensors())]
        if not all(torch.isfinite(t).all() for t in tensors):
            raise PVAIdentityError("The PVA identity holds NaN or infinite numbers; fine-tune it again (a lower "
                                   "learning rate usually helps).")
        try:
            self.trigger = validate_trigger(self.trigger)
        except InvalidName as e:
            raise PVAIdentityError(str(e)) from None


def projection_tensors(projections: dict[str, VisualProjections]) -> dict[str, torch.Tensor]:
    """The visual projections as file tensors (fp16): `pva.layers.<layer>.to_q` etc. Identities and encoders share it."""
    return {f"pva.layers.{name}.{kind}": weight.to(STORAGE_DTYPE)
            for name, projections_of_layer in projections.items()
            for kind, weight in zip(PROJECTION_KINDS, projections_of_layer.tensors())}


def projections_from(tensors: dict[str, torch.Tensor]) -> dict[str, VisualProjections]:
    """projection_tensors' inverse, in fp32; KeyError where a layer lacks one of its three."""
    layers = {}
    for key in tensors:
        if key.startswith("pva.layers."):
            layer, kind = key[len("pva.layers."):].rsplit(".", 1)
            layers.setdefault(layer, {})[kind] = tensors[key].float()
    return {layer: VisualProjections(*(parts[kind] for kind in PROJECTION_KINDS)) for layer, parts in layers.items()}


def save_pva_identity(identity: PVAIdentity, path: str, overwrite: bool = False) -> str:
    if os.path.exists(path) and not overwrite:
        raise PVAIdentityError(f"A PVA identity named {os.path.basename(path)!r} already exists. Choose another "
                               "name, or switch 'overwrite' on to replace it.")
    tensors = {"pva.visual_tokens": identity.visual_tokens.float(), "pva.word": identity.word.float(),
               **projection_tensors(identity.projections)}
    metadata = {**format_metadata(FORMAT_NAME, FORMAT_VERSION), "pva.trigger": identity.trigger,
                "pva.base_model": identity.base_model, "pva.recognizer": identity.recognizer, "pva.encoder": identity.encoder,
                "pva.settings": json.dumps(identity.settings, sort_keys=True)}
    return save_atomically(tensors, metadata, path)


def load_pva_identity(path: str) -> PVAIdentity:
    name = os.path.basename(path)
    _, meta, tensors = read_versioned(path, FORMAT_NAME, FORMAT_VERSION, PVAIdentityError, "a PVA identity",
                                      "Copy the PVA identity file again, or fine-tune it again.",
                                      "Only files made by PVA Fine-tune Identity go in models/pva_identities.")
    try:
        return PVAIdentity(tensors["pva.visual_tokens"].float(), projections_from(tensors), tensors["pva.word"].float(),
                           meta["pva.trigger"], meta.get("pva.base_model", ""), meta.get("pva.recognizer", ""),
                           meta.get("pva.encoder", ""), json.loads(meta.get("pva.settings", "{}")))
    except PVAIdentityError as e:
        raise PVAIdentityError(f"{name}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise PVAIdentityError(f"{name} is damaged ({type(e).__name__}: {e}). Copy it again, or fine-tune it "
                               "again.") from None
