"""SeFi-IDE node pack for ComfyUI (V3 schema): SeFi-IDE's one-photo identities and PVA's face inpainting; see
README.md. The nodes live in nodes/ (ComfyUI's side), their host-free core in sefi_core/.

Exports `comfy_entrypoint` and `WEB_DIRECTORY`; a V1 NODE_CLASS_MAPPINGS beside them would make the host ignore
the entrypoint.
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import pva, sefi
from .nodes.folders import register_folders

WEB_DIRECTORY = "./web"  # help pages (web/docs/<node id>.md), served at /extensions/<this folder's name>/docs/

register_folders()


class SefiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*sefi.NODES, *pva.NODES]


async def comfy_entrypoint() -> SefiExtension:
    return SefiExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
