"""SeFi on SDXL through the real host, on the smallest checkpoint its detection takes as SDXL (tiny_sdxl: 24 attn2
layers at half and a quarter of the latent, and the full-size CLIP-L and 32-layer bigG the host always builds).

Every expectation comes from the plain host CLIP, with a word typed where the trigger is: a word identity's K and V
tokens are that word's embeddings in both encoders side by side (probe.word_identity), so each stage's K context must
be the plain encoding of the prompt with its K word, CLIP-L's part and bigG's part alike, and every cross-attention
layer must attend with exactly those keys and values. The pooled embedding, which SDXL's UNet reads through `y`, must
be the class word's prompt's (see nodes/sefi/training.py for why)."""
import math

import pytest
import torch

from sefi_testkit import probe

WORDS = ("cat", "dog", "car", "tree", "house")  # one token each; stage s: keys WORDS[s], values WORDS[s+1]
V_WORDS = WORDS[1:] + WORDS[:1]
TOL = dict(rtol=1e-4, atol=1e-4)  # batch composition: the K/V prompts are encoded 11 at a time, the plain ones alone


@pytest.fixture(scope="module")
def sdxl(host):
    return host.load_checkpoint(host.checkpoint("tiny_sdxl"))


def plain(host, clip, text) -> torch.Tensor:
    return probe.encode(host, clip, text)[0][0][0]  # (77, 2048)


def pooled(host, clip, text) -> torch.Tensor:
    return probe.encode(host, clip, text)[0][1]["pooled_output"]


def attn2_names(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


# ---------------------------------------------------------------- the checkpoint

def test_the_tiny_checkpoint_is_one_the_host_detects_as_sdxl(host, sdxl):
    from sefi_testkit.checkpoint import _meta_unet

    model, clip, _ = sdxl
    config = model.model.model_config
    assert (type(config).__name__, type(model.model).__name__, type(clip.cond_stage_model).__name__) == \
        ("SDXL", "SDXL", "SDXLClipModel")
    assert (config.unet_config["context_dim"], config.unet_config["adm_in_channels"]) == (2048, 2816)
    names = attn2_names(model.model.diffusion_model)
    assert len(names) == 24 and all(n.startswith("input_blocks.") for n in names)
    # SDXL's own block structure (the kit's sdxl_layout, on the meta device): 70 attn2 layers, 10 at half the latent.
    full = attn2_names(_meta_unet("sdxl_layout"))
    half = [n for n in full if n.split(".")[:2] in (["input_blocks", "4"], ["input_blocks", "5"], ["output_blocks", "3"],
                                                     ["output_blocks", "4"], ["output_blocks", "5"])]
    assert (len(full), len(half)) == (70, 10)


# ---------------------------------------------------------------- applying

def test_each_stage_gives_each_encoder_its_part_and_the_pooled_stays_the_class_words(host, sdxl):
    model, clip, _ = sdxl
    _, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, WORDS, V_WORDS))
    encoded = probe.encode(host, patched_clip, "a photo of sks")
    contexts = probe.stage_contexts(encoded)
    assert contexts.shape == (1, 5, 2, 77, 2048)
    for stage in range(5):
        torch.testing.assert_close(contexts[0, stage, 0], plain(host, clip, f"a photo of {WORDS[stage]}"), **TOL)
        torch.testing.assert_close(contexts[0, stage, 1], plain(host, clip, f"a photo of {V_WORDS[stage]}"), **TOL)
    torch.testing.assert_close(encoded[0][0][0], plain(host, clip, "a photo of person"), **TOL)
    torch.testing.assert_close(encoded[0][1]["pooled_output"].plain(), pooled(host, clip, "a photo of person"), **TOL)


def test_keys_and_values_match_an_independent_attention_computation_in_every_layer(host, sdxl):
    model, clip, _ = sdxl
    patched_model, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"], ["dog"]))
    positive, negative = probe.encode(host, patched_clip, "a photo of sks"), probe.encode(host, patched_clip, "")
    with probe.record_attn2(patched_model) as calls:
        probe.sample(host, patched_model, positive, negative, steps=1, cfg=1.0)
    k_plain, v_plain = plain(host, clip, "a photo of cat"), plain(host, clip, "a photo of dog")
    assert len({r["block"] for r in calls.records}) == len(calls.records) == 24  # each layer once: one UNet call
    for rec in calls.records:
        expected = probe.reference_attention(rec["module"], rec["x"], k_plain.to(rec["x"]), v_plain.to(rec["x"]))
        torch.testing.assert_close(rec["out"], expected, rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(rec["context"][0], k_plain.to(rec["context"]), **TOL)
        torch.testing.assert_close(rec["value"][0], v_plain.to(rec["value"]), **TOL)


def test_stages_switch_at_their_boundaries_in_every_layer(host, sdxl):
    model, clip, _ = sdxl
    patched_model, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, WORDS, WORDS))
    positive, negative = probe.encode(host, patched_clip, "a photo of sks"), probe.encode(host, patched_clip, "")
    with probe.record_attn2(patched_model, keep_tensors=False) as calls:
        probe.sample(host, patched_model, positive, negative, steps=12, cfg=1.0)
    expected = {w: plain(host, clip, f"a photo of {w}") for w in WORDS}
    sampling = model.get_model_object("model_sampling")
    seen = set()
    for sigma, records in calls.by_unet_call():
        t = float(sampling.timestep(torch.tensor(sigma)))
        stage = min(4, max(0, 4 - math.floor(t / 200)))  # paper: 1000 timesteps, 5 even stages, noisiest first
        seen.add(stage)
        assert len({r["block"] for r in records}) == 24, "not every cross-attention layer was patched"
        for r in records:
            torch.testing.assert_close(r["context_row0"], expected[WORDS[stage]].to(r["context_row0"]), **TOL)
    assert seen == {0, 1, 2, 3, 4}


def test_prompts_without_the_trigger_are_bit_identical(host, sdxl):
    model, clip, _ = sdxl
    patched_model, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"], ["dog"]))
    for text in ("a dog on a beach", "blurry"):
        ours, theirs = probe.encode(host, patched_clip, text), probe.encode(host, clip, text)
        assert torch.equal(ours[0][0], theirs[0][0]) and type(ours[0][0]) is torch.Tensor
        assert torch.equal(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"])
    ours, theirs = (encode_sdxl(host, c, "a dog", "on a beach") for c in (patched_clip, clip))
    assert torch.equal(ours[0][0], theirs[0][0]) and torch.equal(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"])
    positive, negative = probe.encode(host, clip, "a dog on a beach"), probe.encode(host, clip, "blurry")
    assert torch.equal(probe.sample(host, patched_model, positive, negative, steps=2),
                       probe.sample(host, model, positive, negative, steps=2))


def test_two_identities_in_one_image(host, sdxl):
    model, clip, _ = sdxl
    m1, c1 = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"], ["car"], trigger="sks"))
    m2, c2 = probe.apply(host, m1, c1, probe.word_identity(clip, ["dog"], ["tree"], trigger="zwx"))
    positive, negative = probe.encode(host, c2, "sks and zwx in a park"), probe.encode(host, c2, "")
    with probe.record_attn2(m2) as calls:
        probe.sample(host, m2, positive, negative, steps=1, cfg=1.0)
    k, v = plain(host, clip, "cat and dog in a park"), plain(host, clip, "car and tree in a park")
    assert len(calls.records) == 24
    for rec in calls.records:
        torch.testing.assert_close(rec["context"][0], k.to(rec["context"]), **TOL)
        torch.testing.assert_close(rec["value"][0], v.to(rec["value"]), **TOL)


def embedding_prompt(host, clip, text: str, word: str, vector: torch.Tensor) -> torch.Tensor:
    """The plain CLIP's encoding of `text` with `vector` (both encoders' parts side by side) where `word` is: the
    host's own embedding entries, one per text encoder."""
    tokens = clip.tokenize(text)
    word_id = clip.tokenize(word)["l"][0][1][0]
    parts = dict(zip(("l", "g"), vector.split((768, 1280))))
    for key in ("l", "g"):
        tokens[key] = [[({"type": "embedding", "data": parts[key]}, *e[1:]) if e[0] == word_id else e for e in chunk]
                       for chunk in tokens[key]]
    with torch.inference_mode():
        return clip.encode_from_tokens(tokens)[0]


def test_strength_and_active_range(host, sdxl):
    model, clip, _ = sdxl
    identity = probe.word_identity(clip, ["cat"] * 5, ["dog"] * 5)
    cat, person = probe.embedding(clip, "cat"), probe.embedding(clip, "person")
    _, half = probe.apply(host, model, clip, identity, strength=0.5)
    torch.testing.assert_close(probe.stage_contexts(probe.encode(host, half, "a photo of sks"))[0, 2, 0],
                               embedding_prompt(host, clip, "a photo of person", "person", person + 0.5 * (cat - person)),
                               **TOL)
    _, late = probe.apply(host, model, clip, identity, start=0.5, end=1.0)
    contexts = probe.stage_contexts(probe.encode(host, late, "a photo of sks"))
    torch.testing.assert_close(contexts[0, 0, 0], plain(host, clip, "a photo of person"), **TOL)  # noisiest: off
    torch.testing.assert_close(contexts[0, -1, 1], plain(host, clip, "a photo of dog"), **TOL)


# ---------------------------------------------------------------- SDXL's own encode node

def encode_sdxl(host, clip, text_g, text_l, size=256):
    """The host's CLIPTextEncodeSDXL node (a schema node on every supported host)."""
    with torch.inference_mode():
        return host.node("CLIPTextEncodeSDXL").execute(clip=clip, width=size, height=size, crop_w=0, crop_h=0,
                                                       target_width=size, target_height=size, text_g=text_g,
                                                       text_l=text_l).result[0]


def test_clip_text_encode_sdxl_with_the_trigger_in_one_or_both_prompts(host, sdxl):
    model, clip, _ = sdxl
    _, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"], ["dog"]))
    both = encode_sdxl(host, patched_clip, "a photo of sks", "sks smiling")
    contexts = probe.stage_contexts(both)
    torch.testing.assert_close(contexts[0, 0, 0], encode_sdxl(host, clip, "a photo of cat", "cat smiling")[0][0][0], **TOL)
    torch.testing.assert_close(contexts[0, 0, 1], encode_sdxl(host, clip, "a photo of dog", "dog smiling")[0][0][0], **TOL)
    torch.testing.assert_close(both[0][1]["pooled_output"].plain(),
                               encode_sdxl(host, clip, "a photo of person", "person smiling")[0][1]["pooled_output"], **TOL)
    # The trigger in CLIP-L's prompt alone: bigG's part of every context is its own prompt's, unchanged.
    l_only = probe.stage_contexts(encode_sdxl(host, patched_clip, "a photo", "sks smiling"))
    torch.testing.assert_close(l_only[0, 0, 0], encode_sdxl(host, clip, "a photo", "cat smiling")[0][0][0], **TOL)
    torch.testing.assert_close(l_only[0, 0, 1, :, 768:], encode_sdxl(host, clip, "a photo", "x")[0][0][0, :, 768:], **TOL)


def test_different_identities_in_the_two_prompts_are_refused(host, sdxl):
    model, clip, _ = sdxl
    m1, c1 = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"], ["cat"], trigger="sks"))
    _, c2 = probe.apply(host, m1, c1, probe.word_identity(clip, ["dog"], ["dog"], trigger="zwx"))
    with pytest.raises(ValueError, match="SeFi Apply Stage Tokens: .*text_l.*text_g.*name different identities.*Write the same trigger words"):
        encode_sdxl(host, c2, "a photo of sks", "zwx smiling")


# ---------------------------------------------------------------- what is refused, by name

def unet_only(config_class, **changes):
    """A ModelPatcher of the host's model for `config_class` (a supported_models class), tiny_sdxl's UNet changed by
    `changes`: what Load Checkpoint gives for that architecture, without a text encoder."""
    import comfy.model_patcher
    import comfy.supported_models
    from sefi_testkit.checkpoint import unet_config

    config = getattr(comfy.supported_models, config_class)({**unet_config("tiny_sdxl"), **changes})
    return comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")


@pytest.mark.parametrize("config_class, changes, message", [
    ("SDXLRefiner", {"model_channels": 384, "context_dim": 1280, "adm_in_channels": 2560,
                     "transformer_depth": [0, 0, 4, 4, 4, 4]}, "cannot use the SDXL refiner.*Connect the SDXL base model"),
    ("SSD1B", {"transformer_depth": [0, 0, 2, 2, 4, 4]}, "works on SD1.x and SDXL models. This model is SSD1B"),
])
def test_other_sdxl_like_architectures_are_refused_by_name(host, sdxl, config_class, changes, message):
    _, clip, _ = sdxl
    with pytest.raises(ValueError, match=f"SeFi Apply Stage Tokens {message}"):
        probe.apply(host, unet_only(config_class, **changes), clip, probe.word_identity(clip, ["cat"], ["cat"]))


def test_a_model_and_clip_of_different_families_are_refused(host, sdxl):
    model, clip, _ = sdxl
    sd1_model, sd1_clip, _ = host.load_checkpoint("tiny.safetensors")
    with pytest.raises(ValueError, match="the MODEL is SDXL, whose text encoders are CLIP-L and OpenCLIP bigG, but the "
                                         "CLIP is SD1ClipModel"):
        probe.apply(host, model, sd1_clip, probe.word_identity(sd1_clip, ["cat"], ["cat"]))
    with pytest.raises(ValueError, match="the MODEL is SD1.x, whose text encoders are CLIP-L, but the CLIP is "
                                         "SDXLClipModel"):
        probe.apply(host, sd1_model, clip, probe.word_identity(clip, ["cat"], ["cat"]))


def test_an_identity_of_the_other_family_is_refused_naming_both(host, sdxl):
    model, clip, _ = sdxl
    sd1_model, sd1_clip, _ = host.load_checkpoint("tiny.safetensors")
    with pytest.raises(ValueError, match="identity 'sks' was trained on SD1.x, but the model is SDXL"):
        probe.apply(host, model, clip, probe.word_identity(sd1_clip, ["cat"], ["cat"]))
    with pytest.raises(ValueError, match="identity 'sks' was trained on SDXL, but the model is SD1.x"):
        probe.apply(host, sd1_model, sd1_clip, probe.word_identity(clip, ["cat"], ["cat"]))


def test_an_sdxl_identity_file_loads_through_the_load_node_and_applies(host, sdxl):
    from sefi_core.sefi.identity import save_identity

    model, clip, _ = sdxl
    identity = probe.word_identity(clip, ["cat"], ["dog"])
    save_identity(identity, host.identity_dir / "sdxl_words.safetensors", overwrite=True)
    with torch.inference_mode():
        loaded = host.node("SefiLoadIdentity").execute(identity_file="sdxl_words.safetensors").result[0]
    assert (type(loaded).__name__, loaded.family, loaded.widths) == ("Identity", "sdxl", (768, 1280))
    _, patched_clip = probe.apply(host, model, clip, loaded)
    torch.testing.assert_close(probe.stage_contexts(probe.encode(host, patched_clip, "a photo of sks"))[0, 0, 1],
                               plain(host, clip, "a photo of dog"), **TOL)
