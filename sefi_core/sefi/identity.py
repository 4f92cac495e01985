"""A SeFi identity: per timestep stage one K token and one V token in the input word-embedding space of the model
family's text encoders, and its `.safetensors` file format (versioned metadata, validated on load, never unpickled).

A family's token is its text encoders' word embeddings side by side: CLIP-L's 768 for SD1.x; CLIP-L's 768 then
OpenCLIP bigG's 1280 for SDXL, whose two encoders each read their own part. Format version 1 is SD1.x (files
from before SDXL); version 2 records the family and its token widths, so a pack that knows only version 1 asks
to be updated instead of misreading an SDXL file."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..files import format_metadata, read_versioned, save_atomically
from ..names import InvalidName, validate_class_word, validate_trigger
from .stages import even_boundaries, validate_boundaries

FORMAT_NAME = "sefi-identity"
FORMAT_VERSION = 2
FAMILIES = {"sd1": (768,), "sdxl": (768, 1280)}  # token widths, in the order of the family's text encoders
FAMILY_NAMES = {"sd1": "SD1.x", "sdxl": "SDXL"}
STAGE_COUNTS = (1, 5, 10)  # the paper's 5 stages, and its 1- and 10-pair ablations (Fig. 7)
# A CLIP-L word embedding has a size (L2 norm) of about 0.1-1. Tokens 20x beyond it come from a run that
# diverged; they give NaN or garbage images, so training stops there and loading refuses them.
MAX_TOKEN_NORM = 20.0


class IdentityError(ValueError):
    """Bad identity data or file; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Identity:
    """Ten (by default) word embeddings of the family's width: k_tokens[i] and v_tokens[i] act in timestep stage i,
    stage 0 being the noisiest (see stages.py)."""

    k_tokens: torch.Tensor  # (S, W) float32, W = sum(FAMILIES[family])
    v_tokens: torch.Tensor  # (S, W) float32
    trigger: str
    class_word: str = "person"
    boundaries: tuple[float, ...] = ()  # S+1 timesteps, 1000 -> 0; empty means an even split
    base_model: str = ""  # fingerprint of the model it was trained on, when known
    training: dict = field(default_factory=dict)  # settings of the run that made it, when known
    family: str = "sd1"  # the model family it was trained on: a key of FAMILIES

    def __post_init__(self):
        k, v = self.k_tokens, self.v_tokens
        if self.family not in FAMILIES:
            raise IdentityError(f"Identity family {self.family!r} is not one of {list(FAMILIES)}.")
        if not (torch.is_tensor(k) and torch.is_tensor(v)):
            raise IdentityError("Identity tokens must be tensors.")
        width = sum(self.widths)
        if k.ndim != 2 or k.shape != v.shape or k.shape[1] != width or k.shape[0] not in STAGE_COUNTS:
            raise IdentityError(f"Identity tokens have shapes K {tuple(k.shape)} and V {tuple(v.shape)}; "
                                f"both must be (stages, {width}) with stages in {STAGE_COUNTS} "
                                f"({self.family_name} word embeddings: {' + '.join(map(str, self.widths))}).")
        if not (k.is_floating_point() and v.is_floating_point()):
            raise IdentityError(f"Identity tokens have dtype {k.dtype}/{v.dtype}; they must be floating point.")
        k, v = (t.detach().to("cpu", torch.float32).contiguous() for t in (k, v))  # float64 may overflow here
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise IdentityError("Identity tokens contain NaN or infinite values (or numbers too large for float32); "
                                "retrain it (a lower learning rate usually helps).")
        size = float(torch.cat([k, v]).norm(dim=-1).max())
        if size > MAX_TOKEN_NORM:
            raise IdentityError(f"Identity tokens have a size (L2 norm) of up to {size:.3g}; a word embedding's is about "
                                f"0.1-1 and {MAX_TOKEN_NORM:g} is the limit. The training that made it diverged: "
                                "retrain it with a lower learning rate.")
        object.__setattr__(self, "k_tokens", k)
        object.__setattr__(self, "v_tokens", v)
        try:
            object.__setattr__(self, "class_word", validate_class_word(self.class_word))
            object.__setattr__(self, "trigger", validate_trigger(self.trigger, self.class_word))
        except InvalidName as e:
            raise IdentityError(str(e)) from None
        bounds = tuple(float(b) for b in self.boundaries) or even_boundaries(k.shape[0])
        validate_boundaries(bounds, k.shape[0])
        object.__setattr__(self, "boundaries", bounds)

    @property
    def stage_count(self) -> int:
        return self.k_tokens.shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return FAMILIES[self.family]

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]


def save_identity(identity: Identity, path: str, overwrite: bool = False) -> str:
    """Write atomically (temp file in the same folder, then rename): a reader never sees half a file."""
    if os.path.exists(path) and not overwrite:
        raise IdentityError(f"An identity named {os.path.basename(path)!r} already exists in {os.path.dirname(path)}. "
                            "Choose another name, or switch 'overwrite' on to replace it.")
    metadata = {  # SD1.x files stay version 1, readable by every version of the pack
        **format_metadata(FORMAT_NAME, 1 if identity.family == "sd1" else FORMAT_VERSION),
        "sefi.family": identity.family,
        "sefi.token_widths": json.dumps(list(identity.widths)),
        "sefi.trigger": identity.trigger,
        "sefi.class_word": identity.class_word,
        "sefi.stage_count": str(identity.stage_count),
        "sefi.stage_boundaries": json.dumps(list(identity.boundaries)),
        "sefi.base_model": identity.base_model,
        "sefi.training": json.dumps(identity.training, sort_keys=True),
    }
    tensors = {"sefi.k_tokens": identity.k_tokens, "sefi.v_tokens": identity.v_tokens}
    return save_atomically(tensors, metadata, path)


def load_identity(path: str) -> Identity:
    """Read and validate an identity file; every problem raises IdentityError naming the file."""
    version, meta, tensors = read_versioned(path, FORMAT_NAME, FORMAT_VERSION, IdentityError, "a SeFi identity",
                                      "Copy the identity file again, or retrain it.",
                                      "Only files made by SeFi Train Identity go in models/sefi_identities.")
    return _identity_from(os.path.basename(path), meta, tensors, version)


def _identity_from(name: str, meta: dict, tensors: dict, version: int) -> Identity:
    field = _MetadataReader(name, meta)
    family = "sd1" if version == 1 else field.read("sefi.family", _family, f"one of {list(FAMILIES)}")
    field.read("sefi.token_widths", lambda raw: _widths(raw, family), f"{list(FAMILIES[family])} for {family}",
               json.dumps(list(FAMILIES[family])))
    for key in ("sefi.k_tokens", "sefi.v_tokens"):
        if key not in tensors:
            raise IdentityError(f"{name} has no {key!r} tensor; the file is damaged. Retrain the identity.")
        if not tensors[key].is_floating_point():
            raise IdentityError(f"{name}: {key!r} has dtype {tensors[key].dtype}; expected floating point.")
    stages = field.read("sefi.stage_count", lambda raw: _integer(raw, 1, STAGE_COUNTS), f"one of {STAGE_COUNTS}")
    if tensors["sefi.k_tokens"].shape[0] != stages:
        raise IdentityError(f"{name}: metadata says {stages} stages but the K tokens have shape "
                            f"{tuple(tensors['sefi.k_tokens'].shape)}; the file is damaged.")
    boundaries = field.read("sefi.stage_boundaries", lambda raw: _boundaries(raw, stages),
                            f"a list of {stages + 1} timesteps from 1000 down to 0")
    class_word = field.read("sefi.class_word", validate_class_word, "the class word, e.g. 'person'", "person")
    trigger = field.read("sefi.trigger", lambda raw: validate_trigger(raw, class_word), "the trigger word, e.g. 'sks'")
    base_model = field.read("sefi.base_model", _text, "text", "")
    training = field.read("sefi.training", _json_object, "an object of training settings", "{}")
    try:
        return Identity(tensors["sefi.k_tokens"], tensors["sefi.v_tokens"], trigger, class_word, boundaries,
                        base_model, training, family)
    except (IdentityError, ValueError) as e:
        raise IdentityError(f"{name}: {e}") from e


class _MetadataReader:
    """One identity file's metadata; every bad value is an IdentityError that names the file and the key."""

    def __init__(self, name: str, meta: dict):
        self.name, self.meta = name, meta

    def read(self, key: str, parse, expected: str, default=None):
        if key not in self.meta and default is None:
            raise IdentityError(f"{self.name}: metadata {key!r} is missing; it must be {expected}. {_DAMAGED}")
        raw = self.meta.get(key, default)
        try:
            return parse(raw)
        except (ValueError, TypeError) as e:  # IdentityError is a ValueError
            detail = f" ({e})" if isinstance(e, (IdentityError, InvalidName)) else ""
            raise IdentityError(f"{self.name}: metadata {key!r} is {raw!r}; it must be {expected}{detail}. "
                                f"{_DAMAGED}") from None


_DAMAGED = "The file is damaged or was edited: retrain the identity, or copy the original file again."


def _integer(raw, minimum: int, allowed=None) -> int:
    value = int(raw)
    if value < minimum or (allowed is not None and value not in allowed):
        raise ValueError(value)
    return value


def _boundaries(raw, stages: int) -> tuple[float, ...]:
    values = json.loads(raw)
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values):
        raise ValueError(values)
    validate_boundaries(values, stages)
    return tuple(float(v) for v in values)


def _family(raw) -> str:
    if raw not in FAMILIES:
        raise ValueError(raw)
    return raw


def _widths(raw, family: str) -> tuple[int, ...]:
    if tuple(json.loads(raw)) != FAMILIES[family]:
        raise ValueError(raw)
    return FAMILIES[family]


def _text(raw) -> str:
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw


def _json_object(raw) -> dict:
    value = json.loads(raw or "{}")
    if not isinstance(value, dict):
        raise TypeError(value)
    return value
