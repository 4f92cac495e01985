"""Benchmark: one step of SeFi Train Identity's own loop over a plain UNet forward+backward to the input at
the same resolution on the same model, in one run, with a breakdown and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_train.py [--resolution 512] [--steps 3]

Builds an SD1.5-size random-weight checkpoint (nothing is downloaded) and trains through the real host.
Goal: ratio <= 1.10. Absolute times only mean something on the machine printed with them.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def clock(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed repeats of each measurement")
    parser.add_argument("--preset", default="sd15_size")
    parser.add_argument("--full-run", type=int, default=0, help="also time a whole training run of this many steps")
    args = parser.parse_args()

    import conftest  # noqa: F401  (registers sefi_core, keeps the repo root off sys.path)
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    host = Host(comfy_path, ROOT, tempfile.mkdtemp(prefix="sefi-bench-"), data_dir=ROOT / "tests" / "data")
    pack = host.pack.__name__
    training = sys.modules[pack + ".nodes.training"]
    train_mod = sys.modules[pack + ".sefi_core.train"]
    mapper_mod = sys.modules[pack + ".sefi_core.mapper"]
    host_mod = sys.modules[pack + ".nodes.host"]

    model, clip, vae = host.load_checkpoint(host.checkpoint(args.preset))
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    settings = train_mod.TrainSettings(steps=args.steps, resolution=args.resolution)
    trainer = training.HostTrainer(model, clip, "sks", "person", "all")
    with torch.inference_mode(), training.frozen(model.model, clip.cond_stage_model), \
            torch.inference_mode(False), torch.enable_grad():
        trainer.load()
        samples = trainer.training_samples(image, vae, args.resolution, 2, torch.Generator().manual_seed(0))
        trainer.find_loss_layers(samples[0][0])
        cls = host_mod.word_embedding(clip, "person").to(trainer.device)
        latent, mask = samples[0]
        noise = torch.randn_like(latent)
        for index in range(len(train_mod.PROMPT_TEMPLATES)):
            trainer.reference(index)
        loss_layers = trainer.loss_layers

        def sefi_step():
            train_mod.train_tokens(train_mod.TrainSettings(steps=1, resolution=args.resolution), cls, samples,
                                   trainer.encode_kv, trainer.denoise, device=trainer.device)

        def plain_unet():  # forward+backward to the input, nothing else
            x = latent.clone().requires_grad_(True)
            context = trainer.reference(0)
            eps = trainer._apply(x, noise, 500, context, context)
            eps.float().pow(2).mean().backward()

        def unet_with_kv():
            k = trainer.reference(0).clone().requires_grad_(True)
            trainer.loss_layers = []
            eps, _ = trainer.denoise(latent, noise, 500, k, k, 0)
            eps.float().pow(2).mean().backward()

        def unet_with_kv_and_attention_loss():
            k = trainer.reference(0).clone().requires_grad_(True)
            trainer.loss_layers = loss_layers
            eps, attn = trainer.denoise(latent, noise, 500, k, k, 0)
            (eps.float().pow(2).mean() + 0.003 * attn).backward()

        def clip_encodes():
            token = cls.clone().requires_grad_(True)
            k, v = trainer.encode_kv(0, token, token)
            (k.float().sum() + v.float().sum()).backward()

        def mapper_and_optimizer():
            mapper = mapper_mod.TokenMapper(cls, 5).to(trainer.device)
            optimizer = torch.optim.Adam(mapper.parameters(), lr=0.005)
            k, v = mapper()
            (k.sum() + v.sum()).backward()
            optimizer.step()

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sefi_step(), plain_unet()  # warm-up
        timings = {name: clock(fn, args.steps) for name, fn in [
            ("SeFi training step", sefi_step), ("plain UNet fwd+bwd", plain_unet), ("UNet with K/V", unet_with_kv),
            ("UNet with K/V + attention loss", unet_with_kv_and_attention_loss), ("CLIP encodes (2) fwd+bwd", clip_encodes),
            ("mapper + Adam", mapper_and_optimizer)]}
        full = None
        if args.full_run:
            start = time.perf_counter()
            train_mod.train_tokens(train_mod.TrainSettings(steps=args.full_run, resolution=args.resolution), cls,
                                   samples, trainer.encode_kv, trainer.denoise, device=trainer.device)
            full = time.perf_counter() - start
        trainer.release()

    device = trainer.device
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; preset {args.preset}; {args.resolution} px; medians of {args.steps}")
    for label, seconds in timings.items():
        print(f"  {label:34s} {seconds * 1000:10.1f} ms")
    ratio = timings["SeFi training step"] / timings["plain UNet fwd+bwd"]
    print(f"ratio SeFi step / plain UNet fwd+bwd: {ratio:.3f}  (goal <= 1.10)")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"peak process memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if full is not None:
        print(f"full run: {args.full_run} steps in {full:.1f} s")


if __name__ == "__main__":
    main()
