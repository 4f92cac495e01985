"""Locate the ComfyUI checkout named by COMFYUI_PATH and make it importable the way main.py does."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ENV_VAR = "COMFYUI_PATH"
_MARKERS = ("nodes.py", "execution.py", "folder_paths.py", "comfy")


def find_comfyui() -> Path | None:
    """The ComfyUI tree from $COMFYUI_PATH, or None when it is unset or not a ComfyUI checkout."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if all((path / marker).exists() for marker in _MARKERS):
        return path
    return None


def import_comfy(comfy_path: Path) -> None:
    """Put ComfyUI first on sys.path and prepare the imports; safe to call more than once."""
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    # The variable only affects new interpreters; this stops __pycache__ in the ComfyUI tree now.
    sys.dont_write_bytecode = True
    root = str(comfy_path)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    _select_device()
    # main.py does this first: nodes.py puts ComfyUI/comfy on sys.path, after which
    # `utils` would resolve to comfy/utils.py instead of the ComfyUI `utils` package.
    importlib.import_module("utils.extra_config")


def _select_device() -> None:
    """Args must be set before comfy.model_management is imported: it picks the device at import time."""
    if "comfy.model_management" in sys.modules:
        return
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
