"""The pack's `.safetensors` files: written atomically, read without unpickling, every failure named with its fix.
Identities and training states (and any later file kind) go through these two functions."""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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
