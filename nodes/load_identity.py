"""SeFi Load Identity: an identity file from models/sefi_identities -> SEFI_IDENTITY."""
from comfy_api.latest import io

from ..sefi_core.identity import load_identity
from .checks import validation_result
from .folders import IDENTITY_FOLDER, check_in_folder, file_fingerprint, identity_files, identity_path
from .sefi_patches import SefiIdentity


def check_available(identity_file: str | None) -> None:
    check_in_folder(identity_file, IDENTITY_FOLDER, "identity file",
                    "Train one first with SeFi Train Identity (the workflow 1_train_and_generate does it from one "
                    "photo), then press R in ComfyUI to refresh this list, or pick one of the files there.")


class SefiLoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SefiLoadIdentity",
            display_name="SeFi Load Identity",
            category="SeFi-IDE",
            description="Loads an identity trained by SeFi Train Identity (ten CLIP-L tokens, ~30 KB) from "
                        "models/sefi_identities. Connect it to SeFi Apply Stage Tokens.",
            inputs=[
                io.Combo.Input("identity_file", options=identity_files(),
                               tooltip="An identity in models/sefi_identities (or a folder named sefi_identities "
                                       "in extra_model_paths.yaml). Press R in ComfyUI to refresh the list."),
            ],
            outputs=[
                SefiIdentity.Output(display_name="identity", tooltip="The identity, for SeFi Apply Stage Tokens."),
                io.String.Output(display_name="trigger", tooltip="The trigger word it was trained with, e.g. 'sks'."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, identity_file):
        return file_fingerprint(identity_file, IDENTITY_FOLDER)  # re-run when the file changes

    @classmethod
    def validate_inputs(cls, identity_file=None):
        """Runs in the host's validator, before anything executes, in place of its own 'Value not in list'."""
        return validation_result(check_available, identity_file)

    @classmethod
    def execute(cls, identity_file) -> io.NodeOutput:
        check_available(identity_file)
        identity = load_identity(identity_path(identity_file))
        return io.NodeOutput(identity, identity.trigger)
