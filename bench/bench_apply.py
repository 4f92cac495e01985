"""Benchmark: sampling-step time of a SeFi-patched model over the unpatched one, and text-encode time of a
prompt with the trigger over the same prompt without it, measured in one run on one machine.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_apply.py [--size 256] [--steps 4] [--repeats 3]
    COMFYUI_PATH=... python bench/bench_apply.py --preset sdxl_layout     # SDXL (goal <= 1.02)

Builds an SD1.5-size checkpoint with random weights (nothing is downloaded), runs the real host. The goal
for the step ratio is <= 1.03. Absolute times are printed with the device they were taken on.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent is size/8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="sd15_size", help="checkpoint preset (sd15_size = real SD1.5 dims)")
    args = parser.parse_args()

    with benchmark_host("sefi-bench-") as host:
        measure(args, host)


@contextlib.contextmanager
def benchmark_host(prefix: str):
    """The real host at $COMFYUI_PATH with the pack loaded, in a temporary work folder removed afterwards (its
    SD1.5-size checkpoints are 2 GB each)."""
    from sefi_testkit import pack
    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.host import Host

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    work_dir = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Host(comfy_path, ROOT, work_dir, data_dir=ROOT / "tests" / "data")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def goal(preset: str) -> float:
    """The step ratio's goal: SDXL's is tighter (a swap of K/V contexts is a smaller share of its larger layers)."""
    return 1.02 if preset.startswith("sdxl") else 1.03


def measure(args, host) -> None:
    from sefi_testkit import probe

    model, clip, _ = host.load_checkpoint(host.checkpoint(args.preset))
    identity = probe.word_identity(clip, ["cat", "dog", "car", "tree", "house"], ["house", "tree", "car", "dog", "cat"])
    patched_model, patched_clip = probe.apply(host, model, clip, identity)
    text = "a photo of {} playing guitar in Paris, detailed, golden hour"
    plain_pos, neg = probe.encode(host, clip, text.format("person")), probe.encode(host, clip, "blurry, lowres")
    sefi_pos = probe.encode(host, patched_clip, text.format("sks"))

    def run(m, pos):
        return lambda: probe.sample(host, m, pos, neg, steps=args.steps, cfg=7.0, size=args.size)

    run(model, plain_pos)(), run(patched_model, sefi_pos)()  # warm-up: load weights, allocate
    plain_t, sefi_t = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        plain_t += timed(run(model, plain_pos), 1)
        sefi_t += timed(run(patched_model, sefi_pos), 1)
    enc_plain = timed(lambda: probe.encode(host, patched_clip, text.format("person")), 2 * args.repeats)
    enc_sefi = timed(lambda: probe.encode(host, patched_clip, text.format("sks")), 2 * args.repeats)

    device = host.model_management.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    step = lambda ts: statistics.median(ts) / args.steps
    print(f"device: {name}; checkpoint preset {args.preset}; {args.size}x{args.size} px; cfg 7 (batch 2); "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    print(f"sampling step  unpatched {step(plain_t) * 1000:9.1f} ms   SeFi-patched {step(sefi_t) * 1000:9.1f} ms   "
          f"ratio {statistics.median(sefi_t) / statistics.median(plain_t):.3f}  (goal <= {goal(args.preset)})")
    print(f"prompt encode  no trigger {statistics.median(enc_plain) * 1000:8.1f} ms   with trigger "
          f"{statistics.median(enc_sefi) * 1000:8.1f} ms   ratio {statistics.median(enc_sefi) / statistics.median(enc_plain):.2f}"
          "  (11 prompt variants in one batched encode)")
    figures = {"step_unpatched_s": step(plain_t), "step_patched_s": step(sefi_t),
               "step_ratio": statistics.median(sefi_t) / statistics.median(plain_t),
               "encode_plain_s": statistics.median(enc_plain), "encode_trigger_s": statistics.median(enc_sefi)}
    model_name = f", {args.preset} (SDXL's 70 cross-attention layers)" if args.preset.startswith("sdxl") else ""
    name = "bench_apply" if args.preset == "sd15_size" else f"bench_apply-{args.preset}"
    results.save(name, vars(args), figures, [
        (f"sampling step, SeFi-patched / unpatched, {args.size} px, cfg 7{model_name}",
         f"{figures['step_ratio']:.3f} (goal <= {goal(args.preset)})"),
        ("prompt encode with the trigger / without (11 prompt variants in one batch, once per prompt)",
         f"{figures['encode_trigger_s'] / figures['encode_plain_s']:.1f}x ({figures['encode_trigger_s'] * 1000:.0f} ms "
         f"vs {figures['encode_plain_s'] * 1000:.0f} ms)")])


if __name__ == "__main__":
    main()
