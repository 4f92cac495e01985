"""PVA Load Identity and PVA Apply through the real host: a PVA identity file drives ComfyUI's own inpainting nodes;
the learned word is the host's own textual embedding of it; what does not fit is refused by name."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sefi_testkit import probe
from sefi_testkit.pva import context_width, recorded_layers, write_pva_identity


def masked_face(host) -> str:
    rgba = np.array(Image.open(host.input_dir / "astronaut.png").convert("RGBA").resize((64, 64)))
    rgba[8:30, 18:42, 3] = 0  # the face, transparent: LoadImage's MASK
    Image.fromarray(rgba).save(host.input_dir / "pva_face.png")
    return "pva_face.png"


def inpaint_graph(host, pva_file="anna.safetensors", strength=1.0, prompt="photo of a sks person",
                  ckpt="tiny_inpaint.safetensors"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "PVALoadIdentity", "inputs": {"pva_identity_file": pva_file}},
        "3": {"class_type": "PVAApply", "inputs": {"model": ["1", 0], "clip": ["1", 1], "pva_identity": ["2", 0],
                                                   "strength": strength, "start_percent": 0.0, "end_percent": 1.0,
                                                   "on_negative": True}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["3", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["3", 1]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": masked_face(host)}},
        "7": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["4", 0], "negative": ["5", 0], "vae": ["1", 2], "pixels": ["6", 0], "mask": ["6", 1],
            "noise_mask": True}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 0, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["7", 2], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "pva"}},
    }


def test_a_pva_identity_inpaints_through_comfyuis_own_inpainting_nodes(host):
    """On an inpainting UNet (9 input channels, detected by the host as such), as PVA is meant to run."""
    model, _, _ = host.load_checkpoint("tiny_inpaint.safetensors")
    assert model.model.concat_keys and model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    write_pva_identity(host)
    results = {s: host.run(inpaint_graph(host, strength=s)) for s in (1.0, 0.0)}
    for result in results.values():
        assert result.success, result.error
    on, off = (probe.saved_latent(host, results[s], "9") for s in (1.0, 0.0))
    assert torch.isfinite(on).all() and not torch.allclose(on, off)  # the visual tokens changed the face


@pytest.mark.parametrize("ckpt", ["tiny", "tiny_sd2_inpaint"], ids=["sd15", "sd2"])
def test_the_learned_word_is_what_the_hosts_own_embedding_of_it_gives(host, ckpt):
    """The conditioning of "photo of a sks person", and the text context every cross-attention layer sees, are the
    host's own encoding of the word as a textual embedding (embedding:pva_word), bit for bit: the word goes into CLIP
    as it is, as the fine-tune put it in the trigger's slot; on SD2 into OpenCLIP ViT-H's word table, then through its
    penultimate layer as the host encodes SD2 prompts."""
    ckpt = host.checkpoint(ckpt)
    identity = write_pva_identity(host, ckpt=ckpt)
    model, clip, _ = host.load_checkpoint(ckpt)
    save_file({"emb_params": identity.word.reshape(1, context_width(model))},
              str(host.embedding_dir / "pva_word.safetensors"))
    with torch.inference_mode():
        patched_model, patched_clip = host.node("PVAApply").execute(
            model=model, clip=clip, pva_identity=identity, strength=1.0, start_percent=0.0, end_percent=1.0,
            on_negative=True).result
    positive, negative = (probe.encode(host, patched_clip, text) for text in ("photo of a sks person", "blurry"))
    with recorded_layers(patched_model) as calls:
        probe.sample(host, patched_model, positive, negative, steps=1, cfg=1.0)
    theirs = probe.encode(host, clip, "photo of a embedding:pva_word person")[0][0]
    plain = probe.encode(host, clip, "photo of a sks person")[0][0]
    assert torch.equal(positive[0][0], theirs)
    assert calls
    for _, _, _, context, value, _, _ in calls:
        for tensor in (context, context if value is None else value):
            assert torch.equal(tensor[0].float(), theirs[0].float())
        assert not torch.allclose(context.float(), plain.float(), atol=1e-3)


def test_what_does_not_fit_is_refused_by_name(host):
    write_pva_identity(host, "partial.safetensors", drop_layer=True)
    result = host.run(inpaint_graph(host, "partial.safetensors"))
    assert not result.success
    assert "has visual projections for 3 cross-attention layers, but this MODEL has 4" in \
        result.error["exception_message"]
    missing = host.run(inpaint_graph(host, "ghost.safetensors"))
    assert not missing.success and "No PVA identity 'ghost.safetensors' in models/pva_identities" in \
        str(missing.node_errors)
    (host.pva_identity_dir / "sefi_file.safetensors").write_bytes(
        next(host.identity_dir.glob("*.safetensors")).read_bytes() if list(host.identity_dir.glob("*.safetensors"))
        else b"not a safetensors file")
    wrong_kind = host.run(inpaint_graph(host, "sefi_file.safetensors"))
    assert not wrong_kind.success and "sefi_file.safetensors" in wrong_kind.error["exception_message"]


def test_inpainting_with_an_empty_mask_is_an_error(host):
    """As with SeFi's MODEL: a latent whose mask is empty would come back unchanged, silently."""
    write_pva_identity(host)
    graph = inpaint_graph(host)
    graph["6"]["inputs"]["image"] = "astronaut.png"  # no alpha: LoadImage's MASK is empty
    result = host.run(graph)
    assert not result.success
    assert "The latent's inpainting mask is empty, so nothing would be repainted" in result.error["exception_message"]


def test_a_clip_that_already_knows_the_learned_word_is_refused_by_pva(host):
    identity = write_pva_identity(host)
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    apply = lambda m, c: host.node("PVAApply").execute(model=m, clip=c, pva_identity=identity, strength=1.0,
                                                       start_percent=0.0, end_percent=1.0, on_negative=True).result
    with torch.inference_mode():
        _, once = apply(model, clip)
        with pytest.raises(ValueError, match="Two identities use the trigger word 'sks'. PVA Apply teaches a CLIP one "
                                             "learned word per trigger") as refused:
            apply(model, once)
    assert "SeFi Apply" not in str(refused.value)
    assert type(clip.tokenizer).__name__ != "TriggerTokenizer"  # the CLIP it was given is as it was


def test_a_strength_that_is_not_a_number_is_refused_by_both_apply_nodes(host):
    """NaN passes the host's min/max check (every comparison with it is false) and would make an all-NaN image."""
    write_pva_identity(host)
    result = host.run(inpaint_graph(host, strength=float("nan")))
    assert not result.success and "PVA Apply: strength is nan; it must be a number from 0 to 2" in \
        result.error["exception_message"]
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    with pytest.raises(ValueError, match="SeFi Apply Stage Tokens: strength is nan; it must be a number from 0 to 2"):
        probe.apply(host, model, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5), strength=float("nan"))


@pytest.mark.parametrize("change", ["to_q takes another width", "twice the inner width"])
def test_projections_that_do_not_fit_the_models_layers_are_refused_naming_the_file_and_the_layer(host, change):
    identity = write_pva_identity(host)
    files = host.module("sefi_core.pva.identity")
    attention = host.module("sefi_core.pva.attention")
    layer = sorted(identity.projections)[0]
    q, k, v = identity.projections[layer].tensors()
    if change == "to_q takes another width":
        q = torch.zeros(q.shape[0], 2 * q.shape[1])
    else:  # each of the three twice as wide: they agree with each other, not with the layer
        q, k, v = (torch.cat([t, t]) for t in (q, k, v))
    projections = {**identity.projections, layer: attention.VisualProjections(q, k, v)}
    files.save_pva_identity(files.PVAIdentity(identity.visual_tokens, projections, identity.word, "sks"),
                            str(host.pva_identity_dir / "misfit.safetensors"), overwrite=True)
    result = host.run(inpaint_graph(host, "misfit.safetensors"))
    assert not result.success
    message = result.error["exception_message"]
    assert f"The PVA identity misfit.safetensors: the visual projections of layer {layer} are" in message
    assert "this MODEL's layer takes" in message and result.error["exception_type"] != "RuntimeError"


def test_a_model_carries_one_pva_identity_and_a_second_pva_apply_says_so(host):
    write_pva_identity(host)
    write_pva_identity(host, "bob.safetensors", seed=1)
    graph = inpaint_graph(host)
    graph["20"] = {"class_type": "PVALoadIdentity", "inputs": {"pva_identity_file": "bob.safetensors"}}
    graph["21"] = {"class_type": "PVAApply", "inputs": {"model": ["3", 0], "clip": ["1", 1], "pva_identity": ["20", 0],
                                                        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                                                        "on_negative": True}}
    graph["8"]["inputs"]["model"] = ["21", 0]
    result = host.run(graph)
    assert not result.success
    message = result.error["exception_message"]
    assert "This MODEL already carries a PVA identity" in message and "one face, then the other" in message
    assert "SeFi" not in message and "object patch" not in message
