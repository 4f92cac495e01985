"""PVA's encoder training as a command, for the runs that outgrow one GPU: the run PVA Train Encoder makes
(train_encoder.py: EncoderTraining, with its settings, files and training state), data-parallel over every process
torchrun starts (one per GPU, on one or several machines; sefi_core/pva/distributed.py). The models load through
ComfyUI's own loaders from its models folders. A run started here resumes in the node, and the other way round.

Rank 0 alone writes: the encoder, its training state, stage 2's tuned recognizer (each whole or not at all), and a
CSV log of the losses beside the state; it also prints the progress. Every `--validation-every` steps all ranks
compute the loss on held-out people. A rank that fails ends its process with the error; torchrun then stops the
others and names the rank and its cause; the last save is whole and `--resume` goes on from it (at any world size).

Started by pva_command.py at the pack's top (`train-encoder`), which prepares the host first (see there and the README).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import time

import nodes as host_nodes

from ...sefi_core.plot import smoothed, smoothing_span
from ...sefi_core.pva.celebahq_idi import celebahq_idi_root
from ...sefi_core.pva.dataset import DatasetError, FaceDataset, open_dataset
from ...sefi_core.pva.distributed import World
from ...sefi_core.pva.train import EncoderTrainingSettings, validation_loss
from ..training import CHECKPOINTING_MODES
from .face_features import ClipVisionFeatures, PVALoadFaceRecognizer, clip_vision_name
from .loaders import PVALoadEncoder
from .train_encoder import (FACE_REGIONS, STAGES, EncoderTraining, PVATrainEncoder, dataset_path, frozen_source_features,
                            parse_box, state_file)

log = logging.getLogger("pva_train_encoder")
COMMAND = "pva_command.py train-encoder"
CSV_COLUMNS = ("step", "loss", "validation_loss", "samples_per_second", "elapsed_seconds", "world_size")
DEFAULTS = EncoderTrainingSettings()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Train PVA's identity encoder on many people, on every GPU torchrun starts. Files "
                                  "are read from and written to ComfyUI's models folders, as PVA Train Encoder does.")
    add = parser.add_argument
    add("--checkpoint", required=True,
        help="The SD1.5 or SD2 inpainting checkpoint, by its name in models/checkpoints.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recognizer", help="The ArcFace recognizer, by its name in models/face_recognizers "
                                             "(the paper's: ms1mv3_arcface_r50.pth).")
    source.add_argument("--clip-vision", help="Or a CLIP vision model in models/clip_vision (stage 1 only).")
    add("--dataset", required=True, help="The dataset folder (a full path, or one under ComfyUI's input folder): one "
                                         "sub-folder per person, or CelebAHQ-IDI as downloaded (its train split), "
                                         "as PVA Train Encoder reads them.")
    add("--name", required=True, help="The encoder's file name in models/pva_encoders (letters, digits, - and _).")
    add("--stage", type=int, choices=sorted(STAGES.values()), default=1,
        help="1: encoder, visual attention, word. 2: also the face recognizer (give --encoder: the stage-1 one).")
    add("--steps", type=int, default=DEFAULTS.steps, help="Optimiser steps in all (the paper: up to 50,000 a stage).")
    add("--batch-size", type=int, default=DEFAULTS.batch_size,
        help="Samples per accumulation step, over all processes (the paper: 2).")
    add("--accumulation", type=int, default=DEFAULTS.accumulation,
        help="Accumulation steps per optimiser step (the paper: 4). batch size x accumulation samples make a step, "
             "shared out over the processes: it must be a multiple of their number.")
    add("--timesteps", type=int, default=DEFAULTS.timesteps, help="Noise levels per sample (the paper: 4).")
    add("--encoder-learning-rate", type=float, default=DEFAULTS.encoder_learning_rate)
    add("--projection-learning-rate", type=float, default=DEFAULTS.projection_learning_rate)
    add("--word-learning-rate", type=float, default=DEFAULTS.word_learning_rate)
    add("--recognizer-learning-rate", type=float, default=DEFAULTS.recognizer_learning_rate)
    add("--seed", type=int, default=DEFAULTS.seed)
    add("--resolution", type=int, default=DEFAULTS.resolution)
    add("--face-region", choices=list(FACE_REGIONS), default="aligned face box",
        help="What is inpainted where a photo has no mask file.")
    add("--custom-box", default="0.125, 0.137, 0.859, 0.871", help="With --face-region 'custom box'.")
    add("--random-masks", default="", help="A folder of random masks joined to each sample's face region.")
    add("--encoder", help="Start from this encoder in models/pva_encoders (stage 2: the stage-1 one).")
    add("--save-every", type=int, default=500, help="Save the encoder and its state every this many steps.")
    add("--new", action="store_true", help="A new run: without it, an existing run of --name goes on from its save.")
    add("--gradient-checkpointing", choices=CHECKPOINTING_MODES, default="auto",
        help="on: recompute activations in backward (less memory, about 1.4x the time). auto: off, switched on after "
             "running out of memory on one process; on several, out of memory stops the run (restart with on).")
    add("--validation-dataset", default="", help="A folder of held-out people (none of the dataset's), for the "
                                                 "validation loss; CelebAHQ-IDI's val split is used by itself.")
    add("--validation-every", type=int, default=500, help="Steps between validation losses (and at the end).")
    add("--validation-samples", type=int, default=64, help="Held-out samples per validation (a multiple of the "
                                                            "number of processes).")
    add("--log-every", type=int, default=10, help="Steps between progress lines.")
    add("--extra-model-paths-config", action="append", default=[],
        help="A YAML of model folders, as ComfyUI's option of that name (its extra_model_paths.yaml is read anyway).")
    return parser


def settings_from(args) -> EncoderTrainingSettings:
    return EncoderTrainingSettings(
        stage=args.stage, steps=args.steps, batch_size=args.batch_size, accumulation=args.accumulation,
        timesteps=args.timesteps, encoder_learning_rate=args.encoder_learning_rate,
        projection_learning_rate=args.projection_learning_rate, word_learning_rate=args.word_learning_rate,
        recognizer_learning_rate=args.recognizer_learning_rate, seed=args.seed, resolution=args.resolution)


def feature_source(args):
    """The face recognizer or CLIP vision model, through the pack's and the host's own loaders."""
    if args.recognizer:
        return PVALoadFaceRecognizer.execute(recognizer_file=args.recognizer).result[0]
    clip_vision = host_nodes.CLIPVisionLoader().load_clip(args.clip_vision)[0]
    return ClipVisionFeatures(clip_vision, clip_vision_name(clip_vision))


class LossLog:
    """The CSV log beside the training state, one row per step, written by rank 0 as the run goes: a resumed run
    keeps the rows up to its save and goes on after them (rows of steps lost with a crash are dropped)."""

    def __init__(self, path: str, kept_steps: int):
        self.path = path
        rows = []
        if kept_steps and os.path.exists(path):
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if row.get("step", "").isdigit()
                        and int(row["step"]) <= kept_steps]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def add(self, **row) -> None:
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, CSV_COLUMNS).writerow(row)


class CommandProgress:
    """on_step for every rank: the validation loss every `validation_every` steps (all ranks compute it), and on
    rank 0 the CSV row and, every `log_every` steps, a progress line with samples/s and the time left."""

    def __init__(self, training: EncoderTraining, args, validation: tuple | None):
        self.training, self.args, self.validation = training, args, validation
        self.world, self.settings = training.world, training.settings
        first = training.saved.steps_done if training.saved is not None else 0
        self.log = LossLog(os.path.splitext(state_file(os.path.basename(training.path)))[0] + ".csv", first) \
            if self.world.writes else None
        self.started, self.first = time.monotonic(), first
        self.last_time, self.last_step = self.started, first
        self.span = smoothing_span(self.settings.steps)

    def __call__(self, step: int, losses: list[float]) -> None:
        done = step + 1
        now = time.monotonic()
        rate = self.settings.samples_per_step / max(now - self.last_time, 1e-9) * (done - self.last_step)
        self.last_time, self.last_step = now, done
        validation = self.validate(done)
        if not self.world.writes:
            return
        self.log.add(step=done, loss=f"{losses[-1]:.6g}", validation_loss="" if validation is None else
                     f"{validation:.6g}", samples_per_second=f"{rate:.4g}", elapsed_seconds=f"{now - self.started:.1f}",
                     world_size=self.world.size)
        if done % self.args.log_every == 0 or done == self.settings.steps or validation is not None:
            smooth = smoothed(losses[-10 * self.span:], self.span)[-1]
            average = (done - self.first) * self.settings.samples_per_step / max(now - self.started, 1e-9)
            left = (self.settings.steps - done) * self.settings.samples_per_step / max(average, 1e-9)
            log.info("step %d/%d: loss %.4f (smoothed)%s | %.2f samples/s on %d processes | %s left", done,
                     self.settings.steps, smooth, "" if validation is None else f", validation loss {validation:.4f}",
                     average, self.world.size, datetime.timedelta(seconds=round(left)))

    def validate(self, done: int) -> float | None:
        if self.validation is None or not (done % self.args.validation_every == 0 or done == self.settings.steps):
            return None
        reader, seed = self.validation
        training = self.training
        return validation_loss(training.trainables, reader, training.tuner.denoise, self.settings.timesteps,
                               self.args.validation_samples, seed, self.world)


def held_out_people(training: EncoderTraining, args):
    """The validation's people: --validation-dataset (a folder of people, or CelebAHQ-IDI's val split), else the
    training dataset's own val split where it has one (CelebAHQ-IDI); None without either."""
    own_split = getattr(training.dataset, "split", None) is not None
    if not args.validation_dataset.strip():
        return open_dataset(training.dataset.root, "val") if own_split else None
    folder = dataset_path(args.validation_dataset)
    if celebahq_idi_root(folder) is not None:
        return open_dataset(folder, "val")
    if os.path.realpath(folder) == os.path.realpath(training.dataset.root):
        raise DatasetError(f"--validation-dataset is the training dataset ({folder}): validation needs people the "
                           "encoder does not train on. Move some people's folders into another folder and give it.")
    return FaceDataset(folder)


def validation_reader(training: EncoderTraining, args):
    """The validation samples' reader (held-out people, read as the training reads its own) and their seed; None
    without held-out people. Checked before any training."""
    held_out = held_out_people(training, args)
    if held_out is None:
        return None
    shared = sorted(set(held_out.names) & set(training.dataset.names))
    if shared:
        raise DatasetError(f"--validation-dataset holds people the training dataset holds too ({', '.join(shared[:3])}"
                           f"{' ...' if len(shared) > 3 else ''}): validation needs held-out people.")
    training.world.share(args.validation_samples)
    features = None if training.features is None else frozen_source_features(held_out, training.source, None)
    return training.reader(held_out, features), training.settings.seed + 1  # other draws than the training's


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    world = World.of_process_group()
    model, clip, vae = host_nodes.CheckpointLoaderSimple().load_checkpoint(args.checkpoint)
    encoder = PVALoadEncoder.execute(encoder_file=args.encoder).result[0] if args.encoder else None
    training = EncoderTraining(model, clip, vae, feature_source(args), PVATrainEncoder.outputs.path(args.name),
                               settings_from(args), not args.new, dataset_path(args.dataset),
                               FACE_REGIONS[args.face_region] or parse_box(args.custom_box), args.save_every, encoder,
                               args.gradient_checkpointing, args.random_masks, None, world)
    progress = CommandProgress(training, args, validation_reader(training, args))
    if world.writes:
        log.info("training %s: stage %d, steps %d to %d, %d samples a step on %d processes", args.name,
                 training.settings.stage, progress.first, training.settings.steps,
                 training.settings.samples_per_step, world.size)
    _, result = training(progress, PVATrainEncoder.outputs)
    if world.writes:
        log.info("saved %s (loss %.4f); %d bytes summed across processes per step", training.path, result.losses[-1],
                 result.bytes_summed)
