"""SeFi Load Identity: an identity file from models/sefi_identities -> SEFI_IDENTITY."""
from comfy_api.latest import io

from ...sefi_core.sefi.identity import load_identity
from ..folders import IDENTITY_FOLDER
from ..loaders import FileLoader
from ..node_ui import schema
from .patches import SefiIdentity


class SefiLoadIdentity(FileLoader):
    FOLDER, FILE_INPUT, WHAT = IDENTITY_FOLDER, "identity_file", "identity file"
    ADVICE = ("Train one first with SeFi Train Identity (the workflow 1_train_and_generate does it from one photo), then "
              "press R in ComfyUI to refresh this list, or pick one of the files there.")

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SefiLoadIdentity",
            display_name="SeFi Load Identity",
            search_aliases=["load identity", "identity", "embedding", "textual inversion", "face id"],
            category="SeFi-IDE",
            description="Loads an identity trained by SeFi Train Identity (ten CLIP-L tokens, ~30 KB) from "
                        "models/sefi_identities. Connect it to SeFi Apply Stage Tokens.",
            inputs=[cls.file_input("An identity in models/sefi_identities (or a folder named sefi_identities in "
                                   "extra_model_paths.yaml). Press R in ComfyUI to refresh the list.")],
            outputs=[
                SefiIdentity.Output(display_name="identity", tooltip="The identity, for SeFi Apply Stage Tokens."),
                io.String.Output(display_name="trigger", tooltip="The trigger word it was trained with, e.g. 'sks'."),
            ],
        )

    @classmethod
    def execute(cls, identity_file) -> io.NodeOutput:
        identity = load_identity(cls.path(identity_file))
        return io.NodeOutput(identity, identity.trigger)
