"""Trigger marking and per-stage prompt variants (host-free)."""
import torch

from sefi_core.prompt_tokens import (IdentitySlot, blend_toward_class, find_spans, identity_slots, mark_triggers,
                                     plan_variants)
from sefi_core.stages import ActiveRange, even_boundaries

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


def test_find_spans_non_overlapping():
    assert find_spans([1, 2, 1, 2, 1], [1, 2]) == [0, 2]
    assert find_spans([1, 1, 1], [1, 1]) == [0]
    assert find_spans([1, {"x": 1}, 2], [1, 2]) == []


def test_mark_collapses_multi_token_trigger_keeps_weight_and_length():
    s = slot()
    chunks = [chunk([5, 7, 8, 9, 7, 8], weight=1.2)]
    marked, count = mark_triggers(chunks, {(7, 8): s})
    assert count == 2
    assert [e[0] for e in marked[0][:6]] == [START, 5, s, 9, s, END]
    assert marked[0][2][1] == 1.2 and len(marked[0]) == len(chunks[0])
    assert chunks[0][2] == (7, 1.2)  # input not mutated


def test_mark_finds_triggers_in_every_chunk():
    s = slot()
    marked, count = mark_triggers([chunk([3, 7]), chunk([7, 4])], {(7,): s})
    assert count == 2 and marked[1][1][0] is s


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
