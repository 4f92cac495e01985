"""Benchmark: SeFi Train Identity's own training step against a plain UNet forward+backward at the same resolution on
the same model, for fp32 and the half-precision set-ups the host uses on GPUs, with and without gradient
checkpointing; plus the time for 1000 steps and peak memory. Every set-up runs in its own process, so its peak
memory is its own.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_train.py [--resolution 512] [--steps 3] [--full-run 1000]
    COMFYUI_PATH=... python bench/bench_train.py --preset sdxl_layout --resolution 256 --setups fp32 --checkpointing off

Builds an SD1.5-size random-weight checkpoint (nothing is downloaded) and trains through the real host; --preset picks
another (sdxl_layout: SDXL's blocks and both its text encoders at full size, the UNet at 320 channels throughout). On a CPU
the GPU set-ups are emulated through the host's own flags (tests/sefi_testkit/gpu_emulation.py); on CUDA they are
the host's real choices. Goals: step ratio <= 1.10; on an H100, 1000 steps in <= 40 s and <= 4 GiB peak at 512 px.
Absolute times only mean something on the machine printed with them.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SETUPS = ("fp32", "fp16", "bf16")


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn, repeats):
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dtype_setup(name: str):
    from sefi_testkit import gpu_emulation as gpu

    cuda = torch.cuda.is_available()
    return {"fp32": gpu.DtypeSetup("fp32-sdpa", torch.float32, {"fp32_unet": True}, "pytorch") if cuda else gpu.CPU_FP32,
            "fp16": gpu.FP16_SDPA, "bf16": gpu.BF16_SDPA}[name]


def measure(args) -> dict:
    """One set-up in this process: step times, the plain baseline, 1000-step time and peak memory."""
    from sefi_testkit import pack
    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit import gpu_emulation as gpu
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host

    host = Host(find_comfyui(), ROOT, args.work_dir, data_dir=ROOT / "tests" / "data")
    training, training_floor = host.module("nodes.sefi.training"), host.module("nodes.training")
    train, host_mod = host.module("sefi_core.sefi.train"), host.module("nodes.clip_tokens")
    setup = dtype_setup(args.setup)
    checkpoint = host.checkpoint(args.preset)
    with gpu.emulate(setup):
        model, clip, vae = host.load_checkpoint(checkpoint)
        image = host.nodes.LoadImage().load_image("astronaut.png")[0]
        trainer = training.HostTrainer(model, clip, "sks", "person", "all", gradient_checkpointing=args.checkpointing)
        with training_floor.training_session(trainer):
            samples = trainer.training_samples(image, vae, args.resolution, 2, torch.Generator().manual_seed(0))
            trainer.find_loss_layers(samples[0][0])
            cls = host_mod.word_embedding(clip, "person")
            latent = samples[0][0]
            noise = torch.randn_like(latent)
            for index in range(len(train.PROMPT_TEMPLATES)):
                trainer.reference(index)

            def run(steps):
                return train.train_tokens(train.TrainSettings(steps=steps, resolution=args.resolution), cls, samples,
                                          trainer.encode_kv, trainer.denoise, device=trainer.device,
                                          compute_dtype=trainer.dtype, widths=trainer.token_widths)

            def plain_unet():  # forward+backward to the input, nothing else
                x = latent.clone().requires_grad_(True)
                context = trainer.reference(0)
                y = trainer.adm(0, latent)  # SDXL's pooled and size embeddings; None on SD1.x
                trainer._apply(x, noise, 500, context, context, y).float().pow(2).mean().backward()

            def text_encoders():  # the K and V prompts through the text encoder(s), forward and backward to the tokens
                k_token, v_token = (cls.clone().to(trainer.device).requires_grad_(True) for _ in range(2))
                k_context, v_context = trainer.encode_kv(0, k_token, v_token)
                (k_context.float().sum() + v_context.float().sum()).backward()

            weights = [t for m in (model.model.diffusion_model, clip.cond_stage_model) for t in m.parameters()]

            def weight_copies():  # what the identity weight wrappers cost per step: one copy of every weight
                for weight in weights:
                    weight.clone()

            run(1), plain_unet()  # warm-up
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            synchronize()
            start = time.perf_counter()
            run(args.steps)
            synchronize()
            step = (time.perf_counter() - start) / args.steps
            peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
            plain = clock(plain_unet, args.steps)
            copies = clock(weight_copies, max(args.steps, 3))
            encoders = clock(text_encoders, args.steps)
            full = None
            if args.full_run:
                synchronize()
                start = time.perf_counter()
                run(args.full_run)
                synchronize()
                full = time.perf_counter() - start
    device = trainer.device
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    return {"setup": setup.name, "checkpointing": args.checkpointing, "device": name, "step_s": step, "plain_s": plain,
            "weight_copies_s": copies, "text_encoders_s": encoders, "full_run": args.full_run, "full_s": full, "peak_gpu_gib": peak_gpu,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def report(r: dict, resolution: int) -> str:
    thousand = f"{r['full_s']:.0f} s measured" if r["full_s"] is not None and r["full_run"] == 1000 else \
        f"{r['step_s'] * 1000:.0f} s (from the step time)"
    memory = f"peak GPU {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else \
        f"peak RSS {r['peak_rss_gib']:.2f} GiB"
    return (f"{r['setup']:30s} ckpt {'on ' if r['checkpointing'] else 'off'}  step {r['step_s'] * 1000:9.1f} ms  "
            f"plain fwd+bwd {r['plain_s'] * 1000:9.1f} ms  ratio {r['step_s'] / r['plain_s']:.3f}  "
            f"weight copies {100 * r['weight_copies_s'] / r['step_s']:4.1f}% of a step  "
            f"1000 steps {thousand}  {memory}  [{resolution} px, {r['device']}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps and repeats of each baseline")
    parser.add_argument("--preset", default="sd15_size")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {SETUPS}")
    parser.add_argument("--checkpointing", default="both", choices=("both", "on", "off"))
    parser.add_argument("--full-run", type=int, default=0, help="also time a whole training run of this many steps")
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # child process: measure one set-up
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)  # shared by the children: the checkpoint is built once
    args = parser.parse_args()

    if args.setup:
        args.checkpointing = args.checkpointing == "on"
        print("RESULT " + json.dumps(measure(args)))
        return
    from sefi_testkit.comfy_env import find_comfyui
    if find_comfyui() is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    modes = ("off", "on") if args.checkpointing == "both" else (args.checkpointing,)
    work_dir = tempfile.mkdtemp(prefix="sefi-bench-")
    try:
        run_children(args, modes, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def run_children(args, modes, work_dir):
    measured = {}  # (setup, checkpointing mode) -> the child's figures
    for setup in args.setups.split(","):
        for mode in modes:
            child = [sys.executable, __file__, "--setup", setup, "--checkpointing", mode, "--resolution",
                     str(args.resolution), "--steps", str(args.steps), "--preset", args.preset, "--full-run",
                     str(args.full_run), "--work-dir", work_dir]
            out = subprocess.run(child, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{setup} ckpt {mode}: failed\n{out.stderr[-3000:]}")
                continue
            measured[setup, mode] = json.loads(line[7:])
            print(report(measured[setup, mode], args.resolution), flush=True)
    if measured:
        name = "bench_train" if args.preset == "sd15_size" else f"bench_train-{args.preset}-{args.resolution}px"
        results.save(name, vars(args), {f"{s} ckpt {m}": r for (s, m), r in measured.items()},
                     rows(measured, args.resolution, args.preset))


def rows(measured: dict, resolution: int, preset: str = "sd15_size") -> list[tuple[str, str]]:
    """The README's lines: per set-up, the step over the plain UNet pass (both without checkpointing), what gradient
    checkpointing costs and saves (against the same set-up without it), the weight copies' share and 1000 steps."""
    out = []
    for setup in dict.fromkeys(s for s, _ in measured):
        off, on = measured.get((setup, "off")), measured.get((setup, "on"))
        name = (off or on)["setup"]
        memory = lambda r: f"{r['peak_gpu_gib']:.1f} GiB VRAM" if r["peak_gpu_gib"] is not None else \
            f"{r['peak_rss_gib']:.1f} GiB RSS"
        model = "" if preset == "sd15_size" else f", {preset}"
        if off:
            encoders = "" if preset == "sd15_size" else \
                f"the K/V prompts through the text encoders {100 * off['text_encoders_s'] / off['step_s']:.0f}% of a step; "
            out.append((f"training step / plain UNet forward+backward, {resolution} px, {name}{model}",
                        f"{off['step_s'] / off['plain_s']:.2f} (goal <= 1.10); {off['step_s']:.1f} s a step, 1000 steps "
                        f"{off['step_s'] * 1000 / 3600:.1f} h from it; {encoders}weight copies "
                        f"{100 * off['weight_copies_s'] / off['step_s']:.1f}% of a step; peak {memory(off)}"))
        elif on:  # checkpointing on alone: the step and the plain pass both recompute
            out.append((f"training step / plain UNet forward+backward, both with gradient checkpointing, {resolution} px, "
                        f"{name}{model}",
                        f"{on['step_s'] / on['plain_s']:.2f} (goal <= 1.10); {on['step_s']:.1f} s a step; the K/V prompts "
                        f"through the text encoders {100 * on['text_encoders_s'] / on['step_s']:.1f}% of a step; peak "
                        f"{memory(on)}"))
        if off and on:
            out.append((f"gradient checkpointing, {resolution} px, {name}: step with / without it",
                        f"{on['step_s'] / off['step_s']:.2f} (more time); peak {memory(on)} instead of {memory(off)}"))
    return out


if __name__ == "__main__":
    main()
