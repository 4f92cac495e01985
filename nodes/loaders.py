"""The skeleton of a node that loads one file picked from a models folder: the folder's files as its combo input, the
host's validator told when the picked file is missing (with what to do), and the node run again when the file changes.
A loader names FOLDER, FILE_INPUT, WHAT and ADVICE, puts `file_input(tooltip)` in its schema and reads `path(name)`."""
from __future__ import annotations

from comfy_api.latest import io

from .checks import validation_result
from .folders import check_in_folder, file_fingerprint, identity_files, identity_path


class FileLoader(io.ComfyNode):
    FOLDER = ""  # the models folder, e.g. "sefi_identities"
    FILE_INPUT = ""  # the combo input's name, e.g. "identity_file"
    WHAT = ""  # what the file is, in messages: "identity file"
    ADVICE = ""  # what to do when it is not there

    @classmethod
    def file_input(cls, tooltip: str):
        return io.Combo.Input(cls.FILE_INPUT, options=identity_files(cls.FOLDER), tooltip=tooltip)

    @classmethod
    def check(cls, name: str | None) -> None:
        check_in_folder(name, cls.FOLDER, cls.WHAT, cls.ADVICE)

    @classmethod
    def path(cls, name: str) -> str:
        cls.check(name)
        return identity_path(name, cls.FOLDER)

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return file_fingerprint(inputs[cls.FILE_INPUT], cls.FOLDER)  # re-run when the file changes

    @classmethod
    def validate_inputs(cls, **inputs):
        """Runs in the host's validator, before anything executes, in place of its own 'Value not in list'."""
        return validation_result(cls.check, inputs.get(cls.FILE_INPUT))


def put_file_advice(folder: str) -> str:
    """What to do about a missing file that the artist downloads or copies (not one the pack trains)."""
    return (f"Put the file in models/{folder} (or a folder named {folder} in extra_model_paths.yaml), press R to "
            "refresh the list, then pick it.")
