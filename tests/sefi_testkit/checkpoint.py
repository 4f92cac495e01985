"""Small SD1-layout checkpoints with seeded random weights, detected by ComfyUI as SD15 (EPS), and an SD2-inpainting
one, detected as SD20 inpainting (EPS, as the host reads every 9-channel SD2 UNet).

Key names and shapes come from ComfyUI's own UNetModel, CLIP text model (CLIP-L for SD1, OpenCLIP ViT-H for SD2) and
TAESD, built on the `meta` device, so the files follow whatever the ComfyUI at COMFYUI_PATH expects. The SD2 text
encoder is written in the OpenCLIP layout real SD2 checkpoints carry (`cond_stage_model.model.*`), which the host
converts on load. The host builds each family's text encoder at full size whatever the file holds (12 layers of 768
for SD1, 24 of 1024 for SD2), so those are written whole: an SD2 file is about 0.8 GB in fp16.
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
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's text encoder, as Stability's checkpoints hold it
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class UNetLayout:
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # one entry per input res block
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]  # popped from the end: last entry is output_blocks.0
    in_channels: int = 4  # 9 for an inpainting UNet: latent, mask, masked-image latent (the host detects SD1.5 inpainting)
    family: str = "sd1"  # "sd2": 1024-d context, linear proj_in/out, 64-wide heads, OpenCLIP ViT-H text encoder;
    # "sdxl": 2048-d context (CLIP-L and OpenCLIP bigG), the pooled and size embeddings through label_emb (`y`)


# What the host's model detection matches for each family (its SD15 / SD20 configs), and its fixed head layout.
FAMILY_CONFIG = {
    "sd1": {"context_dim": 768, "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1},
    "sd2": {"context_dim": 1024, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64},
    "sdxl": {"context_dim": 2048, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64,
             "num_classes": "sequential", "adm_in_channels": 2816},
}
CLIP_CONFIG = {"sd1": "sd1_clip_config.json", "sd2": "text_encoders/sd2_clip_config.json",
               "sdxl_g": "clip_config_bigg.json"}  # under comfy/
# Where each text encoder sits in a checkpoint: (prefix, config, OpenCLIP layout?). SDXL holds CLIP-L in Hugging
# Face names and bigG in OpenCLIP's, as Stability's sd_xl_base_1.0 does; the host converts both on load.
TEXT_ENCODERS = {
    "sd1": [(CLIP_PREFIX, "sd1", False)],
    "sd2": [(OPEN_CLIP_PREFIX, "sd2", True)],
    "sdxl": [("conditioner.embedders.0.transformer.", "sd1", False), ("conditioner.embedders.1.model.", "sdxl_g", True)],
}


_SD1_DEPTH = (1, 1, 1, 1, 1, 1, 0, 0)
_SD1_DEPTH_OUTPUT = (1,) * 9 + (0,) * 3
_SDXL_DEPTH = (0, 0, 2, 2, 10, 10)
_SDXL_DEPTH_OUTPUT = (0, 0, 0, 2, 2, 2, 10, 10, 10)

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
    # tiny_inpaint's blocks as SD2 inpainting (stabilityai/stable-diffusion-2-inpainting, PVA's authors' base): 1024-d
    # context, 5 heads of 64, linear projections, the full OpenCLIP ViT-H text encoder. The smallest the host detects
    # as SD20: one level of 320 channels (model_channels is matched) with a transformer in an input block (the context
    # width is read there).
    "tiny_sd2_inpaint": UNetLayout((1,), (1,), (1,), 1, (1, 1), in_channels=9, family="sd2"),
    # The smallest UNet the host detects as SDXL: its SDXL config matches model_channels 320 and the input blocks'
    # transformer depths [0, 0, 2, 2, 10, 10], so three levels of two blocks, all at 320 channels, attention at half
    # and a quarter of the latent size as in SDXL (24 attn2 layers); no transformer in the middle or output blocks.
    # The host builds both text encoders at full size (CLIP-L and the 32-layer bigG): about 1.6 GB in fp16.
    "tiny_sdxl": UNetLayout((1, 1, 1), (2, 2, 2), _SDXL_DEPTH, -1, (0,) * 9, family="sdxl"),
    # SDXL's block structure (70 attn2 layers: depths 2 and 10) with every level at 320 channels (~0.5B UNet).
    "sdxl_layout": UNetLayout((1, 1, 1), (2, 2, 2), _SDXL_DEPTH, 10, _SDXL_DEPTH_OUTPUT, family="sdxl"),
    # True SDXL dimensions (~2.6B UNet): for benchmarks only, never used by the tests.
    "sdxl_size": UNetLayout((1, 2, 4), (2, 2, 2), _SDXL_DEPTH, 10, _SDXL_DEPTH_OUTPUT, family="sdxl"),
}


def unet_config(preset: str) -> dict:
    """UNetModel kwargs as ComfyUI's SD15 (SD20, SDXL) config would build them for this preset."""
    layout = PRESETS[preset]
    return {
        "image_size": 32,
        "in_channels": layout.in_channels,
        "out_channels": 4,
        "model_channels": 320,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        **FAMILY_CONFIG[layout.family],
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
    family = PRESETS[preset].family
    shapes = {}
    for prefix, module in ((UNET_PREFIX, _meta_unet(preset)), (VAE_PREFIX, _meta_taesd())):
        shapes.update({prefix + name: t.shape for name, t in module.state_dict().items()})
    for prefix, config, open_clip in TEXT_ENCODERS[family]:
        clip = {name: t.shape for name, t in _meta_clip(config).state_dict().items()}
        shapes.update({prefix + name: shape for name, shape in (open_clip_shapes(clip) if open_clip else clip).items()})
    return shapes


# The host's text model (Hugging Face CLIP names) -> OpenCLIP's names, in which SD2 checkpoints hold it.
_OPEN_CLIP_NAMES = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias",
                    "text_projection.weight": "text_projection"}
_OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_shapes(hf_shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The OpenCLIP layout of a text model given by its Hugging Face names and shapes: per block, q/k/v stacked into
    one in_proj, the other parts renamed; the projection stored transposed (a square matrix for ViT-H)."""
    out = {}
    for name, shape in hf_shapes.items():
        if name in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[name]] = torch.Size(reversed(shape)) if name == "text_projection.weight" else shape
            continue
        block, rest = name.removeprefix("text_model.encoder.layers.").split(".", 1)
        part, kind = rest.rsplit(".", 1)
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            out[f"transformer.resblocks.{block}.attn.in_proj_{kind}"] = torch.Size((3 * shape[0], *shape[1:]))
        else:
            out[f"transformer.resblocks.{block}.{_OPEN_CLIP_BLOCK[part]}.{kind}"] = shape
    return out


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


def _meta_clip(family: str = "sd1") -> torch.nn.Module:
    import comfy.clip_model
    import comfy.ops

    config_path = Path(comfy.clip_model.__file__).parent / CLIP_CONFIG[family]
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.manual_cast)
    if family == "sd1":  # Real SD1.x checkpoints carry only text_model.*; the loader accepts a missing projection.
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
