"""SeFi's training gradients under a dtype set-up, computed as the training loop computes them: one implementation for
the half-precision tests (emulated on the CPU) and the GPU check (on CUDA), so both measure the same thing.

`mapper_gradients` gives the unscaled token-mapper gradients of L_KV and of lambda * L_attn on one fixed batch (the
same loss terms and the same loss scaler as training); `agreement` compares two of them."""
from __future__ import annotations

import contextlib

import torch

from . import gpu_emulation as gpu

TEMPLATE = 0  # the fixed batch's prompt template
LAMBDA = 0.003  # the attention-loss weight (the node's default)


@contextlib.contextmanager
def host_trainer(host, setup: gpu.DtypeSetup, preset: str = "tiny"):
    """A HostTrainer on a preset checkpoint (sefi_testkit/checkpoint.py) loaded under `setup`, in a training session;
    (trainer, clip, vae)."""
    training, session = host.module("nodes.sefi.training"), host.module("nodes.training").training_session
    with gpu.emulate(setup):
        model, clip, vae = host.load_checkpoint(host.checkpoint(preset))
        trainer = training.HostTrainer(model, clip, "sks", "person", "all")
        with session(trainer):
            yield trainer, clip, vae


def fixed_batch(host, trainer, vae, t: int, resolution: int):
    train = host.module("sefi_core.sefi.train")
    image = host.nodes.LoadImage().load_image("astronaut.png")[0]
    latent, mask = trainer.training_samples(image, vae, resolution, 1, torch.Generator().manual_seed(0))[0]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    return train.Batch(latent, mask, t, TEMPLATE, noise)


def perturbed_mapper(host, class_embedding: torch.Tensor, widths=None):
    """A mapper away from its start (where the attention loss and its gradient are exactly zero)."""
    torch.manual_seed(5)
    mapper = host.module("sefi_core.sefi.mapper").TokenMapper(class_embedding, 5, widths=widths)
    torch.nn.init.normal_(mapper.out.weight, std=1.0)
    return mapper


def mapper_gradients(host, setup: gpu.DtypeSetup, t: int, resolution: int = 64, loss_scaling: bool = True,
                     preset: str = "tiny"):
    """([grad of L_KV, grad of lambda * L_attn] as float64 vectors, L_KV, L_attn, loss scaling on, compute dtype) on
    one fixed batch under `setup`."""
    train, loss_scaler = host.module("sefi_core.sefi.train"), host.module("sefi_core.training").loss_scaler
    with host_trainer(host, setup, preset) as (trainer, clip, vae):
        batch = fixed_batch(host, trainer, vae, t, resolution)
        trainer.find_loss_layers(batch.latent)
        mapper = perturbed_mapper(host, trainer.class_embedding, trainer.token_widths).to(trainer.device)
        l_kv, l_attn = train.loss_terms(mapper, batch, trainer.encode_kv, trainer.denoise, train.even_boundaries(5))
        scaler = loss_scaler(trainer.device, trainer.dtype if loss_scaling else torch.float32)
        params = list(mapper.parameters())
        grads = []
        for term in (l_kv, LAMBDA * l_attn):
            scaled = torch.autograd.grad(scaler.scale(term), params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(scaled, params)])
            grads.append(flat.double().cpu() / scaler.get_scale())
        return grads, l_kv.item(), l_attn.item(), scaler.is_enabled(), trainer.dtype


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(cosine, size ratio) of a gradient against the reference's: the tests ask for >= 0.99 and 1 +- 0.05."""
    return (float(torch.nn.functional.cosine_similarity(reference, other, dim=0)),
            float(other.norm() / reference.norm()))
