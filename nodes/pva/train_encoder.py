"""PVA Train Encoder: a dataset folder of many people + an inpainting MODEL and a face recognizer -> a PVA identity
encoder in models/pva_encoders (sefi_core/pva/train.py has the method, sefi_core/pva/dataset.py the folder layout).

It trains on the same resident clones, with the same PVA patch and the same inpainting inputs as PVA Fine-tune Identity
(training.py: PVAFineTuner), through the run both systems share (nodes/training.py: train_on_clones). Every
`save_every` steps and at the end it saves, atomically, the encoder (with the visual projections and the word it
trained) and its training state (models/sefi_training_state): a cancelled or crashed run keeps its last save, and
`resume` goes on from it exactly. Stage 2 also tunes the face recognizer, saved beside the others in
models/face_recognizers. A frozen feature source the host runs (CLIP vision) reads every photo once before training
instead, so that the host loads no other model beside the training clones mid-run.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from ...sefi_core.files import save_atomically
from ...sefi_core.pva.distributed import World
from ...sefi_core.pva.dataset import (ALIGNED_FACE_BOX, CAPTION_CHANCE, WHOLE_PHOTO, FaceDataset, MaskBank, Photo,
                                      box_mask, open_dataset, parse_box, read_caption, read_drawn_photo, read_mask,
                                      read_photo)
from ...sefi_core.pva.bases import Base
from ...sefi_core.pva.encoder import IdentityEncoder
from ...sefi_core.pva.face import CROP_FROM, FEATURE_DIM
from ...sefi_core.pva.model_files import PVAEncoder, save_encoder
from ...sefi_core.pva.identity import as_stored
from ...sefi_core.pva.train import (EncoderSample, EncoderTrainables, EncoderTrainingSettings, StateMismatch,
                                    train_encoder, weights_mismatch)
from ...sefi_core.train_state import TrainState, TrainStateError, load_train_state, save_train_state
from ..checks import check_choices, validation_result
from ..folders import FACE_RECOGNIZER_FOLDER, PVA_ENCODER_FOLDER, identity_save_dir, train_state_path
from ..node_ui import TrainingProgress, loss_curve, schema, show_text_on_node
from ..output_files import OutputFiles
from ..training import CHECKPOINTING_MODES, checkpointing_input, train_on_clones
from .checks import check_encoder_fits, check_features_fit, check_inpainting_model
from .sockets import EncoderType, FaceRecognizerType
from .training import PVAFineTuner

log = logging.getLogger(__name__)
NODE = "PVA Train Encoder"
TRIGGER = "sks"  # the learned word S*; the fine-tune's identities keep the word the encoder learned
FACE_REGIONS = {"aligned face box": ALIGNED_FACE_BOX, "whole photo": WHOLE_PHOTO, "custom box": None}
STAGES = {"1: encoder, visual attention, word": 1, "2: also the face recognizer": 2}
COMBO_CHOICES = {"stage": tuple(STAGES), "face_region": tuple(FACE_REGIONS),
                 "gradient_checkpointing": CHECKPOINTING_MODES}


def dataset_path(folder: str) -> str:
    """An absolute folder, or one under ComfyUI's input folder."""
    folder = folder.strip()
    return folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)


def state_file(encoder_file: str) -> str:
    return train_state_path(f"pva_encoder-{encoder_file}")


def tuned_recognizer_file(encoder_file: str) -> str:
    return f"{os.path.splitext(encoder_file)[0]}_recognizer.safetensors"


class SampleReader:
    """draw(generator) -> EncoderSample: the dataset's next target photo as the inpainting model sees it (encoded by
    the host's VAE, its face masked as InpaintModelConditioning masks it) and its references, read from disk, or
    their features where a frozen source computed them beforehand (`features`: photo path -> (plain, mirrored))."""

    def __init__(self, dataset: FaceDataset, tuner: PVAFineTuner, vae, resolution: int, box, features=None,
                 masks: MaskBank | None = None):
        self.dataset, self.tuner, self.vae, self.resolution, self.box = dataset, tuner, vae, resolution, box
        self.features, self.masks = features, masks

    def __call__(self, generator: torch.Generator) -> EncoderSample:
        drawn = self.dataset.draw(generator)
        photo = read_drawn_photo(drawn.target, self.resolution)
        mask = read_mask(drawn.target.mask, self.resolution) if drawn.target.mask else box_mask(self.box,
                                                                                                self.resolution)
        if self.masks is not None:  # drawn only with a bank: runs without one draw as before
            mask = torch.maximum(mask, self.masks.draw(generator, self.resolution))
        target = self.tuner.samples([(photo, mask)], self.vae)[0]
        prompt = self.prompt(drawn.target, generator)
        if self.features is not None:
            rows = [self.features[p.path][int(p.mirrored)] for p in drawn.references]
            rows += [self.features[drawn.references[-1].path][int(not drawn.references[-1].mirrored)]] \
                if drawn.flip_last else []
            return EncoderSample(target, None, torch.stack(rows).to(self.tuner.device), prompt)
        references = torch.stack([read_drawn_photo(p, CROP_FROM) for p in drawn.references])
        if drawn.flip_last:
            references = torch.cat([references, references[-1:].flip(-1)])
        return EncoderSample(target, references.to(self.tuner.device), prompt=prompt)

    def prompt(self, photo: Photo, generator: torch.Generator) -> str | None:
        """The paper's prompt with the photo's caption after it, half the time where it has one; else None (the
        prompt alone). The coin is drawn only for captioned photos: runs without captions draw as before."""
        if photo.caption is None or not bool(torch.rand(1, generator=generator) < CAPTION_CHANCE):
            return None
        return f"{self.tuner.prompt}. {read_caption(photo.caption)}"


def feature_width(dataset: FaceDataset, source) -> int:
    """The width of a source's features, from the dataset's first photo: checked before all photos are read."""
    with torch.inference_mode(False), torch.no_grad():
        return source.features(read_photo(dataset.people[0][0].path, CROP_FROM)[None]).shape[-1]


def frozen_source_features(dataset: FaceDataset, source, node_id, batch: int = 16) -> dict:
    """photo path -> (its features, its mirror's), from a frozen source the host runs (CLIP vision), all computed
    before training: the host then never loads another model beside the training clones mid-run."""
    paths = [photo.path for person in dataset.people for photo in person]
    table = {}
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: the encoder trains on them
        for start in range(0, len(paths), batch):
            show_text_on_node(node_id, f"reading faces with {source.name}: {start}/{len(paths)} photos")
            comfy.model_management.throw_exception_if_processing_interrupted()
            photos = torch.stack([read_photo(path, CROP_FROM) for path in paths[start:start + batch]])
            features = source.features(torch.cat([photos, photos.flip(-1)])).cpu()
            for k, path in enumerate(paths[start:start + batch]):
                table[path] = (features[k], features[len(photos) + k])
    return table


class EncoderSaver:
    """A run's save (every `save_every` steps and at the end): its tuned recognizer (stage 2), then the encoder with
    the projections and word trained beside it, then the training state, each whole or not at all."""

    def __init__(self, path: str, settings: EncoderTrainingSettings, record: dict, recognizer_name: str,
                 source_name: str, outputs: OutputFiles, base: Base):
        self.path, self.file, self.settings, self.record = path, os.path.basename(path), settings, record
        self.recognizer_name, self.source_name, self.outputs, self.base = recognizer_name, source_name, outputs, base

    def __call__(self, trainables: EncoderTrainables, state: TrainState) -> None:
        projections, word = trainables.identity.frozen_copy()
        if self.settings.stage == 2:  # first, so that the encoder never names a recognizer file not yet written
            save_atomically({k: v.float() for k, v in trainables.recognizer.state_dict().items()},
                            {"pva.tuned_from": self.source_name},
                            os.path.join(identity_save_dir(FACE_RECOGNIZER_FOLDER), tuned_recognizer_file(self.file)))
        save_encoder(trainables.encoder, self.path, self.recognizer_name, {**self.record, "steps": state.steps_done},
                     projections, word, self.base)
        state.photos = self.record["dataset_digest"]
        save_train_state(state, state_file(self.file))
        self.outputs.wrote(self.path)


class EncoderRun:
    """train_on_clones' train(draw): the encoder training from its start, or from its saved state, on copies of the
    loaders' networks (the host caches its outputs); (what was trained, the result)."""

    def __init__(self, training: "EncoderTraining", on_step, save: EncoderSaver):
        self.training, self.on_step, self.save = training, on_step, save

    def __call__(self, draw: SampleReader):
        training = self.training
        training.tuner.start_identity()  # afresh: an out-of-memory retry starts again
        trainables = EncoderTrainables(copy.deepcopy(training.network), copy.deepcopy(training.source.network),
                                       training.tuner.identity, training.settings.stage)
        training.trainables = trainables
        try:
            result = train_encoder(training.settings, trainables, draw, training.tuner.denoise, self.on_step,
                                   lambda state: self.save(trainables, state), training.save_every, training.saved,
                                   training.tuner.dtype, training.world)
        except StateMismatch as error:
            raise TrainStateError(f"{os.path.basename(state_file(self.save.file))}: {error}. Connect the encoder, "
                                  "recognizer and model the run started with, or delete its files to start anew.") \
                from None
        return trainables, result


class EncoderTraining:
    """One encoder training, as PVA Train Encoder and the command for several processes (train_encoder_command.py)
    both run it: everything checked and the dataset read on construction, before any training; call it to train.
    On several processes (`world`) every rank builds the same run and rank 0 alone writes its files."""

    def __init__(self, model, clip, vae, face_recognizer, path: str, requested: EncoderTrainingSettings, resume: bool,
                 dataset_folder: str, box, save_every: int, pva_encoder=None, checkpointing: str = "auto",
                 random_masks_folder: str = "", node_id=None, world: World = World()):
        self.base = check_inpainting_model(model, clip, NODE)
        self.settings, self.saved = run_settings(path, resume, requested)
        world.share(self.settings.samples_per_step)  # refused now, before anything is read, where it does not split
        check_sources(self.settings, self.saved, face_recognizer, pva_encoder, model)
        check_outputs(path, self.settings, self.saved, face_recognizer)
        self.dataset = open_dataset(dataset_folder)
        self.masks = MaskBank(dataset_path(random_masks_folder)) if (random_masks_folder or "").strip() else None
        self.path, self.vae, self.box, self.save_every, self.world = path, vae, box, save_every, world
        # An out-of-memory retry ('auto') starts one rank again while the others wait in a step: on several
        # processes 'auto' is 'off', and running out of memory says to switch checkpointing on.
        self.checkpointing = "off" if checkpointing == "auto" and world.size > 1 else checkpointing
        self.source = face_recognizer
        announce(node_id, self.dataset, self.saved, self.settings, os.path.basename(path))
        self.network, self.features = encoder_and_features(model, self.settings.seed, face_recognizer, pva_encoder,
                                                           self.dataset, self.saved, os.path.basename(path), node_id)
        self.record = {**run_record(self.settings, self.dataset, self.masks), "world_size": world.size}
        self.recognizer_name = (f"iresnet {face_recognizer.network.depth} ({tuned_recognizer_file(os.path.basename(path))})"
                                if self.settings.stage == 2 else face_recognizer.name)
        self.tuner = PVAFineTuner(model, clip, TRIGGER,
                                  torch.zeros(self.network.queries.shape[0], self.network.project.out_features),
                                  NODE, checkpointing == "on", pva_encoder)
        self.trainables = None  # what is being trained, once training started

    def reader(self, dataset: FaceDataset, features=None) -> SampleReader:
        return SampleReader(dataset, self.tuner, self.vae, self.settings.resolution, self.box,
                            self.features if features is None else features, self.masks)

    def __call__(self, on_step, outputs: OutputFiles):
        """Train; (the encoder as saved last, the run's result). on_step(step, losses) after every step."""
        saver = EncoderSaver(self.path, self.settings, self.record, self.recognizer_name, self.source.name, outputs,
                             self.base)
        run = EncoderRun(self, on_step, saver)
        trainables, result = train_on_clones(self.tuner, self.checkpointing, self.settings.resolution,
                                             lambda: self.reader(self.dataset), run)
        if self.world.writes:
            log.info("%s: saved encoder %s after %d steps (loss %.4f)", NODE, self.path, self.settings.steps,
                     result.losses[-1])
        projections, word = trainables.identity.frozen_copy()
        encoder = PVAEncoder(trainables.encoder.to("cpu").eval(), self.recognizer_name, as_stored(projections), word,
                             {**self.record, "steps": self.settings.steps}, file=os.path.basename(self.path),
                             base=self.base)
        return encoder, result


class PVATrainEncoder(io.ComfyNode):
    outputs = OutputFiles(PVA_ENCODER_FOLDER, "PVA encoder")

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVATrainEncoder",
            display_name="PVA Train Encoder",
            search_aliases=["identity encoder", "train encoder", "face encoder"],
            category="PVA",
            description="Trains PVA's identity encoder on a dataset of many people (the paper: 1,963 people, 50k steps "
                        "per stage on a large GPU), with the visual attention and the learned word beside it. Saves "
                        "to models/pva_encoders as it goes; resumable. No pretrained encoder exists publicly.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SD2 inpainting model the encoder will serve."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE; encodes the photos."),
                FaceRecognizerType.Input("face_recognizer", tooltip="From PVA Load Face Recognizer (ArcFace r50 is "
                                                                    "the paper's; stage 2 tunes a copy of it), or "
                                                                    "PVA Face Features from CLIP Vision (stage 1 only)."),
                io.String.Input("dataset_folder", default="pva_dataset",
                                tooltip="A folder (under ComfyUI's input folder, or a full path) with one sub-folder "
                                        "per person, 2 or more aligned face photos each. Optional beside a photo: "
                                        "a face mask photo.mask.png for photo.jpg, white on the face, and a caption "
                                        "photo.txt (half the samples are prompted with it, as in the paper). Or the "
                                        "paper's CelebAHQ-IDI as its authors publish it (the folder holding image/ "
                                        "and annotation/): its train identities, face regions, captions and random "
                                        "masks (leave random_masks_folder empty)."),
                io.String.Input("name", default="my_pva_encoder",
                                tooltip="File name in models/pva_encoders (letters, digits, - and _)."),
                io.Combo.Input("stage", options=list(STAGES), default=next(iter(STAGES)),
                               tooltip="1: train from scratch (or from a connected encoder). 2: the paper's second "
                                       "stage, from a stage-1 encoder (connect it), also tuning the face recognizer."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimiser steps in all (a resumed run goes on to this many). The paper runs up "
                                     "to 50,000 per stage."),
                io.Int.Input("batch_size", default=2, min=1, max=64,
                             tooltip="Samples per accumulation step; the paper uses 2."),
                io.Int.Input("accumulation", default=4, min=1, max=64,
                             tooltip="Accumulation steps per optimiser step; the paper uses 4 (8 samples a step)."),
                io.Int.Input("timesteps_per_sample", default=4, min=1, max=16,
                             tooltip="Stratified noise levels per sample, one UNet batch; the paper uses 4."),
                io.Float.Input("encoder_learning_rate", default=3.2e-5, min=1e-7, max=1e-2, step=1e-7,
                               tooltip="AdamW learning rate of the encoder; the paper's 3.2e-5."),
                io.Float.Input("projection_learning_rate", default=8e-6, min=1e-8, max=1e-2, step=1e-8,
                               tooltip="Of the visual projections; the paper's 1e-6 x the samples per step (8e-6)."),
                io.Float.Input("word_learning_rate", default=1e-3, min=0.0, max=0.1, step=1e-5,
                               tooltip="Of the learned word; the paper's 1e-3. 0 keeps the trigger's embedding."),
                io.Float.Input("recognizer_learning_rate", default=8e-6, min=1e-8, max=1e-2, step=1e-8,
                               tooltip="Stage 2 only: of the face recognizer (the visual projections' rate, as the "
                                       "authors' optimiser gives it)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seed for the samples drawn, the timesteps, the noise and the encoder's start."),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=64,
                             tooltip="Training resolution in pixels; SD1.5 and SD2 inpainting are made for 512."),
                io.Combo.Input("face_region", options=list(FACE_REGIONS), default="aligned face box",
                               tooltip="What is masked out and inpainted where a photo has no mask file: the aligned "
                                       "face box (the recognizer's crop of an aligned face), the whole photo, or the "
                                       "box in custom_box."),
                io.String.Input("custom_box", default="0.125, 0.137, 0.859, 0.871",
                                tooltip="With face_region 'custom box': left, top, right, bottom as fractions of the "
                                        "photo's centre square (the default is the aligned face box)."),
                io.Int.Input("save_every", default=500, min=1, max=100_000,
                             tooltip="Save the encoder and its training state every this many steps (and at the "
                                     "end). A cancelled run keeps its last save."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="On: go on from this name's last save, with its settings, to 'steps'. Off: a "
                                         "new run; an existing name is an error (delete it, or choose another)."),
                EncoderType.Input("pva_encoder", optional=True,
                                  tooltip="Optional: start from this encoder (from PVA Load Encoder); stage 2 needs "
                                          "the stage-1 encoder here."),
                checkpointing_input(),
                io.String.Input("random_masks_folder", default="", optional=True,
                                tooltip="Optional: a folder (under ComfyUI's input folder, or a full path) of random "
                                        "mask images, white = inpaint. Each sample's face region is joined with one, "
                                        "as the authors train, so that the encoder serves masks of any shape. Empty: "
                                        "the face region alone."),
            ],
            outputs=[EncoderType.Output(display_name="pva_encoder", tooltip="The trained encoder, for PVA Fine-tune "
                                                                            "Identity."),
                     io.Image.Output(display_name="loss_curve", tooltip="The training loss over the steps.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, stage=None, face_region=None, gradient_checkpointing=None):
        return validation_result(check_choices, COMBO_CHOICES, stage=stage, face_region=face_region,
                                 gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def fingerprint_inputs(cls, name, **kwargs):
        """The file it writes: trained again once deleted."""
        return cls.outputs.fingerprint(name)

    @classmethod
    def execute(cls, model, clip, vae, face_recognizer, dataset_folder, name, stage, steps, batch_size, accumulation,
                timesteps_per_sample, encoder_learning_rate, projection_learning_rate, word_learning_rate,
                recognizer_learning_rate, seed, resolution, face_region, custom_box, save_every, resume,
                pva_encoder=None, gradient_checkpointing="auto", random_masks_folder="") -> io.NodeOutput:
        check_choices(COMBO_CHOICES, stage=stage, face_region=face_region,
                      gradient_checkpointing=gradient_checkpointing)
        requested = EncoderTrainingSettings(
            stage=STAGES[stage], steps=steps, batch_size=batch_size, accumulation=accumulation,
            timesteps=timesteps_per_sample, encoder_learning_rate=encoder_learning_rate,
            projection_learning_rate=projection_learning_rate, word_learning_rate=word_learning_rate,
            recognizer_learning_rate=recognizer_learning_rate, seed=seed, resolution=resolution)
        node_id = cls.hidden.unique_id if cls.hidden else None
        run = EncoderTraining(model, clip, vae, face_recognizer, cls.outputs.path(name), requested, resume,
                              dataset_path(dataset_folder), FACE_REGIONS[face_region] or parse_box(custom_box),
                              save_every, pva_encoder, gradient_checkpointing, random_masks_folder, node_id)
        encoder, result = run(TrainingProgress(run.settings.steps, node_id, NODE), cls.outputs)
        curve = loss_curve(result.losses, encoder.settings["steps"], "PVA encoder training loss")
        return io.NodeOutput(encoder, curve, ui=ui.PreviewImage(curve, cls=cls))


def run_settings(path: str, resume: bool, settings: EncoderTrainingSettings):
    """(the run's settings, the training state it goes on from): a saved run's own settings to `settings.steps`,
    or the node's for a new run (None); refusals where neither fits."""
    file = os.path.basename(path)
    state_path = state_file(file)
    if resume and os.path.exists(state_path):
        state = load_train_state(state_path, f"Delete it (and models/pva_encoders/{file}) to start {file} anew.")
        if state.settings.get("stage") is None or "encoder_learning_rate" not in state.settings:
            raise TrainStateError(f"{os.path.basename(state_path)} is not an encoder training's state. Delete it "
                                  "to start anew.")
        if settings.steps <= state.steps_done:
            raise ValueError(f"{file} is already trained for {state.steps_done} steps; set 'steps' above that to "
                             f"go on (e.g. {state.steps_done + 1000}).")
        return EncoderTrainingSettings(**{**state.settings, "steps": settings.steps}), state
    if os.path.exists(path):
        advice = ("switch 'resume' on to go on training it, or" if os.path.exists(state_path) else
                  "it has no training state to resume from:")
        raise ValueError(f"A PVA encoder named {file!r} already exists; {advice} choose another name (or delete "
                         "it to start anew).")
    return settings, None

def announce(node_id, dataset: FaceDataset, saved, settings: EncoderTrainingSettings, file: str) -> None:
    text = (f"{len(dataset.people)} people, {dataset.photo_count} photos"
            + (f" ({len(dataset.too_few)} folders with one photo left out)" if dataset.too_few else "")
            + (f"; resuming {file} at step {saved.steps_done} of {settings.steps} with its settings"
               if saved is not None else f"; stage {settings.stage}, {settings.steps} steps"))
    if saved is not None and saved.photos and saved.photos != dataset.digest():
        text += ". The dataset changed since: the run will not end where one long run ends"
    show_text_on_node(node_id, text + ".")
    log.info("%s: %s", NODE, text)


def run_record(settings: EncoderTrainingSettings, dataset: FaceDataset, masks: MaskBank | None) -> dict:
    """What the encoder's file records of its run: the settings and the dataset it learned from."""
    return {**settings.as_metadata(), "dataset": os.path.basename(os.path.normpath(dataset.root)),
            "people": len(dataset.people), "photos": dataset.photo_count, "dataset_digest": dataset.digest(),
            "random_masks": len(masks.paths) if masks else 0}


def check_sources(settings: EncoderTrainingSettings, saved, source, pva_encoder, model) -> None:
    """Stage 2 goes on from a stage-1 encoder and tunes an ArcFace recognizer; a connected encoder fits the model."""
    if saved is None and settings.stage == 2 and pva_encoder is None:
        raise ValueError("Stage 2 goes on from a stage-1 encoder: connect PVA Load Encoder with it to "
                         "'pva_encoder' (and the face recognizer stage 1 used), or pick stage 1.")
    if settings.stage == 2 and source.network is None:  # a frozen source (CLIP vision): its features precomputed
        raise ValueError(f"Stage 2 tunes the face recognizer; {source.name} stays frozen. Connect PVA "
                         "Load Face Recognizer (ArcFace), or pick stage 1.")
    if pva_encoder is not None:
        check_encoder_fits(pva_encoder, model)


def check_outputs(path: str, settings: EncoderTrainingSettings, saved, source) -> None:
    """No file a run reads is written by it, and a new run writes over nothing: stage 2's tuned recognizer is never
    the recognizer it tunes, nor one an earlier run left."""
    if settings.stage != 2:
        return
    file, tuned = os.path.basename(path), tuned_recognizer_file(os.path.basename(path))
    if source.file == tuned:
        raise ValueError(f"Stage 2 of {file} saves its tuned recognizer as {tuned}, and that is the recognizer it "
                         "reads: its first save would replace it. Connect the recognizer stage 2 starts from (the one "
                         "stage 1 used), or choose another name.")
    if saved is None and os.path.exists(os.path.join(identity_save_dir(FACE_RECOGNIZER_FOLDER), tuned)):
        raise ValueError(f"models/face_recognizers already holds {tuned}, the tuned recognizer of an earlier stage-2 "
                         f"run named {os.path.splitext(file)[0]}; this new run would replace it. Choose another name, or "
                         "delete that file first.")


def check_resumable(saved, network: IdentityEncoder, file: str) -> None:
    """A resumed run's encoder is the one it was started with (its sizes): the state's weights must load into it."""
    if saved is None:
        return
    expected = {f"encoder.{name}": p for name, p in network.named_parameters()}
    problem = weights_mismatch(expected, {k: v for k, v in saved.weights.items() if k.startswith("encoder.")})
    if problem:
        raise TrainStateError(f"{os.path.basename(state_file(file))} was trained with another encoder than the one "
                              f"given now ({problem}). Connect the encoder the run started from to 'pva_encoder' (none, "
                              f"if it started from scratch), or delete models/pva_encoders/{file} and its state to "
                              "start anew.")


def encoder_and_features(model, seed: int, source, pva_encoder, dataset: FaceDataset, saved, file: str, node_id):
    """The encoder to train (the connected one, or a new one of the source's feature width) and, for a frozen source
    (CLIP vision), every photo's features; widths that do not fit are refused before the dataset is read."""
    width = FEATURE_DIM if source.network is not None else feature_width(dataset, source)
    network = pva_encoder.network if pva_encoder is not None else new_encoder(model, seed, width)
    check_features_fit(network, width, source.name)
    queries = saved.weights.get("encoder.queries") if saved is not None else None
    if queries is not None and queries.shape[-1] != width:
        raise ValueError(f"{file} was trained on {queries.shape[-1]}-d face features; {source.name} gives {width}-d "
                         "ones. To go on, connect the face recognizer (or CLIP vision) it was trained with.")
    check_resumable(saved, network, file)
    return network, None if source.network is not None else frozen_source_features(dataset, source, node_id)


def new_encoder(model, seed: int, feature_dim: int = FEATURE_DIM) -> IdentityEncoder:
    """A freshly initialised encoder for the model's context width and the source's feature width, from the run's seed
    (the process's generator untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IdentityEncoder(model.model.model_config.unet_config.get("context_dim"), feature_dim=feature_dim)
