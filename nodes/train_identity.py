"""SeFi Train Identity: one photo (or several) + the loaded SD1.x model -> an identity, saved to models/sefi_identities;
or a saved identity trained further (continue_from)."""
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
from ..sefi_core.identity import (Identity, IdentityError, load_identity, save_identity, validate_class_word,
                                 validate_identity_name, validate_trigger)
from ..sefi_core.losses import ATTENTION_OPTIONS
from ..sefi_core.plot import loss_curve_image, preview_strip, smoothed, smoothing_span
from ..sefi_core.train import TrainSettings
from ..sefi_core.train_state import (TrainState, TrainStateError, load_train_state, photos_digest, save_train_state,
                                     tokens_digest)
from .checks import check_sd1_clip, check_sd1_model, validation_result
from .clip_tokens import model_fingerprint
from .node_ui import show_text_on_node
from .sefi_patches import SefiIdentity
from .folders import (IDENTITY_FOLDER, file_fingerprint, identity_files, identity_path, identity_save_dir,
                      train_state_path)
from .load_identity import check_available
from .preview import DEFAULT_PREVIEW_PROMPT, TrainingPreview
from .training import CHECKPOINTING_MODES, checkpointing_input, run_training

log = logging.getLogger(__name__)
MIN_IMAGE_SIDE = 64  # pixels; below this there is no face to learn
MAX_ASPECT = 4.0
PREVIEW_SHOWN_SIZE = 512  # the longest side of a preview on the node
NEW_IDENTITY = "none (new identity)"  # continue_from's first choice


def photos_of(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The photos (H, W, C) of an IMAGE list (each entry a batch; sizes may differ between entries)."""
    if not images or any(not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[0] == 0
                         for batch in images):
        shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in images]
        raise ValueError(f"The image input holds {shapes}; connect a Load Image node (one photo), a batch, or a list "
                         "of photos (e.g. Load Image (from Folder)).")
    return [photo for batch in images for photo in batch]


def check_photo(photo: torch.Tensor, number: int, count: int) -> None:
    """Each photo must be a real picture: finite pixels, big enough to learn from."""
    which = f"Photo {number} of {count}" if count > 1 else "The image"
    if not torch.isfinite(photo).all():
        raise ValueError(f"{which} has NaN or infinite pixel values, so there is nothing to learn from. Check the node "
                         "that made it (a decode or an upscale gone wrong?) or load the photo directly with Load Image.")
    height, width = photo.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{which} is {width}x{height} pixels; SeFi Train Identity needs at least {MIN_IMAGE_SIDE} "
                         "on the short side (512 or more is best). Use a larger photo of the subject.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        log.warning("SeFi: %s is %dx%d; training uses its centre square, which holds little of so thin a picture. "
                    "Crop the photo around the subject for a better identity.", which.lower(), width, height)


def subject_masks_for(masks: list[torch.Tensor] | None, photos: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """One mask (H, W) per photo: the masks given one per photo, or one mask for photos all of its size; none empty."""
    if masks is None:
        return None
    masks = [m for batch in masks for m in (batch if batch.ndim == 3 else batch[None])]
    sizes = lambda shapes: ", ".join(f"{w}x{h}" for h, w in shapes)
    photo_sizes, mask_sizes = [tuple(p.shape[:2]) for p in photos], [tuple(m.shape[-2:]) for m in masks]
    if len(masks) == 1 and len(photos) > 1:
        masks, mask_sizes = masks * len(photos), mask_sizes * len(photos)
    if len(masks) != len(photos) or mask_sizes != photo_sizes:
        raise ValueError(f"The subject mask(s) ({len(masks)}: {sizes(mask_sizes[:4])}) do not fit the photo(s) "
                         f"({len(photos)}: {sizes(photo_sizes[:4])}). Paint the mask on this photo (right-click Load "
                         "Image > Open in MaskEditor and use that node's MASK output), and give one mask per photo, or "
                         "one mask for photos all of its size.")
    for number, mask in enumerate(masks, 1):
        if not bool((mask > 0.5).any()):
            raise ValueError(EMPTY_SUBJECT_MASK + (f" (mask {number} of {len(masks)})" if len(masks) > 1 else ""))
    return masks


def single_values(inputs: dict, node: str = "SeFi Train Identity", lists: str = "'image' and 'subject_mask'") -> dict:
    """The node takes its inputs as lists (the photos may be a list of different sizes); every other input must hold
    one value, as one identity is trained per run."""
    for name, values in inputs.items():
        if len(values) != 1:
            raise ValueError(f"'{name}' received a list of {len(values)} values, but {node} trains one identity per "
                             f"run from one set of settings. Connect a single value to '{name}'; only {lists} take "
                             "lists (several photos of one subject).")
    return {name: values[0] for name, values in inputs.items()}


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


def check_continue_from(continue_from: str | None) -> None:
    if continue_from not in (None, NEW_IDENTITY):
        check_available(continue_from)


def continuation(identity_file: str, clip, steps: int) -> tuple[Identity, TrainState, TrainSettings]:
    """The saved identity to continue, its training state and the settings to go on with (its own, `steps` more)."""
    check_available(identity_file)
    identity = load_identity(identity_path(identity_file))
    state_path = train_state_path(identity_file)
    if not os.path.exists(state_path):
        raise TrainStateError(f"{identity_file} has no training state in models/sefi_training_state (it was trained "
                              "with keep_training_state off, or the state was deleted), so it cannot be continued. "
                              f"Train it anew with keep_training_state on, or set continue_from to '{NEW_IDENTITY}'.")
    state = load_train_state(state_path)
    if state.tokens != tokens_digest(identity.k_tokens, identity.v_tokens):
        raise TrainStateError(f"The training state {os.path.basename(state_path)} belongs to another training than "
                              f"the identity file {identity_file} now holds (the file was replaced or edited), so "
                              "continuing from it would not go on from these tokens. Train the identity anew, or "
                              "continue from the identity the state was saved with.")
    if identity.base_model and identity.base_model != model_fingerprint(clip):
        raise ValueError(f"{identity_file} was trained on another model (fingerprint {identity.base_model}, this CLIP's "
                         f"is {model_fingerprint(clip)}); continuing needs the checkpoint it was trained on. Load "
                         f"that checkpoint, or set continue_from to '{NEW_IDENTITY}' to train on this one.")
    try:
        settings = TrainSettings(**{**state.settings, "steps": state.steps_done + steps})
    except (TypeError, ValueError) as e:
        raise TrainStateError(f"The training state of {identity_file} holds settings this pack cannot use ({e}). "
                              "Train the identity anew.") from None
    return identity, state, settings


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
            show_text_on_node(node_id, f"step {len(losses)}/{total_steps}: loss {loss:.4f} (smoothed)")
            if len(losses) % 100 == 0 or len(losses) == total_steps:
                log.info("SeFi training step %d/%d loss %.4f (smoothed)", len(losses), total_steps, loss)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def show_preview(step, image):
        progress.update_absolute(step, total_steps, ("JPEG", Image.fromarray(image), PREVIEW_SHOWN_SIZE))
    return on_step, show_preview


def announce_continuation(node_id, identity_file: str, state: TrainState, settings: TrainSettings, photos: str):
    """Says on the node and in the log which settings a continued run goes on with (the node's own are not used)."""
    text = (f"Continuing {identity_file} from step {state.steps_done} to {settings.steps} with its settings: learning "
            f"rate {settings.learning_rate:g}, attention weight {settings.attention_weight:g}, seed {settings.seed}, "
            f"{settings.resolution} px, {settings.stage_count} K/V pairs.")
    if state.photos and state.photos != photos:
        text += " The photos (or masks) differ from the first run's, so it will not end where one long run ends."
    show_text_on_node(node_id, text)
    log.info("SeFi: %s", text)


def keep_state(state: TrainState, identity: Identity, identity_file: str, photos: str, keep: bool) -> None:
    """The run's training state beside the identity just saved (or, not kept, any older state of that name removed:
    it belonged to the file just replaced)."""
    path = train_state_path(identity_file)
    if keep:
        state.tokens, state.photos = tokens_digest(identity.k_tokens, identity.v_tokens), photos
        save_train_state(state, path)
    elif os.path.exists(path):
        os.remove(path)


def _first(value):
    """A validator's or fingerprint's value: a list of one under is_input_list (a plain value when called directly)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


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
            description="Learns an identity (ten CLIP-L tokens, ~30 KB) from one photo (or a few) on the model you "
                        "loaded, and saves it to models/sefi_identities. About 1000 steps; Cancel stops it and saves "
                        "nothing. continue_from goes on training a saved identity.",
            is_output_node=True,
            is_input_list=True,  # several photos of different sizes arrive as a list; see single_values
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model to train on (not an inpainting checkpoint)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the photo."),
                io.Image.Input("image", tooltip="One photo of the subject, or several of the same subject (a batch, "
                                                "or a list of any sizes such as Load Image (from Folder) gives), used "
                                                "in turn. Each is centre-cropped to a square, or cropped around its "
                                                "subject mask when one is connected."),
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
                checkpointing_input(),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="Optional: where the subject is (paint it in Load Image's mask editor, or any "
                                      "segmentation node). Training then crops a square around it, kept whole, and "
                                      "learns from it alone, not the background. One mask of the photo's size, or one "
                                      "per photo. Without it: the centre square, background included."),
                io.Int.Input("preview_every", default=250, min=0, max=20000, optional=True,
                             tooltip="Every this many steps, sample one small image with the identity as it is so "
                                     "far (same seed each time, so they compare), shown on the node as training goes. "
                                     "0: no previews. About 2% of the run's time at the defaults."),
                io.String.Input("preview_prompt", default="", optional=True,
                                tooltip="The prompt of the previews, with the trigger word. Empty: 'a portrait photo "
                                        "of <trigger>, looking at the camera'."),
                io.Combo.Input("continue_from", options=[NEW_IDENTITY, *identity_files()], default=NEW_IDENTITY,
                               optional=True,
                               tooltip="Continue a saved identity for 'steps' more steps, with its own settings, "
                                       "trigger and class word (this node's learning rate, seed, resolution, K/V "
                                       "pairs, attention loss, trigger and class word are then not used). With the "
                                       "same photos, 500 steps and then 500 more end exactly where 1000 steps end. "
                                       "Needs the identity's training state (keep_training_state). The result is "
                                       "saved under 'name'. Press R to refresh the list."),
                io.Boolean.Input("keep_training_state", default=True, optional=True,
                                 tooltip="Also save what continuing needs (the token mapper and optimiser, about "
                                         "120 MB) in models/sefi_training_state. The identity file stays ~30 KB and "
                                         "is all that applying or sharing it needs; delete the state any time."),
            ],
            outputs=[
                SefiIdentity.Output(display_name="identity", tooltip="The trained identity, for SeFi Apply Stage Tokens."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss over the steps (also shown on "
                                                                   "this node)."),
                io.Image.Output(display_name="previews", tooltip="The previews taken while training, side by side "
                                                                 "with their steps (one grey square when previews are "
                                                                 "off)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, kv_pairs=None, attention_loss=None, gradient_checkpointing=None, continue_from=None):
        """Runs in the host's validator, before anything executes, in place of its own 'Value not in list'. Values come
        as lists (is_input_list); None is an input linked to another node."""
        return validation_result(lambda: (check_choices(
            kv_pairs=_first(kv_pairs), attention_loss=_first(attention_loss),
            gradient_checkpointing=_first(gradient_checkpointing)), check_continue_from(_first(continue_from))))

    @classmethod
    def fingerprint_inputs(cls, name, continue_from=None, **kwargs):
        """The file it writes (trained again once deleted), and the identity it continues (again once that changed,
        e.g. continuing an identity into itself goes on each time it is queued)."""
        continued = _first(continue_from)
        if continued not in (None, NEW_IDENTITY):
            continued = file_fingerprint(continued, IDENTITY_FOLDER)
        try:
            name = _first(name)
            path = os.path.join(identity_save_dir(), validate_identity_name(name))
            return f"{cls.written_files.fingerprint(path)}|{continued}"
        except IdentityError:
            return name  # execute() reports the bad name

    @classmethod
    def execute(cls, image, subject_mask=None, **inputs) -> io.NodeOutput:
        """The host's call: every input a list. The photos may be several, of different sizes; all else one value."""
        return cls.train(photos_of(image), subject_mask, **single_values(inputs))

    @classmethod
    def train(cls, photos, subject_mask, model, clip, vae, name, trigger, class_word, steps, learning_rate,
              attention_weight, seed, resolution, kv_pairs, attention_loss, overwrite, gradient_checkpointing="auto",
              preview_every=250, preview_prompt="", continue_from=NEW_IDENTITY,
              keep_training_state=True) -> io.NodeOutput:
        check_sd1_model(model)
        check_sd1_clip(clip)
        if model.model.concat_keys:
            raise ValueError("This is an inpainting checkpoint. Train on the ordinary SD1.x checkpoint; the identity "
                             "then works with the inpainting checkpoint too.")
        path = os.path.join(identity_save_dir(), validate_identity_name(name))
        if os.path.exists(path) and not overwrite:
            raise IdentityError(f"An identity named {os.path.basename(path)!r} already exists. Choose another name, "
                                "or switch 'overwrite' on to replace it.")
        for number, photo in enumerate(photos, 1):
            check_photo(photo, number, len(photos))
        subject_masks = subject_masks_for(subject_mask, photos)
        check_choices(kv_pairs=kv_pairs, attention_loss=attention_loss, gradient_checkpointing=gradient_checkpointing)
        node_id = cls.hidden.unique_id if cls.hidden else None
        photos_id, resume = photos_digest(photos, subject_masks), None
        if continue_from in (None, NEW_IDENTITY):
            class_word = validate_class_word(class_word)
            trigger = validate_trigger(trigger, class_word)
            settings = TrainSettings(steps=steps, learning_rate=learning_rate, attention_weight=attention_weight,
                                     seed=seed, resolution=resolution, stage_count=int(kv_pairs),
                                     attention_option=ATTENTION_OPTIONS[attention_loss])
        else:
            continued, resume, settings = continuation(continue_from, clip, steps)
            trigger, class_word = continued.trigger, continued.class_word
            announce_continuation(node_id, continue_from, resume, settings, photos_id)
        preview_prompt = check_preview_prompt(preview_prompt, trigger)
        on_step, show_preview = progress_reporter(settings.steps, node_id)
        previews = []

        def make_preview(trainer):
            previews.append(TrainingPreview(trainer, vae, preview_prompt, trigger, class_word, settings.resolution,
                                            settings.seed))
            return lambda step, k, v: show_preview(step, previews[0](step, k, v))

        result = run_training(model, clip, vae, photos, trigger, class_word, settings, gradient_checkpointing, on_step,
                              subject_masks, preview_every, make_preview, resume)
        identity = Identity(result.k_tokens, result.v_tokens, trigger, class_word,
                            base_model=model_fingerprint(clip), training=settings.as_metadata())
        save_identity(identity, path, overwrite=overwrite)
        cls.written_files.wrote(path)
        keep_state(result.state, identity, os.path.basename(path), photos_id, keep_training_state)
        log.info("SeFi: saved identity %s (final loss %.4f)", path, result.losses[-1])
        curve = torch.from_numpy(loss_curve_image(result.losses, settings.steps)).unsqueeze(0)
        strip = preview_strip(previews[0].images, previews[0].steps) if previews and previews[0].images else \
            np.full((64, 64, 3), 128, np.uint8)
        strip = torch.from_numpy(strip.astype(np.float32) / 255).unsqueeze(0)
        return io.NodeOutput(identity, curve, strip, ui=ui.PreviewImage(curve, cls=cls))
