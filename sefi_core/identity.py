"""A SeFi identity: per timestep stage one K token and one V token in the CLIP-L input word-embedding
space, and its `.safetensors` file format (versioned metadata, validated on load, never unpickled)."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .files import read_safetensors, save_atomically
from .stages import even_boundaries, validate_boundaries

FORMAT_NAME = "sefi-identity"
FORMAT_VERSION = 1
TOKEN_DIM = 768  # CLIP-L word embeddings (SD1.x)
STAGE_COUNTS = (1, 5, 10)  # the paper's 5 stages, and its 1- and 10-pair ablations (Fig. 7)
# A CLIP-L word embedding has a size (L2 norm) of about 0.1-1. Tokens 20x beyond it come from a run that
# diverged; they give NaN or garbage images, so training stops there and loading refuses them.
MAX_TOKEN_NORM = 20.0
FILE_SUFFIX = ".safetensors"

_FORBIDDEN_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_PROMPT_SYNTAX = set("()[]{}:\\,|<>")
MAX_CLASS_WORD_LENGTH = 40


class IdentityError(ValueError):
    """Bad identity data, file or name; the message says what is wrong and how to fix it."""


def validate_trigger(trigger: str, class_word: str | None = None) -> str:
    """A trigger is one word the prompt can contain, e.g. 'sks', and not the class word itself."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise IdentityError("The trigger word is empty. Type a single rare word such as 'sks' and use it in the prompt.")
    word = trigger.strip()
    if any(ch.isspace() for ch in word):
        raise IdentityError(f"The trigger word {trigger!r} has spaces. Use a single word such as 'sks' or 'ohwx'.")
    _check_prompt_syntax(trigger, word, "trigger word", "Use letters and digits only, e.g. 'sks'.")
    if not any(ch.isalnum() for ch in word):
        raise IdentityError(f"The trigger word {trigger!r} has no letter or digit, so prompts cannot name it reliably. "
                            "Use a rare word such as 'sks' or 'ohwx'.")
    if class_word is not None and word.lower() == class_word.strip().lower():
        raise IdentityError(f"The trigger word {word!r} is the class word itself: every {word!r} in a prompt would "
                            "become this identity. Use a rare word such as 'sks' as the trigger.")
    return word


def validate_class_word(class_word: str) -> str:
    """What the subject is: 'person', 'dog', or a few words such as 'golden retriever'."""
    if not isinstance(class_word, str) or not class_word.strip():
        raise IdentityError("The class word is empty. Say what the subject is: 'person' for faces, 'dog', 'cat', "
                            "'teddy bear'...")
    words = " ".join(class_word.split())
    _check_prompt_syntax(class_word, words, "class word", "Use plain words, e.g. 'golden retriever'.")
    if not any(ch.isalpha() for ch in words) or len(words) > MAX_CLASS_WORD_LENGTH:
        raise IdentityError(f"The class word {class_word!r} should be one to a few plain words ({MAX_CLASS_WORD_LENGTH} "
                            "characters at most) saying what the subject is, e.g. 'person' or 'golden retriever'.")
    return words


def _check_prompt_syntax(raw: str, text: str, what: str, advice: str) -> None:
    bad = sorted(set(text) & _PROMPT_SYNTAX)
    if bad:
        raise IdentityError(f"The {what} {raw!r} contains prompt syntax {''.join(bad)!r}. {advice}")


def validate_identity_name(name: str) -> str:
    """A file name (without folders) for an identity; returns it with the .safetensors suffix."""
    if not isinstance(name, str) or not name.strip():
        raise IdentityError("The identity name is empty. Give it a file name such as 'anna'.")
    stem = name.strip()
    if stem.lower().endswith(FILE_SUFFIX):
        stem = stem[: -len(FILE_SUFFIX)]
    if stem.strip(".") == "":
        raise IdentityError(f"The identity name {name!r} is not a file name. Use something like 'anna'.")
    if _FORBIDDEN_NAME_CHARS.search(stem) or ".." in stem:
        raise IdentityError(f"The identity name {name!r} contains a path separator, '..' or a character that "
                            "file systems reject (<>:\"/\\|?*). Use letters, digits, '-' and '_', e.g. 'anna_v2'.")
    if stem.endswith((".", " ")) or stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise IdentityError(f"The identity name {name!r} is not allowed on Windows. Use e.g. 'anna_v2'.")
    if len(stem) > 100:
        raise IdentityError(f"The identity name is {len(stem)} characters long; keep it under 100.")
    return stem + FILE_SUFFIX


@dataclass(frozen=True)
class Identity:
    """Ten (by default) 768-d word embeddings: k_tokens[i] and v_tokens[i] act in timestep stage i,
    stage 0 being the noisiest (see stages.py)."""

    k_tokens: torch.Tensor  # (S, 768) float32
    v_tokens: torch.Tensor  # (S, 768) float32
    trigger: str
    class_word: str = "person"
    boundaries: tuple[float, ...] = ()  # S+1 timesteps, 1000 -> 0; empty means an even split
    base_model: str = ""  # fingerprint of the model it was trained on, when known
    training: dict = field(default_factory=dict)  # settings of the run that made it, when known

    def __post_init__(self):
        k, v = self.k_tokens, self.v_tokens
        if not (torch.is_tensor(k) and torch.is_tensor(v)):
            raise IdentityError("Identity tokens must be tensors.")
        if k.ndim != 2 or k.shape != v.shape or k.shape[1] != TOKEN_DIM or k.shape[0] not in STAGE_COUNTS:
            raise IdentityError(f"Identity tokens have shapes K {tuple(k.shape)} and V {tuple(v.shape)}; "
                                f"both must be (stages, {TOKEN_DIM}) with stages in {STAGE_COUNTS} "
                                "(SD1.x CLIP-L word embeddings).")
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
        object.__setattr__(self, "class_word", validate_class_word(self.class_word))
        object.__setattr__(self, "trigger", validate_trigger(self.trigger, self.class_word))
        bounds = tuple(float(b) for b in self.boundaries) or even_boundaries(k.shape[0])
        validate_boundaries(bounds, k.shape[0])
        object.__setattr__(self, "boundaries", bounds)

    @property
    def stage_count(self) -> int:
        return self.k_tokens.shape[0]


def save_identity(identity: Identity, path: str, overwrite: bool = False) -> str:
    """Write atomically (temp file in the same folder, then rename): a reader never sees half a file."""
    if os.path.exists(path) and not overwrite:
        raise IdentityError(f"An identity named {os.path.basename(path)!r} already exists in {os.path.dirname(path)}. "
                            "Choose another name, or switch 'overwrite' on to replace it.")
    metadata = {
        "sefi.format": FORMAT_NAME,
        "sefi.format_version": str(FORMAT_VERSION),
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
    meta, tensors = read_safetensors(path, IdentityError, "Copy the identity file again, or retrain it.")
    return _identity_from(os.path.basename(path), meta, tensors)


def _identity_from(name: str, meta: dict, tensors: dict) -> Identity:
    if meta.get("sefi.format") != FORMAT_NAME:
        raise IdentityError(f"{name} is a .safetensors file but not a SeFi identity (no 'sefi.format' metadata). "
                            "Only files made by SeFi Train Identity go in models/sefi_identities.")
    field = _MetadataReader(name, meta)
    version = field.read("sefi.format_version", lambda raw: _integer(raw, 1), "a format version (a whole number from 1)")
    if version > FORMAT_VERSION:
        raise IdentityError(f"{name} has format version {version}; this pack reads up to {FORMAT_VERSION}. "
                            "Update the SeFi node pack.")
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
                        base_model, training)
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
            detail = f" ({e})" if isinstance(e, IdentityError) else ""
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


def _text(raw) -> str:
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw


def _json_object(raw) -> dict:
    value = json.loads(raw or "{}")
    if not isinstance(value, dict):
        raise TypeError(value)
    return value
