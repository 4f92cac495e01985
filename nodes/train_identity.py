"""SeFi Train Identity: one photo + the loaded SD1.x model -> an identity, saved to models/sefi_identities."""
import logging
import os
import re

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..sefi_core.augment import EMPTY_SUBJECT_MASK
from ..sefi_core.identity import (Identity, IdentityError, save_identity, validate_class_word, validate_identity_name,
                                 validate_trigger)
from ..sefi_core.losses import ATTENTION_OPTIONS
from ..sefi_core.plot import loss_curve_image, preview_strip, smoothed, smoothing_span
from ..sefi_core.train import TrainSettings
from . import host
from .preview import DEFAULT_PREVIEW_PROMPT, TrainingPreview
from .training import CHECKPOINTING_MODES, run_training

log = logging.getLogger(__name__)
MIN_IMAGE_SIDE = 64  # pixels; below this there is no face to learn
MAX_ASPECT = 4.0
PREVIEW_SHOWN_SIZE = 512  # the longest side of a preview on the node  # the centre square of a thinner image holds little of it


def check_image(image: torch.Tensor) -> None:
    """The photo must be a real picture: finite pixels, big enough to learn from."""
    if image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"The image has shape {tuple(image.shape)}; connect a Load Image node (one photo, or a batch).")
    if not torch.isfinite(image).all():
        raise ValueError("The image has NaN or infinite pixel values, so there is nothing to learn from. Check the node "
                         "that made it (a decode or an upscale gone wrong?) or load the photo directly with Load Image.")
    height, width = image.shape[1:3]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"The image is {width}x{height} pixels; SeFi Train Identity needs at least {MIN_IMAGE_SIDE} "
                         "on the short side (512 or more is best). Use a larger photo of the subject.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        log.warning("SeFi: the image is %dx%d; training uses its centre square, which holds little of so thin a "
                    "picture. Crop the photo around the subject for a better identity.", width, height)


def check_subject_mask(mask: torch.Tensor | None, image: torch.Tensor) -> None:
    """One mask for all photos or one per photo, the photos' size, not empty."""
    if mask is None:
        return
    photos, height, width = image.shape[:3]
    if mask.ndim != 3 or mask.shape[1:] != (height, width) or mask.shape[0] not in (1, photos):
        raise ValueError(f"The subject mask is {'x'.join(map(str, mask.shape[1:][::-1]))} pixels ({mask.shape[0]} "
                         f"mask(s)) but the photo is {width}x{height} ({photos} photo(s)). Paint the mask on this "
                         "photo (right-click Load Image > Open in MaskEditor and use that node's MASK output), or give "
                         "one mask of the photo's size.")
    if not bool((mask > 0.5).flatten(1).any(1).all()):
        raise ValueError(EMPTY_SUBJECT_MASK)


def check_preview_prompt(prompt: str, trigger: str) -> str:
    """The previews' prompt, the default one when empty; it must name the identity."""
    prompt = prompt.strip() or DEFAULT_PREVIEW_PROMPT.format(trigger=trigger)
    if not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt, re.IGNORECASE):
        raise ValueError(f"preview_prompt {prompt!r} does not contain the trigger word {trigger!r}, so the previews "
                         f"would not show the identity. Write it in, e.g. 'a portrait photo of {trigger}', or leave "
                         "preview_prompt empty.")
    return prompt


COMBO_CHOICES = {"kv_pairs": ("5", "1", "10"), "attention_loss": tuple(ATTENTION_OPTIONS),
                 "gradient_checkpointing": CHECKPOINTING_MODES}


def check_choices(**values) -> None:
    """Combo values as the node lists them (a workflow saved by an older version can hold shifted ones); None is an
    input the validator does not know yet."""
    for name, value in values.items():
        if value is not None and value not in COMBO_CHOICES[name]:
            raise ValueError(f"{name} {value!r} is not one of {list(COMBO_CHOICES[name])} (a workflow saved by an older "
                             f"version may hold shifted values): pick one of those on the node, then queue again.")


def progress_reporter(total_steps: int, node_id: str | None):
    """(on_step, show_preview) for the training loop: the progress bar every step (Cancel is checked there), the
    smoothed loss as the node's text whenever new losses were read back, and each preview image on the node (the
    host's progress preview, as KSampler's live previews)."""
    progress, shown = comfy.utils.ProgressBar(total_steps), [0]
    span = smoothing_span(total_steps)

    def on_step(step, losses):
        progress.update_absolute(step + 1, total_steps)
        if len(losses) > shown[0]:
            shown[0] = len(losses)
            loss = smoothed(losses[-10 * span:], span)[-1]  # older steps weigh < e^-20
            host.show_text_on_node(node_id, f"step {len(losses)}/{total_steps}: loss {loss:.4f} (smoothed)")
            if len(losses) % 100 == 0 or len(losses) == total_steps:
                log.info("SeFi training step %d/%d loss %.4f (smoothed)", len(losses), total_steps, loss)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def show_preview(step, image):
        progress.update_absolute(step, total_steps, ("JPEG", Image.fromarray(image), PREVIEW_SHOWN_SIZE))
    return on_step, show_preview


class WrittenFiles:
    """The identity files this session's training wrote. The executor re-runs a node whose fingerprint changed, so a
    cached training whose file was deleted since gets a new fingerprint, and trains and saves again."""

    def __init__(self):
        self.written: set[str] = set()
        self.generation: dict[str, int] = {}

    def fingerprint(self, path: str) -> str:
        if path in self.written and not os.path.exists(path):
            self.written.discard(path)
            self.generation[path] = self.generation.get(path, 0) + 1
        return f"{path}#{self.generation.get(path, 0)}"

    def wrote(self, path: str) -> None:
        self.written.add(path)


class SefiTrainIdentity(io.ComfyNode):
    written_files = WrittenFiles()

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SefiTrainIdentity",
            display_name="SeFi Train Identity",
            category="SeFi-IDE",
            description="Learns an identity (ten CLIP-L tokens, ~30 KB) from one photo on the model you loaded, "
                        "and saves it to models/sefi_identities. About 1000 steps; Cancel stops it and saves nothing.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model to train on (not an inpainting checkpoint)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the photo."),
                io.Image.Input("image", tooltip="One photo of the subject (a batch of photos of the same subject "
                                                "is used in turn). Any size; it is centre-cropped to a square, or "
                                                "cropped around the subject mask when one is connected."),
                io.String.Input("name", default="my_identity",
                                tooltip="File name in models/sefi_identities (letters, digits, - and _)."),
                io.String.Input("trigger", default="sks",
                                tooltip="The word your prompts will use: a rare word such as 'sks' or 'ohwx', not the "
                                        "class word."),
                io.String.Input("class_word", default="person",
                                tooltip="What the subject is: 'person' for faces; 'dog', 'cat', 'golden retriever', "
                                        "'teddy bear'... otherwise. Training starts from it, and prompts read the "
                                        "trigger as it where the identity is off."),
                io.Int.Input("steps", default=1000, min=1, max=20000,
                             tooltip="Optimisation steps; the paper uses about 1000."),
                # step 0.00001: the frontend rounds a float to its step's decimals, so 0.00002 and 0.0005 survive
                io.Float.Input("learning_rate", default=0.005, min=0.00001, max=0.1, step=0.00001,
                               tooltip="Adam learning rate; the paper uses 0.005. Lower it if the loss explodes."),
                io.Float.Input("attention_weight", default=0.003, min=0.0, max=1.0, step=0.00001,
                               tooltip="Lambda of the face-wise attention loss; the paper uses 0.003 "
                                       "(0.01 and 0.05 underfit). 0 turns it off."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed for steps, noise and augmentation."),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=64,
                             tooltip="Training resolution in pixels; SD1.x models are made for 512."),
                io.Combo.Input("kv_pairs", options=["5", "1", "10"], default="5",
                               tooltip="Timestep stages, one K/V token pair each. 5 is the paper's choice; "
                                       "1 and 10 are its ablations (Table 2)."),
                io.Combo.Input("attention_loss", options=list(ATTENTION_OPTIONS), default=list(ATTENTION_OPTIONS)[0],
                               tooltip="Which token maps the attention loss compares: all 77 (#3, the paper's), "
                                       "only the trigger's (#1) or the prompt's tokens (#2)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an identity file of the same name. Off: an existing name is an error."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING_MODES), default="auto", optional=True,
                               tooltip="Saves GPU memory by recomputing activations during the backward pass, at "
                                       "about a third more time per step. auto: off, and switched on by itself if the "
                                       "GPU runs out of memory. on: for cards with 8 GB or less. off: fastest."),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="Optional: where the subject is (paint it in Load Image's mask editor, or any "
                                      "segmentation node). Training then crops a square around it, kept whole, and "
                                      "learns from it alone, not the background. One mask of the photo's size, or one "
                                      "per photo. Without it: the centre square, background included."),
                io.Int.Input("preview_every", default=250, min=0, max=20000, optional=True,
                             tooltip="Every this many steps, sample one small image with the identity as it is so "
                                     "far (same seed each time, so they compare), shown on the node as training goes. "
                                     "0: no previews. About 1% of the run's time at the defaults."),
                io.String.Input("preview_prompt", default="", optional=True,
                                tooltip="The prompt of the previews, with the trigger word. Empty: 'a portrait photo "
                                        "of <trigger>, looking at the camera'."),
            ],
            outputs=[
                host.SefiIdentity.Output(display_name="identity", tooltip="The trained identity, for SeFi Apply Stage Tokens."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss over the steps (also shown on "
                                                                   "this node)."),
                io.Image.Output(display_name="previews", tooltip="The previews taken while training, side by side "
                                                                 "with their steps (one grey square when previews are "
                                                                 "off)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, kv_pairs=None, attention_loss=None, gradient_checkpointing=None):
        """Runs in the host's validator, before anything executes, in place of its own 'Value not in list'."""
        return host.validation_result(check_choices, kv_pairs=kv_pairs, attention_loss=attention_loss,
                                      gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def fingerprint_inputs(cls, name, **kwargs):
        try:
            return cls.written_files.fingerprint(os.path.join(host.identity_save_dir(), validate_identity_name(name)))
        except IdentityError:
            return name  # execute() reports the bad name

    @classmethod
    def execute(cls, model, clip, vae, image, name, trigger, class_word, steps, learning_rate, attention_weight,
                seed, resolution, kv_pairs, attention_loss, overwrite, gradient_checkpointing="auto",
                subject_mask=None, preview_every=250, preview_prompt="") -> io.NodeOutput:
        host.check_sd1_model(model)
        host.check_sd1_clip(clip)
        if model.model.concat_keys:
            raise ValueError("This is an inpainting checkpoint. Train on the ordinary SD1.x checkpoint; the identity "
                             "then works with the inpainting checkpoint too.")
        path = os.path.join(host.identity_save_dir(), validate_identity_name(name))
        if os.path.exists(path) and not overwrite:
            raise IdentityError(f"An identity named {os.path.basename(path)!r} already exists. Choose another name, "
                                "or switch 'overwrite' on to replace it.")
        class_word = validate_class_word(class_word)
        trigger = validate_trigger(trigger, class_word)
        check_image(image)
        check_subject_mask(subject_mask, image)
        check_choices(kv_pairs=kv_pairs, attention_loss=attention_loss, gradient_checkpointing=gradient_checkpointing)
        settings = TrainSettings(steps=steps, learning_rate=learning_rate, attention_weight=attention_weight, seed=seed,
                                 resolution=resolution, stage_count=int(kv_pairs),
                                 attention_option=ATTENTION_OPTIONS[attention_loss])
        preview_prompt = check_preview_prompt(preview_prompt, trigger)
        on_step, show_preview = progress_reporter(settings.steps, cls.hidden.unique_id if cls.hidden else None)
        previews = []

        def make_preview(trainer):
            previews.append(TrainingPreview(trainer, vae, preview_prompt, trigger, class_word, resolution, seed))
            return lambda step, k, v: show_preview(step, previews[0](step, k, v))

        result = run_training(model, clip, vae, image, trigger, class_word, settings, gradient_checkpointing, on_step,
                              subject_mask, preview_every, make_preview)
        identity = Identity(result.k_tokens, result.v_tokens, trigger, class_word,
                            base_model=host.model_fingerprint(clip), training=settings.as_metadata())
        save_identity(identity, path, overwrite=overwrite)
        cls.written_files.wrote(path)
        log.info("SeFi: saved identity %s (final loss %.4f)", path, result.losses[-1])
        curve = torch.from_numpy(loss_curve_image(result.losses, settings.steps)).unsqueeze(0)
        strip = preview_strip(previews[0].images, previews[0].steps) if previews and previews[0].images else \
            np.full((64, 64, 3), 128, np.uint8)
        strip = torch.from_numpy(strip.astype(np.float32) / 255).unsqueeze(0)
        return io.NodeOutput(identity, curve, strip, ui=ui.PreviewImage(curve, cls=cls))
