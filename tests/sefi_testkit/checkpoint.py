"""Small SD1-layout checkpoints with seeded random weights, detected by ComfyUI as SD15 (EPS).

Key names and shapes come from ComfyUI's own UNetModel, CLIP-L text model and TAESD, built on the
`meta` device, so the files follow whatever the ComfyUI at COMFYUI_PATH expects.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .comfy_env import find_comfyui, import_comfy

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class UNetLayout:
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # one entry per input res block
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]  # popped from the end: last entry is output_blocks.0
    in_channels: int = 4  # 9 for an inpainting UNet: latent, mask, masked-image latent (the host detects SD1.5 inpainting)


_SD1_DEPTH = (1, 1, 1, 1, 1, 1, 0, 0)
_SD1_DEPTH_OUTPUT = (1,) * 9 + (0,) * 3

PRESETS = {
    # One level, attention in input_blocks.1, the middle block and output_blocks.0/1: 4 attn2 layers.
    "tiny": UNetLayout((1,), (1,), (1,), 1, (1, 1)),
    # The same as an inpainting UNet (SD1.5 inpainting's 9 input channels): the model PVA and face inpainting use.
    "tiny_inpaint": UNetLayout((1,), (1,), (1,), 1, (1, 1), in_channels=9),
    # The SD1.x block structure (16 attn2 layers) with every level at 320 channels (~100M UNet).
    "sd1_layout": UNetLayout((1, 1, 1, 1), (2, 2, 2, 2), _SD1_DEPTH, 1, _SD1_DEPTH_OUTPUT),
    # True SD1.5 dimensions (~860M UNet): for benchmarks only, never used by the tests.
    "sd15_size": UNetLayout((1, 2, 4, 4), (2, 2, 2, 2), _SD1_DEPTH, 1, _SD1_DEPTH_OUTPUT),
    # The same as an inpainting UNet: PVA's benchmarks.
    "sd15_inpaint_size": UNetLayout((1, 2, 4, 4), (2, 2, 2, 2), _SD1_DEPTH, 1, _SD1_DEPTH_OUTPUT, in_channels=9),
}


def unet_config(preset: str) -> dict:
    """UNetModel kwargs as ComfyUI's SD15 config would build them for this preset."""
    layout = PRESETS[preset]
    return {
        "image_size": 32,
        "in_channels": layout.in_channels,
        "out_channels": 4,
        "model_channels": 320,
        "context_dim": 768,
        "num_heads": 8,
        "num_head_channels": -1,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": False,
        "legacy": False,
        "adm_in_channels": None,
        "use_checkpoint": False,
        "channel_mult": list(layout.channel_mult),
        "num_res_blocks": list(layout.num_res_blocks),
        "transformer_depth": list(layout.transformer_depth),
        "transformer_depth_middle": layout.transformer_depth_middle,
        "transformer_depth_output": list(layout.transformer_depth_output),
    }


def write_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0,
                     dtype: torch.dtype = torch.float16) -> Path:
    """Write a random-weight SD1 checkpoint (.safetensors) for `preset`; returns the path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    _ensure_comfy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = meta_shapes(preset)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, generator, dtype) for name, shape in sorted(shapes.items())}
    metadata = {"sefi_testkit": json.dumps({"preset": preset, "seed": seed})}
    save_file(tensors, str(path), metadata=metadata)
    log.info("wrote %s checkpoint (%d tensors) to %s", preset, len(tensors), path)
    return path


def controlnet(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float16):
    """A ControlNet for `preset`'s UNet with random weights, loaded by the host's own ControlNet loader."""
    _ensure_comfy()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in unet_config(preset).items() if k not in ("out_channels", "transformer_depth_output")}
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init, **config)
    generator = torch.Generator().manual_seed(seed)
    state = {name: _random_tensor(name, t.shape, generator, dtype) for name, t in net.state_dict().items()}
    return comfy.controlnet.load_controlnet_state_dict(state)


TINY_CLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "patch_size": 16, "image_size": 32, "projection_dim": 24, "num_channels": 3,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"}


def clip_vision(folder: str | Path, seed: int = 0):
    """The host's own ClipVisionModel (what Load CLIP Vision gives) of a tiny ViT layout with random weights: 24-d
    image embeddings. Built from a config file, which every supported host's constructor takes."""
    _ensure_comfy()
    import comfy.clip_vision

    config = Path(folder) / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_CLIP_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    generator = torch.Generator().manual_seed(seed)
    model.load_sd({name: _random_tensor(name, t.shape, generator, torch.float32) for name, t in model.get_sd().items()})
    return model


def meta_shapes(preset: str) -> dict[str, torch.Size]:
    """Checkpoint key -> shape for the UNet, CLIP text model and TAESD of `preset`."""
    _ensure_comfy()
    shapes = {}
    for prefix, module in ((UNET_PREFIX, _meta_unet(preset)), (CLIP_PREFIX, _meta_clip()), (VAE_PREFIX, _meta_taesd())):
        shapes.update({prefix + name: t.shape for name, t in module.state_dict().items()})
    return shapes


def _ensure_comfy() -> None:
    if "comfy.model_management" in sys.modules:  # already set up, e.g. by a Host
        return
    comfy_path = find_comfyui()
    if comfy_path is None:
        raise RuntimeError("COMFYUI_PATH must point at a ComfyUI checkout to build test checkpoints")
    import_comfy(comfy_path)


def _meta_unet(preset: str) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(**unet_config(preset), device="meta", operations=comfy.ops.disable_weight_init)


def _meta_clip() -> torch.nn.Module:
    import comfy.clip_model
    import comfy.ops

    config_path = Path(comfy.clip_model.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.manual_cast)
    # Real SD1.x checkpoints carry only text_model.*; the loader accepts a missing projection silently.
    del model.text_projection
    return model


def _meta_taesd() -> torch.nn.Module:
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        return TAESD()


def _random_tensor(name: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Matrices and kernels: N(0, 1/fan_in), about 0.02 for the 320/768-wide layers, which keeps
    activations O(1) through the network. 1-D weights are all norm scales here: 1. Biases: 0."""
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    elif name.endswith(("weight", "vae_scale")):
        values = torch.ones(shape)
    else:
        values = torch.zeros(shape)
    return values.to(dtype)
