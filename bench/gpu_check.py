"""GPU check: SeFi Train Identity (1000 steps at 512 px) under the host's default dynamic VRAM and under
--disable-dynamic-vram, PVA Fine-tune Identity (40 steps at 512 px), and fp16-vs-fp32 training gradients, on CUDA.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_check.py [--out DIR]
    COMFYUI_PATH=... python bench/gpu_check.py --steps 3 --resolution 64 --preset tiny --inpaint-preset tiny_inpaint \\
        --pva-steps 2 --grad-resolution 64                                   # a dry run of the same code on a CPU
    COMFYUI_PATH=... python bench/gpu_check.py --sdxl                        # SeFi on SDXL: 1000 steps at 1024 px

Needs a ComfyUI v0.33 tree with its start-up requirements; on a GPU machine without a package index,
.ci/gpu/README.md says what to carry and .ci/gpu/install.sh installs it.

Each training runs in ComfyUI's own server (main.py with the pack in custom_nodes, started as the suite starts it:
sefi_testkit/server.py), from a queued prompt, as an artist runs it: the host picks the dtypes and, on NVIDIA, dynamic
VRAM. It is measured from outside, through what the node reports: the step time from the progress messages (the
training loop's on_step), peak device memory sampled with cudaMemGetInfo (device-wide, so it also sees what
comfy-aimdo allocates beside torch's allocator), and the server's own log lines on dtypes and dynamic VRAM. The
checkpoints have random weights of true SD1.5 size (sefi_testkit/checkpoint.py). Goals: SeFi <= 40 s per 1000 steps
and <= 4 GiB peak. The gradient check is the suite's (sefi_testkit/gradients.py), here on CUDA: the host's default
fp16 against fp32 by its flags --fp32-unet --fp32-text-enc.

--sdxl checks SeFi on a random-weight checkpoint of true SDXL size instead (sdxl_size: the 2.6B UNet, CLIP-L and the
32-layer bigG), 1000 steps at 1024 px in fp16 with gradient checkpointing on; goals <= 180 s and <= 16 GiB. PVA is
not run then (it has no SDXL base).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
MODES = {"dynamic": (), "static": ("--disable-dynamic-vram",)}  # the host's default; and without dynamic VRAM
GOALS = {"sd1": (40.0, 4.0), "sdxl": (180.0, 16.0)}  # SeFi: seconds per 1000 steps, peak GiB


def goals(args) -> tuple[float, float]:
    return GOALS["sdxl" if args.sdxl else "sd1"]
GIB = 2 ** 30


class DeviceMemory:
    """Device-wide memory in use (cudaMemGetInfo) sampled every 20 ms while inside; peak and baseline in bytes."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.baseline = self.peak = self._used()
        self._stop = threading.Event()

    def _used(self) -> int:
        if not self.cuda:
            return 0
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def __enter__(self):
        self.peak = self._used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak_gib(self) -> float | None:
        return (self.peak - self.baseline) / GIB if self.cuda else None


def follow(server, graph: dict, node: str, timeout: float) -> dict:
    """Queue `graph` and follow it on the server's websocket: the training node's progress ticks (time, step) and
    the outcome."""
    import aiohttp

    client = uuid.uuid4().hex

    async def run():
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId={client}") as ws:
            prompt_id = server.post_json("/prompt", {"prompt": graph, "client_id": client})["prompt_id"]
            ticks, error, start = [], None, time.perf_counter()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary frames: previews
                event = json.loads(message.data)
                data = event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] == "progress" and str(data.get("node")) == node:
                    ticks.append((time.perf_counter(), data["value"], data["max"]))
                elif event["type"] == "execution_error":
                    error = f"{data.get('exception_type')}: {data.get('exception_message')}"
                    break
                elif event["type"] == "execution_success" or (event["type"] == "executing" and data.get("node") is None):
                    break
            return {"ticks": ticks, "error": error, "prompt_s": time.perf_counter() - start}

    return asyncio.run(asyncio.wait_for(run(), timeout))


def steps_per_second(ticks) -> float | None:
    """From the first to the last progress tick (the host may throttle ticks; their times stay true)."""
    if len(ticks) < 2 or ticks[-1][1] == ticks[0][1]:
        return None
    return (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0])


def host_says(log: str) -> list[str]:
    """The server's log lines on what it picked (the device, dynamic VRAM, weight dtypes, full or partial loads), each
    once, without the log's colours."""
    keys = ("Device:", "Total VRAM", "ynamic", "model weight dtype", "loaded partially", "loaded completely")
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    return list(dict.fromkeys(line[:200] for line in lines if any(k in line for k in keys)))[:12]


def sefi_graph(args) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{args.preset}.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
            "3": {"class_type": "SefiTrainIdentity", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "name": "gpu_check",
                "trigger": "sks", "class_word": "person", "steps": args.steps, "learning_rate": 0.005,
                "attention_weight": 0.003, "seed": 0, "resolution": args.resolution, "kv_pairs": "5",
                "attention_loss": "all tokens (#3, paper)", "overwrite": True,
                "gradient_checkpointing": "on" if args.sdxl else "auto",
                "preview_every": 0, "keep_training_state": False}}}


def pva_graph(args) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{args.inpaint_preset}.safetensors"}},
            "2": {"class_type": "PVALoadFaceRecognizer", "inputs": {"recognizer_file": "r50.safetensors"}},
            "3": {"class_type": "PVALoadEncoder", "inputs": {"encoder_file": "random.safetensors"}},
            "4": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
            "5": {"class_type": "PVAFineTuneIdentity", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["4", 0], "face_recognizer": ["2", 0],
                "pva_encoder": ["3", 0], "name": "gpu_check", "trigger": "sks", "steps": args.pva_steps,
                "timesteps_per_step": 2, "projection_learning_rate": 0.00002, "word_learning_rate": 0.001, "seed": 0,
                "resolution": args.resolution, "overwrite": True, "gradient_checkpointing": "auto"}}}


def write_models(work: Path, args) -> None:
    """Random-weight checkpoints, a random ArcFace r50 and PVA encoder, and the photo, in the server's folders."""
    from safetensors.torch import save_file

    from sefi_testkit import pack
    pack.prepare()
    import torch
    from sefi_core.pva.encoder import IdentityEncoder
    from sefi_core.pva.face import IResNet
    from sefi_core.pva.model_files import save_encoder
    from sefi_testkit.checkpoint import write_checkpoint

    for folder in ("checkpoints", "face_recognizers", "pva_encoders"):
        (work / "models" / folder).mkdir(parents=True, exist_ok=True)
    for preset in {args.preset} if args.sdxl else {args.preset, args.inpaint_preset}:
        write_checkpoint(work / "models" / "checkpoints" / f"{preset}.safetensors", preset)
    torch.manual_seed(0)
    save_file(IResNet("r50").state_dict(), str(work / "models" / "face_recognizers" / "r50.safetensors"))
    save_encoder(IdentityEncoder(768), str(work / "models" / "pva_encoders" / "random.safetensors"), "iresnet r50")
    (work / "input").mkdir(exist_ok=True)
    shutil.copy(ROOT / "tests" / "data" / "astronaut.png", work / "input" / "astronaut.png")


def train_in_server(comfy_path: Path, work: Path, mode: str, args, cuda: bool) -> dict:
    from sefi_testkit.server import ComfyServer

    out = {"mode": mode, "flags": " ".join(MODES[mode]) or "(the host's defaults)"}
    memory = DeviceMemory()
    with ComfyServer(comfy_path, ROOT, work, cpu=not cuda, flags=MODES[mode]) as server:
        runs = [("sefi", sefi_graph(args), "3", args.steps)]
        if mode == "dynamic" and not args.sdxl:
            runs.append(("pva", pva_graph(args), "5", args.pva_steps))
        for name, graph, node, steps in runs:
            with memory:
                result = follow(server, graph, node, args.timeout)
            rate = steps_per_second(result["ticks"])
            out[name] = {"steps": steps, "error": result["error"], "prompt_s": result["prompt_s"],
                         "steps_per_s": rate, "run_s": steps / rate if rate else None, "peak_gib": memory.peak_gib()}
            memory.baseline = memory.peak = memory._used()  # the next prompt's peak on its own
        out["host"] = host_says(server.log_path.read_text(errors="replace"))
    return out


def gradients(args) -> dict:
    """The child process: the suite's in-process host on this machine, the suite's gradient check."""
    from sefi_testkit import pack
    pack.prepare()
    import torch
    from sefi_testkit import gpu_emulation as gpu
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.gradients import agreement, mapper_gradients
    from sefi_testkit.host import Host

    host = Host(find_comfyui(), ROOT, tempfile.mkdtemp(prefix="sefi-gpu-grad-"), data_dir=ROOT / "tests" / "data")
    if torch.cuda.is_available():  # the host's own choices on this GPU: its default, and fp32 by its flags
        reference = gpu.DtypeSetup("fp32 (--fp32-unet --fp32-text-enc)", torch.float32,
                                   {"fp32_unet": True, "fp32_text_enc": True}, "pytorch", gpu_policy=False)
        half = gpu.DtypeSetup("the host's default", torch.float16, {}, "pytorch", gpu_policy=False)
    else:
        reference, half = gpu.CPU_FP32, gpu.FP16_SDPA  # emulated, as the suite does
    rows = []
    for t in (100, 700):
        g32, *_ = mapper_gradients(host, reference, t, args.grad_resolution, preset=args.preset)
        gh, _, _, scaled, dtype = mapper_gradients(host, half, t, args.grad_resolution, preset=args.preset)
        for term, a, b in zip(("L_KV", "lambda*L_attn"), g32, gh):
            cosine, ratio = agreement(a, b)
            rows.append({"t": t, "term": term, "cosine": cosine, "norm_ratio": ratio, "dtype": str(dtype),
                         "loss_scaling": scaled})
    return {"setups": [reference.name, half.name], "rows": rows, "emulated": not torch.cuda.is_available()}


def machine(comfy_path: Path) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform(), "comfyui": "unknown"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / GIB:.0f} GiB, sm {props.major}.{props.minor}"
    else:
        info["gpu"] = f"none: a dry run on the CPU ({os.cpu_count()} cores)"
    version = comfy_path / "comfyui_version.py"
    if version.exists():
        info["comfyui"] = version.read_text().split('"')[1]
    return info


def summary(info: dict, trainings: list[dict], grads: dict | None, args) -> str:
    fmt = lambda v, spec=".1f", unit="": "n/a" if v is None else f"{v:{spec}}{unit}"
    lines = ["=" * 100, f"SeFi-IDE GPU check: {info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}); ComfyUI "
             f"{info['comfyui']}", f"SeFi: {args.steps} steps at {args.resolution} px on {args.preset}; PVA: "
             f"{args.pva_steps} steps on {args.inpaint_preset}; goals SeFi <= {goals(args)[0]:.0f} s per 1000 steps, "
             f"<= {goals(args)[1]:.0f} GiB"]
    for run in trainings:
        lines.append(f"[{run['mode']}] {run['flags']}")
        for name in ("sefi", "pva"):
            r = run.get(name)
            if r is None:
                continue
            if r["error"]:
                lines.append(f"  {name}: FAILED {r['error'][:500]}")
                continue
            per_1000 = 1000 / r["steps_per_s"] if r["steps_per_s"] else None
            lines.append(f"  {name}: {fmt(r['steps_per_s'], '.2f')} steps/s ({fmt(per_1000, '.1f', ' s')} per 1000; "
                         f"the run {fmt(r['run_s'], '.1f', ' s')}, the whole prompt {fmt(r['prompt_s'], '.1f', ' s')}); "
                         f"peak device memory {fmt(r['peak_gib'], '.2f', ' GiB')}")
        lines += [f"  host: {line}" for line in run.get("host", [])]
    if grads:
        lines.append(f"[gradients] {' vs '.join(grads['setups'])}" + (" (emulated on the CPU)" if grads["emulated"]
                                                                        else ""))
        for row in grads["rows"]:
            ok = row["cosine"] >= 0.99 and abs(row["norm_ratio"] - 1) <= 0.05
            lines.append(f"  t={row['t']:<4d} {row['term']:14s} cosine {row['cosine']:.4f}  norm ratio "
                         f"{row['norm_ratio']:.4f}  ({row['dtype']}, loss scaling {row['loss_scaling']})  "
                         f"{'OK' if ok else 'DIFFERS'}")
    return "\n".join(lines + ["=" * 100])


def readme_rows(trainings: list[dict], grads: dict | None, args) -> list[tuple[str, str]]:
    """The README's lines: each training's time and peak device memory per host mode, and the gradient check."""
    rows, names = [], {"sefi": f"SeFi Train Identity, {args.steps} steps", "pva": f"PVA Fine-tune Identity, "
                                                                                 f"{args.pva_steps} steps"}
    for run in trainings:
        for name in ("sefi", "pva"):
            r = run.get(name)
            if r is None:
                continue
            what = f"{names[name]} at {args.resolution} px, ComfyUI's own set-up ({run['mode']}: {run['flags']})"
            if r["error"]:
                rows.append((what, f"failed: {r['error'][:200]}"))
                continue
            per_1000 = f"{1000 / r['steps_per_s']:.1f} s per 1000 steps" if r["steps_per_s"] else "no rate"
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a"
            wanted = f" (goals <= {goals(args)[0]:.0f} s, <= {goals(args)[1]:.0f} GiB)" if name == "sefi" else ""
            rows.append((what, f"{per_1000}, the run {r['run_s']:.1f} s; peak device memory {peak}{wanted}"))
    if grads:
        worst = min(grads["rows"], key=lambda row: row["cosine"])
        rows.append((f"SeFi's gradients, {' vs '.join(grads['setups'])}, {args.grad_resolution} px",
                     f"worst cosine {worst['cosine']:.4f}, norm ratio {worst['norm_ratio']:.4f} (t={worst['t']}, "
                     f"{worst['term']}; goals >= 0.99, within 5%)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--pva-steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--preset", default="sd15_size", help="sefi_testkit/checkpoint.py preset")
    parser.add_argument("--inpaint-preset", default="sd15_inpaint_size")
    parser.add_argument("--modes", default="dynamic,static", help="from " + ",".join(MODES))
    parser.add_argument("--grad-resolution", type=int, default=512)
    parser.add_argument("--no-gradients", action="store_true")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per prompt")
    parser.add_argument("--out", help="a folder for gpu_check.txt and gpu_check.json")
    parser.add_argument("--sdxl", action="store_true", help="SeFi on a true-size SDXL checkpoint at 1024 px (no PVA)")
    parser.add_argument("--gradients-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdxl:
        args.preset = "sdxl_size" if args.preset == "sd15_size" else args.preset
        args.resolution = 1024 if args.resolution == 512 else args.resolution
        args.grad_resolution = 1024 if args.grad_resolution == 512 else args.grad_resolution
    if args.gradients_child:
        print("RESULT " + json.dumps(gradients(args)), flush=True)
        return
    raw = os.environ.get("COMFYUI_PATH")
    if not raw or not (Path(raw) / "comfy").is_dir():
        sys.exit("Set COMFYUI_PATH to a ComfyUI v0.33 tree (see .ci/gpu/README.md).")
    import torch

    comfy_path, cuda = Path(raw).resolve(), torch.cuda.is_available()
    info = machine(comfy_path)
    print(json.dumps(info), flush=True)
    work = Path(tempfile.mkdtemp(prefix="sefi-gpu-check-"))
    try:
        write_models(work, args)
        trainings = [train_in_server(comfy_path, work, mode, args, cuda) for mode in args.modes.split(",")]
        grads = None
        if not args.no_gradients:
            child = subprocess.run([sys.executable, __file__, "--gradients-child", "--preset", args.preset,
                                    "--grad-resolution", str(args.grad_resolution)], capture_output=True, text=True)
            line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
            grads = json.loads(line[7:]) if line else None
            if grads is None:
                print(f"gradient check FAILED (exit {child.returncode}):\n{child.stderr[-3000:]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = summary(info, trainings, grads, args)
    print(text, flush=True)
    if cuda:  # a CPU dry run measures nothing the README should carry
        import results
        results.save("gpu_check_sdxl" if args.sdxl else "gpu_check", vars(args), {"trainings": trainings, "gradients": grads},
                     readme_rows(trainings, grads, args))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.txt").write_text(text + "\n")
        (out / "gpu_check.json").write_text(json.dumps({"machine": info, "trainings": trainings, "gradients": grads},
                                                       indent=1))


if __name__ == "__main__":
    main()
