"""The pack's folders under ComfyUI's models directory, registered with the host so that extra_model_paths.yaml can
add to them: SeFi identities (what Apply uses), training states (what continuing a training uses), PVA identities, PVA
identity encoders and the face recognizers PVA reads faces with."""
from __future__ import annotations

import os

import folder_paths

IDENTITY_FOLDER = "sefi_identities"
TRAIN_STATE_FOLDER = "sefi_training_state"
PVA_IDENTITY_FOLDER = "pva_identities"
PVA_ENCODER_FOLDER = "pva_encoders"
FACE_RECOGNIZER_FOLDER = "face_recognizers"
SAFETENSORS = {".safetensors"}
FOLDERS = {IDENTITY_FOLDER: SAFETENSORS, TRAIN_STATE_FOLDER: SAFETENSORS, PVA_IDENTITY_FOLDER: SAFETENSORS,
           PVA_ENCODER_FOLDER: SAFETENSORS,
           # InsightFace publishes its ArcFace backbones as .pth state dicts; they are read weights-only
           FACE_RECOGNIZER_FOLDER: {".safetensors", ".pth", ".pt"}}


def register_folders() -> None:
    """models/<folder> for each, merged with any paths extra_model_paths.yaml gave the same folder name."""
    for name, extensions in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        paths, known = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in paths:
            paths = paths + [default]
        folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)


def identity_files(folder: str = IDENTITY_FOLDER) -> list[str]:
    return folder_paths.get_filename_list(folder)


def identity_path(name: str, folder: str = IDENTITY_FOLDER) -> str:
    return folder_paths.get_full_path_or_raise(folder, name)


def identity_save_dir(folder: str = IDENTITY_FOLDER) -> str:
    return folder_paths.get_folder_paths(folder)[0]


def train_state_path(identity_file: str) -> str:
    """Where the training state of an identity file (its name in the identity folder) is or will be kept."""
    found = folder_paths.get_full_path(TRAIN_STATE_FOLDER, identity_file)
    return found or os.path.join(folder_paths.get_folder_paths(TRAIN_STATE_FOLDER)[0], identity_file)


def check_in_folder(name: str | None, folder: str, what: str, advice: str) -> None:
    """A file picked on a node must be in its folder now (a workflow may name one this machine lacks)."""
    available = identity_files(folder)
    if name is not None and name not in available:
        found = ", ".join(available) if available else "none yet"
        raise FileNotFoundError(f"No {what} {name!r} in models/{folder} (there: {found}). {advice}")


def file_fingerprint(name: str, folder: str) -> str:
    """For fingerprint_inputs: a node reading a file runs again when the file changes."""
    try:
        stat = os.stat(identity_path(name, folder))
    except (FileNotFoundError, OSError):
        return f"{name}:missing"  # execute() says what to do
    return f"{name}:{stat.st_mtime_ns}:{stat.st_size}"
