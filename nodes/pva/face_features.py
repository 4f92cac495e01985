"""PVA's face-feature sources, what a PVA_FACE_RECOGNIZER link carries: ArcFace loaded from models/face_recognizers
(PVA Load Face Recognizer), or the host's CLIP vision in its place (PVA Face Features from CLIP Vision)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.utils
from comfy_api.latest import io

from ...sefi_core.pva.face import IResNet, face_crop
from ...sefi_core.pva.model_files import recognizer_from_state_dict
from ..folders import FACE_RECOGNIZER_FOLDER
from ..loaders import FileLoader, put_file_advice
from ..node_ui import schema
from .sockets import FaceRecognizerType


@dataclass
class FaceRecognizer:
    """What a PVA_FACE_RECOGNIZER link carries: ArcFace, whose network stage 2 of encoder training tunes."""
    network: IResNet  # fp32, eval mode, on the CPU
    name: str  # e.g. "iresnet r50 (backbone.pth)": recorded in the encoders and identities it makes
    file: str = ""  # its file in models/face_recognizers: what a training must never write over

    def features(self, photos: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) aligned square face photos in [0, 1], on the CPU -> (B, 512) fp32 features."""
        return self.network(face_crop(photos))


@dataclass
class ClipVisionFeatures:
    """The host's CLIP_VISION as PVA's feature source: one image embedding per photo, the whole photo as the authors'
    CLIP branch reads it. Frozen (network None: no stage 2); the host loads and runs it."""
    clip_vision: object
    name: str
    network: None = None

    def features(self, photos: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) square photos in [0, 1] -> (B, embedding width) fp32 features, on the photos' device."""
        embeds = self.clip_vision.encode_image(photos.movedim(1, -1), crop=True)["image_embeds"]
        return embeds.to(photos.device, torch.float32)


def clip_vision_name(clip_vision) -> str:
    """What encoders and identities record of the source, "CLIP vision (<number> weights)": models told apart by
    size (the host keeps no file name with the model)."""
    weights = sum(t.numel() for t in clip_vision.get_sd().values())
    return f"CLIP vision ({weights:,} weights)"


def unreadable_recognizer(file: str, error: Exception) -> str:
    """What to do about a recognizer file the host's weights-only loader refused: one holding code is refused on
    purpose; anything else is a damaged (often a partly downloaded) file."""
    detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if "weights only" in str(error).lower():
        return (f"{file} could not be read as plain weights ({detail}). Only state dicts load; a file that needs code "
                "to unpickle is refused. Use InsightFace's backbone.pth or a .safetensors.")
    return (f"{file} could not be read ({detail}): it is damaged or was not downloaded whole. Download it again "
            "(InsightFace's backbone.pth, or a .safetensors of it).")


class PVALoadFaceRecognizer(FileLoader):
    FOLDER, FILE_INPUT, WHAT = FACE_RECOGNIZER_FOLDER, "recognizer_file", "face recognizer"
    ADVICE = put_file_advice(FACE_RECOGNIZER_FOLDER)

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVALoadFaceRecognizer",
            display_name="PVA Load Face Recognizer",
            search_aliases=["arcface", "insightface", "face recognition", "face embedding"],
            category="PVA",
            description="Loads the ArcFace face recognizer (iresnet) PVA reads a person's photos with, from "
                        "models/face_recognizers: InsightFace's arcface_torch backbone.pth (e.g. ms1mv3_arcface_r50, "
                        "the paper's), or a .safetensors of it. Read weights-only: a file holding code is refused.",
            inputs=[cls.file_input("An iresnet state dict (r18, r34, r50 or r100) in models/face_recognizers. Press R "
                                   "to refresh the list.")],
            outputs=[FaceRecognizerType.Output(display_name="face_recognizer",
                                               tooltip="For PVA Fine-tune Identity (and encoder training).")],
        )

    @classmethod
    def execute(cls, recognizer_file) -> io.NodeOutput:
        path = cls.path(recognizer_file)
        try:  # the host's loader, weights-only: a pickle that holds code raises instead of running
            state = comfy.utils.load_torch_file(path, safe_load=True)
        except Exception as error:
            raise ValueError(unreadable_recognizer(recognizer_file, error)) from None
        network = recognizer_from_state_dict(state, recognizer_file)
        return io.NodeOutput(FaceRecognizer(network, f"iresnet {network.depth} ({recognizer_file})", recognizer_file))


class PVAClipVisionFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVAClipVisionFeatures",
            display_name="PVA Face Features from CLIP Vision",
            search_aliases=["clip vision", "image embedding", "face features"],
            category="PVA",
            description="Uses a CLIP vision model (Load CLIP Vision) instead of ArcFace to read a person's photos: one "
                        "image embedding per photo. Not the paper's setting; an encoder trained on it works only with "
                        "it. Frozen: encoder training's stage 2 needs ArcFace.",
            inputs=[io.ClipVision.Input("clip_vision", tooltip="From Load CLIP Vision, e.g. the ViT-L/14 or ViT-H "
                                                               "models IP-Adapter uses. Encoders read its embedding "
                                                               "width (768 for ViT-L, 1024 for ViT-H).")],
            outputs=[FaceRecognizerType.Output(display_name="face_recognizer",
                                               tooltip="For PVA Train Encoder and PVA Fine-tune Identity, where PVA "
                                                       "Load Face Recognizer's would go.")],
        )

    @classmethod
    def execute(cls, clip_vision) -> io.NodeOutput:
        if not all(callable(getattr(clip_vision, method, None)) for method in ("encode_image", "get_sd")):
            raise ValueError("PVA Face Features from CLIP Vision needs a CLIP_VISION (from Load CLIP Vision); it got "
                             f"a {type(clip_vision).__name__}.")
        return io.NodeOutput(ClipVisionFeatures(clip_vision, clip_vision_name(clip_vision)))


