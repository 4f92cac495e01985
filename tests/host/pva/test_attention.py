"""PVA's parallel visual attention in the real host's UNet (nodes/pva/patch.py): each patched layer is the paper's joint
softmax, computed independently here, in every attention backend and dtype set-up the suite emulates, on SD1.5 and on
SD2 (1024-d context, 64-wide heads, attention precision fp32 as the host sets it for SD2); the original network, bit
for bit, wherever no visual tokens act; beside SeFi's K/V injector; refusing what cannot share a layer."""
import pytest
import torch
import torch.nn.functional as F

from sefi_testkit import gpu_emulation as gpu
from sefi_testkit import probe
from sefi_testkit.pva import context_width, paper_formula, recorded_layers

TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # relative to the output's size


def visual_identity(host, model, seed=0, tokens=None, spread=0.5, **where):
    """Random visual tokens, and per layer the paper's copied projections moved away from the copy (else Q' = Q)."""
    pva, attention = host.module("nodes.pva.patch"), host.module("sefi_core.pva.attention")
    g = torch.Generator().manual_seed(seed)
    projections = {}
    for name, layer in pva.cross_attention_layers(model).items():
        copy = attention.VisualProjections.copy_of(layer.to_q.weight, layer.to_k.weight, layer.to_v.weight)
        for w in copy.tensors():
            w += spread * w.std() * torch.randn(w.shape, generator=g)
        projections[name] = copy
    tokens = torch.randn(10, context_width(model), generator=g) if tokens is None else tokens
    return pva.VisualIdentity(tokens, projections, **where)


def paper_layer(module, x, context, value, projections, tokens, strength=1.0):
    """One cross-attention layer with PVA, from the paper's formula in float64 on the layer's stored weights."""
    double = lambda t: t.detach().to(torch.float64)
    linear = lambda t, layer: F.linear(double(t), double(layer.weight), None if layer.bias is None else double(layer.bias))
    value = context if value is None else value
    q, k, v = linear(x, module.to_q), linear(context, module.to_k), linear(value, module.to_v)
    f = double(tokens).expand(x.shape[0], -1, -1)
    q_v, k_v, v_v = (F.linear(t, double(w)) for t, w in zip((double(x), f, f), projections.tensors()))
    return linear(paper_formula(q, k, v, q_v, k_v, v_v, module.heads, strength), module.to_out[0])


def relative_error(ours, reference) -> float:
    return float((ours.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("ckpt", ["tiny", "tiny_sd2_inpaint"], ids=["sd15", "sd2"])
@pytest.mark.parametrize("setup", gpu.ALL_SETUPS, ids=str)
def test_every_patched_layer_is_the_papers_joint_softmax_in_each_dtype_setup(host, setup, ckpt):
    with gpu.emulate(setup):
        model, clip, _ = host.load_checkpoint(host.checkpoint(ckpt))
        identity = visual_identity(host, model, strength=0.7)
        patched = host.module("nodes.pva.patch").apply_visual_identity(model, identity)
        positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry")
        with recorded_layers(patched) as calls:
            probe.sample(host, patched, positive, negative, steps=2, cfg=1.0)  # cfg 1: the positive alone
    assert len(calls) == 2 * len(identity.projections) == 8
    for name, module, x, context, value, out, _ in calls:
        reference = paper_layer(module, x, context, value, identity.projections[name], identity.tokens, 0.7)
        error = relative_error(out, reference)
        assert error < TOLERANCE[setup.compute], (name, error)
        assert out.dtype == setup.compute


@pytest.mark.parametrize("where", [dict(strength=0.0), dict(sigma_start=-1.0, sigma_end=-2.0), dict(tokens="none")],
                         ids=["strength 0", "outside start-end", "no visual tokens"])
def test_where_no_visual_tokens_act_the_model_is_the_original_bit_for_bit(host, where):
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    if where.get("tokens") == "none":
        where = dict(tokens=torch.zeros(0, 768))
    patched = host.module("nodes.pva.patch").apply_visual_identity(model, visual_identity(host, model, **where))
    positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry")
    assert torch.equal(probe.sample(host, patched, positive, negative), probe.sample(host, model, positive, negative))


def test_copied_projections_with_the_text_context_as_visual_tokens_give_the_original_output(host):
    """Every text key twice, each with its value: the softmax averages are unchanged (the check without weights)."""
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry")
    tokens = positive[0][0][0].float()  # (77, 768): the context every layer sees for the positive
    patched = host.module("nodes.pva.patch").apply_visual_identity(
        model, visual_identity(host, model, tokens=tokens, spread=0.0))
    ours, original = (probe.sample(host, m, positive, negative, cfg=1.0) for m in (patched, model))
    assert not torch.equal(ours, original)  # the joint path ran
    torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-4)


ROW_CASES = [(gpu.CPU_FP32, False, 1.0), (gpu.CPU_FP32, True, 1.0), (gpu.FP16_SDPA, False, 0.5),
             (gpu.BF16_SDPA, True, 1.0), (gpu.FP16_SPLIT, False, 1.0)]


@pytest.mark.parametrize("setup, on_negative, strength", ROW_CASES,
                         ids=[f"{setup}-{'both' if both else 'positive'}-strength {s}" for setup, both, s in ROW_CASES])
def test_rows_with_and_without_visual_tokens_in_one_call(host, setup, on_negative, strength):
    """cfg > 1 batches the negative and the positive into one UNet call: the negative's rows are the original
    layer's unless visual tokens are on the negative too; the rows with visual tokens are the paper's formula."""
    with gpu.emulate(setup):
        model, clip, _ = host.load_checkpoint("tiny.safetensors")
        identity = visual_identity(host, model, on_negative=on_negative, strength=strength)
        patched = host.module("nodes.pva.patch").apply_visual_identity(model, identity)
        positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry")
        first = {}
        for label, m in (("pva", patched), ("original", model)):
            with recorded_layers(m) as calls:
                probe.sample(host, m, positive, negative, steps=1, cfg=7.0)
            name, module, x, context, value, out, options = calls[0]  # the first layer of the first call: same input
            first[label] = (out, options["cond_or_uncond"], x, context, value, module, name)
    out, chunks, x, context, value, module, name = first["pva"]
    original = first["original"][0]
    assert sorted(chunks) == [0, 1] and out.shape[0] == 2 and out.dtype == setup.compute
    for row, chunk in enumerate(chunks):
        gets_tokens = chunk == 0 or on_negative
        if gets_tokens:
            reference = paper_layer(module, x[row:row + 1], context[row:row + 1],
                                    None if value is None else value[row:row + 1], identity.projections[name],
                                    identity.tokens, strength)
            assert relative_error(out[row:row + 1], reference) < TOLERANCE[setup.compute]
            assert not torch.allclose(out[row], original[row])
        elif setup.compute == torch.float32:
            torch.testing.assert_close(out[row], original[row], rtol=1e-5, atol=1e-6)
        else:  # the host's attention on one row instead of two: the same within its dtype's rounding
            torch.testing.assert_close(out[row], original[row])


def test_beside_sefis_kv_injector_the_text_half_is_sefis(host):
    """SeFi's attn2 patch changes the context and value before the layer: PVA's text keys and values are those."""
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    sefi = probe.word_identity(clip, ["dog"] * 5, ["cat"] * 5)
    sefi_model, sefi_clip = probe.apply(host, model, clip, sefi)
    positive, negative = probe.encode(host, sefi_clip, "photo of sks"), probe.encode(host, sefi_clip, "blurry")
    pva = host.module("nodes.pva.patch")
    off = pva.apply_visual_identity(sefi_model, visual_identity(host, model, strength=0.0))
    assert torch.equal(probe.sample(host, off, positive, negative), probe.sample(host, sefi_model, positive, negative))
    identity = visual_identity(host, model)
    both = pva.apply_visual_identity(sefi_model, identity)
    with recorded_layers(both) as calls:
        probe.sample(host, both, positive, negative, steps=1, cfg=1.0)
    plain_context = probe.encode(host, clip, "photo of sks")[0][0]
    for name, module, x, context, value, out, _ in calls:
        assert value is not None and not torch.equal(value, context)  # SeFi's K and V contexts reached the layer
        assert not torch.equal(context[:1], plain_context.to(context))
        reference = paper_layer(module, x, context, value, identity.projections[name], identity.tokens)
        assert relative_error(out, reference) < TOLERANCE[torch.float32]


def test_what_cannot_share_a_layer_is_refused_by_name(host):
    model, clip, _ = host.load_checkpoint("tiny.safetensors")
    pva = host.module("nodes.pva.patch")
    identity = visual_identity(host, model)
    replaced = model.clone()
    replaced.set_model_attn2_replace(lambda q, k, v, extra_options: q, "input", 1)
    with pytest.raises(RuntimeError, match=r"PVA cannot share cross-attention with the attn2 replace patch already on "
                                           r"this MODEL \(blocks \('input', 1\)"):
        pva.apply_visual_identity(replaced, identity)
    later = pva.apply_visual_identity(model, identity)
    later.set_model_attn2_replace(lambda q, k, v, extra_options: q, "input", 1)
    positive, negative = probe.encode(host, clip, "photo of a person"), probe.encode(host, clip, "blurry")
    with pytest.raises(RuntimeError, match="added to this MODEL after PVA"):
        probe.sample(host, later, positive, negative)
    assert torch.isfinite(probe.sample(host, model, positive, negative)).all()  # the input MODEL is unchanged


def test_all_sixteen_cross_attention_layers_of_an_sd1_unet_are_patched(host):
    model, _, _ = host.load_checkpoint(host.checkpoint("sd1_layout"))
    pva = host.module("nodes.pva.patch")
    layers = pva.cross_attention_layers(model)
    assert len(layers) == 16
    patched = pva.apply_visual_identity(model, visual_identity(host, model))
    assert sum(key.endswith(".attn2.forward") for key in patched.object_patches) == 16
    assert not any(key.endswith(".attn2.forward") for key in model.object_patches)
