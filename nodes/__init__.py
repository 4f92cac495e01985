"""The ComfyUI side of the pack: the only package that imports the host."""
from comfy_api.latest import ComfyExtension, io

from .apply_stage_tokens import SefiApplyStageTokens
from .attention_preview import SefiAttentionMapPreview
from .folders import register_folders
from .load_identity import SefiLoadIdentity
from .pva_fine_tune import PVAFineTuneIdentity
from .pva_nodes import PVAApply, PVAClipVisionFeatures, PVALoadEncoder, PVALoadFaceRecognizer, PVALoadIdentity
from .pva_train_encoder import PVATrainEncoder
from .train_identity import SefiTrainIdentity

register_folders()


class SefiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SefiTrainIdentity, SefiLoadIdentity, SefiApplyStageTokens, SefiAttentionMapPreview,
                PVALoadFaceRecognizer, PVAClipVisionFeatures, PVALoadEncoder, PVATrainEncoder, PVAFineTuneIdentity,
                PVALoadIdentity, PVAApply]


async def comfy_entrypoint() -> SefiExtension:
    return SefiExtension()
