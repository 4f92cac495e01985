"""PVA Fine-tune Identity: 1-5 photos of a person + an SD1.5 or SD2 inpainting MODEL, a face recognizer and an identity
encoder -> a PVA identity in models/pva_identities (sefi_core/pva/train.py has the method; training.py the trainer on
the host's models)."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ...sefi_core.images import as_rgb, center_square
from ...sefi_core.names import validate_trigger
from ...sefi_core.pva.encoder import MAX_REFERENCES
from ...sefi_core.pva.face import CROP_COLS, CROP_FROM, CROP_ROWS
from ...sefi_core.pva.identity import PVAIdentity, as_stored, save_pva_identity
from ...sefi_core.pva.train import FineTuneSettings
from ..checks import check_choices, first, single_values, validation_result
from ..clip_tokens import model_fingerprint
from ..folders import PVA_IDENTITY_FOLDER
from ..node_ui import TrainingProgress, loss_curve, schema
from ..output_files import OutputFiles
from ..photos import check_photo, masks_for_photos, photos_of
from ..training import CHECKPOINTING_MODES, checkpointing_input, train_on_clones
from .checks import check_encoder_fits, check_features_fit, check_inpainting_model
from .sockets import EncoderType, FaceRecognizerType, PVAIdentityType
from .training import PVAFineTuner

log = logging.getLogger(__name__)
NODE = "PVA Fine-tune Identity"
EMPTY_FACE_MASK = ("The face mask is empty: paint over the face in Load Image's mask editor, or disconnect the mask to "
                   "inpaint the aligned face box.")


def face_box_mask(size: int) -> torch.Tensor:
    """(size, size): 1 on the face region of an aligned face photo (the recognizer's crop), where no mask is given."""
    mask = torch.zeros(size, size)
    scale = size / CROP_FROM
    mask[round(CROP_ROWS[0] * scale):round(CROP_ROWS[1] * scale), round(CROP_COLS[0] * scale):round(CROP_COLS[1] * scale)] = 1
    return mask


def square_photos(photos: list[torch.Tensor], masks: list[torch.Tensor] | None, size: int):
    """[(3, size, size) photo, (size, size) face mask)]: the centre square of each photo and of its mask."""
    out = []
    for k, photo in enumerate(photos):
        square = center_square(as_rgb(photo), size)
        if masks is None:
            mask = face_box_mask(size)
        else:
            mask = center_square(masks[k].float()[..., None], size)[0]
            if not bool((mask > 0.5).any()):
                raise ValueError(f"Face mask {k + 1} covers nothing of its photo's centre square, which {NODE} uses. "
                                 "Paint the face in the centre, or crop the photo around the face.")
        out.append((square, mask))
    return out


def visual_tokens(recognizer, encoder, squares) -> torch.Tensor:
    """(10, context width): the encoder's tokens from the recognizer's features of all the photos (fp32, CPU)."""
    with torch.inference_mode(False), torch.no_grad():
        features = recognizer.features(torch.stack([square for square, _ in squares]))
        check_features_fit(encoder.network, features.shape[-1], recognizer.name)
        bad = [k + 1 for k, row in enumerate(features) if not torch.isfinite(row).all()]
        if bad:  # before the fine-tune, whose NaN loss would blame the learning rates
            raise ValueError(f"{recognizer.name} gives NaN or infinite features for photo {bad[0]} of {len(squares)}: "
                             "the recognizer is damaged. Load it again (download its file again).")
        tokens = encoder.network(features.cpu().unsqueeze(0))[0].detach()
        if not torch.isfinite(tokens).all():
            raise ValueError(f"The PVA encoder {encoder.file} makes NaN or infinite visual tokens from {recognizer.name}'s"
                             f" features (up to {float(features.abs().max()):.3g} in size): the recognizer or the encoder "
                             "is damaged. Load them again, or use the recognizer the encoder was trained with.")
        return tokens


class PVAFineTuneIdentity(io.ComfyNode):
    outputs = OutputFiles(PVA_IDENTITY_FOLDER, "PVA identity")

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVAFineTuneIdentity",
            display_name="PVA Fine-tune Identity",
            search_aliases=["inpaint face", "train face", "personalize", "face id", "identity"],
            category="PVA",
            description="Makes a PVA identity from 1-5 photos of a person: their visual tokens (from the encoder), and "
                        "a short fine-tune (40 steps, the paper's) of the visual attention and the learned word on the "
                        "inpainting model. Saved to models/pva_identities for PVA Load Identity / PVA Apply.",
            is_output_node=True,
            is_input_list=True,  # photos of different sizes arrive as a list
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SD2 inpainting model you will inpaint with."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE; encodes the photos."),
                io.Image.Input("image", tooltip="1-5 photos of the person: aligned face crops (the face centred and "
                                                "filling the middle, as in CelebA-HQ), a batch or a list of any sizes. "
                                                "Each is centre-cropped to a square."),
                FaceRecognizerType.Input("face_recognizer", tooltip="From PVA Load Face Recognizer (or PVA Face Features "
                                                                    "from CLIP Vision): what the encoder was trained "
                                                                    "with."),
                EncoderType.Input("pva_encoder", tooltip="From PVA Load Encoder."),
                io.String.Input("name", default="my_pva_identity",
                                tooltip="File name in models/pva_identities (letters, digits, - and _)."),
                io.String.Input("trigger", default="sks",
                                tooltip="The learned word: prompt 'photo of a sks person'. A rare word, one token is best."),
                io.Int.Input("steps", default=40, min=1, max=2000, tooltip="Optimiser steps; the paper uses 40."),
                io.Int.Input("timesteps_per_step", default=2, min=1, max=16,
                             tooltip="Noise levels per step, one UNet batch; the paper uses 2 (80 UNet passes)."),
                io.Float.Input("projection_learning_rate", default=0.00002, min=0.000001, max=0.01, step=0.000001,
                               tooltip="AdamW learning rate of the visual projections; the paper uses 2e-5."),
                io.Float.Input("word_learning_rate", default=0.001, min=0.0, max=0.1, step=0.00001,
                               tooltip="AdamW learning rate of the learned word; the paper uses 1e-3. 0 keeps the "
                                       "trigger's own embedding."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed for the timesteps and the noise."),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=64,
                             tooltip="Training resolution in pixels; SD1.5 and SD2 inpainting are made for 512."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a PVA identity of the same name. Off: an existing name is an error."),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Optional: the face region to inpaint in training, one mask per photo or one for "
                                      "all (e.g. painted in Load Image's mask editor). Without it: the aligned face "
                                      "box (the recognizer's crop region), the paper's whole-face mask."),
                checkpointing_input(),
            ],
            outputs=[PVAIdentityType.Output(display_name="pva_identity", tooltip="The identity, for PVA Apply."),
                     io.Image.Output(display_name="loss_curve", tooltip="The fine-tune's loss over the steps.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, gradient_checkpointing=None):
        return validation_result(check_choices, {"gradient_checkpointing": CHECKPOINTING_MODES},
                                 gradient_checkpointing=first(gradient_checkpointing))

    @classmethod
    def fingerprint_inputs(cls, name, **kwargs):
        """The file it writes: fine-tuned again once deleted."""
        return cls.outputs.fingerprint(first(name))

    @classmethod
    def execute(cls, image, face_mask=None, **inputs) -> io.NodeOutput:
        return cls.fine_tune(photos_of(image), face_mask, **single_values(inputs, NODE, "'image' and 'face_mask'"))

    @classmethod
    def fine_tune(cls, photos, face_mask, model, clip, vae, face_recognizer, pva_encoder, name, trigger, steps,
                  timesteps_per_step, projection_learning_rate, word_learning_rate, seed, resolution, overwrite,
                  gradient_checkpointing="auto") -> io.NodeOutput:
        path, trigger, masks = cls.check_inputs(photos, face_mask, model, clip, face_recognizer, pva_encoder, name,
                                                trigger, overwrite, gradient_checkpointing)
        settings = FineTuneSettings(steps=steps, timesteps=timesteps_per_step,
                                    projection_learning_rate=projection_learning_rate,
                                    word_learning_rate=word_learning_rate, seed=seed, resolution=resolution)
        progress = TrainingProgress(settings.steps, cls.hidden.unique_id if cls.hidden else None, NODE)
        identity, result = cls.identity_from(photos, masks, face_mask is not None, model, clip, vae, face_recognizer,
                                             pva_encoder, trigger, settings, progress, gradient_checkpointing)
        cls.save(identity, path, overwrite, result.losses)
        curve = loss_curve(result.losses, settings.steps, "PVA fine-tune loss")
        return io.NodeOutput(identity, curve, ui=ui.PreviewImage(curve, cls=cls))

    @staticmethod
    def identity_from(photos, masks, masked: bool, model, clip, vae, face_recognizer, pva_encoder, trigger: str,
                      settings: FineTuneSettings, on_step, gradient_checkpointing="auto"):
        """The fine-tune itself, on checked inputs, saving nothing: (the identity, the run's result). PVA's evaluation
        command fine-tunes each test person through it."""
        squares = square_photos(photos, masks, settings.resolution)
        tokens = visual_tokens(face_recognizer, pva_encoder, squares)
        tuner = PVAFineTuner(model, clip, trigger, tokens, NODE, gradient_checkpointing == "on", pva_encoder)
        result = train_on_clones(tuner, gradient_checkpointing, settings.resolution, lambda: tuner.samples(squares, vae),
                                 lambda samples: tuner.fine_tune(settings, samples, on_step))
        identity = PVAIdentity(tokens, as_stored(result.projections), result.word, trigger, model_fingerprint(clip),
                               face_recognizer.name, pva_encoder.hash,
                               {**settings.as_metadata(), "photos": len(photos), "face_mask": masked},
                               base=pva_encoder.base)  # the model's (check_encoder_fits)
        return identity, result

    @classmethod
    def save(cls, identity: PVAIdentity, path: str, overwrite: bool, losses: list[float]) -> None:
        save_pva_identity(identity, path, overwrite=overwrite)
        cls.outputs.wrote(path)
        log.info("%s: saved identity %s (final loss %.4f)", NODE, path, losses[-1])

    @classmethod
    def check_inputs(cls, photos, face_mask, model, clip, face_recognizer, pva_encoder, name, trigger, overwrite,
                     gradient_checkpointing):
        """Everything that can be known wrong before any work; (the path to write, the trigger, the face masks)."""
        check_inpainting_model(model, clip, NODE)
        path = cls.outputs.new_path(name, overwrite)
        trigger = validate_trigger(trigger, "person")
        if not 1 <= len(photos) <= MAX_REFERENCES:
            raise ValueError(f"{NODE} takes 1-{MAX_REFERENCES} photos of the person (the encoder reads at most "
                             f"{MAX_REFERENCES}); it got {len(photos)}. Pick the {MAX_REFERENCES} best.")
        for number, photo in enumerate(photos, 1):
            check_photo(photo, number, len(photos), NODE)
        check_encoder_fits(pva_encoder, model)
        if pva_encoder.recognizer and not f"{face_recognizer.name} ".startswith(f"{pva_encoder.recognizer} "):
            log.warning("%s: the encoder was trained on features of %r, and is given %r.", NODE,
                        pva_encoder.recognizer, face_recognizer.name)
        check_choices({"gradient_checkpointing": CHECKPOINTING_MODES}, gradient_checkpointing=gradient_checkpointing)
        return path, trigger, masks_for_photos(face_mask, photos, "face mask", EMPTY_FACE_MASK)
