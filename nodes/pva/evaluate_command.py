"""PVA's evaluation as the paper makes it (its "ID" column), as a command: for each test person of CelebAHQ-IDI,
fine-tune a PVA identity on their reference photos (PVA Fine-tune Identity's run, the paper's settings, nothing saved),
repaint each of their inference photos in each face region with ComfyUI's own inpainting (PVA Apply's MODEL and CLIP,
InpaintModelConditioning, the KSampler, the VAE), and score each repainted photo against the photo itself with a face
recognizer (sefi_core/pva/metric.py). It prints the paper's table row (mean ± std per region, the mean of the region
means) and writes every score to a CSV.

Started by pva_command.py at the pack's top (`evaluate`), which prepares the host first.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os

import torch

import folder_paths
import nodes as host_nodes

from ...sefi_core.pva.dataset import open_dataset, read_photo
from ...sefi_core.pva.metric import identity_similarity, metric_input, summarize
from ...sefi_core.pva.train import PROMPT, FineTuneSettings
from .apply import PVAApply
from .checks import check_inpainting_model
from .face_features import PVALoadFaceRecognizer
from .fine_tune import PVAFineTuneIdentity
from .loaders import PVALoadEncoder
from .train_encoder import dataset_path

log = logging.getLogger("pva_evaluate")
NODE = "PVA evaluation"
TRIGGER = "sks"
DEFAULTS = FineTuneSettings()
CSV_COLUMNS = ("person", "photo", "region", "identity_similarity")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pva_command.py evaluate",
        description="Measure PVA's identity similarity on a dataset's test people, as the paper does.")
    add = parser.add_argument
    add("--checkpoint", required=True,
        help="The SD1.5 or SD2 inpainting checkpoint, by its name in models/checkpoints.")
    add("--recognizer", required=True, help="The face recognizer PVA reads photos with (models/face_recognizers).")
    add("--encoder", required=True, help="The trained PVA encoder (models/pva_encoders).")
    add("--metric-recognizer", default="",
        help="The recognizer that scores (models/face_recognizers); the paper's is glint360k CosFace r100. Default: "
             "--recognizer (then not comparable with the paper's figures).")
    add("--dataset", required=True, help="CelebAHQ-IDI as downloaded (the folder holding image/ and annotation/).")
    add("--split", default="test", choices=("test", "val"), help="Whose photos: the paper reports the test split.")
    add("--people", type=int, default=0, help="Only the first this many people of the split (0: all).")
    add("--fine-tune-steps", type=int, default=DEFAULTS.steps, help="The paper: 40.")
    add("--resolution", type=int, default=DEFAULTS.resolution)
    add("--steps", type=int, default=50, help="Sampling steps per repainted photo.")
    add("--cfg", type=float, default=7.5)
    add("--sampler", default="ddim", help="A ComfyUI sampler name.")
    add("--scheduler", default="ddim_uniform", help="A ComfyUI scheduler name.")
    add("--seed", type=int, default=0)
    add("--output", default="pva_evaluation.csv", help="The CSV of every score, in ComfyUI's output folder (or a "
                                                       "full path).")
    add("--extra-model-paths-config", action="append", default=[],
        help="A YAML of model folders, as ComfyUI's option of that name (its extra_model_paths.yaml is read anyway).")
    return parser


def prompts(clip) -> tuple:
    """The paper's prompt and an empty negative, encoded once per person (their CLIP carries their word)."""
    encode = host_nodes.CLIPTextEncode().encode
    return encode(clip, PROMPT.format(TRIGGER))[0], encode(clip, "")[0]


def repaint(model, conditioning: tuple, vae, photo: torch.Tensor, mask: torch.Tensor, args) -> torch.Tensor:
    """(3, S, S) photo in [0, 1] with its face region (S, S) repainted by the host's inpainting, as a workflow does:
    InpaintModelConditioning, then the KSampler, then VAE Decode."""
    positive, negative = conditioning
    positive, negative, latent = host_nodes.InpaintModelConditioning().encode(
        positive, negative, photo.permute(1, 2, 0)[None], vae, mask[None])
    samples = host_nodes.common_ksampler(model, args.seed, args.steps, args.cfg, args.sampler, args.scheduler,
                                         positive, negative, latent)[0]
    return vae.decode(samples["samples"])[0].permute(2, 0, 1).float().clamp(0, 1)


def person_identity(person, model, clip, vae, recognizer, encoder, args):
    """A PVA identity fine-tuned on the person's reference photos with the paper's settings (nothing saved)."""
    settings = FineTuneSettings(steps=args.fine_tune_steps, resolution=args.resolution, seed=args.seed)
    photos = [read_photo(photo.path, args.resolution).permute(1, 2, 0) for photo in person.references]
    identity, _ = PVAFineTuneIdentity.identity_from(photos, None, False, model, clip, vae, recognizer, encoder, TRIGGER,
                                                    settings, lambda step, losses: None)
    return identity


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    model, clip, vae = host_nodes.CheckpointLoaderSimple().load_checkpoint(args.checkpoint)
    check_inpainting_model(model, clip, NODE)
    recognizer = PVALoadFaceRecognizer.execute(recognizer_file=args.recognizer).result[0]
    scorer = PVALoadFaceRecognizer.execute(recognizer_file=args.metric_recognizer or args.recognizer).result[0]
    encoder = PVALoadEncoder.execute(encoder_file=args.encoder).result[0]
    dataset = open_dataset(dataset_path(args.dataset), args.split)
    if not hasattr(dataset, "identities"):
        raise ValueError(f"{args.dataset} is a folder of people: the evaluation needs CelebAHQ-IDI's split of "
                         "reference and inference photos (annotation/idi-5.json).")
    people = dataset.identities()[:args.people or None]
    output = args.output if os.path.isabs(args.output) else os.path.join(folder_paths.get_output_directory(),
                                                                          args.output)
    scores, rows = {}, []
    for number, person in enumerate(people, 1):
        identity = person_identity(person, model, clip, vae, recognizer, encoder, args)
        with torch.inference_mode():
            applied_model, applied_clip = PVAApply.execute(model, clip, identity, 1.0, 0.0, 1.0, True).result
            conditioning = prompts(applied_clip)
            for photo in person.inferences:
                picture = read_photo(photo.path, args.resolution)
                for region, mask in dataset.region_masks(photo).items():
                    repainted = repaint(applied_model, conditioning, vae, picture, mask.read(args.resolution), args)
                    score = float(identity_similarity(scorer.network, metric_input(repainted[None]),
                                                      metric_input(picture[None]))[0])
                    scores.setdefault(region, []).append(score)
                    rows.append({"person": person.name, "photo": os.path.basename(photo.path), "region": region,
                                 "identity_similarity": f"{score:.6f}"})
        log.info("person %d/%d (%s): %d photos repainted", number, len(people), person.name, len(person.inferences))
    report = summarize(scores)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.DictWriter(file, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"identity similarity of {len(people)} people ({scorer.name} scoring):")
    for line in report.lines():
        print("  " + line)
    print(f"every score: {output}")
