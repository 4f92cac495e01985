"""The dtypes and attention ComfyUI picks on an NVIDIA GPU, set up on the CPU through the host's own flags and
functions, so the suite runs the pack the way artists run it.

On a GPU the host loads SD1.x in fp16 (bf16 with --bf16-unet) and computes in that dtype, with no cast to fp32,
and attends with PyTorch SDPA. On a CPU its policy functions `should_use_fp16` / `should_use_bf16` answer False
for the CPU device, so every half-precision UNet gets manual-cast to fp32. `emulate(setup)` makes them answer as
on an Ampere-or-newer card, sets the host's own command-line flags for the weight and text-encoder dtypes, and
selects one of the host's own attention functions (the UNet looks `optimized_attention` up at call time).
Everything is put back afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DtypeSetup:
    name: str
    compute: torch.dtype  # what the UNet must compute in under this set-up
    flags: dict = field(default_factory=dict)  # comfy.cli_args.args fields (the host's command-line flags)
    attention: str = "sub_quad"  # comfy.ldm.modules.attention.attention_<name>
    gpu_policy: bool = True  # should_use_fp16/bf16 answer as on an Ampere-or-newer NVIDIA card

    def __str__(self):
        return self.name


CPU_FP32 = DtypeSetup("fp32-cpu-default", torch.float32, gpu_policy=False)
FP16_SDPA = DtypeSetup("fp16-sdpa", torch.float16, {"fp16_text_enc": True}, "pytorch")
BF16_SDPA = DtypeSetup("bf16-sdpa", torch.bfloat16, {"bf16_unet": True, "bf16_text_enc": True}, "pytorch")
FP8_MANUAL_CAST = DtypeSetup("fp8-weights-cast-to-fp16-sdpa", torch.float16, {"fp8_e4m3fn_unet": True}, "pytorch")
FP8_AS_FP32 = DtypeSetup("fp8-weights-cast-to-fp32", torch.float32, {"fp8_e4m3fn_unet": True}, gpu_policy=False)
FP16_SPLIT = DtypeSetup("fp16-split-attention", torch.float16, {}, "split")
FP16_SUB_QUAD = DtypeSetup("fp16-sub-quadratic-attention", torch.float16, {}, "sub_quad")

HALF_SETUPS = (FP16_SDPA, BF16_SDPA, FP8_MANUAL_CAST, FP16_SPLIT, FP16_SUB_QUAD)
ALL_SETUPS = (CPU_FP32, *HALF_SETUPS)


def _on_ampere(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    """What should_use_fp16 / should_use_bf16 answer on an NVIDIA card of compute capability 8.0 or more."""
    return not sys.modules["comfy.model_management"].FORCE_FP32


@contextlib.contextmanager
def emulate(setup: DtypeSetup):
    """Checkpoints loaded inside get the set-up's dtypes; the UNet attends with its attention function."""
    import comfy.cli_args
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm

    args = comfy.cli_args.args
    saved_flags = {name: getattr(args, name) for name in setup.flags}
    saved_policy = (mm.should_use_fp16, mm.should_use_bf16)
    saved_attention = (attention.optimized_attention, attention.optimized_attention_masked)
    try:
        for name, value in setup.flags.items():
            setattr(args, name, value)
        if setup.gpu_policy:
            mm.should_use_fp16 = mm.should_use_bf16 = _on_ampere
        attention.optimized_attention = attention.optimized_attention_masked = \
            getattr(attention, f"attention_{setup.attention}")
        yield setup
    finally:
        for name, value in saved_flags.items():
            setattr(args, name, value)
        mm.should_use_fp16, mm.should_use_bf16 = saved_policy
        attention.optimized_attention, attention.optimized_attention_masked = saved_attention
        mm.unload_all_models()  # nothing loaded under the set-up outlives it


SLOW_HALF_CONV_RATIO = 20.0  # fp16 convolutions this many times slower than fp32: no hardware support for them


@functools.lru_cache(maxsize=None)
def cpu_half_convolution_slowdown() -> float:
    """How many times slower an fp16 3x3 convolution is than fp32 on this CPU. Without AVX-512 (FP16/BF16) or AMX,
    PyTorch falls back to a reference kernel ~250x slower: a 512 px UNet pass in fp16 then takes an hour here."""
    x, w = torch.randn(1, 128, 32, 32), torch.randn(128, 128, 3, 3)
    seconds = {}
    for dtype in (torch.float32, torch.float16):
        a, b = x.to(dtype), w.to(dtype)
        torch.nn.functional.conv2d(a, b, padding=1)  # warm-up
        runs = []
        for _ in range(3):  # the fastest of three: other work on the machine only slows a run down
            start = time.perf_counter()
            torch.nn.functional.conv2d(a, b, padding=1)
            runs.append(time.perf_counter() - start)
        seconds[dtype] = min(runs)
    return seconds[torch.float16] / max(seconds[torch.float32], 1e-6)


FP16_CPU_FLAGS = {"avx512_fp16", "amx_fp16"}  # what fast fp16 convolution kernels need (bf16 hardware does not help)


def half_precision_is_slow_here() -> bool:
    """Whether fp16 convolutions are slow on this CPU: from its flags where Linux lists them (a timing is at the mercy
    of other work on the machine), else from a timing. AVX-512 BF16 alone (e.g. AMD EPYC Zen 4) makes bf16 fast and
    leaves fp16 ~80x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    if flags:
        return not flags & FP16_CPU_FLAGS
    return cpu_half_convolution_slowdown() > SLOW_HALF_CONV_RATIO
