"""The identity through ComfyUI's own conditioning nodes: whatever a node does to the conditioning, it does to the
identity's K and V contexts. Every expectation is computed independently: the prompt encoded by the plain CLIP
with the K word ("cat") or the V word ("dog") written in the trigger's place, then the node's operation written out
by hand; and it is checked against the contexts every cross-attention layer actually received while sampling.

Each node is checked on SD1.x (tiny) and on SDXL (tiny_sdxl: CLIP-L's and bigG's contexts side by side, and the pooled
embedding the UNet reads through `y`), except GLIGEN, which exists for SD1.x alone. On SDXL the identity has one stage:
each prompt with the trigger then costs 3 encodes through the 32-layer bigG instead of 11; the stages themselves are
tested on SDXL in test_training_matches_apply and test_sdxl."""
import pytest
import torch

from sefi_testkit import probe

K_WORD, V_WORD = "cat", "dog"
PROMPT = "a photo of sks sitting"
STAGES = {"tiny": 5, "tiny_sdxl": 1}


def applied(host, preset):
    model, clip, _ = host.load_checkpoint(host.checkpoint(preset))
    stages = STAGES[preset]
    patched_model, patched_clip = probe.apply(host, model, clip,
                                              probe.word_identity(clip, [K_WORD] * stages, [V_WORD] * stages))
    return model, clip, patched_model, patched_clip


def preset_of(clip) -> str:
    return "tiny_sdxl" if probe.family(clip) == "sdxl" else "tiny"


@pytest.fixture(scope="module", params=list(STAGES))
def sefi(host, request):
    return applied(host, request.param)


@pytest.fixture(scope="module")
def sefi_sd1(host):
    return applied(host, "tiny")


def plain(host, clip, text):
    return probe.encode(host, clip, text)[0][0]  # (1, 77, 768), SDXL's (1, 77, 2048)


def expected_kv(host, clip, text):
    """The K and V contexts of a prompt with the trigger, from the plain CLIP."""
    return plain(host, clip, text.replace("sks", K_WORD)), plain(host, clip, text.replace("sks", V_WORD))


def received(host, model, positive, negative, cfg=1.0):
    """(context, value) rows each cross-attention layer received, over all steps (cfg 1: the positive only)."""
    with probe.record_attn2(model) as calls:
        probe.sample(host, model, positive, negative, steps=2, cfg=cfg)
    assert calls.records
    return [(r["context"], r["value"]) for r in calls.records]


def assert_rows(records, expected_k, expected_v, row=0):
    for context, value in records:
        torch.testing.assert_close(context[row], expected_k[0].to(context), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(value[row], expected_v[0].to(value), rtol=1e-4, atol=1e-4)


def node(host, name):
    return host.nodes.NODE_CLASS_MAPPINGS[name]()


def run(fn, *args):
    with torch.inference_mode():
        return fn(*args)[0]


@pytest.mark.parametrize("identity_side", ["to", "from"])
def test_average_blends_the_identity_with_the_same_weight(host, sefi, identity_side):
    _, clip, model, sefi_clip = sefi
    ident, other = probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "an oil painting")
    to, source = (ident, other) if identity_side == "to" else (other, ident)
    averaged = run(node(host, "ConditioningAverage").addWeighted, to, source, 0.7)
    k, v = expected_kv(host, clip, PROMPT)
    painting = plain(host, clip, "an oil painting")
    weight = 0.7 if identity_side == "to" else 0.3
    expected = lambda e: weight * e + (1 - weight) * painting
    assert_rows(received(host, model, averaged, other), expected(k), expected(v))


@pytest.mark.parametrize("identity_side", ["to", "from"])
def test_concat_keeps_the_identity_on_its_tokens(host, sefi, identity_side):
    _, clip, model, sefi_clip = sefi
    ident, other = probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "in a garden")
    to, source = (ident, other) if identity_side == "to" else (other, ident)
    joined = run(node(host, "ConditioningConcat").concat, to, source)
    k, v = expected_kv(host, clip, PROMPT)
    garden = plain(host, clip, "in a garden")
    expected = (lambda e: torch.cat((e, garden), 1)) if identity_side == "to" else (lambda e: torch.cat((garden, e), 1))
    records = received(host, model, joined, other)
    assert records[0][0].shape[1] == 154
    assert_rows(records, expected(k), expected(v))


def test_zero_out_on_a_negative_with_the_trigger_gives_zeros(host, sefi):
    _, clip, model, sefi_clip = sefi
    negative = run(node(host, "ConditioningZeroOut").zero_out, probe.encode(host, sefi_clip, "sks, blurry"))
    positive = probe.encode(host, sefi_clip, PROMPT)
    k, v = expected_kv(host, clip, PROMPT)
    for context, value in received(host, model, positive, negative, cfg=3.0):
        zero_rows = [r for r in range(2) if not context[r].any() and not value[r].any()]
        assert len(zero_rows) == 1, "the zeroed negative got the identity back"
        row = 1 - zero_rows[0]
        torch.testing.assert_close(context[row], k[0].to(context), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(value[row], v[0].to(value), rtol=1e-4, atol=1e-4)


def style_model_and_image(context_dim=768):
    import comfy.clip_vision
    import comfy.sd
    import comfy.t2i_adapter.adapter

    torch.manual_seed(0)  # the SD1 T2I style adapter's architecture (its tokens as wide as the context), random weights
    style = comfy.sd.StyleModel(comfy.t2i_adapter.adapter.StyleAdapter(width=1024, context_dim=context_dim, num_head=8,
                                                                       n_layes=3, num_token=8))
    vision = comfy.clip_vision.Output()
    vision.last_hidden_state = torch.randn(1, 257, 1024)
    return style, vision


@pytest.mark.parametrize("strength_type", ["multiply", "attn_bias"])
def test_style_tokens_are_appended_to_the_identity_contexts(host, sefi, strength_type):
    _, clip, model, sefi_clip = sefi
    style, vision = style_model_and_image(plain(host, clip, "").shape[-1])
    styled = run(node(host, "StyleModelApply").apply_stylemodel, probe.encode(host, sefi_clip, PROMPT), style, vision,
                 0.8, strength_type)
    with torch.inference_mode():
        tokens = style.get_cond(vision).flatten(0, 1).unsqueeze(0) * (0.8 if strength_type == "multiply" else 1.0)
    k, v = expected_kv(host, clip, PROMPT)
    records = received(host, model, styled, probe.encode(host, sefi_clip, ""))
    assert records[0][0].shape[1] == 85
    assert_rows(records, torch.cat((k, tokens), 1), torch.cat((v, tokens), 1))


def test_unclip_conditioning_has_no_effect_on_sd1_and_keeps_the_identity(host, sefi_sd1):
    """unCLIP Conditioning adds an image embedding that only unCLIP models read (their ADM input); on SD1.x the host
    ignores it: every layer receives the identity's contexts, and the image is the one without the node."""
    _, clip, model, sefi_clip = sefi_sd1
    _, vision = style_model_and_image()
    vision.image_embeds = torch.randn(1, 1024)
    ident, negative = probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "")
    unclip = run(node(host, "unCLIPConditioning").apply_adm, ident, vision, 1.0, 0.0)
    assert "unclip_conditioning" in unclip[0][1]
    k, v = expected_kv(host, clip, PROMPT)
    assert_rows(received(host, model, unclip, negative), k, v)
    assert torch.equal(probe.sample(host, model, unclip, negative, steps=2),
                       probe.sample(host, model, ident, negative, steps=2))


def test_unclip_conditioning_on_sdxl_changes_the_pooled_input_and_keeps_the_identity(host):
    """On SDXL the host reads unCLIP Conditioning's image embedding into `y` in place of the pooled text embedding
    (sdxl_pooled); the cross-attention still receives the identity's contexts in every layer."""
    _, clip, model, sefi_clip = applied(host, "tiny_sdxl")
    _, vision = style_model_and_image(2048)
    vision.image_embeds = torch.randn(1, 1280)
    ident, negative = probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "")
    unclip = run(node(host, "unCLIPConditioning").apply_adm, ident, vision, 1.0, 0.0)
    k, v = expected_kv(host, clip, PROMPT)
    assert_rows(received(host, model, unclip, negative), k, v)
    assert not torch.equal(probe.sample(host, model, unclip, negative, steps=2),
                           probe.sample(host, model, ident, negative, steps=2))


def test_area_mask_strength_timestep_range_properties_and_combine_keep_the_identity(host, sefi):
    _, clip, model, sefi_clip = sefi
    ident = probe.encode(host, sefi_clip, PROMPT)
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:40, 10:40] = 1
    with torch.inference_mode():
        masked = node(host, "ConditioningSetMask").append(ident, mask, "default", 0.9)[0]
        strong = node(host, "ConditioningSetAreaStrength").append(masked, 1.3)[0]
        ranged = node(host, "ConditioningSetTimestepRange").set_range(strong, 0.0, 1.0)[0]
        area = node(host, "ConditioningSetArea").append(ident, 64, 64, 0, 0, 1.0)[0]
        percent = node(host, "ConditioningSetAreaPercentage").append(ident, 1.0, 1.0, 0.0, 0.0, 1.0)[0]
        properties = node(host, "ConditioningSetProperties").set_properties(ident, 0.8, "default", mask=mask)[0]
        both = node(host, "ConditioningCombine").combine(ranged, area)[0]
        both = node(host, "ConditioningCombine").combine(both, node(host, "ConditioningCombine").combine(percent, properties)[0])[0]
    k, v = expected_kv(host, clip, PROMPT)
    for context, value in received(host, model, both, probe.encode(host, sefi_clip, "")):
        for row in range(context.shape[0]):
            torch.testing.assert_close(context[row], k[0].to(context), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(value[row], v[0].to(value), rtol=1e-4, atol=1e-4)


def test_two_identities_averaged_each_keep_their_stages(host, sefi):
    """Five stages on both families: two identities of different words per stage."""
    base_model, clip, _, _ = sefi
    words_k, words_v = ["cat", "dog", "car", "tree", "house"], ["house", "tree", "car", "dog", "cat"]
    m1, c1 = probe.apply(host, base_model, clip, probe.word_identity(clip, words_k, words_v, trigger="sks"))
    m2, c2 = probe.apply(host, m1, c1, probe.word_identity(clip, ["bird"] * 5, ["fish"] * 5, trigger="zwx"))
    averaged = run(node(host, "ConditioningAverage").addWeighted, probe.encode(host, c2, "sks on a beach"),
                   probe.encode(host, c2, "zwx on a beach"), 0.5)
    contexts = probe.stage_contexts(averaged)
    for stage in range(5):
        for kv, words, other in ((0, words_k, "bird"), (1, words_v, "fish")):
            expected = 0.5 * plain(host, clip, f"{words[stage]} on a beach") + 0.5 * plain(host, clip, f"{other} on a beach")
            torch.testing.assert_close(contexts[0, stage, kv], expected[0], rtol=1e-4, atol=1e-4)


def test_a_sefi_prompt_on_the_checkpoints_model_is_an_error_that_says_which_model_to_use(host):
    graph = probe.txt2img_graph("a photo of sks", "blurry", identity="cat_id_for_errors.safetensors")
    graph["7"]["inputs"]["model"] = ["1", 0]  # the checkpoint's MODEL instead of Apply's
    _, clip, _ = host.load_checkpoint("tiny.safetensors")
    from sefi_core.sefi.identity import save_identity
    save_identity(probe.word_identity(clip, ["cat"] * 5, ["cat"] * 5), host.identity_dir / "cat_id_for_errors.safetensors",
                  overwrite=True)
    result = host.run(graph)
    assert not result.success
    assert ("A prompt with the trigger 'sks' reached a model without SeFi's K/V injector, where the identity would be "
            "lost. Connect the MODEL output of SeFi Apply Stage Tokens") in result.error["exception_message"]


def test_controlnet_keeps_the_identity_in_the_unet_and_sees_the_class_word_itself(host, sefi):
    from sefi_testkit.checkpoint import controlnet

    _, clip, model, sefi_clip = sefi
    control = controlnet(preset_of(clip))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        positive, negative = node(host, "ControlNetApplyAdvanced").apply_controlnet(
            probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "blurry"), control, hint, 1.0, 0.0, 1.0)
    seen = []
    modules = [m for name, m in control.control_model.named_modules() if name.endswith("attn2")]
    handles = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["context"][0].clone()),
                                       with_kwargs=True) for m in modules]
    try:
        k, v = expected_kv(host, clip, PROMPT)
        assert_rows(received(host, model, positive, negative), k, v)
    finally:
        for h in handles:
            h.remove()
    class_word = plain(host, clip, PROMPT.replace("sks", "person"))[0]
    assert seen and all(torch.allclose(c, class_word.to(c), rtol=1e-4, atol=1e-4) for c in seen)


def test_inpaint_conditioning_keeps_the_identity(host, sefi):
    _, clip, model, sefi_clip = sefi
    _, _, vae = host.load_checkpoint(host.checkpoint(preset_of(clip)))
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    with torch.inference_mode():
        positive, negative, _ = node(host, "InpaintModelConditioning").encode(
            probe.encode(host, sefi_clip, PROMPT), probe.encode(host, sefi_clip, "blurry"), pixels, vae, mask, True)
    assert "concat_latent_image" in positive[0][1]
    k, v = expected_kv(host, clip, PROMPT)
    assert_rows(received(host, model, positive, negative), k, v)


def gligen_model():
    """A GLIGEN for the tiny UNet's 4 transformer blocks, from the host's own classes, random weights."""
    import comfy.gligen
    import comfy.model_management
    import comfy.model_patcher

    torch.manual_seed(0)
    blocks = [comfy.gligen.GatedSelfAttentionDense(320, 768, 8, 40) for _ in range(4)]
    gligen = comfy.gligen.Gligen(blocks, comfy.gligen.PositionNet(768, 768), 768)
    with torch.no_grad():
        for p in gligen.parameters():  # the host's ops leave weights uninitialised
            p.normal_(0, 0.02)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(gligen, load_device=device, offload_device=device)


def test_a_gligen_box_with_the_trigger_is_an_error_that_says_what_to_write(host, sefi_sd1):
    """GLIGEN reads the box phrase's pooled embedding, which an identity does not change: the box would silently
    show the class word."""
    _, _, model, sefi_clip = sefi_sd1
    gligen = gligen_model()
    with torch.inference_mode():
        boxed = node(host, "GLIGENTextBoxApply").append(probe.encode(host, sefi_clip, PROMPT), sefi_clip, gligen,
                                                        "sks", 32, 32, 0, 0)[0]
        with pytest.raises(Exception, match="pooled text embedding of a prompt with the trigger 'sks' was given to a "
                                            "model \\(a GLIGEN text box.*write the class word"):
            probe.sample(host, model, boxed, probe.encode(host, sefi_clip, "blurry"), steps=1)
        plain_box = node(host, "GLIGENTextBoxApply").append(probe.encode(host, sefi_clip, PROMPT), sefi_clip, gligen,
                                                            "person", 32, 32, 0, 0)[0]
    assert torch.isfinite(probe.sample(host, model, plain_box, probe.encode(host, sefi_clip, "blurry"), steps=1)).all()
