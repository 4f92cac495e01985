"""A PVA identity and its `.safetensors` file: what applying PVA for one person needs once the encoder has run.

After the per-identity fine-tune the encoder and recognizer are frozen, so the 10 visual tokens are computed once and
stored; beside them the fine-tuned visual projections of every cross-attention layer (W'_q, W'_k, W'_v; ~31.6M numbers
for SD1.5, ~63 MB in fp16) and the learned word of "photo of a S* person". Versioned metadata: the base it is for
(bases.py: SD1.5 or SD2 inpainting; none recorded: SD1.5), the base model's fingerprint, the recognizer and encoder it
came from, the trigger and the settings. Validated on load like SeFi identities (sefi_core/sefi/identity.py); never
unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..files import format_metadata, read_versioned, save_atomically
from ..names import InvalidName, validate_trigger
from .attention import VisualProjections
from .bases import BASE_KEY, SD15_INPAINTING, Base, base_named

FORMAT_NAME = "pva-identity"
FORMAT_VERSION = 1
PROJECTION_KINDS = ("to_q", "to_k", "to_v")
STORAGE_DTYPE = torch.float16  # the projections' storage (fp32 in training); tokens and word stay fp32
# Sane sizes, far beyond what training makes, so that a damaged or hand-made file is refused instead of making NaN
# images: a text-context token of SD1.x has a norm of about 28 (the encoder's tokens are made like them), a word
# embedding about 0.4 (the learned word moves from its start by at most the learning rate per step and dimension),
# and SD's to_q/to_k/to_v weights are about 0.05 in size.
MAX_VISUAL_TOKENS = 64
MAX_VISUAL_TOKEN_NORM = 1000.0
MAX_WORD_NORM = 100.0
MAX_PROJECTION_WEIGHT = 100.0


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
    file: str = field(default="", compare=False)  # the file it was loaded from, for messages
    base: Base = SD15_INPAINTING  # the base model family it is for; its context width is the tokens' and the word's

    def __post_init__(self):
        width = self.visual_tokens.shape[-1] if self.visual_tokens.ndim == 2 else None
        if width is None or not 1 <= self.visual_tokens.shape[0] <= MAX_VISUAL_TOKENS:
            raise PVAIdentityError(f"PVA visual tokens have shape {tuple(self.visual_tokens.shape)}; expected "
                                   f"(tokens, context width) with 1-{MAX_VISUAL_TOKENS} tokens, e.g. (10, 768).")
        if width != self.base.context_dim:
            raise PVAIdentityError(f"A PVA identity for {self.base.describe()} needs {self.base.context_dim}-d visual "
                                   f"tokens; these are {width}-d.")
        if self.word.shape != (width,):
            raise PVAIdentityError(f"The learned word has shape {tuple(self.word.shape)}; expected ({width},).")
        if not self.projections:
            raise PVAIdentityError("A PVA identity needs the visual projections of the cross-attention layers.")
        try:
            check_projections(self.projections, width)
            check_size("visual tokens", self.visual_tokens, MAX_VISUAL_TOKEN_NORM)
            check_size("learned word", self.word[None], MAX_WORD_NORM)
            self.trigger = validate_trigger(self.trigger)
        except (ValueError, InvalidName) as e:
            raise PVAIdentityError(f"{e} Fine-tune the identity again (a lower learning rate usually helps).") from None


def check_size(what: str, rows: torch.Tensor, limit: float) -> None:
    """Finite, and no row's norm beyond `limit` (ValueError naming `what`)."""
    if not torch.isfinite(rows).all():
        raise ValueError(f"NaN or infinite numbers in the {what}.")
    size = float(rows.float().norm(dim=-1).max())
    if size > limit:
        raise ValueError(f"A size (norm) of up to {size:.3g} in the {what}; the limit is {limit:g}.")


def check_projections(projections: dict[str, VisualProjections], width: int) -> None:
    """Every layer's W'_q (inner, query width), W'_k and W'_v (inner, `width`): of one inner width, finite and of sane
    size (ValueError naming the layer)."""
    for name, p in projections.items():
        shapes = [tuple(t.shape) for t in p.tensors()]
        if any(len(shape) != 2 for shape in shapes) or len({shape[0] for shape in shapes}) != 1 or \
                shapes[1][1] != width or shapes[2][1] != width:
            raise ValueError(f"The visual projections of layer {name} have shapes {shapes} (to_q, to_k, to_v); they "
                             f"must share their first size and take {width}-d tokens.")
        for kind, weight in zip(PROJECTION_KINDS, p.tensors()):
            if not torch.isfinite(weight).all():
                raise ValueError(f"The visual projection {kind} of layer {name} holds NaN or infinite numbers.")
            largest = float(weight.abs().max()) if weight.numel() else 0.0
            if largest > MAX_PROJECTION_WEIGHT:
                raise ValueError(f"The visual projection {kind} of layer {name} has weights up to {largest:.3g}; the "
                                 f"limit is {MAX_PROJECTION_WEIGHT:g}.")


def as_stored(projections: dict[str, VisualProjections]) -> dict[str, VisualProjections]:
    """The projections as a file holds them (rounded to STORAGE_DTYPE, back in fp32): what a node returns is what it
    saves, so an identity gives one result whether it comes from its node or from its file."""
    return {name: VisualProjections(*(t.detach().to("cpu", STORAGE_DTYPE).float() for t in p.tensors()))
            for name, p in projections.items()}


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
    metadata = {**format_metadata(FORMAT_NAME, FORMAT_VERSION), BASE_KEY: identity.base.name,
                "pva.trigger": identity.trigger,
                "pva.base_model": identity.base_model, "pva.recognizer": identity.recognizer, "pva.encoder": identity.encoder,
                "pva.settings": json.dumps(identity.settings, sort_keys=True)}
    return save_atomically(tensors, metadata, path)


def load_pva_identity(path: str) -> PVAIdentity:
    name = os.path.basename(path)
    _, meta, tensors = read_versioned(path, FORMAT_NAME, FORMAT_VERSION, PVAIdentityError, "a PVA identity",
                                      "Copy the PVA identity file again, or fine-tune it again.",
                                      "Only files made by PVA Fine-tune Identity go in models/pva_identities.")
    try:
        tokens = tensors["pva.visual_tokens"].float()
        base = base_named(meta.get(BASE_KEY), tokens.shape[-1])
        return PVAIdentity(tokens, projections_from(tensors), tensors["pva.word"].float(),
                           meta["pva.trigger"], meta.get("pva.base_model", ""), meta.get("pva.recognizer", ""),
                           meta.get("pva.encoder", ""), json.loads(meta.get("pva.settings", "{}")), name, base)
    except PVAIdentityError as e:
        raise PVAIdentityError(f"{name}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise PVAIdentityError(f"{name} is damaged ({type(e).__name__}: {e}). Copy it again, or fine-tune it "
                               "again.") from None
