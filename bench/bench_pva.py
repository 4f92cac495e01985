"""Benchmark, PVA, measured in one run on one machine:
- sampling: a sampling step of a PVA-patched model (PVA Apply, visual tokens on both branches, as the paper samples)
  over the unpatched one; goal <= 1.03 (issue 24: the visual logits come from a per-identity logit map, Q' is
  never formed);
- fine-tune: a step of PVA Fine-tune Identity (two timesteps in one UNet batch, the patched UNet, the word through
  the CLIP, AdamW on the projections) over a plain inpainting-UNet forward+backward of the same batch; goal <= 1.15;
  and the process's peak memory;
- encoder: a sample of PVA Train Encoder (the recognizer's features of 3 reference photos through the encoder, 4
  timesteps in one UNet batch through the patched UNet, backward into the encoder, the projections and the word;
  stage 1, recognizer r50 as the paper's) over a plain inpainting-UNet forward+backward of the same batch; goal <= 1.15;
  and that step scaled to the paper's 8 samples a step and 50k steps.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_pva.py [--part sampling|fine-tune|encoder|all] [--size 256]

Builds SD1.5-size checkpoints with random weights (and, for sampling, a PVA identity of copied projections; nothing is
downloaded), runs the real host. Absolute times are printed with the device they were taken on.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import types
from pathlib import Path

import torch

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent is size/8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="sd15_size", help="checkpoint preset (sd15_size = real SD1.5 dims)")
    parser.add_argument("--inpaint-preset", default="sd15_inpaint_size", help="the fine-tune's checkpoint preset")
    parser.add_argument("--part", choices=("sampling", "fine-tune", "encoder", "all"), default="all")
    args = parser.parse_args()

    from bench_apply import benchmark_host

    figures, rows = {}, []  # each part's figures and README lines
    with benchmark_host("sefi-bench-pva-") as host:
        for part, measure_part in (("sampling", measure), ("fine-tune", measure_fine_tune),
                                   ("encoder", measure_encoder_training)):
            if args.part in (part, "all"):
                figures[part], part_rows = measure_part(args, host)
                rows += part_rows
    results.save(f"bench_pva-{args.part}-{args.size}px", vars(args), figures, rows)


def measure(args, host) -> None:
    from sefi_testkit import probe
    from bench_apply import timed

    pva, attention = host.module("nodes.pva.patch"), host.module("sefi_core.pva.attention")
    model, clip, _ = host.load_checkpoint(host.checkpoint(args.preset))
    g = torch.Generator().manual_seed(0)
    projections = {name: attention.VisualProjections.copy_of(layer.to_q.weight, layer.to_k.weight, layer.to_v.weight)
                   for name, layer in pva.cross_attention_layers(model).items()}
    identity = pva.VisualIdentity(torch.randn(10, 768, generator=g) * 0.5, projections, on_negative=True)
    patched = pva.apply_visual_identity(model, identity)
    positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry, lowres")
    run = lambda m: lambda: probe.sample(host, m, positive, negative, steps=args.steps, cfg=7.0, size=args.size)

    run(model)(), run(patched)()  # warm-up: load weights, allocate, cast the projections
    plain_t, pva_t = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        plain_t += timed(run(model), 1)
        pva_t += timed(run(patched), 1)
    device = host.model_management.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    step = lambda ts: statistics.median(ts) / args.steps
    print(f"device: {name}; checkpoint preset {args.preset}; {args.size}x{args.size} px; cfg 7 (batch 2), visual "
          f"tokens on both branches; {len(projections)} cross-attention layers patched")
    print(f"sampling step: unpatched {step(plain_t):.3f} s, PVA {step(pva_t):.3f} s, "
          f"ratio {step(pva_t) / step(plain_t):.3f} (goal <= 1.03)")
    ratio = step(pva_t) / step(plain_t)
    return {"step_unpatched_s": step(plain_t), "step_pva_s": step(pva_t), "ratio": ratio}, [
        (f"PVA sampling step, patched (visual tokens on both branches) / unpatched, {args.size} px, cfg 7",
         f"{ratio:.3f} (goal <= 1.03)")]


def device_name(host) -> str:
    device = host.model_management.get_torch_device()
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def measure_fine_tune(args, host) -> None:
    from bench_train import clock, synchronize

    fine_tune, training, pva = host.module("nodes.pva.fine_tune"), host.module("nodes.training"), host.module("nodes.pva.patch")
    pva_train, tuners = host.module("sefi_core.pva.train"), host.module("nodes.pva.training")
    model, clip, vae = host.load_checkpoint(host.checkpoint(args.inpaint_preset))
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    squares = fine_tune.square_photos([image[0]], None, args.size)
    tokens = torch.randn(10, 768, generator=torch.Generator().manual_seed(0)) * 0.5
    tuner = tuners.PVAFineTuner(model, clip, "sks", tokens, "benchmark")
    settings = pva_train.FineTuneSettings(steps=args.steps, resolution=args.size)
    with training.training_session(tuner):
        samples = tuner.samples(squares, vae)
        sample = samples[0]
        context = tuner.clip.encode_from_tokens(tuner.with_token(tuner.prompt, tuner.initial_word)).detach()
        sampling = model.get_model_object("model_sampling")
        layers = pva.cross_attention_layers(tuner.model).values()
        patched_forwards = [layer.forward for layer in layers]

        def plain_unet():  # forward+backward of the same batch of 2 to its input, PVA's forwards taken off
            for layer in layers:
                layer.forward = types.MethodType(type(layer).forward, layer)
            try:
                unet_forward_backward()
            finally:
                for layer, forward in zip(layers, patched_forwards):
                    layer.forward = forward

        def unet_forward_backward():
            x = sample.latent.expand(2, -1, -1, -1).clone().requires_grad_(True)
            sigma = sampling.sigma(torch.tensor([250.0, 750.0], device=x.device))
            out = tuner.model.model.apply_model(x, sigma, c_concat=sample.concat.expand(2, -1, -1, -1).to(tuner.dtype),
                                          c_crossattn=context.expand(2, -1, -1).to(tuner.device, tuner.dtype))
            out.float().pow(2).mean().backward()

        run = lambda steps: pva_train.fine_tune(pva_train.FineTuneSettings(steps=steps, resolution=args.size),
                                                 tuner.identity, samples, tuner.denoise,
                                                 compute_dtype=tuner.dtype)
        run(1), plain_unet()  # warm-up
        synchronize()
        step = clock(lambda: run(1), settings.steps)
        plain = clock(plain_unet, settings.steps)
    print(f"device: {device_name(host)}; checkpoint preset {args.inpaint_preset} (random weights); {args.size}x{args.size} px; "
          f"batch of 2 timesteps; {tuner.dtype}")
    print(f"fine-tune step: {step:.3f} s; plain inpainting UNet forward+backward {plain:.3f} s; ratio {step / plain:.3f} "
          f"(goal <= 1.15); 40 steps: {40 * step:.0f} s here; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"step_s": step, "plain_s": plain, "peak_rss_gib": rss}, [
        (f"PVA fine-tune step (2 timesteps in one batch, the word through CLIP, AdamW on the projections) / plain "
         f"inpainting-UNet forward+backward of the same batch, {args.size} px, "
         f"{str(tuner.dtype).removeprefix('torch.')}",
         f"{step / plain:.3f} (goal <= 1.15); the 40 steps of a fine-tune {40 * step / 60:.0f} min from it")]


def measure_encoder_training(args, host, timesteps: int = 4, references: int = 3) -> None:
    from bench_train import clock, synchronize

    fine_tune, training, pva = host.module("nodes.pva.fine_tune"), host.module("nodes.training"), host.module("nodes.pva.patch")
    pva_train, face = host.module("sefi_core.pva.train"), host.module("sefi_core.pva.face")
    encoder_module, tuners = host.module("sefi_core.pva.encoder"), host.module("nodes.pva.training")
    model, clip, vae = host.load_checkpoint(host.checkpoint(args.inpaint_preset))
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    squares = fine_tune.square_photos([image[0]], None, args.size)
    torch.manual_seed(0)
    encoder, recognizer = encoder_module.IdentityEncoder(768), face.IResNet("r50")
    tuner = tuners.PVAFineTuner(model, clip, "sks", torch.zeros(10, 768), "benchmark")
    with training.training_session(tuner):
        sample = tuner.samples(squares, vae)[0]
        photos = torch.nn.functional.interpolate(squares[0][0][None], (256, 256)).expand(references, -1, -1, -1)
        drawn = pva_train.EncoderSample(sample, photos.to(tuner.device).contiguous())
        trainables = pva_train.EncoderTrainables(encoder, recognizer, tuner.identity, 1)
        context = tuner.clip.encode_from_tokens(tuner.with_token(tuner.prompt, tuner.initial_word)).detach()
        sampling = model.get_model_object("model_sampling")
        layers = pva.cross_attention_layers(tuner.model).values()
        patched_forwards = [layer.forward for layer in layers]

        def plain_unet():  # forward+backward of the same batch to its input, PVA's forwards taken off
            for layer in layers:
                layer.forward = types.MethodType(type(layer).forward, layer)
            try:
                x = sample.latent.expand(timesteps, -1, -1, -1).clone().requires_grad_(True)
                sigma = sampling.sigma(torch.linspace(125.0, 875.0, timesteps, device=x.device))
                out = tuner.model.model.apply_model(
                    x, sigma, c_concat=sample.concat.expand(timesteps, -1, -1, -1).to(tuner.dtype),
                    c_crossattn=context.expand(timesteps, -1, -1).to(tuner.device, tuner.dtype))
                out.float().pow(2).mean().backward()
            finally:
                for layer, forward in zip(layers, patched_forwards):
                    layer.forward = forward

        settings = pva_train.EncoderTrainingSettings(steps=1, batch_size=1, accumulation=1, timesteps=timesteps,
                                                     resolution=args.size)
        run = lambda: pva_train.train_encoder(settings, trainables, lambda g: drawn, tuner.denoise,
                                              compute_dtype=tuner.dtype)
        run(), plain_unet()  # warm-up
        synchronize()
        step = clock(run, args.steps)
        plain = clock(plain_unet, args.steps)
    paper = 8 * 50_000 * step
    print(f"device: {device_name(host)}; checkpoint preset {args.inpaint_preset} (random weights); {args.size}x{args.size} "
          f"px; a sample of {timesteps} timesteps, {references} references, recognizer r50, stage 1; {tuner.dtype}")
    print(f"encoder-training sample: {step:.3f} s; plain inpainting UNet forward+backward {plain:.3f} s; ratio "
          f"{step / plain:.3f} (goal <= 1.15); the paper's 50k steps of 8 samples: {paper / 3600:.0f} h here; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")
    return {"sample_s": step, "plain_s": plain, "paper_stage_h": paper / 3600}, [
        (f"PVA encoder-training sample ({references} references through the recognizer and the encoder, {timesteps} "
         f"timesteps in one batch, stage 1) / plain inpainting-UNet forward+backward of the same batch, {args.size} px",
         f"{step / plain:.3f} (goal <= 1.15); one stage of the paper's training (50k steps of 8 samples) "
         f"{paper / 3600:,.0f} h from it")]


if __name__ == "__main__":
    main()
