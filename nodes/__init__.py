"""The ComfyUI side of the pack: the only package that imports the host."""
from comfy_api.latest import ComfyExtension, io


class SefiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> SefiExtension:
    return SefiExtension()
