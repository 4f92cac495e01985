"""PVA's networks as files: the identity encoder (`.safetensors`, versioned metadata, validated on load like the
identities) and a face recognizer's state dict (whichever iresnet it is, found from its blocks).

An encoder records the base it serves (bases.py: SD1.5 or SD2 inpainting; none recorded: SD1.5), whose context width
is its tokens'. An encoder trained by the pack (format 2) also carries what its training taught the UNet side: every
cross-attention layer's visual projections and the learned word. Per-identity fine-tunes start from them (the paper's
pipeline); an encoder without them (format 1) starts them from the layers' own projections and the trigger's
embedding.

Both are read without unpickling: the nodes read a recognizer's `.pth` through the host's weights-only loader."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..files import format_metadata, read_versioned, save_atomically
from .encoder import VISUAL_TOKENS, IdentityEncoder
from .attention import VisualProjections
from .bases import BASE_KEY, SD15_INPAINTING, Base, base_named
from .face import FEATURE_DIM, IResNet, depth_of
from .identity import MAX_WORD_NORM, check_projections, check_size, projection_tensors, projections_from

MAX_ENCODER_LAYERS = 64  # the paper's has 4; more is a damaged file, not a network to build

ENCODER_FORMAT = "pva-encoder"
ENCODER_VERSION = 3  # 2: optional visual projections and learned word; 3: face features of another width than 512


class PVAModelFileError(ValueError):
    """A PVA encoder or face-recognizer file that cannot be used; the message says why and what to do."""


def weights_hash(module: torch.nn.Module) -> str:
    """A short hash of a network's weights: which encoder made an identity, recorded in the identity's metadata."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_shape(encoder: IdentityEncoder) -> dict[str, int]:
    return {"context_dim": encoder.project.out_features, "layers": len(encoder.transformer.layers),
            "heads": encoder.transformer.layers[0].self_attn.num_heads, "tokens": encoder.queries.shape[0],
            "feature_dim": encoder.queries.shape[1]}


@dataclass
class PVAEncoder:
    """An identity encoder as a file holds it (and as the nodes pass it on)."""

    network: IdentityEncoder  # fp32, eval mode, on the CPU
    recognizer: str  # the face features it was trained on, e.g. "iresnet r50 (backbone.pth)"
    projections: dict[str, VisualProjections] = field(default_factory=dict)  # empty: none trained with it
    word: torch.Tensor | None = None  # the learned word's embedding, where trained with it
    settings: dict = field(default_factory=dict)
    hash: str = ""  # of the network's weights: recorded in the identities it makes
    file: str = field(default="", compare=False)  # the file it was loaded from, for messages
    base: Base = SD15_INPAINTING  # the base model family it serves

    def __post_init__(self):
        self.hash = self.hash or weights_hash(self.network)
        check_base(self.base, self.network)


def check_base(base: Base, encoder: IdentityEncoder) -> None:
    if encoder.project.out_features != base.context_dim:
        raise ValueError(f"An encoder for {base.describe()} makes {base.context_dim}-d visual tokens; this one makes "
                         f"{encoder.project.out_features}-d ones.")


def save_encoder(encoder: IdentityEncoder, path: str, recognizer: str, settings: dict | None = None,
                 projections: dict[str, VisualProjections] | None = None, word: torch.Tensor | None = None,
                 base: Base = SD15_INPAINTING) -> str:
    """Atomically; `recognizer` names the face features it reads (e.g. "iresnet r50"), settings how it was trained;
    projections and word: what its training trained beside it; base: the model family it serves."""
    check_base(base, encoder)
    shape = encoder_shape(encoder)
    # ArcFace-width encoders stay version 2, which older packs read; another width needs a pack that knows it
    version = 2 if shape["feature_dim"] == FEATURE_DIM else ENCODER_VERSION
    metadata = {**format_metadata(ENCODER_FORMAT, version), BASE_KEY: base.name, "pva.recognizer": recognizer,
                **{f"pva.{k}": str(v) for k, v in shape.items()}, "pva.settings": json.dumps(settings or {}, sort_keys=True)}
    tensors = {f"encoder.{k}": v.float() for k, v in encoder.state_dict().items()}
    tensors.update(projection_tensors(projections or {}))
    if word is not None:
        tensors["pva.word"] = word.float()
    return save_atomically(tensors, metadata, path)


def load_encoder(path: str) -> PVAEncoder:
    """The encoder in eval mode, with what was trained beside it. Its metadata is checked against its tensors before
    anything is built from either."""
    name = os.path.basename(path)
    advice = "Copy the encoder file again, or train it again with PVA's encoder training."
    version, meta, tensors = read_versioned(
        path, ENCODER_FORMAT, ENCODER_VERSION, PVAModelFileError, "a PVA identity encoder", advice,
        "Put PVA encoders in models/pva_encoders; PVA identities go in models/pva_identities.")
    weights = tensors if version == 1 else {k[len("encoder."):]: v for k, v in tensors.items()
                                            if k.startswith("encoder.")}
    try:
        shape = encoder_shape_of(meta, weights)
        base = base_named(meta.get(BASE_KEY), shape["context_dim"])
        encoder = IdentityEncoder(shape["context_dim"], shape["layers"], shape["heads"], tokens=shape["tokens"],
                                  feature_dim=shape["feature_dim"])
        encoder.load_state_dict(weights, strict=True)
        projections = projections_from(tensors) if version > 1 else {}
        check_projections(projections, shape["context_dim"])
        word = tensors.get("pva.word")
        if word is not None:
            if word.shape != (shape["context_dim"],):
                raise ValueError(f"its learned word has shape {tuple(word.shape)}, not ({shape['context_dim']},)")
            check_size("learned word", word[None], MAX_WORD_NORM)
        settings = json.loads(meta.get("pva.settings", "{}"))
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise PVAModelFileError(f"{name} is damaged or not an encoder this pack made ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}). {advice}") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise PVAModelFileError(f"{name} holds NaN or infinite weights. {advice}")
    return PVAEncoder(encoder.eval(), meta.get("pva.recognizer", ""), projections, word, settings, file=name, base=base)


def encoder_shape_of(meta: dict, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The encoder's sizes from its metadata, each checked against its tensors (ValueError naming the key)."""
    shape = {k: int(meta[f"pva.{k}"]) for k in ("context_dim", "layers", "heads", "tokens")}
    shape["feature_dim"] = int(meta.get("pva.feature_dim", FEATURE_DIM))  # versions 1-2: ArcFace's 512
    queries, project = weights["queries"], weights["project.weight"]
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("transformer.layers.")}
    found = {"tokens": queries.shape[0], "feature_dim": queries.shape[-1], "context_dim": project.shape[0],
             "layers": len(layers)}
    for key, size in found.items():
        if shape[key] != size:
            raise ValueError(f"metadata pva.{key} is {shape[key]} but its tensors have {size}")
    if not 1 <= shape["layers"] <= MAX_ENCODER_LAYERS or layers != set(range(shape["layers"])):
        raise ValueError(f"its transformer layers are {sorted(layers)[:8]}; expected 0 to at most "
                         f"{MAX_ENCODER_LAYERS - 1}")
    if shape["heads"] < 1 or shape["context_dim"] % shape["heads"]:
        raise ValueError(f"metadata pva.heads {shape['heads']} does not divide the width {shape['context_dim']}")
    return shape


def recognizer_from_state_dict(state: dict[str, torch.Tensor], name: str) -> IResNet:
    """An ArcFace iresnet (r18/r34/r50/r100) with this state dict, in eval mode, fp32. InsightFace's arcface_torch
    `backbone.pth` files are such state dicts; a `module.` prefix (saved from DataParallel) is dropped."""
    if not isinstance(state, Mapping):
        raise PVAModelFileError(f"{name} holds a {type(state).__name__} where a recognizer's state dict (names to "
                                "weights) belongs. PVA reads InsightFace's arcface_torch backbones (e.g. "
                                "ms1mv3_arcface_r50_fp16/backbone.pth) or a .safetensors of one.")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        net = IResNet(depth_of(state))
        net.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        raise PVAModelFileError(
            f"{name} is not an ArcFace iresnet state dict ({str(e).splitlines()[0]}). PVA reads InsightFace's "
            "arcface_torch backbones (e.g. ms1mv3_arcface_r50_fp16/backbone.pth) or a .safetensors of one.") from None
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise PVAModelFileError(f"{name} holds NaN or infinite weights; download it again.")
    negative = sorted(k for k, v in state.items() if k.endswith("running_var") and bool((v < 0).any()))
    if negative:  # a variance below 0 gives NaN features (the square root of it in batch norm)
        raise PVAModelFileError(f"{name} holds negative batch-norm variances ({', '.join(negative[:3])}): it is "
                                "damaged. Download it again.")
    return net.float().eval()


__all__ = ["PVAEncoder", "PVAModelFileError", "VISUAL_TOKENS", "encoder_shape", "load_encoder", "recognizer_from_state_dict",
           "save_encoder", "weights_hash"]
