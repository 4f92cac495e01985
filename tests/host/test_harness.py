"""Smoke tests for the headless ComfyUI harness itself (tests/sefi_testkit)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sefi_testkit import txt2img


def test_tiny_checkpoint_is_detected_as_sd15(host_clean, caplog):
    with caplog.at_level(logging.WARNING):
        model, clip, vae = host_clean.load_checkpoint("tiny.safetensors")
    assert [r.message for r in caplog.records if "missing" in r.message or "unexpected" in r.message] == []
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_type.name == "EPS"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert next(model.model.diffusion_model.parameters()).is_inference()


def test_tiny_checkpoint_gives_finite_conditioning(host_clean):
    _, clip, _ = host_clean.load_checkpoint("tiny.safetensors")
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    assert cond.shape == (1, 77, 768)
    assert torch.isfinite(cond).all()
    assert cond.float().std() > 0.1


def _saved_pixels(host, result) -> np.ndarray:
    [path] = host.saved_images(result, "7")
    return np.asarray(Image.open(path), dtype=np.float32)


def test_txt2img_runs_and_saves_a_finite_image(host_clean):
    result = host_clean.run(txt2img(steps=2))
    assert result.success, result.error or result.node_errors
    assert result.event_names()[-1] == "execution_success"
    assert host_clean.progress == [(1, 2), (2, 2)]
    pixels = _saved_pixels(host_clean, result)
    assert pixels.shape == (64, 64, 3)
    assert np.isfinite(pixels).all() and pixels.std() > 0


def test_invalid_prompt_is_reported_not_raised(host_clean):
    result = host_clean.run(txt2img(ckpt_name="missing.safetensors"))
    assert not result.success
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert "1" in result.node_errors
    assert result.messages == []


def test_sd1_layout_has_sixteen_cross_attention_layers(host_clean):
    model, _, _ = host_clean.load_checkpoint("sd1_layout.safetensors")
    unet = model.model.diffusion_model
    attn2 = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert type(model.model.model_config).__name__ == "SD15"
    assert len(attn2) == 16


def test_sd1_layout_samples(host_clean):
    result = host_clean.run(txt2img("sd1_layout.safetensors", steps=1))
    assert result.success, result.error or result.node_errors
    assert np.isfinite(_saved_pixels(host_clean, result)).all()


def test_pack_is_loaded(host):
    assert host.pack is sys.modules[str(host.repo_root).replace(".", "_x_")]
    assert hasattr(host.pack, "comfy_entrypoint")


def test_input_dir_has_the_test_images(host):
    assert {"astronaut.png", "chelsea.png"} <= {p.name for p in host.input_dir.iterdir()}


def test_interrupt_at_tick_interrupts_ksampler(host_clean):
    host_clean.interrupt_at_tick(2)
    result = host_clean.run(txt2img(steps=3))
    assert result.interrupted
    assert not result.success
    assert result.error is None
    assert host_clean.progress == [(1, 3), (2, 3)]
    assert dict(result.messages)["execution_interrupted"]["node_type"] == "KSampler"


def test_interrupt_is_one_shot(host_clean):
    host_clean.interrupt_at_tick(1)
    assert host_clean.run(txt2img()).interrupted
    assert host_clean.run(txt2img()).success


def test_execution_error_is_reported_not_raised(host_clean):
    prompt = txt2img()
    prompt["7"]["inputs"]["filename_prefix"] = "../outside"  # SaveImage raises at run time
    result = host_clean.run(prompt)
    assert not result.success and not result.interrupted
    assert result.error["node_type"] == "SaveImage"
    assert "outside the output folder" in result.error["exception_message"]


@pytest.mark.parametrize("fresh", [True, False])
def test_fresh_controls_the_output_cache(host_clean, fresh):
    host_clean.run(txt2img())
    result = host_clean.run(txt2img(), fresh=fresh)
    cached = dict(result.messages)["execution_cached"]["nodes"]
    assert (cached == []) == fresh


def test_sefi_core_imports_without_the_repo_root_on_sys_path():
    import sefi_core

    repo_root = Path(__file__).resolve().parents[2]
    assert Path(sefi_core.__file__).parent == repo_root / "sefi_core"
    assert repo_root not in {Path(p or ".").resolve() for p in sys.path}
