"""SeFi's training through the host: the callables `sefi_core.sefi.train.train_tokens` needs, on the training clones
both systems share (nodes/training.py), and the run SeFi Train Identity starts.

The face-wise attention loss is computed in fp32 from fp32 contexts, outside the UNet: its gradient is ~1e-3 of L_KV's
and would vanish in fp16.

SDXL: a token is CLIP-L's and bigG's word embeddings side by side, each encoder reading its part
(nodes/clip_tokens.py); the UNet also takes `y`, the pooled embedding with the size and crop embeddings, made here as
sampling makes it. The pooled embedding is the class-word prompt's, as SeFi Apply gives it: the host pools the first
prompt it encodes, which SefiEncode makes the class-word one. That is right, not only convenient: `y` is added to the
time embedding of every block, where it would act on the whole image (style, composition) rather than on the
subject the trigger names; SeFi's identity acts through the cross-attention keys and values alone, where each word's
influence stays where the image attends to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.patcher_extension

from ...sefi_core.images import as_rgb, center_square
from ...sefi_core.sefi.augment import augment, subject_square
from ...sefi_core.sefi.identity import FAMILIES
from ...sefi_core.sefi.losses import attention_loss, token_mask
from ...sefi_core.sefi.train import PROMPT_TEMPLATES, TrainResult, TrainSettings, train_tokens
from ..clip_tokens import word_embedding
from ..training import TRIGGER_SLOT, TrainingClones, forward_pre_hooks, fp32_weight, train_on_clones
from .patches import OPTIONS_KEY, StageKVInjector

NODE = "SeFi Train Identity"
AUGMENTED_VIEWS = 32  # augmented copies VAE-encoded once up front, then drawn at random each step


class HostTrainer(TrainingClones):
    """The host-specific callables `train_tokens` needs, built on resident clones of the inputs."""

    def __init__(self, model, clip, trigger: str, class_word: str, attention_option: str,
                 gradient_checkpointing: bool = False):
        super().__init__(model, clip, trigger, NODE, gradient_checkpointing)
        self.attention_option = attention_option
        self.class_embedding = word_embedding(clip, class_word)
        self.family = next(name for name, widths in FAMILIES.items() if widths == self.token_widths)
        self._references, self._pooled, self._adm, self._masks = {}, {}, {}, {}
        self.loss_layers: list = []
        self._loss_weights: dict = {}  # loss layer -> fp32 (to_q, to_k) weights

    def release(self) -> None:
        super().release()
        self._references.clear()
        self._pooled.clear()
        self._adm.clear()
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
            weights = F.adaptive_avg_pool2d(mask[None, None], latent.shape[-2:])
            # The placement box alone is cut at half a latent pixel; a subject mask keeps its soft edges.
            weights = (weights > 0.5).float() if subject is None else weights
            samples.append((latent.float(), weights.to(self.device)))
        return samples

    # -- prompts ---------------------------------------------------------------------------------

    def _with_token(self, index: int, token: torch.Tensor) -> dict:
        return self.with_token(PROMPT_TEMPLATES[index].format(self.trigger), token)

    def encode_kv(self, index: int, k_token: torch.Tensor, v_token: torch.Tensor):
        k_tokens, v_tokens = self._with_token(index, k_token), self._with_token(index, v_token)
        cond = self.clip.encode_from_tokens({key: k_tokens[key] + v_tokens[key] for key in self.token_keys})
        length = cond.shape[1] // 2
        return cond[:, :length].to(self.device), cond[:, length:].to(self.device)

    def reference(self, index: int) -> torch.Tensor:
        """The reference prompt: the template with the class word in the trigger's slot (its embedding, as Apply's
        class-word prompt has it, so that token positions match even for a class word of several tokens)."""
        if index not in self._references:
            with torch.no_grad():
                tokens = self._with_token(index, self.class_embedding)
                context, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                self._references[index], self._pooled[index] = context.to(self.device), pooled
        return self._references[index]

    def adm(self, index: int, latent: torch.Tensor) -> torch.Tensor | None:
        """The UNet's `y` for a template at the latent's size, as sampling makes it from the class-word prompt's pooled
        embedding (SDXL: with the size and crop embeddings, no crop, target size = size); None for SD1.x."""
        key = (index, *latent.shape[-2:])
        if key not in self._adm:
            self.reference(index)
            height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
            y = self.model.model.encode_adm(pooled_output=self._pooled[index], width=width, height=height,
                                            device=self.device)
            self._adm[key] = None if y is None else y.to(self.device)
        return self._adm[key]

    def _token_mask(self, index: int):
        if index not in self._masks:
            key = self.token_keys[0]  # SDXL's two token lists hold the same words at the same positions
            chunk = self.marked_prompt(PROMPT_TEMPLATES[index].format(self.trigger))[key][0]
            slots = [i for i, e in enumerate(chunk) if e[0] is TRIGGER_SLOT]
            end_token = getattr(self.tokenizer, f"clip_{key}").end_token
            end = next(i for i, e in enumerate(chunk) if e[0] == end_token)
            self._masks[index] = token_mask(self.attention_option, len(chunk), slots, end)
        return self._masks[index]

    # -- UNet ------------------------------------------------------------------------------------

    def find_loss_layers(self, latent: torch.Tensor) -> None:
        """The cross-attention layers at half the latent size (32x32 at 512 px, as in Algorithm 1), or the
        nearest size a model has; found with one forward pass.

        On SDXL that is its highest-resolution attention (64x64 at 1024 px, SDXL has none at the latent's own size):
        the 10 layers of the second level (input_blocks.4-5 and output_blocks.3-5, two transformer blocks each), where
        the paper's rule (half the latent size) puts the loss. There a face spans enough positions for its attention map
        to have a shape, which the loss keeps like the class word's; the 60 layers at a quarter of the latent (32x32)
        see the face as a few positions and would cost six times as many maps."""
        sizes = {}
        modules = [m for name, m in self.model.model.diffusion_model.named_modules() if name.endswith("attn2")]

        def record(module, args, kwargs):
            sizes[module] = args[0].shape[1]

        target = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
        with torch.no_grad(), forward_pre_hooks(modules, record):
            context = self.reference(0)
            self._apply(latent, torch.zeros_like(latent), 500, context, context, self.adm(0, latent))
        best = min(abs(n - target) for n in sizes.values())
        self.loss_layers = [m for m, n in sizes.items() if abs(n - target) == best]
        self._loss_weights = {m: (fp32_weight(m.to_q, self.device), fp32_weight(m.to_k, self.device))
                              for m in self.loss_layers}

    def _apply(self, latent, noise, t, k_context, v_context, y=None):
        sigma = self.sampling.sigma(torch.tensor([float(t)], device=self.device))
        x = self.sampling.noise_scaling(sigma, noise, latent)
        k_context, v_context = k_context.to(self.dtype), v_context.to(self.dtype)  # SDPA wants one dtype
        options = {"patches": {"attn2_patch": [StageKVInjector()]}, OPTIONS_KEY: (k_context, v_context, None),
                   "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"sefi_train": [self.checkpointing]}}}
        extra = {} if y is None else {"y": y}
        denoised = self.model.model.apply_model(x, sigma, c_crossattn=k_context, transformer_options=options, **extra)
        return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)

    def denoise(self, latent, noise, t, k_context, v_context, index):
        """(eps prediction, face-wise attention loss). The loss layers' inputs are recorded during the forward and
        the loss is computed afterwards in fp32: queries from those inputs (no gradient: the loss constrains the
        K path, paper Algorithm 1), keys from the fp32 K context and from the reference prompt."""
        inputs = []

        def record_input(module, args, kwargs):
            inputs.append((module, args[0].detach()))

        with forward_pre_hooks(self.loss_layers, record_input):
            eps = self._apply(latent, noise, t, k_context, v_context, self.adm(index, latent))
        reference, mask = self.reference(index), self._token_mask(index)
        losses = []
        for module, x in inputs:
            w_q, w_k = self._loss_weights[module]
            q = F.linear(x.float(), w_q)
            k_target, k_reference = F.linear(k_context.float(), w_k), F.linear(reference.float(), w_k)
            losses.append(attention_loss(q, k_target, k_reference, module.heads, mask))
        return eps, torch.stack(losses).mean() if losses else torch.zeros((), device=eps.device)


def view_count(photos: int) -> int:
    """Augmented views to encode: AUGMENTED_VIEWS, or one per photo when there are more. Not fewer for a short run:
    the views must not depend on the steps, so that a continued run draws from the same views as one long run."""
    return max(AUGMENTED_VIEWS, photos)


def run_training(model, clip, vae, images, trigger: str, class_word: str, settings: TrainSettings,
                 checkpointing: str = "auto", on_step=lambda step, losses: None, subject_masks=None,
                 preview_every: int = 0, make_preview=None, resume=None) -> TrainResult:
    """Trains an identity on clones of the host's model and CLIP (nodes/training.py: train_on_clones).
    make_preview(trainer) gives the on_preview callable for `preview_every`; resume: the TrainState of a run to
    continue (train_tokens)."""
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
                            on_preview=on_preview, resume=resume, widths=trainer.token_widths)

    return train_on_clones(trainer, checkpointing, settings.resolution, prepare, train)
