"""The pack's `.safetensors` files: written atomically, read without unpickling, every failure named with its fix.
Every file kind of both systems (SeFi and PVA identities, PVA encoders, training states) goes through these
functions: each is marked with its format's name and version in the metadata, and read back through `read_versioned`."""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_KEY = "sefi.format"  # the file kind's name; "sefi." for every kind, as the first files had it
VERSION_KEY = "sefi.format_version"


def save_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> str:
    """Write to a temp file in the same folder, then rename: a reader never sees half a file, and a failed or
    cancelled write leaves whatever was there before."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sefi-", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_safetensors(path: str, error: type[Exception], advice: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a `.safetensors` file on the CPU; a missing, truncated or foreign file raises `error`
    naming the file, followed by `advice`."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise error(f"{name} does not exist (looked for {path!r}). {advice}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise error(f"{name} is not a readable .safetensors file ({e}); it may be truncated. {advice}") from e


def format_metadata(format_name: str, version: int) -> dict[str, str]:
    """The metadata entries that say which kind of file this is, and in which version of its format."""
    return {FORMAT_KEY: format_name, VERSION_KEY: str(version)}


def read_versioned(path: str, format_name: str, newest_version: int, error: type[Exception], kind: str,
                   advice: str, wrong_kind_advice: str) -> tuple[int, dict[str, str], dict[str, torch.Tensor]]:
    """(version, metadata, tensors) of a file of one kind (`kind`: "a SeFi identity", "a PVA identity encoder"...):
    read as read_safetensors reads it, then its format name checked (another file kind: `wrong_kind_advice`) and its
    version a whole number from 1 to `newest_version` (a newer file needs a newer pack)."""
    meta, tensors = read_safetensors(path, error, advice)
    name = os.path.basename(path)
    if meta.get(FORMAT_KEY) != format_name:
        found = f"its format is {meta[FORMAT_KEY]!r}" if FORMAT_KEY in meta else f"no {FORMAT_KEY!r} metadata"
        raise error(f"{name} is a .safetensors file but not {kind} ({found}). {wrong_kind_advice}")
    raw = meta.get(VERSION_KEY)
    try:
        version = int(raw)
        if version < 1:
            raise ValueError(version)
    except (TypeError, ValueError):
        raise error(f"{name}: metadata {VERSION_KEY!r} is {raw!r}; it must be a format version (a whole number from "
                    f"1). The file is damaged or was edited. {advice}") from None
    if version > newest_version:
        raise error(f"{name} has format version {version}; this pack reads up to {newest_version}. Update the node "
                    "pack.")
    return version, meta, tensors
