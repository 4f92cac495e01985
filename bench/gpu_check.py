"""GPU check on ComfyUI v0.33.0: SeFi Train Identity under the host's default dynamic VRAM and with
--disable-dynamic-vram, and the fp16-vs-fp32 mapper gradients on CUDA. Driven by bench/gpu_check.sh (which
installs the host's start-up packages first); runs on a CPU too, as a dry run of the same code:

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_check.py                      # the real check (CUDA)
    COMFYUI_PATH=... python bench/gpu_check.py --steps 3 --resolution 64 --preset tiny --grad-resolution 64

Each training mode runs in its own process (its own host start-up, its own peak memory): the child sets the
host's command-line flags to their defaults (as `python main.py` with no flags would; `static` adds
--disable-dynamic-vram) and then does, in main.py's order, what main.py does before any model loads:
`import cuda_malloc` (cudaMallocAsync on CUDA torch), `comfy_aimdo.control.init(...)` before torch is imported,
and after `import nodes, execution, comfy.model_management` the dynamic-VRAM switch of main.py:300-331
(`comfy_aimdo.control.init_devices(...)`, then `comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic` and
`comfy.memory_management.aimdo_enabled = True`), with the host's own functions. Nothing is faked: on a CPU the
host's own conditions keep dynamic VRAM off, and the check says so.

Training goes through the real executor: CheckpointLoaderSimple -> LoadImage -> SefiTrainIdentity (the
node's defaults: lr 0.005, lambda 0.003, 5 K/V pairs, all-token attention loss, gradient checkpointing 'auto'),
on a random-weight checkpoint of true SD1.5 size (tests/sefi_testkit/checkpoint.py preset sd15_size). Reported:
the training loop's time (sefi_core.train.train_tokens, timed around the call), steps/s, the whole prompt's
time, peak VRAM (torch's max_memory_allocated / max_memory_reserved, plus the device-wide use sampled with
cudaMemGetInfo, which also sees what comfy-aimdo allocates outside torch's allocator), and the ModelPatcher
classes of the host's MODEL and of the training clone. Goals: <= 40 s for 1000 steps, <= 4 GiB peak.

The gradient check follows tests/test_half_precision.py (mapper_gradients): one fixed batch, a perturbed
mapper, the unscaled mapper gradients of L_KV and of lambda * L_attn computed as the training loop does,
under the host's default fp16 and under --fp32-unet --fp32-text-enc, on CUDA (on a CPU: the emulated fp16
set-up of tests/sefi_testkit/gpu_emulation.py against CPU fp32, as the test does).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
MODES = {"dynamic": "ComfyUI default (dynamic VRAM where the host enables it)",
         "static": "--disable-dynamic-vram"}
GOAL_SECONDS, GOAL_GIB = 40.0, 4.0
TEMPLATE, LAMBDA = 0, 0.003  # the fixed batch's prompt template; the attention-loss weight (the node's default)
GIB = 2 ** 30


# -- host start-up, as main.py does it ---------------------------------------------------------------------------

def start_host_flags(comfy_path: Path, mode: str, cuda_malloc: bool) -> dict:
    """Before torch is imported: the host's flags at their defaults (plus --disable-dynamic-vram for `static`),
    cudaMallocAsync as main.py sets it, and comfy-aimdo's first init (main.py:96-108)."""
    assert "torch" not in sys.modules, "torch must not be imported before the host's start-up (main.py:272)"
    sys.path.insert(0, str(comfy_path))
    import comfy.options  # noqa: F401  (argument parsing stays off: every flag at its default)
    from comfy.cli_args import args, enables_dynamic_vram

    if mode == "static":
        args.disable_dynamic_vram = True
    info = {"mode": mode, "flags": MODES[mode]}
    if cuda_malloc:
        import cuda_malloc as _cuda_malloc  # noqa: F401  (main.py: `import cuda_malloc` before torch)
    info["cuda_malloc"] = bool(args.cuda_malloc)
    info["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    import comfy_aimdo.control

    info["aimdo_init"] = None
    if enables_dynamic_vram():
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * GIB)
        try:
            info["aimdo_init"] = comfy_aimdo.control.init(simple_vram_headroom=headroom,
                                                          nvml_pressure=not args.disable_nvml_pressure)
        except TypeError:
            try:
                info["aimdo_init"] = comfy_aimdo.control.init(simple_vram_headroom=headroom)
            except TypeError:
                info["aimdo_init"] = comfy_aimdo.control.init()
    return info


def switch_dynamic_vram(info: dict) -> None:
    """main.py:291-331 after `import nodes, execution, comfy.model_management`: the switch to ModelPatcherDynamic."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    from comfy.cli_args import args, enables_dynamic_vram

    supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0, 0)) >= (7, 14))
    info["enables_dynamic_vram"] = enables_dynamic_vram()
    info["dynamic_vram_supported"] = supported
    if not (args.enable_dynamic_vram or (enables_dynamic_vram() and supported)):
        why = "--disable-dynamic-vram" if args.disable_dynamic_vram else \
            "no CUDA device: the host runs with --cpu, where enables_dynamic_vram() is False" if args.cpu else \
            "the host does not support it on this device (dynamic_vram_supported() is False)"
        info["dynamic_vram"] = f"off ({why})"
        return
    if not args.enable_dynamic_vram and mm.torch_version_numeric < (2, 8):
        info["dynamic_vram"] = "off (PyTorch < 2.8: the host falls back to the legacy ModelPatcher)"
        return
    devices = mm.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * GIB)) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        info["dynamic_vram"] = "off (comfy-aimdo did not initialise: the host falls back to the legacy ModelPatcher)"
        return
    comfy_aimdo.control.set_log_info()
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    info["dynamic_vram"] = "on (CoreModelPatcher = ModelPatcherDynamic, aimdo_enabled)"


def start_host(comfy_path: Path, work_dir: Path, mode: str, cuda_malloc: bool):
    info = start_host_flags(comfy_path, mode, cuda_malloc)
    # the testkit, without tests/conftest.py (it needs pytest); the repo root stays off sys.path, or the pack's
    # nodes/ package would shadow ComfyUI's nodes module
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.path.insert(0, str(TESTS))
    from sefi_testkit.comfy_env import import_comfy

    import_comfy(comfy_path)  # torch now; --cpu where there is no CUDA (as a CPU user would start the host)
    import comfy.utils  # noqa: F401  (main.py:276-288, in its order)
    import execution  # noqa: F401
    import server  # noqa: F401
    import nodes  # noqa: F401
    import comfy.model_management  # noqa: F401

    switch_dynamic_vram(info)
    from sefi_testkit.host import Host

    host = Host(comfy_path, ROOT, work_dir, data_dir=TESTS / "data")
    return host, info


# -- measurements -------------------------------------------------------------------------------------------------

class DeviceMemorySampler:
    """Device-wide memory in use (cudaMemGetInfo), sampled every 20 ms: it also sees allocations made outside
    torch's caching allocator (comfy-aimdo's)."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self.peak, self.baseline = torch, device, 0, None
        self._stop = threading.Event()

    def _used(self):
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self):
        self.baseline = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def train_graph(preset: str, steps: int, resolution: int, checkpointing: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{preset}.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
            "3": {"class_type": "SefiTrainIdentity", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "name": "gpu_check",
                "trigger": "sks", "class_word": "person", "steps": steps, "learning_rate": 0.005,
                "attention_weight": LAMBDA, "seed": 0, "resolution": resolution, "kv_pairs": "5",
                "attention_loss": "all tokens (#3, paper)", "overwrite": True,
                "gradient_checkpointing": checkpointing}}}


def _patcher_name(patcher) -> str:
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    return f"{type(patcher).__module__}.{type(patcher).__qualname__} (is_dynamic={dynamic})"


@contextlib.contextmanager
def spy_training(training) -> dict:
    """Records, around the pack's own code, the patcher classes of the host's MODEL/CLIP and of the training clones,
    the training loop's time, and the compute dtype. Everything is put back afterwards."""
    import torch

    seen: dict = {}
    trainer_cls, train_tokens = training.HostTrainer, training.train_tokens
    original_init, original_load = trainer_cls.__init__, trainer_cls.load

    def init(self, model, clip, *args, **kwargs):
        seen["host_model"], seen["host_clip"] = _patcher_name(model), _patcher_name(clip.patcher)
        original_init(self, model, clip, *args, **kwargs)
        seen["clone_model"], seen["clone_clip"] = _patcher_name(self.model), _patcher_name(self.clip.patcher)

    def load(self):
        original_load(self)
        seen["device"], seen["compute_dtype"] = str(self.device), str(self.dtype)
        params = list(self.model.model.diffusion_model.parameters())
        seen["unet_weight_devices"] = sorted({str(p.device) for p in params})
        seen["unet_weight_dtypes"] = sorted({str(p.dtype) for p in params})

    def timed_train_tokens(settings, *args, **kwargs):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            result = train_tokens(settings, *args, **kwargs)
        finally:
            sync()
            seen.setdefault("train_calls", []).append(time.perf_counter() - start)
        seen["steps"] = settings.steps
        seen["final_losses"] = [float(x) for x in list(getattr(result, "losses", []))[-3:]]
        return result

    trainer_cls.__init__, trainer_cls.load, training.train_tokens = init, load, timed_train_tokens
    try:
        yield seen
    finally:
        trainer_cls.__init__, trainer_cls.load, training.train_tokens = original_init, original_load, train_tokens


def print_progress(host, every: int = 100) -> None:
    """The host's progress hook, plus a line on stderr every `every` ticks (so a child stopped at its time limit
    still tells how far it got)."""
    import comfy.utils

    start = time.perf_counter()

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        if value == 1 or value % every == 0 or value == total:
            print(f"PROGRESS {value}/{total} at {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return host._progress_hook(value, total, preview_image, prompt_id, node_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def measure_training(host, info: dict, args) -> dict:
    import torch
    import comfy.ldm.modules.attention as attention

    training = sys.modules[host.pack.__name__ + ".nodes.training"]
    cuda = torch.cuda.is_available()
    host.checkpoint(args.preset)
    graph = train_graph(args.preset, args.steps, args.resolution, args.checkpointing)
    if cuda:
        try:
            torch.cuda.reset_peak_memory_stats()
        except RuntimeError as e:  # an allocator backend without peak statistics
            print(f"reset_peak_memory_stats: {e}", file=sys.stderr)
    sampler = DeviceMemorySampler(torch.cuda.current_device()) if cuda else contextlib.nullcontext()
    print_progress(host)
    with spy_training(training) as seen, sampler:
        start = time.perf_counter()
        result = host.run(graph)
        prompt_s = time.perf_counter() - start
    out = dict(info, **seen, prompt_s=prompt_s, success=result.success, attention=attention.optimized_attention.__name__)
    if not result.success:
        error = result.error or {"node_errors": result.node_errors}
        out["error"] = (error.get("exception_message") or str(error))[:2000]
        out["traceback"] = "".join(error.get("traceback", []))[-4000:] if isinstance(error, dict) else ""
    calls = seen.get("train_calls", [])
    if calls:
        out["train_s"] = calls[-1]
        out["train_restarts"] = len(calls) - 1  # 'auto' restarted with gradient checkpointing after an OOM
        out["steps_per_s"] = args.steps / calls[-1]
    identity = host.identity_dir / "gpu_check.safetensors"
    if identity.exists():
        from safetensors.torch import load_file

        out["identity_finite"] = all(bool(torch.isfinite(t.float()).all()) for t in load_file(identity).values())
    if cuda:
        try:
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        except RuntimeError as e:  # the summary then rests on the device-wide figure
            out["peak_allocated_gib"] = out["peak_reserved_gib"] = 0.0
            out["peak_stats_error"] = str(e)
        out["device_used_peak_gib"] = sampler.peak / GIB
        out["device_used_before_gib"] = sampler.baseline / GIB
        out["allocator_backend"] = torch.cuda.get_allocator_backend()
        try:
            import comfy_aimdo.control

            out["aimdo_vram_after_gib"] = comfy_aimdo.control.get_total_vram_usage() / GIB
        except Exception as e:  # noqa: BLE001
            out["aimdo_vram_after_gib"] = f"n/a ({e})"
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


# -- fp16 vs fp32 mapper gradients (tests/test_half_precision.py's approach) ---------------------------------------

def grad_setups():
    import torch
    from sefi_testkit import gpu_emulation as gpu

    if torch.cuda.is_available():  # the host's real choices on this GPU: its default, and fp32 by its own flags
        return (gpu.DtypeSetup("fp32 (--fp32-unet --fp32-text-enc)", torch.float32,
                               {"fp32_unet": True, "fp32_text_enc": True}, "pytorch", gpu_policy=False),
                gpu.DtypeSetup("fp16 (host default)", torch.float16, {}, "pytorch", gpu_policy=False))
    return gpu.CPU_FP32, gpu.FP16_SDPA  # emulated on the CPU, as tests/test_half_precision.py does


def mapper_gradients(host, setup, ts, resolution, preset) -> dict:
    """{t: ([grad L_KV, grad lambda*L_attn] as float64 vectors, L_KV, L_attn)} for one setup, one load."""
    import torch
    from sefi_testkit import gpu_emulation as gpu

    pack = host.pack.__name__
    training, train = sys.modules[pack + ".nodes.training"], sys.modules[pack + ".sefi_core.train"]
    mapper_module = sys.modules[pack + ".sefi_core.mapper"]
    out = {}
    with gpu.emulate(setup):
        with torch.inference_mode():  # as the executor loads and hands over the models
            model, clip, vae = host.load_checkpoint(host.checkpoint(preset))
            trainer = training.HostTrainer(model, clip, "sks", "person", "all")
        with torch.inference_mode(), training.frozen(trainer.model.model, trainer.clip.cond_stage_model), \
                torch.inference_mode(False), torch.enable_grad():
            trainer.load()
            try:
                image = host.nodes.LoadImage().load_image("astronaut.png")[0]
                latent, mask = trainer.training_samples(image, vae, resolution, 1, torch.Generator().manual_seed(0))[0]
                trainer.find_loss_layers(latent)
                torch.manual_seed(5)  # perturbed_mapper: away from the start, where L_attn and its gradient are 0
                mapper = mapper_module.TokenMapper(trainer.class_embedding, 5)
                torch.nn.init.normal_(mapper.out.weight, std=1.0)
                mapper = mapper.to(trainer.device)
                params = list(mapper.parameters())
                for t in ts:
                    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)).to(latent.device)
                    batch = train.Batch(latent, mask, t, TEMPLATE, noise)
                    l_kv, l_attn = train.loss_terms(mapper, batch, trainer.encode_kv, trainer.denoise,
                                                    train.even_boundaries(5))
                    scaler = train.loss_scaler(trainer.device, trainer.dtype)
                    grads = []
                    for term in (l_kv, LAMBDA * l_attn):
                        scaled = torch.autograd.grad(scaler.scale(term), params, retain_graph=True, allow_unused=True)
                        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                          for g, p in zip(scaled, params)])
                        grads.append(flat.double().cpu() / scaler.get_scale())
                    out[t] = (grads, l_kv.item(), l_attn.item(), str(trainer.dtype), scaler.is_enabled())
            finally:
                trainer.release()
    return out


def measure_gradients(host, info: dict, args) -> dict:
    import torch

    reference_setup, half_setup = grad_setups()
    ts = [int(t) for t in args.grad_timesteps.split(",")]
    start = time.perf_counter()
    reference = mapper_gradients(host, reference_setup, ts, args.grad_resolution, args.preset)
    half = mapper_gradients(host, half_setup, ts, args.grad_resolution, args.preset)
    rows = []
    for t in ts:
        (g32, l32, a32, d32, _), (gh, lh, ah, dh, scaled) = reference[t], half[t]
        for name, a, b in zip(("L_KV", "lambda*L_attn"), g32, gh):
            rows.append({"t": t, "term": name, "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                         "norm_ratio": float(b.norm() / a.norm()), "ref_norm": float(a.norm())})
        rows.append({"t": t, "term": "losses", "L_KV_ref": l32, "L_KV_half": lh, "L_attn_ref": a32, "L_attn_half": ah,
                     "dtypes": f"{d32} vs {dh}", "loss_scaling": scaled})
    return dict(info, setups=[reference_setup.name, half_setup.name], resolution=args.grad_resolution, rows=rows,
                grad_s=time.perf_counter() - start, emulated=not torch.cuda.is_available())


# -- child process ------------------------------------------------------------------------------------------------

def run_child(args) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    comfy_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    mode = "dynamic" if args.child == "grad" else args.child
    host, info = start_host(comfy_path, Path(args.work_dir), mode, not args.no_cuda_malloc)
    if args.child == "grad":
        return measure_gradients(host, info, args)
    return measure_training(host, info, args)


# -- parent: machine, children, summary ---------------------------------------------------------------------------

def machine_info(comfy_path: Path) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "platform": platform.platform()}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"none (CPU, {os.cpu_count()} cores: a dry run)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip()
    version_file = comfy_path / "comfyui_version.py"
    info["comfyui"] = version_file.read_text().split('"')[1] if version_file.exists() else "unknown"
    for name in ("torchaudio", "comfy-aimdo", "comfy-kitchen", "av", "transformers", "safetensors"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "MISSING"
    return info


def spawn(args, what: str, work_dir: str, log_dir: Path | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--work-dir", work_dir, "--steps", str(args.steps),
           "--resolution", str(args.resolution), "--preset", args.preset, "--checkpointing", args.checkpointing,
           "--grad-resolution", str(args.grad_resolution), "--grad-timesteps", args.grad_timesteps]
    if args.no_cuda_malloc:
        cmd.append("--no-cuda-malloc")
    print(f"--- {what} (time limit {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1"))
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\nTIMEOUT after {timeout:.0f} s"
        rc = "timeout"
    if log_dir is not None:
        (log_dir / f"{what}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{what}: FAILED (exit {rc}, {time.perf_counter() - start:.0f} s)\n{stderr[-4000:]}", flush=True)
        progress = [l for l in stderr.splitlines() if l.startswith("PROGRESS ")]
        return {"mode": what, "success": False, "error": f"child exit {rc}: " + stderr[-600:],
                "last_progress": progress[-1] if progress else "none"}
    result = json.loads(line[7:])
    result["child_s"] = time.perf_counter() - start
    for key in ("dynamic_vram", "cuda_malloc"):
        if key in result:
            print(f"  {key}: {result[key]}")
    if not result.get("success", True):
        print(f"  training failed: {result.get('error')}\n{result.get('traceback', '')}", flush=True)
    return result


def fmt(value, spec=".2f", unit=""):
    return "n/a" if value is None or isinstance(value, str) else f"{value:{spec}}{unit}"


def summary(machine: dict, results: dict, args) -> str:
    lines = ["=" * 100, "SeFi-IDE GPU check" + ("  (DRY RUN: no CUDA)" if machine["gpu"].startswith("none") else ""),
             f"machine   : {machine['gpu']}" + (f", {machine.get('gpu_memory_gib')} GiB, sm {machine.get('capability')}, "
                                                   f"driver {machine.get('driver')}" if "capability" in machine else ""),
             f"python    : {machine['python']} ({machine['executable']})",
             f"torch     : {machine['torch']} (CUDA {machine['torch_cuda']}), torchaudio {machine['torchaudio']}",
             f"ComfyUI   : {machine['comfyui']} (comfy-aimdo {machine['comfy-aimdo']}, comfy-kitchen "
             f"{machine['comfy-kitchen']}, av {machine['av']}, transformers {machine['transformers']})",
             f"training  : {args.steps} steps at {args.resolution} px, preset {args.preset}, checkpointing "
             f"{args.checkpointing}; goals <= {GOAL_SECONDS:.0f} s per 1000 steps, <= {GOAL_GIB:.0f} GiB peak"]
    for mode in MODES:
        r = results.get(mode)
        if r is None:
            continue
        lines.append(f"[{mode}] {MODES[mode]}")
        lines.append(f"  dynamic VRAM : {r.get('dynamic_vram', 'n/a')}; allocator {r.get('allocator_backend', 'n/a')} "
                     f"(cuda_malloc {r.get('cuda_malloc')})")
        lines.append(f"  host MODEL   : {r.get('host_model', 'n/a')}")
        lines.append(f"  train clone  : {r.get('clone_model', 'n/a')}; CLIP {r.get('clone_clip', 'n/a')}")
        lines.append(f"  compute      : {r.get('compute_dtype', 'n/a')} on {r.get('device', 'n/a')}, UNet weights on "
                     f"{r.get('unet_weight_devices', 'n/a')} {r.get('unet_weight_dtypes', '')}, attention "
                     f"{r.get('attention', 'n/a')}")
        if not r.get("success"):
            lines.append(f"  FAILED       : {str(r.get('error'))[:600]}")
            if "last_progress" in r:
                lines.append(f"  got as far as: {r['last_progress']}")
            continue
        per_1000 = r["train_s"] * 1000 / args.steps if r.get("train_s") else None
        verdict = ""
        if "peak_allocated_gib" in r and per_1000 is not None:
            peak = max(r["peak_reserved_gib"], r["device_used_peak_gib"] - r["device_used_before_gib"])
            verdict = (f"  -> time {'OK' if per_1000 <= GOAL_SECONDS else 'OVER GOAL'}, "
                       f"memory {'OK' if peak <= GOAL_GIB else 'OVER GOAL'} (largest of reserved / device-wide)")
        lines.append(f"  {args.steps} steps  : {fmt(r.get('train_s'), '.1f', ' s')} ({fmt(r.get('steps_per_s'), '.1f')} "
                     f"steps/s; {fmt(per_1000, '.1f', ' s')} per 1000), whole prompt {fmt(r.get('prompt_s'), '.1f', ' s')}"
                     f", OOM restarts {r.get('train_restarts', 0)}, identity finite {r.get('identity_finite')}")
        if "peak_allocated_gib" in r:
            lines.append(f"  peak VRAM    : allocated {fmt(r['peak_allocated_gib'], '.2f', ' GiB')}, reserved "
                         f"{fmt(r['peak_reserved_gib'], '.2f', ' GiB')}, device-wide {fmt(r['device_used_peak_gib'], '.2f')}"
                         f" GiB (before {fmt(r['device_used_before_gib'], '.2f')} GiB)")
            lines.append(verdict)
        else:
            lines.append(f"  peak RSS     : {fmt(r.get('peak_rss_gib'), '.2f', ' GiB')} (CPU: no VRAM figures)")
    g = results.get("grad")
    if g is not None:
        lines.append(f"[gradients] {' vs '.join(g.get('setups', []))} at {g.get('resolution')} px"
                     + (" (EMULATED on the CPU)" if g.get("emulated") else " (CUDA)")
                     + f"; dynamic VRAM {g.get('dynamic_vram', 'n/a')}")
        if "rows" not in g:
            lines.append(f"  FAILED       : {str(g.get('error'))[:600]}")
        for row in g.get("rows", []):
            if row["term"] == "losses":
                lines.append(f"  t={row['t']:<4d} L_KV {row['L_KV_ref']:.5f} vs {row['L_KV_half']:.5f}, L_attn "
                             f"{row['L_attn_ref']:.4e} vs {row['L_attn_half']:.4e} ({row['dtypes']}, loss scaling "
                             f"{row['loss_scaling']})")
            else:
                ok = row["cosine"] >= 0.99 and abs(row["norm_ratio"] - 1) <= 0.05
                lines.append(f"  t={row['t']:<4d} {row['term']:14s} cosine {row['cosine']:.4f}  norm ratio "
                             f"{row['norm_ratio']:.4f}  |g32| {row['ref_norm']:.3e}  {'OK' if ok else 'DIFFERS'} "
                             f"(test bounds: cosine >= 0.99, ratio 1 +- 0.05)")
    lines.append("=" * 100)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--preset", default="sd15_size", help="tests/sefi_testkit/checkpoint.py preset")
    parser.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                        help="the node's gradient_checkpointing input (default: the node's default)")
    parser.add_argument("--modes", default="dynamic,static", help="comma-separated, from " + ",".join(MODES))
    parser.add_argument("--no-grad", action="store_true", help="skip the fp16-vs-fp32 gradient check")
    parser.add_argument("--grad-resolution", type=int, default=512)
    parser.add_argument("--grad-timesteps", default="100,700")
    parser.add_argument("--no-cuda-malloc", action="store_true", help="as main.py --disable-cuda-malloc")
    parser.add_argument("--child-timeout", type=int, default=240, help="at most this many seconds per training child")
    parser.add_argument("--deadline", type=int, default=480,
                        help="seconds for all children together (the device tool allows 600 per call)")
    parser.add_argument("--grad-reserve", type=int, default=100, help="seconds kept for the gradient check")
    parser.add_argument("--work-dir", help="where the checkpoint is written (default: a fresh temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    raw = os.environ.get("COMFYUI_PATH")
    if not raw or not (Path(raw) / "comfy").is_dir():
        sys.exit("Set COMFYUI_PATH to a ComfyUI v0.33.0 tree.")
    comfy_path = Path(raw).resolve()
    machine = machine_info(comfy_path)
    print(json.dumps(machine, indent=1), flush=True)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="sefi-gpu-check-")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        end = time.perf_counter() + args.deadline
        reserve = 0 if args.no_grad else args.grad_reserve  # kept for the gradient check
        for mode in args.modes.split(","):
            left = end - time.perf_counter() - reserve
            results[mode] = spawn(args, mode, work_dir, out_dir, max(30.0, min(args.child_timeout, left)))
        if not args.no_grad:
            results["grad"] = spawn(args, "grad", work_dir, out_dir, max(30.0, end - time.perf_counter()))
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    text = summary(machine, results, args)
    print(text, flush=True)
    if out_dir is not None:
        (out_dir / "gpu_check.txt").write_text(text + "\n")
        (out_dir / "gpu_check.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
