"""Benchmark: what Train Identity's previews cost, as a share of the run at the node's defaults (1000 steps, a preview
every 250): one training step and one preview, timed in one run on the same model.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_preview.py [--resolution 512] [--preset sd15_size]

Builds an SD1.5-size random-weight checkpoint (nothing is downloaded) and runs through the real host, in the host's
own dtype for this device (fp32 on a CPU). Goal: previews <= 5% of the run. Absolute times only mean something on the
machine printed with them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--preset", default="sd15_size")
    parser.add_argument("--steps", type=int, default=1000, help="the run the share is taken of")
    parser.add_argument("--every", type=int, default=250, help="preview_every")
    args = parser.parse_args()

    from sefi_testkit import pack

    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host

    host = Host(find_comfyui(), ROOT, tempfile.mkdtemp(prefix="sefi-bench-preview-"), data_dir=ROOT / "tests" / "data")
    training, training_floor = host.module("nodes.sefi.training"), host.module("nodes.training")
    train, host_mod = host.module("sefi_core.sefi.train"), host.module("nodes.clip_tokens")
    preview_module = host.module("nodes.sefi.preview")
    model, clip, vae = host.load_checkpoint(host.checkpoint(args.preset))
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with training_floor.training_session(trainer):
        samples = trainer.training_samples(image, vae, args.resolution, 2, torch.Generator().manual_seed(0))
        trainer.find_loss_layers(samples[0][0])
        cls = host_mod.word_embedding(clip, "person")
        for index in range(len(train.PROMPT_TEMPLATES)):
            trainer.reference(index)
        settings = lambda steps: train.TrainSettings(steps=steps, resolution=args.resolution)
        step = lambda: train.train_tokens(settings(2), cls, samples, trainer.encode_kv, trainer.denoise,
                                          device=trainer.device, compute_dtype=trainer.dtype)
        preview = preview_module.TrainingPreview(trainer, vae, "a portrait photo of sks", "sks", "person",
                                                 args.resolution, 0)
        tokens = cls.expand(5, 768).to(trainer.device)
        step(), preview(1, tokens, tokens)  # warm-up
        step_s = timed(step) / 2
        preview_s = timed(lambda: preview(2, tokens, tokens))
    previews = args.steps // args.every
    share = previews * preview_s / (args.steps * step_s + previews * preview_s)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{device}, {args.preset} at {args.resolution} px, UNet in {trainer.dtype}:")
    print(f"  training step {step_s:.2f} s, one preview ({preview_module.PREVIEW_STEPS} steps at "
          f"{min(args.resolution, preview_module.PREVIEW_SIZE['sd1'])} px, cfg) {preview_s:.2f} s = {preview_s / step_s:.2f} steps")
    print(f"  {previews} previews in {args.steps} steps: {100 * share:.1f}% of the run (goal <= 5%)")
    results.save("bench_preview", vars(args), {"step_s": step_s, "preview_s": preview_s, "share": share}, [
        (f"Train Identity's previews at the defaults ({previews} in {args.steps} steps; one preview = "
         f"{preview_module.PREVIEW_STEPS} steps at {min(args.resolution, preview_module.PREVIEW_SIZE['sd1'])} px with cfg), "
         f"UNet in {str(trainer.dtype).removeprefix('torch.')}, {args.resolution} px",
         f"one preview = {preview_s / step_s:.1f} training steps ({preview_s:.1f} s vs {step_s:.1f} s); "
         f"{100 * share:.1f}% of the run (goal <= 5%)")])


if __name__ == "__main__":
    main()
