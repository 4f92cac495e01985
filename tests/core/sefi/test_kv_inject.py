"""Batching of stage contexts and per-row K/V selection (host-free)."""
import math

import pytest
import torch

from sefi_core.sefi.kv_inject import RowContexts, concat_rows, inject_kv, select_kv


def contexts(rows, segments, length, seed):
    return torch.randn(rows, segments, 2, length, 3, generator=torch.Generator().manual_seed(seed))


def test_concat_tiles_lengths_and_pads_segments_like_the_host_tiles_crossattn():
    a = RowContexts(1, 4, contexts(1, 5, 4, 0), (800, 600, 400, 200))
    neutral = RowContexts(2, 8)
    b = RowContexts(1, 8, contexts(1, 2, 8, 1), (500,))
    batch = concat_rows([a, neutral, b], channels=3)
    assert batch.contexts.shape == (4, 5, 2, 8, 3)
    assert torch.equal(batch.contexts[0], torch.cat([a.contexts[0]] * 2, dim=2))  # tiled 4 -> 8 tokens
    assert torch.equal(batch.contexts[3, :2], b.contexts[0]) and torch.equal(batch.contexts[3, 4], b.contexts[0, 1])
    assert batch.has_identity.tolist() == [True, False, False, True]
    assert batch.cuts[3].tolist() == [500, -math.inf, -math.inf, -math.inf]


@pytest.mark.parametrize("t, segment", [(999.0, 0), (700.0, 1), (450.0, 2), (250.0, 3), (10.0, 4)])
def test_select_picks_each_rows_segment(t, segment):
    batch = concat_rows([RowContexts(1, 4, contexts(1, 5, 4, 0), (800, 600, 400, 200)),
                         RowContexts(1, 4, contexts(1, 2, 4, 1), (500,))], channels=3)
    k, v = select_kv(batch, torch.tensor([t, t]))
    assert torch.equal(k[0], batch.contexts[0, segment, 0]) and torch.equal(v[0], batch.contexts[0, segment, 1])
    assert torch.equal(k[1], batch.contexts[1, 0 if t >= 500 else 1, 0])


def test_inject_leaves_rows_without_identity_untouched():
    context, value = torch.randn(3, 4, 3), torch.randn(3, 4, 3)
    k, v = torch.randn(3, 4, 3), torch.randn(3, 4, 3)
    new_k, new_v = inject_kv(context, value, k, v, torch.tensor([True, False, True]))
    assert torch.equal(new_k[1], context[1]) and torch.equal(new_v[1], value[1])
    assert torch.equal(new_k[0], k[0]) and torch.equal(new_v[2], v[2])
    assert inject_kv(context, value, k, v, None) == (k, v)


def test_inject_refuses_mismatched_context():
    with pytest.raises(RuntimeError, match="put SeFi Apply Stage Tokens first"):
        inject_kv(torch.randn(1, 81, 3), torch.randn(1, 81, 3), torch.randn(1, 77, 3), torch.randn(1, 77, 3), None)
