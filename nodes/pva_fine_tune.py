"""PVA Fine-tune Identity: 1-5 photos of a person + an SD1.5 inpainting MODEL, a face recognizer and an identity
encoder -> a PVA identity in models/pva_identities (sefi_core/pva/train.py has the method).

The fine-tune runs on resident training clones of the host's MODEL and CLIP, as SeFi's training does (training.py:
dynamic VRAM, inference tensors, the host's flags restored, loss scaling in fp16, checkpointing, out-of-memory
advice). The clone's cross-attention layers carry the same parallel-visual-attention patch PVA Apply puts on a MODEL,
with the trained projections in it, and each photo reaches the UNet as ComfyUI's InpaintModelConditioning gives it
(the face greyed out, the host's own extra_conds for the mask and masked-image channels): training computes what
Apply and the host's sampler compute.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.patcher_extension
from comfy_api.latest import io, ui

from ..sefi_core.augment import as_rgb, center_square
from ..sefi_core.identity import IdentityError, validate_identity_name, validate_trigger
from ..sefi_core.plot import loss_curve_image
from ..sefi_core.pva.attention import VisualProjections
from ..sefi_core.pva.encoder import MAX_REFERENCES, IdentityEncoder
from ..sefi_core.pva.face import CROP_COLS, CROP_FROM, CROP_ROWS
from ..sefi_core.pva.identity import PVAIdentity, save_pva_identity
from ..sefi_core.pva.train import PROMPT, FineTuneSettings, InpaintSample, TrainableIdentity, fine_tune
from .checks import check_sd1_clip, check_sd1_model
from .clip_tokens import model_fingerprint, word_embedding
from .folders import PVA_IDENTITY_FOLDER, identity_save_dir
from ..sefi_core.pva.model_files import PVAEncoder
from .pva_nodes import EncoderType, FaceRecognizerType, PVAIdentityType
from .pva_patch import CONDITIONAL, VisualIdentity, cross_attention_layers, patch_layers
from .train_identity import (WrittenFiles, check_photo, photos_of, progress_reporter, single_values,
                             subject_masks_for, _first)
from .training import (CHECKPOINTING_MODES, GradientCheckpointing, TrainingClones, _fp32_weight, checkpointing_input,
                       train_on_clones)

log = logging.getLogger(__name__)
NODE = "PVA Fine-tune Identity"


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
                raise ValueError(f"Face mask {k + 1} covers nothing of its photo's centre square, which the fine-tune "
                                 "uses. Paint the face in the centre, or crop the photo around the face.")
        out.append((square, mask))
    return out


def visual_tokens(recognizer, encoder, squares) -> torch.Tensor:
    """(10, context width): the encoder's tokens from the recognizer's features of all the photos (fp32, CPU)."""
    with torch.inference_mode(False), torch.no_grad():
        features = recognizer.features(torch.stack([square for square, _ in squares]))
        check_features_fit(encoder.network, features.shape[-1], recognizer.name)
        return encoder.network(features.cpu().unsqueeze(0))[0].detach()


def check_features_fit(encoder: IdentityEncoder, width: int, source: str) -> None:
    """An encoder reads features of the width it was trained on (ArcFace's 512, a CLIP vision's embedding width)."""
    if width != encoder.queries.shape[-1]:
        raise ValueError(f"This PVA encoder reads {encoder.queries.shape[-1]}-d face features; {source} gives "
                         f"{width}-d ones. "
                         "Connect the face recognizer (or CLIP vision) the encoder was trained with.")


def check_encoder_fits(encoder: PVAEncoder, model) -> None:
    """An encoder's tokens and trained projections must fit the model's cross-attention."""
    context_dim = model.model.model_config.unet_config.get("context_dim")
    if encoder.network.project.out_features != context_dim:
        raise ValueError(f"This PVA encoder makes {encoder.network.project.out_features}-d visual tokens; the model's "
                         f"text context is {context_dim}-d. Use an encoder trained for this model family.")
    layers = set(cross_attention_layers(model))
    if encoder.projections and set(encoder.projections) != layers:
        raise ValueError(f"This PVA encoder was trained with visual projections for {len(encoder.projections)} "
                         f"cross-attention layers; this MODEL has {len(layers)}. Use the model family it was trained "
                         "on (SD1.x inpainting).")


class PVAFineTuner(TrainingClones):
    """The callables PVA's trainings (sefi_core.pva.train) need, on training clones whose attn2 layers carry PVA.
    The visual projections and the word start from what the encoder was trained with, else from the layers' own
    projections (PVA's initialisation) and the trigger's embedding."""

    def __init__(self, model, clip, trigger: str, tokens: torch.Tensor, checkpointing: bool = False,
                 encoder: PVAEncoder | None = None):
        self.visual = VisualIdentity(tokens, {}, on_negative=True)  # its projections are set once loaded
        super().__init__(model, clip, trigger, patch_model=lambda clone: patch_layers(clone, self.visual))
        trained_word = encoder is not None and encoder.word is not None
        self.initial_word = encoder.word if trained_word else word_embedding(clip, trigger)
        self.initial_projections = encoder.projections if encoder is not None else {}
        self.prompt = PROMPT.format(trigger)
        self.checkpointing = GradientCheckpointing(checkpointing)
        self.identity = None

    def load(self) -> None:
        super().load()
        self.start_identity()
        self.visual.tokens = self.visual.tokens.to(self.device)

    def start_identity(self) -> None:
        """What is trained, as it starts (again, on an out-of-memory retry); else the layers' own projections, as
        loaded (LoRAs included)."""
        start = self.initial_projections or {
            name: VisualProjections(*(_fp32_weight(getattr(layer, kind), self.device) for kind in ("to_q", "to_k", "to_v")))
            for name, layer in cross_attention_layers(self.model).items()}
        self.identity = TrainableIdentity(start, self.initial_word, self.device)
        self.visual.projections = self.identity.projections  # the patch uses the very tensors being trained

    def samples(self, squares, vae) -> list[InpaintSample]:
        """Each photo encoded once: its latent, and the inpainting channels as InpaintModelConditioning makes them
        (the masked pixels grey, then the host's extra_conds)."""
        out = []
        for square, mask in squares:
            pixels = square.permute(1, 2, 0).unsqueeze(0)
            keep = (1.0 - mask.round())[None, :, :, None]
            with torch.no_grad():
                latent = vae.encode(pixels)
                masked = vae.encode((pixels - 0.5) * keep + 0.5)
                latent = self.model.model.process_latent_in(latent).to(self.device).float()
                conds = self.model.model.extra_conds(concat_latent_image=masked, concat_mask=mask[None], noise=latent,
                                                     device=self.device)
            out.append(InpaintSample(latent, conds["c_concat"].cond.float()))
        return out

    def denoise(self, latents, noise, timesteps, concat, word, tokens=None, prompt=None) -> torch.Tensor:
        """eps of the patched UNet; `tokens`: the visual tokens of this call (the encoder training's), else the
        fixed ones; `prompt`: this sample's (a caption after the learned word's), else "photo of a sks person"."""
        if tokens is not None:
            self.visual.tokens = tokens
        text = prompt or self.prompt
        context = self.clip.encode_from_tokens({"l": self.with_token(text, word)}).to(self.device, self.dtype)
        sigma = self.sampling.sigma(timesteps.to(self.device).float())
        x = self.sampling.noise_scaling(sigma, noise, latents)
        options = {"cond_or_uncond": [CONDITIONAL],
                   "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"pva_train": [self.checkpointing]}}}
        denoised = self.model.model.apply_model(x, sigma, c_concat=concat.to(self.dtype),
                                                c_crossattn=context.expand(len(timesteps), -1, -1),
                                                transformer_options=options)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)

    def release(self) -> None:
        super().release()
        self.visual.tokens = self.visual.tokens.cpu()


def check_inpainting_model(model) -> None:
    check_sd1_model(model)
    if not model.model.concat_keys:
        raise ValueError("PVA fine-tunes an inpainting model: this MODEL has 4 input channels. Load the SD1.5 "
                         "inpainting checkpoint (sd-v1-5-inpainting) and use it here and in PVA Apply.")


class PVAFineTuneIdentity(io.ComfyNode):
    written_files = WrittenFiles()

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PVAFineTuneIdentity",
            display_name="PVA Fine-tune Identity",
            category="PVA",
            description="Makes a PVA identity from 1-5 photos of a person: their visual tokens (from the encoder), and "
                        "a short fine-tune (40 steps, the paper's) of the visual attention and the learned word on the "
                        "inpainting model. Saved to models/pva_identities for PVA Load Identity / PVA Apply.",
            is_output_node=True,
            is_input_list=True,  # photos of different sizes arrive as a list
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 inpainting model you will inpaint with."),
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
                             tooltip="Training resolution in pixels; SD1.5 inpainting is made for 512."),
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
        value = _first(gradient_checkpointing)
        if value is not None and value not in CHECKPOINTING_MODES:
            return f"gradient_checkpointing {value!r} is not one of {list(CHECKPOINTING_MODES)}: pick one on the node."
        return True

    @classmethod
    def fingerprint_inputs(cls, name, **kwargs):
        """The file it writes: fine-tuned again once deleted."""
        try:
            path = os.path.join(identity_save_dir(PVA_IDENTITY_FOLDER), validate_identity_name(_first(name)))
            return cls.written_files.fingerprint(path)
        except IdentityError:
            return _first(name)  # execute() reports the bad name

    @classmethod
    def execute(cls, image, face_mask=None, **inputs) -> io.NodeOutput:
        return cls.fine_tune(photos_of(image), face_mask, **single_values(inputs, NODE, "'image' and 'face_mask'"))

    @classmethod
    def fine_tune(cls, photos, face_mask, model, clip, vae, face_recognizer, pva_encoder, name, trigger, steps,
                  timesteps_per_step, projection_learning_rate, word_learning_rate, seed, resolution, overwrite,
                  gradient_checkpointing="auto") -> io.NodeOutput:
        check_inpainting_model(model)
        check_sd1_clip(clip)
        path = os.path.join(identity_save_dir(PVA_IDENTITY_FOLDER), validate_identity_name(name))
        if os.path.exists(path) and not overwrite:
            raise IdentityError(f"A PVA identity named {os.path.basename(path)!r} already exists. Choose another "
                                "name, or switch 'overwrite' on to replace it.")
        trigger = validate_trigger(trigger, "person")
        if not 1 <= len(photos) <= MAX_REFERENCES:
            raise ValueError(f"{NODE} takes 1-{MAX_REFERENCES} photos of the person (the encoder reads at most "
                             f"{MAX_REFERENCES}); it got {len(photos)}. Pick the {MAX_REFERENCES} best.")
        for number, photo in enumerate(photos, 1):
            check_photo(photo, number, len(photos))
        check_encoder_fits(pva_encoder, model)
        if pva_encoder.recognizer and not f"{face_recognizer.name} ".startswith(f"{pva_encoder.recognizer} "):
            log.warning("PVA: the encoder was trained on features of %r, and is given %r.", pva_encoder.recognizer,
                        face_recognizer.name)
        settings = FineTuneSettings(steps=steps, timesteps=timesteps_per_step,
                                    projection_learning_rate=projection_learning_rate,
                                    word_learning_rate=word_learning_rate, seed=seed, resolution=resolution)
        squares = square_photos(photos, subject_masks_for(face_mask, photos), resolution)
        tokens = visual_tokens(face_recognizer, pva_encoder, squares)
        on_step, _ = progress_reporter(settings.steps, cls.hidden.unique_id if cls.hidden else None)
        tuner = PVAFineTuner(model, clip, trigger, tokens, gradient_checkpointing == "on", pva_encoder)

        def train(samples):
            tuner.start_identity()  # afresh: an out-of-memory retry starts again
            return fine_tune(settings, tuner.identity, samples, tuner.denoise, on_step, tuner.dtype)
        result = train_on_clones(tuner, tuner.checkpointing, gradient_checkpointing, resolution, NODE,
                                 lambda: tuner.samples(squares, vae), train)
        identity = PVAIdentity(tokens, result.projections, result.word, trigger, model_fingerprint(clip),
                               face_recognizer.name, pva_encoder.hash,
                               {**settings.as_metadata(), "photos": len(photos), "face_mask": face_mask is not None})
        save_pva_identity(identity, path, overwrite=overwrite)
        cls.written_files.wrote(path)
        log.info("PVA: saved identity %s (final loss %.4f)", path, result.losses[-1])
        curve = torch.from_numpy(loss_curve_image(result.losses, settings.steps)).unsqueeze(0)
        return io.NodeOutput(identity, curve, ui=ui.PreviewImage(curve, cls=cls))
