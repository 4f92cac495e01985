"""Benchmark, PVA's encoder training on several processes (pva_command.py train-encoder under torchrun), measured in one run:
- the bytes each process sends into the gradients' all-reduce per step (the trainables' gradients and the loss, fp32:
  the encoder, every layer's visual projections, the word; never the frozen UNet);
- the step time of 2 processes over 1 at equal work per process (one sample each a step), from the runs' own CSV logs,
  the first step (loading, warm-up) left out: what the all-reduce and sharing the machine cost.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_distributed.py [--preset sd15_inpaint_size] [--size 64]

On a CPU the processes run gloo with one thread each (on a 2-core machine: one core each); on a machine with 2 GPUs,
NCCL. Builds a random-weight checkpoint of the preset (SD1.5-inpainting dimensions by default), a random ArcFace r50
and a small folder of people; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15_inpaint_size", help="checkpoint preset (SD1.5-inpainting dimensions)")
    parser.add_argument("--size", type=int, default=64, help="training resolution in pixels")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is left out)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sefi-bench-distributed-") as work:
        config = prepare(Path(work), args.preset)
        runs = {n: run(Path(work), config, n, args) for n in (1, 2)}
    step = {n: statistics.median(times) for n, (times, _) in runs.items()}
    sent = runs[2][1]
    ratio = step[2] / step[1]
    device = results.device_name()
    print(f"device: {device}; preset {args.preset}; {args.size} px; one sample per process a step")
    print(f"bytes all-reduced per step by each process: {sent:,} ({sent / 2**20:.1f} MiB)")
    print(f"step time: 1 process {step[1]:.2f} s, 2 processes {step[2]:.2f} s: ratio {ratio:.3f}")
    rows = [("PVA encoder training, gradients all-reduced per step (SD1.5 inpainting, stage 1)",
             f"{sent / 2**20:.1f} MiB per process"),
            ("PVA encoder training, step time of 2 processes over 1 at equal work per process",
             f"{ratio:.3f} ({device})")]
    results.save(f"bench_distributed-{args.size}px", vars(args),
                 {"bytes_per_step": sent, "step_seconds": step, "ratio": ratio}, rows)


def prepare(work: Path, preset: str) -> Path:
    """A models folder (the checkpoint, a random ArcFace r50), a dataset of four people, the YAML naming them."""
    from PIL import Image
    from safetensors.torch import save_file
    from sefi_testkit import pack
    from sefi_testkit.checkpoint import write_checkpoint

    pack.prepare()
    from sefi_core.pva.face import IResNet

    folders = {name: work / "models" / name for name in ("checkpoints", "face_recognizers", "pva_encoders",
                                                         "sefi_training_state", "embeddings")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    write_checkpoint(folders["checkpoints"] / "bench.safetensors", preset)
    torch.manual_seed(0)
    save_file(IResNet("r50").state_dict(), str(folders["face_recognizers"] / "r50.safetensors"))
    photo = Image.open(ROOT / "tests" / "data" / "astronaut.png").convert("RGB")
    for person in range(4):
        (work / "people" / str(person)).mkdir(parents=True)
        for k in range(3):
            box = (30 * k + 20 * person, 10 * k, 30 * k + 20 * person + 250, 10 * k + 250)
            photo.crop(box).resize((256, 256)).save(work / "people" / str(person) / f"{k}.png")
    config = work / "extra_model_paths.yaml"
    config.write_text("bench:\n  base_path: " + str(work) + "\n  is_default: true\n"
                      + "".join(f"  {name}: {path}\n" for name, path in folders.items()))
    return config


def run(work: Path, config: Path, processes: int, args) -> tuple[list[float], int]:
    """(the step times after the first, the bytes sent per step) of one run on `processes` processes."""
    from sefi_testkit.distributed import COMMAND
    import os
    import subprocess

    name = f"bench{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(COMMAND), "train-encoder", "--checkpoint", "bench.safetensors", "--recognizer", "r50.safetensors",
               "--dataset", str(work / "people"), "--name", name, "--steps", str(args.steps),
               "--batch-size", str(processes), "--accumulation", "1", "--resolution", str(args.size),
               "--save-every", str(args.steps), "--extra-model-paths-config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {processes}-process run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    found = re.search(r"(\d+) bytes summed across processes per step", done.stdout + done.stderr)
    with open(work / "models" / "sefi_training_state" / f"pva_encoder-{name}.csv", newline="") as file:
        elapsed = [float(row["elapsed_seconds"]) for row in csv.DictReader(file)]
    return [b - a for a, b in zip(elapsed, elapsed[1:])], int(found[1]) if found else 0


if __name__ == "__main__":
    main()
