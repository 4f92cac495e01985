"""SeFi-IDE node pack for ComfyUI (V3 schema): see README.md.

Exports `comfy_entrypoint` and `WEB_DIRECTORY`; a V1 NODE_CLASS_MAPPINGS beside them would make the host ignore
the entrypoint.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # help pages (web/docs/<node id>.md), served at /extensions/<this folder's name>/docs/

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
