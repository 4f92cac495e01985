"""Test kit for SeFi-IDE: random-weight SD1 checkpoints, a headless ComfyUI host, prompt builders.
Importing it does not import ComfyUI; that happens when a Host is built or a checkpoint written."""
from .checkpoint import PRESETS, write_checkpoint
from .comfy_env import find_comfyui
from .host import Host, Result
from .prompts import txt2img

__all__ = ["PRESETS", "Host", "Result", "find_comfyui", "txt2img", "write_checkpoint"]
