"""SeFi Train Identity: one photo (or several) + the loaded SD1.x or SDXL model -> an identity, saved to
models/sefi_identities; or a saved identity trained further (continue_from)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from comfy_api.latest import io, ui

from ...sefi_core.names import validate_class_word, validate_trigger
from ...sefi_core.plot import preview_strip
from ...sefi_core.sefi.augment import EMPTY_SUBJECT_MASK
from ...sefi_core.sefi.identity import FAMILY_NAMES, Identity, load_identity, save_identity
from ...sefi_core.sefi.losses import ATTENTION_OPTIONS
from ...sefi_core.sefi.train import TrainSettings
from ...sefi_core.train_state import (TrainState, TrainStateError, load_train_state, photos_digest, save_train_state,
                                      tokens_digest)
from ..checks import check_choices, first, single_values, validation_result
from ..clip_tokens import model_fingerprint
from ..folders import IDENTITY_FOLDER, file_fingerprint, identity_files, train_state_path
from ..node_ui import TrainingProgress, loss_curve, schema, show_text_on_node
from ..output_files import OutputFiles
from ..photos import check_photo, masks_for_photos, photos_of
from ..training import CHECKPOINTING_MODES, checkpointing_input
from .family import check_identity_fits, sefi_family
from .load_identity import SefiLoadIdentity
from .patches import SefiIdentity
from .preview import DEFAULT_PREVIEW_PROMPT, TrainingPreview
from .training import NODE, run_training

log = logging.getLogger(__name__)
NEW_IDENTITY = "none (new identity)"  # continue_from's first choice
KV_PAIRS = ("5", "1", "10")
COMBO_CHOICES = {"kv_pairs": KV_PAIRS, "attention_loss": tuple(ATTENTION_OPTIONS),
                 "gradient_checkpointing": CHECKPOINTING_MODES}
STATE_ADVICE = "Delete it and train the identity anew (with keep_training_state on) to continue it later."
NATIVE_RESOLUTION = {"sd1": 512, "sdxl": 1024}  # what resolution 0 trains at: the size each family was trained at


@dataclass
class RunPlan:
    """What a run trains with: its settings, trigger and class word, and the state it goes on from (None: new)."""
    settings: TrainSettings
    trigger: str
    class_word: str
    resume: TrainState | None = None


def new_run(trigger, class_word, steps, learning_rate, attention_weight, seed, resolution, kv_pairs,
            attention_loss, family: str = "sd1") -> RunPlan:
    class_word = validate_class_word(class_word)
    settings = TrainSettings(steps=steps, learning_rate=learning_rate, attention_weight=attention_weight, seed=seed,
                             resolution=resolution or NATIVE_RESOLUTION[family], stage_count=int(kv_pairs),
                             attention_option=ATTENTION_OPTIONS[attention_loss])
    return RunPlan(settings, validate_trigger(trigger, class_word), class_word)


def continued_run(identity_file: str, clip, steps: int, family: str = "sd1") -> RunPlan:
    """The saved identity's run to continue: its own settings, `steps` more, trigger and class word, and its state."""
    identity = load_identity(SefiLoadIdentity.path(identity_file))
    check_identity_fits(identity, family, NODE)
    state_path = train_state_path(identity_file)
    if not os.path.exists(state_path):
        raise TrainStateError(f"{identity_file} has no training state in models/sefi_training_state (it was trained "
                              "with keep_training_state off, or the state was deleted), so it cannot be continued. "
                              f"Train it anew with keep_training_state on, or set continue_from to '{NEW_IDENTITY}'.")
    state = load_train_state(state_path, STATE_ADVICE)
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
    return RunPlan(settings, identity.trigger, identity.class_word, state)


def check_continue_from(continue_from: str | None) -> None:
    if continue_from not in (None, NEW_IDENTITY):
        SefiLoadIdentity.check(continue_from)


def check_preview_prompt(prompt: str, trigger: str) -> str:
    """The previews' prompt, the default one when empty; it must name the identity."""
    prompt = prompt.strip() or DEFAULT_PREVIEW_PROMPT.format(trigger=trigger)
    if not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt, re.IGNORECASE):
        raise ValueError(f"preview_prompt {prompt!r} does not contain the trigger word {trigger!r}, so the previews "
                         f"would not show the identity. Write it in, e.g. 'a portrait photo of {trigger}', or leave "
                         "preview_prompt empty.")
    return prompt


def announce_continuation(node_id, identity_file: str, plan: RunPlan, photos: str) -> None:
    """Says on the node and in the log which settings a continued run goes on with (the node's own are not used)."""
    settings = plan.settings
    text = (f"Continuing {identity_file} from step {plan.resume.steps_done} to {settings.steps} with its settings: "
            f"learning rate {settings.learning_rate:g}, attention weight {settings.attention_weight:g}, seed "
            f"{settings.seed}, {settings.resolution} px, {settings.stage_count} K/V pairs.")
    if plan.resume.photos and plan.resume.photos != photos:
        text += " The photos (or masks) differ from the first run's, so it will not end where one long run ends."
    show_text_on_node(node_id, text)
    log.info("%s: %s", NODE, text)


class Previews:
    """run_training's make_preview: the run's TrainingPreview on the loaded trainer, each image shown on the node as
    it is taken; strip() is the previews output (one grey square when there were none)."""

    def __init__(self, vae, prompt: str, plan: RunPlan, progress: TrainingProgress):
        self.vae, self.prompt, self.plan, self.progress = vae, prompt, plan, progress
        self.preview: TrainingPreview | None = None

    def __call__(self, trainer):
        settings = self.plan.settings
        self.preview = TrainingPreview(trainer, self.vae, self.prompt, self.plan.trigger, self.plan.class_word,
                                       settings.resolution, settings.seed, trainer.family)
        return self.show

    def show(self, step: int, k_tokens: torch.Tensor, v_tokens: torch.Tensor) -> None:
        self.progress.show_preview(step, self.preview(step, k_tokens, v_tokens))

    def strip(self) -> torch.Tensor:
        if self.preview is None or not self.preview.images:
            picture = np.full((64, 64, 3), 128, np.uint8)
        else:
            picture = preview_strip(self.preview.images, self.preview.steps)
        return torch.from_numpy(picture.astype(np.float32) / 255).unsqueeze(0)


def keep_state(state: TrainState, identity: Identity, identity_file: str, photos: str, keep: bool) -> None:
    """The run's training state beside the identity just saved (or, not kept, any older state of that name removed:
    it belonged to the file just replaced)."""
    path = train_state_path(identity_file)
    if keep:
        state.tokens, state.photos = tokens_digest(identity.k_tokens, identity.v_tokens), photos
        save_train_state(state, path)
    elif os.path.exists(path):
        os.remove(path)


class SefiTrainIdentity(io.ComfyNode):
    outputs = OutputFiles(IDENTITY_FOLDER, "identity")

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SefiTrainIdentity",
            display_name="SeFi Train Identity",
            search_aliases=["train identity", "textual inversion", "personalize", "face id", "dreambooth", "one photo",
                            "embedding"],
            category="SeFi-IDE",
            description="Learns an identity (ten word embeddings: ~30 KB on SD1.x, ~80 KB on SDXL) from one photo (or "
                        "a few) on the model you loaded, and saves it to models/sefi_identities. About 1000 steps; "
                        "Cancel stops it and saves nothing. continue_from goes on training a saved identity.",
            is_output_node=True,
            is_input_list=True,  # several photos of different sizes arrive as a list; see single_values
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL model to train on (not an inpainting checkpoint). "
                                                "The identity works on that family's models."),
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
                io.Int.Input("resolution", default=0, min=0, max=2048, step=64,
                             tooltip="Training resolution in pixels. 0: the model's own, 512 for SD1.x and 1024 for "
                                     "SDXL. Lower trains faster in less memory (SDXL at 768 still works well)."),
                io.Combo.Input("kv_pairs", options=list(KV_PAIRS), default="5",
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
                                       "same photos, 500 steps and then 500 more end where 1000 steps end (bit for "
                                       "bit on the CPU; on a GPU with ComfyUI's --deterministic). Needs the "
                                       "identity's training state (keep_training_state). The result is "
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
            COMBO_CHOICES, kv_pairs=first(kv_pairs), attention_loss=first(attention_loss),
            gradient_checkpointing=first(gradient_checkpointing)), check_continue_from(first(continue_from))))

    @classmethod
    def fingerprint_inputs(cls, name, continue_from=None, **kwargs):
        """The file it writes (trained again once deleted), and the identity it continues (again once that changed,
        e.g. continuing an identity into itself goes on each time it is queued)."""
        continued = first(continue_from)
        if continued not in (None, NEW_IDENTITY):
            continued = file_fingerprint(continued, IDENTITY_FOLDER)
        return f"{cls.outputs.fingerprint(first(name))}|{continued}"

    @classmethod
    def execute(cls, image, subject_mask=None, **inputs) -> io.NodeOutput:
        """The host's call: every input a list. The photos may be several, of different sizes; all else one value."""
        return cls.train(photos_of(image), subject_mask, **single_values(inputs, NODE, "'image' and 'subject_mask'"))

    @classmethod
    def train(cls, photos, subject_mask, model, clip, vae, name, trigger, class_word, steps, learning_rate,
              attention_weight, seed, resolution, kv_pairs, attention_loss, overwrite, gradient_checkpointing="auto",
              preview_every=250, preview_prompt="", continue_from=NEW_IDENTITY,
              keep_training_state=True) -> io.NodeOutput:
        family, path, masks = cls.check_inputs(model, clip, photos, subject_mask, name, overwrite, kv_pairs=kv_pairs,
                                               attention_loss=attention_loss,
                                               gradient_checkpointing=gradient_checkpointing)
        node_id, photos_id = cls.hidden.unique_id if cls.hidden else None, photos_digest(photos, masks)
        if continue_from in (None, NEW_IDENTITY):
            plan = new_run(trigger, class_word, steps, learning_rate, attention_weight, seed, resolution, kv_pairs,
                           attention_loss, family)
        else:
            plan = continued_run(continue_from, clip, steps, family)
            announce_continuation(node_id, continue_from, plan, photos_id)
        progress = TrainingProgress(plan.settings.steps, node_id, NODE)
        previews = Previews(vae, check_preview_prompt(preview_prompt, plan.trigger), plan, progress)
        result = run_training(model, clip, vae, photos, plan.trigger, plan.class_word, plan.settings,
                              gradient_checkpointing, progress, masks, preview_every, previews, plan.resume)
        identity = cls.save(result, plan, clip, family, path, overwrite, photos_id, keep_training_state)
        curve = loss_curve(result.losses, plan.settings.steps, "SeFi training loss")
        progress.end_on(curve)
        return io.NodeOutput(identity, curve, previews.strip(), ui=ui.PreviewImage(curve, cls=cls))

    @classmethod
    def check_inputs(cls, model, clip, photos, subject_mask, name, overwrite, **choices):
        """Everything that can be known wrong before any work; (the model family, the path to write, one subject mask
        per photo)."""
        family = sefi_family(model, clip, NODE)
        if model.model.concat_keys:
            raise ValueError(f"{NODE}: this is an inpainting checkpoint. Train on the ordinary {FAMILY_NAMES[family]} "
                             "checkpoint; the identity then works with the inpainting checkpoint too.")
        path = cls.outputs.new_path(name, overwrite)
        for number, photo in enumerate(photos, 1):
            check_photo(photo, number, len(photos), NODE)
        masks = masks_for_photos(subject_mask, photos, "subject mask", EMPTY_SUBJECT_MASK)
        check_choices(COMBO_CHOICES, **choices)
        return family, path, masks

    @classmethod
    def save(cls, result, plan: RunPlan, clip, family: str, path: str, overwrite: bool, photos_id: str,
             keep_state_file: bool):
        """The identity file (and, kept, its training state beside it)."""
        identity = Identity(result.k_tokens, result.v_tokens, plan.trigger, plan.class_word,
                            base_model=model_fingerprint(clip), training=plan.settings.as_metadata(), family=family)
        save_identity(identity, path, overwrite=overwrite)
        cls.outputs.wrote(path)
        keep_state(result.state, identity, os.path.basename(path), photos_id, keep_state_file)
        log.info("%s: saved identity %s (final loss %.4f)", NODE, path, result.losses[-1])
        return identity
