"""Trigger words in tokenized prompts: finding their token spans and marking them (host-free)."""
from sefi_core.tokens import find_spans, mark_triggers

START, END = 49406, 49407
MARKER = {"type": "embedding", "data": None}  # what an Apply node puts in a trigger's place


def chunk(ids, weight=1.0, length=12):
    entries = [(START, 1.0)] + [(i, weight) for i in ids] + [(END, 1.0)]
    return entries + [(END, 1.0)] * (length - len(entries))


def test_find_spans_non_overlapping():
    assert find_spans([1, 2, 1, 2, 1], [1, 2]) == [0, 2]
    assert find_spans([1, 1, 1], [1, 1]) == [0]
    assert find_spans([1, {"x": 1}, 2], [1, 2]) == []


def test_mark_collapses_multi_token_trigger_keeps_weight_and_length():
    s = MARKER
    chunks = [chunk([5, 7, 8, 9, 7, 8], weight=1.2)]
    marked, count = mark_triggers(chunks, {(7, 8): s})
    assert count == 2
    assert [e[0] for e in marked[0][:6]] == [START, 5, s, 9, s, END]
    assert marked[0][2][1] == 1.2 and len(marked[0]) == len(chunks[0])
    assert chunks[0][2] == (7, 1.2)  # input not mutated


def test_mark_finds_triggers_in_every_chunk():
    s = MARKER
    marked, count = mark_triggers([chunk([3, 7]), chunk([7, 4])], {(7,): s})
    assert count == 2 and marked[1][1][0] is s
