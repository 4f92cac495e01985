"""A headless harness around the real ComfyUI at $COMFYUI_PATH: loads this pack and runs prompts
through ComfyUI's own validator and PromptExecutor, as the server would, without a server.

ComfyUI keeps its state in module globals (node registry, folder paths, loaded models, interrupt
flag), so there can be one Host per process.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import inspect
import logging
import shutil
import sys
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import PRESETS, write_checkpoint
from .comfy_env import import_comfy

log = logging.getLogger(__name__)

CLIENT_ID = "sefi-tests"
IDENTITY_FOLDER = "sefi_identities"
TRAIN_STATE_FOLDER = "sefi_training_state"
PVA_IDENTITY_FOLDER = "pva_identities"
_active_host: Host | None = None


@dataclass
class Result:
    """What a prompt produced. `error` is the execution_error data, or the validation error when
    the prompt was rejected before running (then `messages` is empty and `node_errors` says why)."""

    success: bool
    outputs: dict[str, dict] = field(default_factory=dict)
    messages: list[tuple[str, dict]] = field(default_factory=list)
    error: dict | None = None
    node_errors: dict = field(default_factory=dict)
    interrupted: bool = False
    events: list[tuple[str, Any]] = field(default_factory=list)  # everything sent to the server stub
    prompt_id: str = ""

    def event_names(self) -> list[str]:
        return [name for name, _ in self.messages]


class ServerStub:
    """The parts of server.PromptServer that the executor, progress handlers and packs touch."""

    def __init__(self):
        from aiohttp import web

        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.routes = web.RouteTableDef()
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        """The real server's method (it packs the text into a binary TEXT message and sends it with send_sync)."""
        return sys.modules["server"].PromptServer.send_progress_text(self, text, node_id, sid)

    def progress_texts(self) -> list[tuple[str, str]]:
        """(node id, text) of every progress-text message sent so far."""
        texts = []
        for event, data in self.events:
            if isinstance(data, (bytes, bytearray)) and event == 3:  # protocol.BinaryEventTypes.TEXT
                length = int.from_bytes(data[:4], "big")
                texts.append((data[4:4 + length].decode(), data[4 + length:].decode()))
        return texts


class Host:
    """One ComfyUI host with this pack loaded, rooted in `work_dir` (checkpoints, identities,
    input, output, temp, user). Checkpoints named `<preset>.safetensors` are generated on first use."""

    def __init__(self, comfy_path: str | Path, repo_root: str | Path, work_dir: str | Path, data_dir: str | Path | None = None):
        global _active_host
        if _active_host is not None:
            raise RuntimeError("ComfyUI state is process-wide: create one Host per process")
        self.comfy_path = Path(comfy_path).resolve()
        import_comfy(self.comfy_path)
        self.repo_root = Path(repo_root).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.progress: list[tuple[int, int]] = []
        self.previews: list[tuple[int, Any]] = []  # (progress value, the preview image a node sent with it)
        self.tick_watchers: list = []  # functions called at every progress tick with (value, total), before recording
        self._interrupt_tick: int | None = None
        self._import_modules()
        self._set_folders(data_dir)
        self.server = self._install_server()
        self._install_progress_hook()
        self._load_nodes()
        self.identity_dir = self._make_dir("identities")
        self.folder_paths.add_model_folder_path(IDENTITY_FOLDER, str(self.identity_dir), is_default=True)
        self.train_state_dir = self._make_dir("training_state")
        self.folder_paths.add_model_folder_path(TRAIN_STATE_FOLDER, str(self.train_state_dir), is_default=True)
        self.pva_identity_dir = self._make_dir("pva_identities")
        self.folder_paths.add_model_folder_path(PVA_IDENTITY_FOLDER, str(self.pva_identity_dir), is_default=True)
        self.pva_encoder_dir = self._make_dir("pva_encoders")
        self.folder_paths.add_model_folder_path("pva_encoders", str(self.pva_encoder_dir), is_default=True)
        self.face_recognizer_dir = self._make_dir("face_recognizers")
        self.folder_paths.add_model_folder_path("face_recognizers", str(self.face_recognizer_dir), is_default=True)
        self.embedding_dir = self._make_dir("embeddings")
        self.folder_paths.add_model_folder_path("embeddings", str(self.embedding_dir), is_default=True)
        self.executor = _classic_executor(self.execution, self.server)
        _active_host = self

    # -- set-up -------------------------------------------------------------------------------

    def _import_modules(self):
        import comfy.model_management
        import comfy.utils
        import execution
        import folder_paths
        import nodes

        self.comfy = sys.modules["comfy"]
        self.model_management = comfy.model_management
        self.comfy_utils = comfy.utils
        self.execution = execution
        self.folder_paths = folder_paths
        self.nodes = nodes
        self.server_module = _import_server_module()
        import comfyui_version
        self.version = comfyui_version.__version__  # what core's nodes are saved with in a workflow ("ver")

    def _make_dir(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _set_folders(self, data_dir):
        fp = self.folder_paths
        self.checkpoint_dir = self._make_dir("checkpoints")
        self.input_dir = self._make_dir("input")
        self.output_dir = self._make_dir("output")
        self.temp_dir = self._make_dir("temp")
        fp.set_input_directory(str(self.input_dir))
        fp.set_output_directory(str(self.output_dir))
        fp.set_temp_directory(str(self.temp_dir))
        fp.set_user_directory(str(self._make_dir("user")))
        fp.add_model_folder_path("checkpoints", str(self.checkpoint_dir), is_default=True)
        if data_dir is not None:
            for image in sorted(Path(data_dir).glob("*.png")):
                shutil.copy(image, self.input_dir / image.name)

    def _install_server(self) -> ServerStub:
        stub = ServerStub()
        self.server_module.PromptServer.instance = stub
        return stub

    def _install_progress_hook(self):
        self.comfy_utils.set_progress_bar_global_hook(self._progress_hook)
        # Newer hosts drop progress ticks within 100 ms (or 0.5%) of the last one sent, for the UI's sake, so which
        # ticks reach the hook would depend on this machine's speed; tests count ticks (interrupt_at_tick), so
        # every tick is sent here.
        for throttle in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
            if hasattr(self.comfy_utils, throttle):
                setattr(self.comfy_utils, throttle, 0.0)

    def _load_nodes(self):
        asyncio.run(self.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        module_name = str(self.repo_root).replace(".", "_x_")  # how load_custom_node names it
        problems = _LogCollector()
        with problems:
            loaded = asyncio.run(self.nodes.load_custom_node(str(self.repo_root), module_parent="custom_nodes"))
        if not loaded:
            raise RuntimeError(f"ComfyUI failed to load the pack at {self.repo_root}:\n{problems.text()}")
        self.pack = sys.modules[module_name]

    # -- progress and interrupts ---------------------------------------------------------------

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        """Like main.py's hijack_progress hook (it is where ComfyUI raises on interrupt), plus recording."""
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        for watch in self.tick_watchers:
            watch(value, total)
        self.progress.append((value, total))
        if preview_image is not None:
            self.previews.append((value, preview_image))
        if self._interrupt_tick is not None and len(self.progress) >= self._interrupt_tick:
            self._interrupt_tick = None
            self.model_management.interrupt_current_processing(True)
        self.model_management.throw_exception_if_processing_interrupted()
        context = get_executing_context()
        if context is not None:
            prompt_id = prompt_id or context.prompt_id
            node_id = node_id or context.node_id
        node_id = node_id or self.server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        progress = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        self.server.send_sync("progress", progress, self.server.client_id)

    def interrupt_at_tick(self, n: int) -> None:
        """Interrupt processing when the n-th progress tick (1-based, counted in `progress`) arrives.
        One-shot; disarmed after each run() and by reset()."""
        self._interrupt_tick = n

    # -- running ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget executor caches, progress, pending interrupts and recorded events."""
        self.executor.reset()
        self.model_management.interrupt_current_processing(False)
        self._interrupt_tick = None
        self.progress.clear()
        self.previews.clear()
        self.server.events.clear()

    def run(self, prompt: dict, fresh: bool = True) -> Result:
        """Validate and execute an API-format prompt. fresh=False keeps the executor's output
        cache from earlier runs, as a long-running ComfyUI would."""
        if fresh:
            self.executor.reset()
            gc.collect()  # the models of earlier runs (see load_checkpoint)
        self.progress.clear()
        self.previews.clear()
        self.server.events.clear()
        self.model_management.interrupt_current_processing(False)
        self._materialize_checkpoints(prompt)
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            self._interrupt_tick = None
            return Result(success=False, error=error, node_errors=node_errors, prompt_id=prompt_id)
        try:
            self.executor.execute(prompt, prompt_id, {"client_id": CLIENT_ID}, outputs)
        finally:
            self._interrupt_tick = None
        return self._result(prompt_id, node_errors)

    def _result(self, prompt_id: str, node_errors: dict) -> Result:
        messages = list(self.executor.status_messages)
        names = [name for name, _ in messages]
        error = next((data for name, data in messages if name == "execution_error"), None)
        return Result(
            success=self.executor.success and "execution_success" in names,
            outputs=self.executor.history_result["outputs"],
            messages=messages,
            error=error,
            node_errors=node_errors,
            interrupted="execution_interrupted" in names,
            events=list(self.server.events),
            prompt_id=prompt_id,
        )

    # -- models and nodes ------------------------------------------------------------------------

    def module(self, name: str):
        """One of the loaded pack's modules, e.g. module("nodes.sefi.training"): the code the host runs (the suite's
        own `import sefi_core` is a second copy, fine for host-free helpers, not for patching or isinstance)."""
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def node(self, name: str) -> type:
        """A node class as registered with the host (the pack's own module copy, not a re-import)."""
        return self.nodes.NODE_CLASS_MAPPINGS[name]

    def checkpoint(self, preset: str = "tiny") -> str:
        """The ckpt_name of a generated preset checkpoint, writing it on first use."""
        name = f"{preset}.safetensors"
        path = self.checkpoint_dir / name
        if not path.exists():
            write_checkpoint(path.with_suffix(".tmp"), preset).rename(path)
        return name

    def load_checkpoint(self, name: str = "tiny.safetensors"):
        """(model, clip, vae) from the core CheckpointLoaderSimple under inference mode, as the
        executor would load them (so the weights are inference tensors). Models no test holds any more are freed
        first: a ModelPatcher sits in reference cycles, which only the collector frees, and an SDXL checkpoint's
        text encoders alone take 1.6 GB."""
        gc.collect()
        self._materialize_name(name)
        with torch.inference_mode():
            return self.nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]

    def saved_images(self, result: Result, node_id: str) -> list[Path]:
        """Files written by a SaveImage-like output node in `result`."""
        images = result.outputs.get(node_id, {}).get("images", [])
        return [self.output_dir / image["subfolder"] / image["filename"] for image in images]

    def _materialize_checkpoints(self, prompt: dict):
        for node in prompt.values():
            for value in node.get("inputs", {}).values():
                if isinstance(value, str):
                    self._materialize_name(value)

    def _materialize_name(self, name: str):
        stem, dot, ext = name.rpartition(".")
        if dot and ext == "safetensors" and stem in PRESETS:
            self.checkpoint(stem)


def _classic_executor(execution, server):
    """The host's PromptExecutor with its classic cache, as `main.py --cache-classic` makes it. Newer hosts read
    `cache_args` in every execute (RAM headroom; classic caching gives 0 GB, as main.py does), older ones lack it."""
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)


def _import_server_module() -> types.ModuleType:
    """ComfyUI's server.py, or a stand-in module with a PromptServer class when it cannot be
    imported (it needs packages such as `requests` that ComfyUI's requirements.txt does not list)."""
    try:
        import server
    except ImportError as exc:
        log.warning("ComfyUI's server.py does not import (%s); using a stand-in `server` module", exc)
        server = types.ModuleType("server")
        server.PromptServer = type("PromptServer", (), {"instance": None})
        sys.modules["server"] = server
    return server


class _LogCollector(logging.Handler):
    """Collects WARNING+ log records while active (load_custom_node only logs its import errors)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.records) or "(nothing was logged)"

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)
