"""PVA's parallel visual attention, host-free: the joint softmax of sefi_core.pva.attention against an independent
computation written out from the paper's formula."""
import math

import pytest
import torch

from sefi_core.pva.attention import VisualProjections, joint_attention
from sefi_testkit.pva import paper_formula


def plain_attention(q, k, v, heads, mask=None):
    """An ordinary multi-head attention, as the host's backends are: scale 1/sqrt(head width), additive mask."""
    b, n, inner = q.shape
    d = inner // heads
    heads_of = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)
    logits = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        logits = logits + mask.unsqueeze(1)
    return (torch.softmax(logits, dim=-1) @ heads_of(v)).transpose(1, 2).reshape(b, n, inner)


def random_layer(g, b=2, n=16, t=7, m=3, heads=4, d=8):
    make = lambda *shape: torch.randn(*shape, generator=g)
    inner = heads * d
    return (make(b, n, inner), make(b, t, inner), make(b, t, inner), make(b, n, inner), make(b, m, inner),
            make(b, m, inner), heads)


@pytest.mark.parametrize("strength", [1.0, 0.3, 2.0])
def test_joint_attention_is_the_papers_concatenated_softmax(strength):
    args = random_layer(torch.Generator().manual_seed(0))
    ours = joint_attention(*args, attention=plain_attention, strength=strength)
    torch.testing.assert_close(ours.double(), paper_formula(*args, strength=strength), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_visual_projections_and_tokens_as_the_formula_says():
    g = torch.Generator().manual_seed(1)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    x, c, tokens = make(1, 12, 16), make(1, 5, 24), make(4, 24)
    w_q, w_k, w_v = make(32, 16), make(32, 24), make(32, 24)
    visual = VisualProjections.copy_of(w_q, w_k, w_v)
    for w in visual.tensors():
        w.requires_grad_(True)
    tokens.requires_grad_(True)
    q_v, k_v, v_v = visual.project(x, tokens[None])
    ours = joint_attention(x @ w_q.T, c @ w_k.T, c @ w_v.T, q_v, k_v, v_v, 4, plain_attention)
    theirs = paper_formula(x @ w_q.T, c @ w_k.T, c @ w_v.T, q_v, k_v, v_v, 4)
    grads = torch.autograd.grad(ours.sum(), [*visual.tensors(), tokens], retain_graph=True)
    expected = torch.autograd.grad(theirs.sum(), [*visual.tensors(), tokens])
    for a, e in zip(grads, expected):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-6, atol=1e-8)


def test_visual_tokens_equal_to_the_text_context_leave_the_output_unchanged():
    """With copied projections and f = c, every text key appears twice with the same value: softmax averages do not
    change (notes: the check that needs no weights)."""
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 10, 16, generator=g), torch.randn(2, 6, 24, generator=g)
    w_q, w_k, w_v = torch.randn(32, 16, generator=g), torch.randn(32, 24, generator=g), torch.randn(32, 24, generator=g)
    q, k, v = x @ w_q.T, c @ w_k.T, c @ w_v.T
    q_v, k_v, v_v = VisualProjections.copy_of(w_q, w_k, w_v).project(x, c)
    torch.testing.assert_close(joint_attention(q, k, v, q_v, k_v, v_v, 4, plain_attention),
                               plain_attention(q, k, v, 4), rtol=1e-5, atol=1e-5)


def test_strength_zero_is_refused_here_because_the_layer_skips_pva_there():
    args = random_layer(torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="strength 0"):
        joint_attention(*args, attention=plain_attention, strength=0.0)


def test_projections_are_cast_once_while_not_trained_and_every_call_while_trained():
    projections = VisualProjections.copy_of(torch.randn(8, 4), torch.randn(8, 6), torch.randn(8, 6))
    x, tokens = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 2, 6)
    first = projections.weights_for(x.device, torch.float64)
    assert projections.weights_for(x.device, torch.float64) is first and first[0].dtype == torch.float64
    assert projections.weights_for(x.device, torch.float16)[0].dtype == torch.float16 and len(projections._cast) == 1
    for w in projections.tensors():
        w.requires_grad_(True)
    q, k, v = projections.project(x, tokens)
    (q.sum() + k.sum() + v.sum()).backward()
    assert all(w.grad is not None for w in projections.tensors())
