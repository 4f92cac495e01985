"""SeFi's identities in tokenized prompts: the per-stage prompt variants (host-free)."""
import torch

from sefi_core.sefi.prompt_tokens import IdentitySlot, blend_toward_class, identity_slots, plan_variants
from sefi_core.sefi.stages import ActiveRange, even_boundaries

START, END = 49406, 49407


def chunk(ids, weight=1.0, length=12):
    entries = [(START, 1.0)] + [(i, weight) for i in ids] + [(END, 1.0)]
    return entries + [(END, 1.0)] * (length - len(entries))


def slot(trigger="sks", stages=5, seed=0, active=ActiveRange()):
    g = torch.Generator().manual_seed(seed)
    return IdentitySlot(trigger, torch.randn(stages, 4, generator=g), torch.randn(stages, 4, generator=g),
                        torch.randn(4, generator=g), even_boundaries(stages), active)


def slot_of(token):
    return token if isinstance(token, IdentitySlot) else None


def test_no_trigger_no_plan():
    assert plan_variants([chunk([1, 2, 3])], slot_of) is None


def test_variants_put_stage_tokens_in_every_slot():
    a, b = slot("a", seed=1), slot("b", stages=10, seed=2)
    chunks = [[(START, 1.0), (a, 1.0), (9, 1.0), (b, 1.0), (a, 1.0), (END, 1.0)]]
    assert identity_slots(chunks, slot_of) == [a, b]
    plan = plan_variants(chunks, slot_of)
    assert len(plan.keys) == len(plan.values) == 10
    assert plan.base[0][1][0] is a.class_embedding and plan.base[0][3][0] is b.class_embedding
    for g in range(10):
        k, v = plan.keys[g][0], plan.values[g][0]
        assert torch.equal(k[1][0], a.k_tokens[g // 2]) and torch.equal(k[4][0], a.k_tokens[g // 2])
        assert torch.equal(v[3][0], b.v_tokens[g]) and torch.equal(k[3][0], b.k_tokens[g])
        assert k[2] == (9, 1.0) and k[0] == (START, 1.0)


def test_outside_the_active_range_the_slot_is_the_class_word():
    a = slot(active=ActiveRange.from_percent(0.5, 1.0))
    plan = plan_variants([[(START, 1.0), (a, 1.0), (END, 1.0)]], slot_of)
    first = plan.keys[0][0][1][0]
    assert torch.equal(first, a.class_embedding)
    assert torch.equal(plan.values[-1][0][1][0], a.v_tokens[-1])


def test_blend_toward_class():
    tokens, cls = torch.randn(5, 4), torch.randn(4)
    assert torch.equal(blend_toward_class(tokens, cls, 0.0), cls.expand(5, 4))
    assert torch.allclose(blend_toward_class(tokens, cls, 1.0), tokens)
    assert torch.allclose(blend_toward_class(tokens, cls, 0.5), (tokens + cls) / 2)
