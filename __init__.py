"""SeFi-IDE node pack for ComfyUI (V3 schema): see README.md.

Only `comfy_entrypoint` is exported: a V1 NODE_CLASS_MAPPINGS beside it would make the host ignore it.
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
