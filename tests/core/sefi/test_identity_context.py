"""IdentityContext: a conditioning tensor whose stage contexts follow every operation done to it (host-free).
Each expectation is the same operation written out on the variants by hand."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from sefi_core.sefi.identity_context import IdentityContext, IdentityReachedModel, merged_cuts, segment_index


def carrier(seed, cuts=(800.0, 600.0, 400.0, 200.0), length=4, trigger="sks"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, length, 6, generator=g)
    variants = torch.randn(len(cuts) + 1, 2, 1, length, 6, generator=g)
    return IdentityContext(base, variants, cuts, [trigger])


def test_average_blends_every_stage_context_with_the_same_weight():
    to, other = carrier(0), torch.randn(1, 4, 6)
    out = torch.mul(to, 0.7) + torch.mul(other, 0.3)  # ConditioningAverage, identity in "to"
    assert isinstance(out, IdentityContext)
    torch.testing.assert_close(out.plain(), to.plain() * 0.7 + other * 0.3)
    for g in range(5):
        for kv in range(2):
            torch.testing.assert_close(out.variants[g, kv], to.variants[g, kv] * 0.7 + other * 0.3)
    source = carrier(1)
    out = torch.mul(other, 0.7) + torch.mul(source, 0.3)  # identity in "from"
    torch.testing.assert_close(out.variants[2, 1], other * 0.7 + source.variants[2, 1] * 0.3)


def test_concat_keeps_the_identity_on_its_tokens_and_the_rest_as_written():
    ident, other = carrier(0), torch.randn(1, 3, 6)
    out = torch.cat((ident, other), 1)
    assert out.shape == (1, 7, 6) and out.stage_contexts().shape == (1, 5, 2, 7, 6)
    torch.testing.assert_close(out.variants[3, 0], torch.cat((ident.variants[3, 0], other), 1))
    out = torch.cat((other, ident), 1)  # identity in "from"
    torch.testing.assert_close(out.variants[0, 1], torch.cat((other, ident.variants[0, 1]), 1))


def test_zero_out_zeroes_the_identity_too():
    out = torch.zeros_like(carrier(0))
    assert isinstance(out, IdentityContext) and not out.variants.any()


def test_two_identities_with_different_stages_merge_their_segments():
    a = carrier(0, cuts=(800.0, 600.0, 400.0, 200.0), trigger="sks")
    b = carrier(1, cuts=(500.0,), trigger="zwx")
    out = torch.cat((a, b), 1)
    assert out.cuts == (800.0, 600.0, 500.0, 400.0, 200.0) and out.triggers == ("sks", "zwx")
    # merged segment 3 is [400, 500): a's segment 2 ([400, 600)), b's segment 1 ([-inf, 500))
    torch.testing.assert_close(out.variants[3, 1], torch.cat((a.variants[2, 1], b.variants[1, 1]), 1))
    assert merged_cuts([a, b]) == out.cuts
    assert [segment_index(a.cuts, t) for t in (800, 650, 600, 100)] == [0, 1, 1, 4]


def test_in_place_changes_reach_the_variants():
    ident = carrier(0)
    before = ident.variants.clone()
    ident *= 2
    torch.testing.assert_close(ident.variants, before * 2)
    ident[:, 0] = 0
    assert not ident.variants[:, :, :, 0].any()
    with pytest.raises(ValueError, match="written into a plain tensor"):
        torch.zeros(1, 4, 6).copy_(carrier(1))


def test_questions_get_the_class_words_answer_and_device_moves_keep_the_identity():
    ident = carrier(0)
    assert ident.shape == (1, 4, 6) and ident.dtype == torch.float32
    assert not isinstance(ident.mean(), IdentityContext)
    half = ident.to(torch.float16)
    assert isinstance(half, IdentityContext) and half.variants.dtype == torch.float16


@pytest.mark.parametrize("use", [lambda x: F.linear(x, torch.randn(3, 6)), lambda x: x @ torch.randn(6, 2),
                                 lambda x: torch.einsum("bld,ed->ble", x, torch.randn(3, 6))])
def test_a_model_without_the_injector_is_an_error_not_a_silent_class_word(use):
    with pytest.raises(IdentityReachedModel, match="trigger 'sks' reached a model without SeFi's K/V injector.*Connect "
                                                   "the MODEL output of SeFi Apply Stage Tokens"):
        use(carrier(0))


def test_copies_and_pickles_keep_the_identity():
    ident = carrier(0)
    for other in (copy.deepcopy(ident), pickle.loads(pickle.dumps(ident))):
        assert isinstance(other, IdentityContext) and other.cuts == ident.cuts and other.triggers == ident.triggers
        assert torch.equal(other.variants, ident.variants) and torch.equal(other.plain(), ident.plain())


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="do not fit"):
        IdentityContext(torch.zeros(1, 4, 6), torch.zeros(3, 2, 1, 4, 6), (800.0,), ["sks"])
