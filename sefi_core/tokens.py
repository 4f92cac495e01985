"""Trigger words in tokenized prompts: both systems put a learned word where a prompt says its trigger.

A tokenized prompt is a list of chunks (77 entries each for CLIP-L); an entry is a tuple (token, weight, *extra) where
token is a token id, or an entry standing for one trigger occurrence (the host reads a dict {"type": "embedding",
"data": vector} as a word embedding, as it reads textual-inversion embeddings)."""
from __future__ import annotations

from typing import Sequence


def find_spans(tokens: Sequence, pattern: Sequence[int]) -> list[int]:
    """Start indices of non-overlapping occurrences of the id sequence `pattern` in `tokens`."""
    starts, i, m = [], 0, len(pattern)
    while m and i + m <= len(tokens):
        if all(isinstance(tokens[i + j], int) and tokens[i + j] == pattern[j] for j in range(m)):
            starts.append(i)
            i += m
        else:
            i += 1
    return starts


def mark_triggers(chunks: list[list[tuple]], patterns: dict[tuple[int, ...], object]) -> tuple[list[list[tuple]], int]:
    """Replace each trigger's token span by one entry holding its marker (keeping the first token's weight),
    and pad the chunk back to its length with copies of its last (padding) entry. Returns (chunks, count)."""
    out, count = [], 0
    for chunk in chunks:
        chunk = list(chunk)
        for pattern, marker in patterns.items():
            starts = find_spans([e[0] for e in chunk], pattern)
            for s in reversed(starts):
                chunk[s:s + len(pattern)] = [(marker, *chunk[s][1:])]
                chunk.extend([chunk[-1]] * (len(pattern) - 1))
            count += len(starts)
        out.append(chunk)
    return out, count
