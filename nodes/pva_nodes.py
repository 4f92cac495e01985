"""PVA's nodes: load a face recognizer (models/face_recognizers) or read faces with the host's CLIP vision instead, load
an identity encoder (models/pva_encoders) and a PVA identity (models/pva_identities), and apply an identity to an
(inpainting) MODEL and its CLIP. The fine-tune that makes identities is in pva_fine_tune.py.

Apply puts parallel visual attention on every cross-attention layer (nodes/pva_patch.py) and teaches the CLIP the
identity's learned word as its trigger, through SeFi's own trigger mechanism with one stage whose K and V token are
that word (a plain learned word: one place serves both systems). Feed the outputs to ComfyUI's own inpainting nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.utils
from comfy_api.latest import io

from ..sefi_core.identity import Identity
from ..sefi_core.pva.face import IResNet, face_crop
from ..sefi_core.pva.identity import load_pva_identity
from ..sefi_core.pva.model_files import PVAEncoder, load_encoder, recognizer_from_state_dict
from .apply_stage_tokens import apply_identity
from .checks import validation_result
from .clip_tokens import model_fingerprint, token_embedding_table
from .folders import (FACE_RECOGNIZER_FOLDER, PVA_ENCODER_FOLDER, PVA_IDENTITY_FOLDER, check_in_folder,
                      file_fingerprint, identity_files, identity_path)
from .pva_patch import VisualIdentity, apply_visual_identity

log = logging.getLogger(__name__)
PVAIdentityType = io.Custom("PVA_IDENTITY")
FaceRecognizerType = io.Custom("PVA_FACE_RECOGNIZER")
EncoderType = io.Custom("PVA_ENCODER")


@dataclass
class FaceRecognizer:
    """What a PVA_FACE_RECOGNIZER link carries: ArcFace, whose network stage 2 of encoder training tunes."""
    network: IResNet  # fp32, eval mode, on the CPU
    name: str  # e.g. "iresnet r50 (backbone.pth)": recorded in the encoders and identities it makes

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


Encoder = PVAEncoder  # what an EncoderType link carries (sefi_core/pva/model_files.py)


def file_loader_checks(folder: str, what: str):
    """The validator check of a file picked on a loader node."""
    return lambda name: check_in_folder(name, folder, what, f"Put the file in models/{folder} (or a folder named "
                                        f"{folder} in extra_model_paths.yaml), press R to refresh the list, then pick it.")


class PVALoadFaceRecognizer(io.ComfyNode):
    check = staticmethod(file_loader_checks(FACE_RECOGNIZER_FOLDER, "face recognizer"))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVALoadFaceRecognizer",
            display_name="PVA Load Face Recognizer",
            category="PVA",
            description="Loads the ArcFace face recognizer (iresnet) PVA reads a person's photos with, from "
                        "models/face_recognizers: InsightFace's arcface_torch backbone.pth (e.g. ms1mv3_arcface_r50, "
                        "the paper's), or a .safetensors of it. Read weights-only: a file holding code is refused.",
            inputs=[io.Combo.Input("recognizer_file", options=identity_files(FACE_RECOGNIZER_FOLDER),
                                   tooltip="An iresnet state dict (r18, r34, r50 or r100) in models/face_recognizers. "
                                           "Press R to refresh the list.")],
            outputs=[FaceRecognizerType.Output(display_name="face_recognizer",
                                               tooltip="For PVA Fine-tune Identity (and encoder training).")],
        )

    @classmethod
    def fingerprint_inputs(cls, recognizer_file):
        return file_fingerprint(recognizer_file, FACE_RECOGNIZER_FOLDER)

    @classmethod
    def validate_inputs(cls, recognizer_file=None):
        return validation_result(cls.check, recognizer_file)

    @classmethod
    def execute(cls, recognizer_file) -> io.NodeOutput:
        cls.check(recognizer_file)
        try:  # the host's loader, weights-only: a pickle that holds code raises instead of running
            state = comfy.utils.load_torch_file(identity_path(recognizer_file, FACE_RECOGNIZER_FOLDER), safe_load=True)
        except Exception as error:
            raise ValueError(f"{recognizer_file} could not be read as plain weights ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}). Only state dicts load; a file "
                             "that needs code to unpickle is refused. Use InsightFace's backbone.pth or a "
                             ".safetensors.") from None
        network = recognizer_from_state_dict(state, recognizer_file)
        return io.NodeOutput(FaceRecognizer(network, f"iresnet {network.depth} ({recognizer_file})"))


class PVAClipVisionFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVAClipVisionFeatures",
            display_name="PVA Face Features from CLIP Vision",
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


class PVALoadEncoder(io.ComfyNode):
    check = staticmethod(file_loader_checks(PVA_ENCODER_FOLDER, "PVA identity encoder"))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVALoadEncoder",
            display_name="PVA Load Encoder",
            category="PVA",
            description="Loads a PVA identity encoder (face features of 1-5 photos -> 10 visual tokens) from "
                        "models/pva_encoders. No pretrained one exists publicly: it is trained on a dataset of many "
                        "people (see the README).",
            inputs=[io.Combo.Input("encoder_file", options=identity_files(PVA_ENCODER_FOLDER),
                                   tooltip="A PVA encoder in models/pva_encoders. Press R to refresh the list.")],
            outputs=[EncoderType.Output(display_name="pva_encoder", tooltip="For PVA Fine-tune Identity.")],
        )

    @classmethod
    def fingerprint_inputs(cls, encoder_file):
        return file_fingerprint(encoder_file, PVA_ENCODER_FOLDER)

    @classmethod
    def validate_inputs(cls, encoder_file=None):
        return validation_result(cls.check, encoder_file)

    @classmethod
    def execute(cls, encoder_file) -> io.NodeOutput:
        cls.check(encoder_file)
        return io.NodeOutput(load_encoder(identity_path(encoder_file, PVA_ENCODER_FOLDER)))


def check_pva_available(identity_file: str | None) -> None:
    check_in_folder(identity_file, PVA_IDENTITY_FOLDER, "PVA identity",
                    "Put the file there (or in a folder named pva_identities in extra_model_paths.yaml), press R to "
                    "refresh the list, then pick it.")


class PVALoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVALoadIdentity",
            display_name="PVA Load Identity",
            category="PVA",
            description="Loads a PVA identity (visual tokens, visual projections and learned word of one person) from "
                        "models/pva_identities. Connect it to PVA Apply.",
            inputs=[io.Combo.Input("pva_identity_file", options=identity_files(PVA_IDENTITY_FOLDER),
                                   tooltip="A PVA identity in models/pva_identities. Press R to refresh the list.")],
            outputs=[PVAIdentityType.Output(display_name="pva_identity", tooltip="The identity, for PVA Apply."),
                     io.String.Output(display_name="trigger", tooltip="Its learned word, e.g. 'sks': prompt "
                                                                      "'photo of a sks person'.")],
        )

    @classmethod
    def fingerprint_inputs(cls, pva_identity_file):
        return file_fingerprint(pva_identity_file, PVA_IDENTITY_FOLDER)

    @classmethod
    def validate_inputs(cls, pva_identity_file=None):
        return validation_result(check_pva_available, pva_identity_file)

    @classmethod
    def execute(cls, pva_identity_file) -> io.NodeOutput:
        check_pva_available(pva_identity_file)
        identity = load_pva_identity(identity_path(pva_identity_file, PVA_IDENTITY_FOLDER))
        return io.NodeOutput(identity, identity.trigger)


class PVAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVAApply",
            display_name="PVA Apply",
            category="PVA",
            description="Parallel visual attention: the inpainting MODEL attends to the person's visual tokens beside "
                        "the prompt, and the CLIP knows their learned word. Then use ComfyUI's InpaintModelConditioning "
                        "or VAE Encode (for Inpainting) with a mask over the face, and prompt 'photo of a sks person'.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 inpainting model the identity was fine-tuned on."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                PVAIdentityType.Input("pva_identity", tooltip="From PVA Load Identity."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="The visual tokens' weight in the attention: 1 is the paper's, 0 turns PVA off "
                                       "(the original model), above 1 weighs the photos more than the prompt."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the denoising the visual tokens start acting (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where they stop (1 = last step)."),
                io.Boolean.Input("on_negative", default=True,
                                 tooltip="Visual tokens on the negative prompt too, as the paper samples. Off: the "
                                         "negative stays the plain model's."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with parallel visual attention."),
                     io.Clip.Output(display_name="CLIP", tooltip="The CLIP that knows the learned word.")],
        )

    @classmethod
    def execute(cls, model, clip, pva_identity, strength, start_percent, end_percent, on_negative) -> io.NodeOutput:
        if not 0.0 <= start_percent < end_percent <= 1.0:
            raise ValueError(f"start_percent {start_percent} must be below end_percent {end_percent} (both 0-1); "
                             "otherwise the visual tokens never act.")
        width = token_embedding_table(clip).shape[1]
        if pva_identity.word.shape[0] != width:
            raise ValueError(f"This PVA identity is for a {pva_identity.word.shape[0]}-d text encoder; this CLIP's "
                             f"words are {width}-d. Use the checkpoint it was fine-tuned on.")
        if pva_identity.base_model and pva_identity.base_model != model_fingerprint(clip):
            log.warning("PVA: identity %r was fine-tuned on another model; its projections may not fit this one.",
                        pva_identity.trigger)
        sampling = model.get_model_object("model_sampling")
        visual = VisualIdentity(pva_identity.visual_tokens, pva_identity.projections, strength,
                                sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent),
                                on_negative)
        word = pva_identity.word.reshape(1, -1)
        patched_model, patched_clip = apply_identity(model, clip, Identity(word, word, pva_identity.trigger),
                                                     pva_identity.trigger)
        return io.NodeOutput(apply_visual_identity(patched_model, visual), patched_clip)
