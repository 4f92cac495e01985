"""SeFi Apply Stage Tokens against the real host: K/V injection, stages, batching, no side effects."""
import math

import pytest
import torch

from sefi_testkit import probe
from sefi_core.sefi.identity import Identity, save_identity

WORDS = ["cat", "dog", "car", "tree", "house"]


@pytest.fixture(scope="module")
def tiny(host):
    return host.load_checkpoint("tiny.safetensors")


def test_cat_identity_samples_like_the_word_cat_through_the_executor(host, tiny):
    _, clip, _ = tiny
    cat = probe.embedding(clip, "cat")
    save_identity(Identity(cat.expand(5, 768), cat.expand(5, 768), "sks"), host.identity_dir / "cat_id.safetensors",
                  overwrite=True)
    with_identity = probe.txt2img_graph("a photo of sks sitting", "blurry", identity="cat_id.safetensors")
    plain = probe.txt2img_graph("a photo of cat sitting", "blurry")
    latents = []
    for graph in (with_identity, plain):
        result = host.run(graph)
        assert result.success, result.error
        latents.append(probe.saved_latent(host, result))
    assert latents[0].abs().sum() > 0
    # The identity's prompt is encoded in a batch of 11 and the plain one alone: CPU kernels block them differently
    # (contexts agree to ~3e-6), and three sampling steps through random weights amplify that to ~7e-4 at most.
    torch.testing.assert_close(latents[0], latents[1], rtol=1e-3, atol=2e-3)


def test_keys_and_values_match_an_independent_attention_computation(host, tiny):
    model, clip, _ = tiny
    ident = probe.word_identity(clip, k_words=["cat"] * 5, v_words=["dog"] * 5)
    patched_model, patched_clip = probe.apply(host, model, clip, ident)
    pos, neg = probe.encode(host, patched_clip, "a photo of sks"), probe.encode(host, patched_clip, "")
    with probe.record_attn2(patched_model) as calls:
        probe.sample(host, patched_model, pos, neg, steps=1, cfg=1.0)
    k_plain = probe.encode(host, clip, "a photo of cat")[0][0][0]
    v_plain = probe.encode(host, clip, "a photo of dog")[0][0][0]
    assert calls.records, "no cross-attention call was recorded"
    for rec in calls.records:
        attn = rec["module"]
        expected = probe.reference_attention(attn, rec["x"], k_plain.to(rec["x"]), v_plain.to(rec["x"]))
        torch.testing.assert_close(rec["out"], expected, rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(rec["context"][0], k_plain.to(rec["context"]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rec["value"][0], v_plain.to(rec["value"]), rtol=1e-4, atol=1e-4)


def test_stages_switch_at_their_boundaries_in_all_16_cross_attention_layers(host):
    model, clip, _ = host.load_checkpoint("sd1_layout.safetensors")
    assert sum(name.endswith("attn2") for name, _ in model.model.named_modules()) == 16
    ident = probe.word_identity(clip, k_words=WORDS, v_words=WORDS)
    patched_model, patched_clip = probe.apply(host, model, clip, ident)
    pos, neg = probe.encode(host, patched_clip, "a photo of sks"), probe.encode(host, patched_clip, "")
    with probe.record_attn2(patched_model, keep_tensors=False) as calls:
        probe.sample(host, patched_model, pos, neg, steps=12, cfg=1.0, size=64)
    plain = {w: probe.encode(host, clip, f"a photo of {w}")[0][0][0] for w in WORDS}
    by_call = calls.by_unet_call()
    assert len(by_call) == 12
    seen_stages = set()
    ms = model.get_model_object("model_sampling")
    for sigma, recs in by_call:
        t = float(ms.timestep(torch.tensor(sigma)))
        stage = min(4, max(0, 4 - math.floor(t / 200)))  # paper: 1000 timesteps, 5 even stages, noisiest first
        seen_stages.add(stage)
        assert len({r["block"] for r in recs}) == 16, "not every cross-attention layer was patched"
        for r in recs:
            torch.testing.assert_close(r["context_row0"], plain[WORDS[stage]].to(r["context_row0"]), rtol=1e-4, atol=1e-4)
    assert seen_stages == {0, 1, 2, 3, 4}


def test_prompts_without_trigger_are_bit_identical_and_batching_is_kept(host, tiny):
    model, clip, _ = tiny
    ident = probe.word_identity(clip, k_words=WORDS, v_words=WORDS[::-1])
    patched_model, patched_clip = probe.apply(host, model, clip, ident)
    plain_pos, plain_neg = probe.encode(host, clip, "a dog on a beach"), probe.encode(host, clip, "blurry")
    pos, neg = probe.encode(host, patched_clip, "a dog on a beach"), probe.encode(host, patched_clip, "blurry")
    assert torch.equal(pos[0][0], plain_pos[0][0]) and "model_conds" not in pos[0][1]
    before = probe.sample(host, model, plain_pos, plain_neg, steps=3)
    assert torch.equal(probe.sample(host, patched_model, pos, neg, steps=3), before)

    counted = probe.count_unet_calls(patched_model)
    probe.sample(host, counted.model, probe.encode(host, patched_clip, "sks on a beach"), neg, steps=3)
    assert counted.batches == [2, 2, 2]  # positive with identity + negative without: one UNet call per step


def test_inputs_are_unchanged_after_use(host, tiny):
    model, clip, _ = tiny
    pos_before = probe.encode(host, clip, "a photo of sks")
    neg = probe.encode(host, clip, "blurry")
    before = probe.sample(host, model, pos_before, neg, steps=2)
    options_before = repr(model.model_options)
    patched_model, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["dog"] * 5, ["car"] * 5))
    probe.sample(host, patched_model, probe.encode(host, patched_clip, "a photo of sks"), neg, steps=2)
    pos_after = probe.encode(host, clip, "a photo of sks")
    assert torch.equal(pos_after[0][0], pos_before[0][0]) and "model_conds" not in pos_after[0][1]
    assert repr(model.model_options) == options_before
    assert torch.equal(probe.sample(host, model, pos_after, neg, steps=2), before)


def test_two_chained_identities_in_one_prompt(host, tiny):
    model, clip, _ = tiny
    m1, c1 = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5, trigger="sks"))
    m2, c2 = probe.apply(host, m1, c1, probe.word_identity(clip, ["dog"] * 5, ["dog"] * 5, trigger="zwx"))
    assert len(m2.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    both = probe.stage_contexts(probe.encode(host, c2, "sks and zwx in a park"))
    expected = probe.encode(host, clip, "cat and dog in a park")[0][0][0]
    for g in range(both.shape[1]):
        torch.testing.assert_close(both[0, g, 0], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(both[0, g, 1], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="Two identities use the trigger word 'sks'"):
        probe.apply(host, m1, c1, probe.word_identity(clip, ["car"] * 5, ["car"] * 5, trigger="sks"))


@pytest.mark.parametrize("template", [
    "(sks:1.2) smiling, sks again",
    "a painting, " + ", ".join(["very detailed"] * 30) + ", portrait of sks",  # trigger in the second chunk
    "ohwx",  # a trigger the tokenizer splits into several tokens
])
def test_weights_repeats_long_prompts_and_multi_token_triggers(host, tiny, template):
    model, clip, _ = tiny
    trigger = "ohwx" if template == "ohwx" else "sks"
    _, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5, trigger=trigger))
    conds = probe.stage_contexts(probe.encode(host, patched_clip, template))
    expected = probe.encode(host, clip, template.replace(trigger, "cat"))[0][0][0]
    assert conds.shape[3] == expected.shape[0]
    torch.testing.assert_close(conds[0, 0, 0], expected, rtol=1e-4, atol=1e-4)


def test_clip_set_last_layer_applies_to_the_stage_prompts(host, tiny):
    model, clip, _ = tiny
    _, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5))
    with torch.inference_mode():
        last_layer = host.nodes.CLIPSetLastLayer()
        skipped = last_layer.set_last_layer(patched_clip, -2)[0]
        plain_skipped = last_layer.set_last_layer(clip, -2)[0]
    expected = probe.encode(host, plain_skipped, "sks photo".replace("sks", "cat"))[0][0][0]
    assert not torch.allclose(expected, probe.encode(host, clip, "cat photo")[0][0][0])
    torch.testing.assert_close(probe.stage_contexts(probe.encode(host, skipped, "sks photo"))[0, 3, 1], expected,
                               rtol=1e-4, atol=1e-4)


def test_strength_zero_and_out_of_range_read_as_the_class_word(host, tiny):
    model, clip, _ = tiny
    ident = probe.word_identity(clip, ["cat"] * 5, ["dog"] * 5)
    person = probe.encode(host, clip, "a photo of person")[0][0][0]
    _, weak = probe.apply(host, model, clip, ident, strength=0.0)
    torch.testing.assert_close(probe.stage_contexts(probe.encode(host, weak, "a photo of sks"))[0, 2, 1], person,
                               rtol=1e-4, atol=1e-4)
    _, late = probe.apply(host, model, clip, ident, start=0.5, end=1.0)
    contexts = probe.stage_contexts(probe.encode(host, late, "a photo of sks"))
    torch.testing.assert_close(contexts[0, 0, 0], person, rtol=1e-4, atol=1e-4)  # noisiest segment: class word
    torch.testing.assert_close(contexts[0, -1, 1], probe.encode(host, clip, "a photo of dog")[0][0][0], rtol=1e-4, atol=1e-4)


def test_coexists_with_an_attention_patch_already_on_the_model(host, tiny):
    model, clip, _ = tiny
    extended = model.clone()
    seen = []

    def add_tokens(n, context, value, extra_options):  # an IPAdapter-like patch: 4 extra K/V tokens
        seen.append(context.shape[1])
        extra = torch.zeros(context.shape[0], 4, context.shape[2], dtype=context.dtype, device=context.device)
        return n, torch.cat([context, extra], 1), torch.cat([value, extra], 1)

    extended.set_model_attn2_patch(add_tokens)
    patched_model, patched_clip = probe.apply(host, extended, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5))
    out = probe.sample(host, patched_model, probe.encode(host, patched_clip, "sks"), probe.encode(host, clip, ""), steps=1)
    assert torch.isfinite(out).all() and seen and set(seen) == {77}


def test_bad_inputs_give_clear_errors(host, tiny):
    model, clip, _ = tiny
    ident = probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5)
    with pytest.raises(ValueError, match="has spaces"):
        probe.apply(host, model, clip, ident, trigger="two words")
    with pytest.raises(ValueError, match="start_percent 0.8 must be below end_percent 0.2"):
        probe.apply(host, model, clip, ident, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="The trigger word 'person' is the class word itself"):
        probe.apply(host, model, clip, ident, trigger="person")


def test_malformed_identity_file_fails_the_load_node_naming_the_file(host):
    (host.identity_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    result = host.run(probe.txt2img_graph("sks", "", identity="broken.safetensors"))
    assert not result.success
    assert "broken.safetensors" in result.error["exception_message"]


def test_an_sd2_model_is_refused_naming_what_was_found(host, tiny):
    import comfy.model_patcher
    import comfy.supported_models
    from sefi_testkit.checkpoint import unet_config

    _, clip, _ = tiny
    config = comfy.supported_models.SD20({**unet_config("tiny"), "context_dim": 1024, "use_linear_in_transformer": True,
                                          "num_heads": -1, "num_head_channels": 64})
    sd2 = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")
    with pytest.raises(ValueError, match="SeFi Apply Stage Tokens works on SD1.x and SDXL models. This model is SD20 with a 1024-d"):
        probe.apply(host, sd2, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5))


def test_sd15_inpainting_model_is_accepted(host, tiny):
    import comfy.model_patcher
    import comfy.supported_models
    from sefi_testkit.checkpoint import unet_config

    _, clip, _ = tiny
    config = comfy.supported_models.SD15({**unet_config("tiny"), "in_channels": 9})
    inpaint = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device="cpu", offload_device="cpu")
    assert inpaint.model.concat_keys  # the host treats it as an inpainting model
    patched, _ = probe.apply(host, inpaint, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5))
    assert patched.model is inpaint.model and patched is not inpaint


def test_patched_clip_survives_copies_and_further_clones(host, tiny):
    import copy

    model, clip, _ = tiny
    _, patched_clip = probe.apply(host, model, clip, probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5))
    tokenizer = copy.deepcopy(patched_clip.tokenizer)
    assert tokenizer.patterns.keys() == patched_clip.tokenizer.patterns.keys()
    again = patched_clip.clone()
    torch.testing.assert_close(probe.stage_contexts(probe.encode(host, again, "sks"))[0, 0, 0],
                               probe.encode(host, clip, "cat")[0][0][0], rtol=1e-4, atol=1e-4)


def test_load_identity_reruns_when_the_file_changes(host, tiny):
    _, clip, _ = tiny
    path = host.identity_dir / "changing.safetensors"
    save_identity(probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5), path, overwrite=True)
    load_node = host.node("SefiLoadIdentity")
    first = load_node.fingerprint_inputs(identity_file="changing.safetensors")
    assert load_node.fingerprint_inputs(identity_file="changing.safetensors") == first
    save_identity(probe.word_identity(clip, ["dog"] * 5, ["dog"] * 5), path, overwrite=True)
    assert load_node.fingerprint_inputs(identity_file="changing.safetensors") != first
    with torch.inference_mode():
        identity, trigger = load_node.execute(identity_file="changing.safetensors").result
    assert trigger == "sks" and torch.equal(identity.k_tokens[0], probe.embedding(clip, "dog"))
