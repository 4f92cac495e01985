"""Training inside the host: gradients through ComfyUI's frozen, already-loaded UNet and CLIP.

Host traps handled here (see shared notes §4): weights loaded under the executor are inference tensors,
so every weight gets an identity weight wrapper on a clone (a fresh copy per forward that autograd can
save); CLIPLayer adds in place, so the clone's CLIP layers get an out-of-place forward; parameters are
shared with the host, so their requires_grad flags are switched off for the run and restored after.

Dynamic VRAM (the host's default on NVIDIA since v0.15): a ModelPatcherDynamic keeps the weights in host memory
and casts each layer into reused GPU buffers as it runs, so a weight autograd saved for backward may already hold
another layer's values, and `layer.weight` may sit on the CPU while the layer runs on the GPU. Training therefore
works on clones whose weights are resident and real on the training device for the whole run (`resident_clones`).

Precision: the UNet computes in whatever dtype the host loaded it for (fp16/bf16 on GPUs, no cast to
fp32); the K/V contexts are cast to it on the way in. The face-wise attention loss is computed in fp32
from fp32 contexts, outside the UNet (its gradient is ~1e-3 of L_KV's and would vanish in fp16), and
fp16 runs get loss scaling (sefi_core.train.loss_scaler).
"""
from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.patcher_extension
from comfy_api.latest import io

from ..sefi_core.augment import as_rgb, augment, center_square, subject_square
from ..sefi_core.losses import attention_loss, token_mask
from ..sefi_core.prompt_tokens import mark_triggers
from ..sefi_core.train import PROMPT_TEMPLATES, TrainResult, TrainSettings, train_tokens
from .clip_tokens import word_embedding, word_token_ids
from .sefi_patches import OPTIONS_KEY, StageKVInjector

log = logging.getLogger(__name__)
_SLOT = object()  # marks the trigger's slot while building training prompts
AUGMENTED_VIEWS = 32  # augmented copies VAE-encoded once up front, then drawn at random each step
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
    (non-reentrant torch.utils.checkpoint). About a third more compute for a fraction of the memory."""

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


def resident_clones(model, clip):
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
            f"SeFi Train Identity cannot train on this MODEL/CLIP under ComfyUI's dynamic VRAM ({error}). Connect the "
            "outputs of Load Checkpoint directly, or start ComfyUI with --disable-dynamic-vram.") from None
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


class TrainingClones:
    """Resident clones of the host's MODEL and CLIP that gradients flow through (module docstring), loaded with
    load() and given back with release(); prompts with the trigger's slot filled by a differentiable embedding.
    `patch_model` may add object patches to the model clone first (they are applied when it loads)."""

    def __init__(self, model, clip, trigger: str, patch_model=lambda clone: clone):
        self.model, self.clip = resident_clones(model, clip)
        self.model = patch_model(self.model)
        _wrap_weights(self.model, self.model.model)
        _wrap_weights(self.clip.patcher, self.clip.cond_stage_model)
        layers = self.clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers
        for i, layer in enumerate(layers):
            self.clip.patcher.add_object_patch(f"clip_l.transformer.text_model.encoder.layers.{i}.forward",
                                               _out_of_place(layer))
        self.tokenizer = getattr(clip.tokenizer, "inner", clip.tokenizer)  # a SeFi CLIP's plain tokenizer
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

    def marked_prompt(self, text: str) -> list:
        """The tokenized prompt, the trigger's tokens replaced by one slot marker."""
        if text not in self._prompts:
            tokens = self.tokenizer.tokenize_with_weights(text)["l"]
            self._prompts[text], _ = mark_triggers(tokens, {self.trigger_ids: _SLOT})
        return self._prompts[text]

    def with_token(self, text: str, token: torch.Tensor) -> list:
        """The prompt's CLIP-L token list with `token` (an input embedding) in the trigger's slot."""
        return [[({"type": "embedding", "data": token} if e[0] is _SLOT else e[0], *e[1:]) for e in chunk]
                for chunk in self.marked_prompt(text)]


class HostTrainer(TrainingClones):
    """The host-specific callables `sefi_core.train.train_tokens` needs, built on resident clones of the inputs."""

    def __init__(self, model, clip, trigger: str, class_word: str, attention_option: str,
                 gradient_checkpointing: bool = False):
        super().__init__(model, clip, trigger)
        self.attention_option = attention_option
        self.class_embedding = word_embedding(clip, class_word)
        self._references, self._masks = {}, {}
        self.loss_layers: list = []
        self._loss_weights: dict = {}  # loss layer -> fp32 (to_q, to_k) weights
        self.checkpointing = GradientCheckpointing(gradient_checkpointing)

    def release(self) -> None:
        super().release()
        self._references.clear()
        self._loss_weights.clear()

    # -- data ------------------------------------------------------------------------------------

    def training_samples(self, images, vae, resolution: int, count: int, generator, subject_masks=None) -> list:
        """`count` augmented views, VAE-encoded once up front, the photos (a batch, or a list of (H, W, C) of any
        sizes) used in turn, so each gets an equal share of the views and, drawn uniformly, of the steps. With subject
        masks (one per photo, or one for all), each square follows its mask and the loss weights it."""
        if subject_masks is None:
            squares = [(center_square(as_rgb(image), resolution), None) for image in images]
        else:
            squares = [subject_square(as_rgb(image), subject_masks[k % len(subject_masks)], resolution)
                       for k, image in enumerate(images)]
        samples = []
        for k in range(count):
            square, subject = squares[k % len(squares)]
            pixels, mask = augment(square, generator, subject)
            with torch.no_grad():
                latent = vae.encode(pixels.permute(1, 2, 0).unsqueeze(0))
                latent = self.model.model.process_latent_in(latent).to(self.device)
            weights = torch.nn.functional.adaptive_avg_pool2d(mask[None, None], latent.shape[-2:])
            # The placement box alone is cut at half a latent pixel; a subject mask keeps its soft edges.
            weights = (weights > 0.5).float() if subject is None else weights
            samples.append((latent.float(), weights.to(self.device)))
        return samples

    # -- prompts ---------------------------------------------------------------------------------

    def _template(self, index: int) -> list:
        return self.marked_prompt(PROMPT_TEMPLATES[index].format(self.trigger))

    def _with_token(self, index: int, token: torch.Tensor) -> list:
        return self.with_token(PROMPT_TEMPLATES[index].format(self.trigger), token)

    def encode_kv(self, index: int, k_token: torch.Tensor, v_token: torch.Tensor):
        cond = self.clip.encode_from_tokens({"l": self._with_token(index, k_token) + self._with_token(index, v_token)})
        length = cond.shape[1] // 2
        return cond[:, :length].to(self.device), cond[:, length:].to(self.device)

    def reference(self, index: int) -> torch.Tensor:
        """The reference prompt: the template with the class word in the trigger's slot (its embedding, as Apply's
        class-word prompt has it, so that token positions match even for a class word of several tokens)."""
        if index not in self._references:
            with torch.no_grad():
                tokens = {"l": self._with_token(index, self.class_embedding)}
                self._references[index] = self.clip.encode_from_tokens(tokens).to(self.device)
        return self._references[index]

    def _token_mask(self, index: int):
        if index not in self._masks:
            chunk = self._template(index)[0]
            slots = [i for i, e in enumerate(chunk) if e[0] is _SLOT]
            end = next(i for i, e in enumerate(chunk) if e[0] == self.tokenizer.clip_l.end_token)
            self._masks[index] = token_mask(self.attention_option, len(chunk), slots, end)
        return self._masks[index]

    # -- UNet ------------------------------------------------------------------------------------

    def find_loss_layers(self, latent: torch.Tensor) -> None:
        """The cross-attention layers at half the latent size (32x32 at 512 px, as in Algorithm 1), or the
        nearest size a model has; found with one forward pass."""
        sizes = {}
        modules = [m for name, m in self.model.model.diffusion_model.named_modules() if name.endswith("attn2")]

        def record(module, args, kwargs):
            sizes[module] = args[0].shape[1]

        target = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
        with torch.no_grad(), _hooks(modules, record):
            context = self.reference(0)
            self._apply(latent, torch.zeros_like(latent), 500, context, context)
        best = min(abs(n - target) for n in sizes.values())
        self.loss_layers = [m for m, n in sizes.items() if abs(n - target) == best]
        self._loss_weights = {m: (_fp32_weight(m.to_q, self.device), _fp32_weight(m.to_k, self.device))
                              for m in self.loss_layers}

    def _apply(self, latent, noise, t, k_context, v_context):
        sigma = self.sampling.sigma(torch.tensor([float(t)], device=self.device))
        x = self.sampling.noise_scaling(sigma, noise, latent)
        k_context, v_context = k_context.to(self.dtype), v_context.to(self.dtype)  # SDPA wants one dtype
        options = {"patches": {"attn2_patch": [StageKVInjector()]}, OPTIONS_KEY: (k_context, v_context, None),
                   "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"sefi_train": [self.checkpointing]}}}
        denoised = self.model.model.apply_model(x, sigma, c_crossattn=k_context, transformer_options=options)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)

    def denoise(self, latent, noise, t, k_context, v_context, index):
        """(eps prediction, face-wise attention loss). The loss layers' inputs are recorded during the forward and
        the loss is computed afterwards in fp32: queries from those inputs (no gradient: the loss constrains the
        K path, paper Algorithm 1), keys from the fp32 K context and from the reference prompt."""
        inputs = []

        def record_input(module, args, kwargs):
            inputs.append((module, args[0].detach()))

        with _hooks(self.loss_layers, record_input):
            eps = self._apply(latent, noise, t, k_context, v_context)
        reference, mask = self.reference(index), self._token_mask(index)
        losses = []
        for module, x in inputs:
            w_q, w_k = self._loss_weights[module]
            q = F.linear(x.float(), w_q)
            k_target, k_reference = F.linear(k_context.float(), w_k), F.linear(reference.float(), w_k)
            losses.append(attention_loss(q, k_target, k_reference, module.heads, mask))
        return eps, torch.stack(losses).mean() if losses else torch.zeros((), device=eps.device)


def _fp32_weight(linear, device) -> torch.Tensor:
    """A layer's weight as fp32 (from fp16, bf16 or fp8 storage) on `device`, with any host weight function applied."""
    weight = linear.weight.to(device).float()
    for function in getattr(linear, "weight_function", []):
        weight = function(weight)
    return weight.detach().clone()


@contextlib.contextmanager
def _hooks(modules, hook):
    """Forward pre-hooks that exist only inside the `with` (removed even on cancel or error)."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def view_count(photos: int) -> int:
    """Augmented views to encode: AUGMENTED_VIEWS, or one per photo when there are more. Not fewer for a short run:
    the views must not depend on the steps, so that a continued run draws from the same views as one long run."""
    return max(AUGMENTED_VIEWS, photos)


def run_training(model, clip, vae, images, trigger: str, class_word: str, settings: TrainSettings,
                 checkpointing: str = "auto", on_step=lambda step, losses: None, subject_masks=None,
                 preview_every: int = 0, make_preview=None, resume=None) -> TrainResult:
    """Trains an identity on clones of the host's model and CLIP (see train_on_clones). make_preview(trainer) gives
    the on_preview callable for `preview_every`; resume: the TrainState of a run to continue
    (sefi_core.train.train_tokens)."""
    trainer = HostTrainer(model, clip, trigger, class_word, settings.attention_option, checkpointing == "on")

    def prepare():
        generator = torch.Generator().manual_seed(settings.seed)
        samples = trainer.training_samples(images, vae, settings.resolution, view_count(len(images)), generator,
                                           subject_masks)
        trainer.find_loss_layers(samples[0][0])
        on_preview = make_preview(trainer) if make_preview and preview_every else (lambda *args: None)
        return samples, on_preview

    def train(prepared):
        samples, on_preview = prepared
        return train_tokens(settings, trainer.class_embedding, samples, trainer.encode_kv, trainer.denoise, on_step,
                            device=trainer.device, compute_dtype=trainer.dtype, preview_every=preview_every,
                            on_preview=on_preview, resume=resume)

    return train_on_clones(trainer, trainer.checkpointing, checkpointing, settings.resolution, "SeFi Train Identity",
                           prepare, train)


def train_on_clones(clones: TrainingClones, gradient_checkpointing: GradientCheckpointing, mode: str, resolution: int,
                    node: str, prepare, train):
    """The run both systems' training shares: the clones loaded, prepare() once, then train(prepared); the host
    model's flags come back and what training loaded is given back, whether it ends, fails or is cancelled. Out of
    memory in mode 'auto', train() starts again with gradient checkpointing on; any other allocation failure says
    what to do (OutOfMemory)."""
    # frozen() outside: the executor's inference mode is the only place the flags may be set back. The training clones'
    # modules are the host's own, or under dynamic VRAM a reloaded copy of them: either way, those are the ones to freeze.
    with frozen(clones.model.model, clones.clip.cond_stage_model), torch.inference_mode(False), torch.enable_grad():
        try:
            clones.load()
            prepared = prepare()
            while True:
                try:
                    return train(prepared)
                except Exception as error:
                    if not (is_out_of_memory(error) and mode == "auto" and not gradient_checkpointing.enabled):
                        raise
                # Out of memory in 'auto': start again with checkpointing, outside the except block so that the
                # failed step's tensors can be freed first.
                log.warning("%s: out of GPU memory at %d px; starting again with gradient checkpointing.", node,
                            resolution)
                gradient_checkpointing.enabled = True
                comfy.model_management.soft_empty_cache()
        except Exception as error:  # loading, encoding the photos, or a step: every allocation failure says what to do
            if is_out_of_memory(error):
                raise OutOfMemory(resolution, gradient_checkpointing.enabled, node) from None
            raise
        finally:
            clones.release()


class OutOfMemory(RuntimeError):
    def __init__(self, resolution: int, checkpointing: bool, node: str = "SeFi Train Identity"):
        advice = "close other programs using the GPU" if checkpointing else \
            "set 'gradient_checkpointing' to 'on' (or 'auto')"
        super().__init__(f"{node} ran out of GPU memory at {resolution} px with gradient checkpointing "
                         f"{'on' if checkpointing else 'off'}. Lower 'resolution' (e.g. {max(256, resolution - 128)}) or "
                         f"{advice}. Nothing was saved; the loaded model is unchanged.")
