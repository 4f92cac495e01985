"""PVA's parallel visual attention, host-free: the joint softmax of sefi_core.pva.attention (visual logits from the
image features and a per-identity logit map, Q' never formed) against an independent computation written out from the
paper's formula with Q' = W'_q x, K_v = W'_k f, V_v = W'_v f."""
import math

import pytest
import torch

from sefi_core.pva.attention import VisualProjections, joint_attention
from sefi_testkit.pva import paper_formula


def plain_attention(q, k, v, heads):
    """An ordinary multi-head attention: scale 1/sqrt(head width)."""
    b, n, inner = q.shape
    d = inner // heads
    heads_of = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)
    logits = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(d)
    return (torch.softmax(logits, dim=-1) @ heads_of(v)).transpose(1, 2).reshape(b, n, inner)


def random_layer(g, b=2, n=16, t=7, m=3, heads=4, d=8, query_width=12, context_width=20, dtype=torch.float32):
    """(q, k, v, x, tokens, projections, w_q, w_k, w_v, heads): a layer's text Q, K, V for image features x and text
    context c, visual tokens and projections."""
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])
    inner = heads * d
    x, c, tokens = (make(*shape) * math.sqrt(shape[-1]) for shape in ((b, n, query_width), (b, t, context_width),
                                                                      (m, context_width)))
    w_q, w_k, w_v = make(inner, query_width), make(inner, context_width), make(inner, context_width)
    projections = VisualProjections(make(inner, query_width), make(inner, context_width), make(inner, context_width))
    q, k, v = x @ w_q.T, c @ w_k.T, c @ w_v.T
    cast = lambda t: t.to(dtype)
    return cast(q), cast(k), cast(v), cast(x), tokens, projections, heads


def reference(q, k, v, x, tokens, projections, heads, strength=1.0):
    """The paper's formula in float64 with Q', K_v, V_v projected explicitly."""
    double = lambda t: t.to(torch.float64)
    w_q, w_k, w_v = map(double, projections.tensors())
    f = double(tokens).expand(x.shape[0], -1, -1)
    return paper_formula(double(q), double(k), double(v), double(x) @ w_q.T, f @ w_k.T, f @ w_v.T, heads, strength)


def ours(q, k, v, x, tokens, projections, heads, strength=1.0):
    visual = projections.visual_keys(tokens, heads, x.device, x.dtype)
    return joint_attention(q, k, v, x, visual, heads, strength=strength)


@pytest.mark.parametrize("strength", [1.0, 0.3, 2.0])
def test_joint_attention_is_the_papers_concatenated_softmax(strength):
    args = random_layer(torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(*args, strength=strength).double(), reference(*args, strength=strength),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=["fp16", "bf16"])
def test_half_precision_inputs_give_the_formula_of_those_inputs_within_rounding(dtype, tolerance, strength):
    """fp16/bf16 q, k, v, x (as the host computes them): the softmax runs in fp32, only the output is rounded."""
    args = random_layer(torch.Generator().manual_seed(4), dtype=dtype)
    out = ours(*args, strength=strength)
    assert out.dtype == dtype
    expected = reference(*args, strength=strength)
    assert float((out.double() - expected).norm() / expected.norm()) < tolerance


def test_gradients_reach_the_visual_projections_and_tokens_as_the_formula_says():
    q, k, v, x, tokens, projections, heads = random_layer(torch.Generator().manual_seed(1), dtype=torch.float64)
    for w in projections.tensors():
        w.requires_grad_(True)
    tokens.requires_grad_(True)
    x.requires_grad_(True)
    inputs = [*projections.tensors(), tokens, x]
    grads = torch.autograd.grad(ours(q, k, v, x, tokens, projections, heads, 0.7).square().sum(), inputs)
    expected = torch.autograd.grad(reference(q, k, v, x, tokens, projections, heads, 0.7).square().sum(), inputs)
    for a, e in zip(grads, expected):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8)


def test_visual_tokens_equal_to_the_text_context_leave_the_output_unchanged():
    """With copied projections and f = c, every text key appears twice with the same value: softmax averages do not
    change (notes: the check that needs no weights)."""
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 10, 16, generator=g), torch.randn(1, 6, 24, generator=g)
    w_q, w_k, w_v = torch.randn(32, 16, generator=g), torch.randn(32, 24, generator=g), torch.randn(32, 24, generator=g)
    q, k, v = x @ w_q.T, c @ w_k.T, c @ w_v.T
    visual = VisualProjections.copy_of(w_q, w_k, w_v).visual_keys(c[0], 4, x.device, x.dtype)
    torch.testing.assert_close(joint_attention(q, k, v, x, visual, 4), plain_attention(q, k, v, 4),
                               rtol=1e-5, atol=1e-5)


def test_strength_zero_is_refused_here_because_the_layer_skips_pva_there():
    q, k, v, x, tokens, projections, heads = random_layer(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="strength 0"):
        ours(q, k, v, x, tokens, projections, heads, strength=0.0)


def test_the_logit_map_is_each_heads_query_and_key_projections_of_the_tokens():
    """Row h*M + j of the map applied to x is q'_h . k'_hj / sqrt(d), per head h and visual token j."""
    q, k, v, x, tokens, projections, heads = random_layer(torch.Generator().manual_seed(5), dtype=torch.float64)
    visual = projections.visual_keys(tokens, heads, x.device, x.dtype)
    w_q, w_k, w_v = projections.tensors()
    d, m = w_q.shape[0] // heads, tokens.shape[0]
    q_v, k_v = (x @ w_q.T).reshape(*x.shape[:2], heads, d), (tokens @ w_k.T).reshape(m, heads, d)
    for h in range(heads):
        for j in range(m):
            torch.testing.assert_close(x @ visual.logit_map[h * m + j], (q_v[..., h, :] * k_v[j, h]).sum(-1) / math.sqrt(d))
    torch.testing.assert_close(visual.values, tokens @ w_v.T)


def test_frozen_projections_form_the_visual_keys_once_per_tokens_device_and_dtype():
    projections = VisualProjections.copy_of(torch.randn(8, 4), torch.randn(8, 6), torch.randn(8, 6))
    tokens, cpu = torch.randn(2, 6), torch.device("cpu")
    first = projections.visual_keys(tokens, 2, cpu, torch.float32)
    assert projections.visual_keys(tokens, 2, cpu, torch.float32) is first
    half = projections.visual_keys(tokens, 2, cpu, torch.float16)
    assert half.logit_map.dtype == torch.float32 and len(projections._keys) == 1  # fp32 for half inputs; one kept
    assert projections.visual_keys(tokens, 2, cpu, torch.float64).logit_map.dtype == torch.float64
    other = torch.randn(2, 6)
    assert not torch.equal(projections.visual_keys(other, 2, cpu, torch.float64).values,
                           projections.visual_keys(tokens, 2, cpu, torch.float64).values)


def test_trained_projections_and_tokens_form_the_visual_keys_at_every_call_differentiably():
    """A training changes the weights in place between steps: nothing may be kept from an earlier step."""
    projections = VisualProjections.copy_of(torch.randn(8, 4), torch.randn(8, 6), torch.randn(8, 6))
    tokens = torch.randn(2, 6)
    for w in projections.tensors():
        w.requires_grad_(True)
    before = projections.visual_keys(tokens, 2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        projections.to_k.add_(1.0)
        projections.to_v.add_(1.0)
    after = projections.visual_keys(tokens, 2, torch.device("cpu"), torch.float32)
    assert not torch.equal(before.logit_map, after.logit_map) and not torch.equal(before.values, after.values)
    (after.logit_map.sum() + after.values.sum()).backward()
    assert all(w.grad is not None and float(w.grad.abs().max()) > 0 for w in projections.tensors())
    assert not projections._keys
    tokens.requires_grad_(True)
    for w in projections.tensors():
        w.requires_grad_(False)
    keys = projections.visual_keys(tokens, 2, torch.device("cpu"), torch.float32)
    assert keys.values.requires_grad and not projections._keys  # the encoder's tokens: trained too
