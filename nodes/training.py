"""Training inside the host, for both systems: gradients through ComfyUI's frozen, already-loaded UNet and CLIP.

Host traps handled here: weights loaded under the executor are inference tensors, so every weight gets an identity
weight wrapper on a clone (a fresh copy per forward that autograd can save); CLIPLayer adds in place, so the clone's
CLIP layers get an out-of-place forward; parameters are shared with the host, so their requires_grad flags are
switched off for the run and restored after.

Dynamic VRAM (the host's default on NVIDIA since v0.15): a ModelPatcherDynamic keeps the weights in host memory
and casts each layer into reused GPU buffers as it runs, so a weight autograd saved for backward may already hold
another layer's values, and `layer.weight` may sit on the CPU while the layer runs on the GPU. Training therefore
works on clones whose weights are resident and real on the training device for the whole run (`resident_clones`).

Precision: the UNet computes in whatever dtype the host loaded it for (fp16/bf16 on GPUs, no cast to fp32); what a
training feeds it is cast to that dtype on the way in, and fp16 runs get loss scaling (sefi_core/training.py).

Each system builds its trainer on `TrainingClones` (nodes/sefi/training.py, nodes/pva/training.py) and runs it with
`train_on_clones`; tests and benchmarks enter the same `training_session`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
from comfy_api.latest import io

from ..sefi_core.tokens import mark_triggers
from .clip_tokens import split_by_encoder, text_encoder, token_keys, token_widths, word_token_ids

log = logging.getLogger(__name__)
TRIGGER_SLOT = object()  # marks the trigger's slot in a training prompt, filled with the embedding being trained
CHECKPOINTING_MODES = ("auto", "on", "off")


def checkpointing_input():
    """The gradient_checkpointing input every training node declares."""
    return io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING_MODES), default="auto", optional=True,
                          tooltip="Saves GPU memory by recomputing activations during the backward pass, at about a "
                                  "third more time per step. auto: off, and switched on by itself if the GPU runs out "
                                  "of memory. on: for cards with 8 GB or less. off: fastest.")


def _identity(weight):
    return weight


def _out_of_place(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


def _wrap_weights(patcher, root) -> None:
    for name, module in root.named_modules():
        if hasattr(module, "weight_function"):
            for attr in ("weight", "bias"):
                if getattr(module, attr, None) is not None:
                    patcher.add_weight_wrapper(f"{name}.{attr}", _identity)


@contextlib.contextmanager
def frozen(*modules):
    """requires_grad off on the (shared) host parameters for the run; the original flags come back after.
    Enter it in the executor's inference mode: inference tensors' flags can only be set there."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def compute_dtype(model) -> torch.dtype:
    """The dtype the host runs this UNet in: its manual-cast dtype, else its weights' dtype."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


class GradientCheckpointing:
    """DIFFUSION_MODEL wrapper: while `enabled`, each ResBlock and SpatialTransformer of the UNet call keeps
    only its inputs and recomputes its activations (and the per-forward weight copies) in backward
    (non-reentrant torch.utils.checkpoint). A step takes 1.3-1.4x as long (bench/bench_train.py: fp32 1.32, bf16 1.40 at
    512 px) for a fraction of the activations' memory (the peak of a 512 px fp32 run there: 7.1 instead of 13.1 GiB,
    the model included)."""

    BLOCKS = (comfy.ldm.modules.diffusionmodules.openaimodel.ResBlock, comfy.ldm.modules.attention.SpatialTransformer)

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def __call__(self, executor, *args, **kwargs):
        if not (self.enabled and torch.is_grad_enabled()):
            return executor(*args, **kwargs)
        blocks = [m for m in executor.class_obj.modules() if isinstance(m, self.BLOCKS)]
        saved = [m.__dict__.get("forward") for m in blocks]
        for m in blocks:
            m.forward = _checkpointed(m.forward)
        try:
            return executor(*args, **kwargs)
        finally:  # the recompute in backward uses the forward captured above
            for m, forward in zip(blocks, saved):
                if forward is None:
                    del m.forward
                else:
                    m.forward = forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def resident_clones(model, clip, node: str):
    """Clones of the host's MODEL and CLIP whose weights a full load puts on the training device, as real tensors.

    Of the host's three ways (v0.33 model_patcher.py), `clone(disable_dynamic=True)` is the one that fits: on a
    classic patcher it is a plain clone sharing the loaded weights (no copy, nothing reloaded); on a dynamic one it
    reloads the model through the loader's `cached_patcher_init` into a classic ModelPatcher, whose full load makes
    every weight resident, so no weight goes through aimdo's shared cast buffers. `get_non_dynamic_delegate()` does
    the same but caches the copy on the patcher we received (an input left changed, a second model kept alive);
    `clone(force_deepcopy=True)` is for trainers that change weights (core's LoRA trainer) and stays dynamic.
    Hosts from before dynamic VRAM (v0.3.x) have no such argument: there a plain clone is already classic."""
    if not _accepts(type(model).clone, "disable_dynamic"):
        return model.clone(), clip.clone()
    try:
        model_clone, clip_clone = model.clone(disable_dynamic=True), clip.clone(disable_dynamic=True)
    except RuntimeError as error:  # a dynamic MODEL/CLIP from a loader that gave no way to reload it
        raise RuntimeError(
            f"{node} cannot train on this MODEL/CLIP under ComfyUI's dynamic VRAM ({error}). Connect the outputs of "
            "Load Checkpoint directly, or start ComfyUI with --disable-dynamic-vram.") from None
    # CLIP.clone keeps the original encoder beside the new patcher: encode through the patcher's (reloaded) one.
    clip_clone.cond_stage_model = clip_clone.patcher.model
    return model_clone, clip_clone


def check_resident(patcher, device) -> None:
    """Every weight of a loaded training clone on the training device (else layers would be cast per call)."""
    elsewhere = {str(p.device) for p in patcher.model.parameters() if p.device != torch.device(device)}
    if elsewhere:
        raise RuntimeError(f"ComfyUI kept part of the model on {', '.join(sorted(elsewhere))} instead of {device} "
                           "(low-VRAM loading), which training cannot use. Lower 'resolution', close other programs "
                           "using the GPU, or start ComfyUI with --disable-dynamic-vram --normalvram.")


def is_out_of_memory(error: BaseException) -> bool:
    """Every allocation failure the host can raise: torch's OOM, CUDA errors the host counts as OOM (`is_oom`,
    newer hosts), and aimdo's MemoryError ('VBAR allocation failed')."""
    mm = comfy.model_management
    if isinstance(error, (mm.OOM_EXCEPTION, MemoryError)):
        return True
    return bool(getattr(mm, "is_oom", lambda e: False)(error))


def fp32_weight(linear, device) -> torch.Tensor:
    """A layer's weight as fp32 (from fp16, bf16 or fp8 storage) on `device`, with any host weight function applied."""
    weight = linear.weight.to(device).float()
    for function in getattr(linear, "weight_function", []):
        weight = function(weight)
    return weight.detach().clone()


@contextlib.contextmanager
def forward_pre_hooks(modules, hook):
    """Forward pre-hooks that exist only inside the `with` (removed even on cancel or error)."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TrainingClones:
    """Resident clones of the host's MODEL and CLIP that gradients flow through (module docstring), loaded with
    load() and given back with release(); prompts with the trigger's slot filled by a differentiable embedding.
    `patch_model` may add object patches to the model clone first (they are applied when it loads). `node`: the
    display name of the node that trains, which every message names. `checkpointing`: the UNet wrapper a trainer's
    forward passes in its transformer options; on from the start, or switched on by train_on_clones."""

    def __init__(self, model, clip, trigger: str, node: str, checkpointing: bool = False,
                 patch_model=lambda clone: clone):
        self.node = node
        self.checkpointing = GradientCheckpointing(checkpointing)
        self.model, self.clip = resident_clones(model, clip, node)
        self.model = patch_model(self.model)
        _wrap_weights(self.model, self.model.model)
        _wrap_weights(self.clip.patcher, self.clip.cond_stage_model)
        # ("l",) CLIP-L, ("h",) SD2's OpenCLIP ViT-H (PVA's), ("l", "g") SDXL's CLIP-L and bigG (SeFi's)
        self.token_keys, self.token_widths = token_keys(clip), token_widths(clip)
        for key in self.token_keys:
            for i, layer in enumerate(text_encoder(self.clip, key).transformer.text_model.encoder.layers):
                self.clip.patcher.add_object_patch(
                    f"clip_{key}.transformer.text_model.encoder.layers.{i}.forward", _out_of_place(layer))
        self.tokenizer = getattr(clip.tokenizer, "inner", clip.tokenizer)  # an applied CLIP's plain tokenizer
        self.trigger_ids = word_token_ids(clip, trigger)
        self.trigger = trigger
        self.sampling = self.model.get_model_object("model_sampling")
        self._prompts = {}

    def load(self) -> None:
        comfy.model_management.load_models_gpu([self.model, self.clip.patcher], force_full_load=True)
        self.device = self.model.load_device
        check_resident(self.model, self.device)
        self.dtype = compute_dtype(self.model)

    def release(self) -> None:
        """Unload the training clones so their wrappers and object patches leave the shared modules, and give
        what training held back to the host's memory management."""
        loaded = comfy.model_management.current_loaded_models
        for i in reversed(range(len(loaded))):
            if loaded[i].model in (self.model, self.clip.patcher):
                loaded.pop(i).model_unload()
        comfy.model_management.soft_empty_cache()

    def marked_prompt(self, text: str) -> dict[str, list]:
        """The tokenized prompt (token key -> chunks), the trigger's tokens replaced by one TRIGGER_SLOT entry."""
        if text not in self._prompts:
            tokens = self.tokenizer.tokenize_with_weights(text)
            self._prompts[text] = {key: mark_triggers(tokens[key], {self.trigger_ids: TRIGGER_SLOT})[0]
                                   for key in self.token_keys}
        return self._prompts[text]

    def with_token(self, text: str, token: torch.Tensor) -> dict[str, list]:
        """The prompt's tokens with `token` (an input embedding; SDXL's: both encoders' side by side) in the trigger's
        slot, each text encoder's part in its own tokens: what `encode_from_tokens` takes."""
        parts = split_by_encoder(self.token_keys, self.token_widths, token)
        return {key: [[({"type": "embedding", "data": parts[key]} if e[0] is TRIGGER_SLOT else e[0], *e[1:])
                       for e in chunk] for chunk in chunks] for key, chunks in self.marked_prompt(text).items()}


@contextlib.contextmanager
def host_training_flag():
    """The host's own training flag (`comfy.model_management.in_training`, set by its trainer around its loop) on for
    the run: host code with an inference-only fast path (v0.33's fused INT8 linear) checks it. Restored however the
    run ends; a host without the flag is left without it."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


@contextlib.contextmanager
def training_session(clones: TrainingClones, grad: bool = True):
    """The clones loaded for a run, with the host's weights frozen and, inside, plain (not inference) tensors and
    autograd on (off with grad=False); the flags come back and the clones are given back however the run ends.
    `frozen` runs in inference mode, the only place the flags of the executor's inference tensors may be set, so the
    session enters it first (a no-op inside a node, which the executor runs in it). The training clones' modules are
    the host's own, or under dynamic VRAM a reloaded copy of them: either way, those are the ones to freeze. The host's
    training flag is on inside (host_training_flag)."""
    with torch.inference_mode(), frozen(clones.model.model, clones.clip.cond_stage_model), host_training_flag(), \
            torch.inference_mode(False), torch.set_grad_enabled(grad):
        try:
            clones.load()
            yield clones
        finally:
            clones.release()


def train_on_clones(clones: TrainingClones, mode: str, resolution: int, prepare, train):
    """The run both systems' training shares: in a training session, prepare() once, then train(prepared). Out of
    memory in mode 'auto', train() starts again with gradient checkpointing on; any allocation failure, also while
    loading or preparing, says what to do (OutOfMemory)."""
    try:
        with training_session(clones):
            prepared = prepare()
            while True:
                try:
                    return train(prepared)
                except Exception as error:
                    if not (is_out_of_memory(error) and mode == "auto" and not clones.checkpointing.enabled):
                        raise
                # Out of memory in 'auto': start again with checkpointing, outside the except block so that the
                # failed step's tensors can be freed first.
                log.warning("%s: out of GPU memory at %d px; starting again with gradient checkpointing.",
                            clones.node, resolution)
                clones.checkpointing.enabled = True
                comfy.model_management.soft_empty_cache()
    except Exception as error:
        if is_out_of_memory(error):
            raise OutOfMemory(resolution, clones.checkpointing.enabled, clones.node) from None
        raise


class OutOfMemory(RuntimeError):
    def __init__(self, resolution: int, checkpointing: bool, node: str):
        advice = "close other programs using the GPU" if checkpointing else \
            "set 'gradient_checkpointing' to 'on' (or 'auto')"
        super().__init__(f"{node} ran out of GPU memory at {resolution} px with gradient checkpointing "
                         f"{'on' if checkpointing else 'off'}. Lower 'resolution' (e.g. {max(256, resolution - 128)}) or "
                         f"{advice}. Nothing was saved; the loaded model is unchanged.")
