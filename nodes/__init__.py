"""The ComfyUI side of the pack: the only package that imports the host."""
from comfy_api.latest import ComfyExtension, io

from .apply_stage_tokens import SefiApplyStageTokens
from .attention_preview import SefiAttentionMapPreview
from .host import register_identity_folder
from .load_identity import SefiLoadIdentity
from .train_identity import SefiTrainIdentity

register_identity_folder()


class SefiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SefiTrainIdentity, SefiLoadIdentity, SefiApplyStageTokens, SefiAttentionMapPreview]


async def comfy_entrypoint() -> SefiExtension:
    return SefiExtension()
