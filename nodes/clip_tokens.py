"""The host's CLIP vocabulary: a word's token ids and input embedding, a fingerprint of the model family, and the
tokenizer through which both systems' trigger words mean learned embeddings. For a CLIP of one text encoder, as the
host gives it for SD1.x (CLIP-L, token key "l") and SD2 (OpenCLIP ViT-H, key "h"; PVA's alone): each function works on
that encoder, whichever it is."""
from __future__ import annotations

import hashlib

import torch

from ..sefi_core.tokens import mark_triggers


def token_key(clip) -> str:
    """The key of the CLIP's text encoder in the host's token dicts (and its modules' `clip_<key>`): "l", "h"."""
    return clip.cond_stage_model.clip_name


def text_encoder(clip):
    """The host's model of the CLIP's text encoder (an SDClipModel: `transformer` is the text model)."""
    return getattr(clip.cond_stage_model, f"clip_{token_key(clip)}")


def token_embedding_table(clip) -> torch.Tensor:
    return text_encoder(clip).transformer.get_input_embeddings().weight


def word_token_ids(clip, word: str) -> tuple[int, ...]:
    """The token ids the host's own tokenizer gives a word, without start/end/padding."""
    tokenizer = getattr(clip.tokenizer, f"clip_{token_key(clip)}")
    chunk = tokenizer.tokenize_with_weights(word)[0]
    ids = [e[0] for e in chunk[1:]]
    return tuple(ids[: ids.index(tokenizer.end_token)])


def word_embedding(clip, word: str) -> torch.Tensor:
    """(768,) input embedding of a word (1024 for SD2); the mean of its tokens when the tokenizer splits it."""
    ids = torch.tensor(word_token_ids(clip, word))
    return token_embedding_table(clip)[ids].detach().to("cpu", torch.float32).mean(0)


def model_fingerprint(clip) -> str:
    """Short hash of the text encoder's word embeddings: tells SD1.x families apart cheaply."""
    rows = token_embedding_table(clip)[:64].detach().to("cpu", torch.float32)
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


class TriggerTokenizer:
    """A CLIP clone's tokenizer in which each trigger word's tokens become one entry (sefi_core/tokens.py): an
    embedding entry the host's encoder reads as a word (PVA's learned word), or one that also marks SeFi's identity.
    It wraps the CLIP's own tokenizer, so the CLIP a node received keeps tokenizing as before; everything else is
    delegated. Apply nodes chained on one CLIP, of either system, extend one wrapper."""

    def __init__(self, inner, patterns: dict[tuple[int, ...], dict]):
        self.inner = inner
        self.patterns = patterns  # trigger token ids -> the entry that replaces them

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        out = self.inner.tokenize_with_weights(text, return_word_ids, **kwargs)
        key = self.inner.clip_name  # the one text encoder's: "l", or "h" for SD2
        chunks, count = mark_triggers(out[key], self.patterns)
        return {**out, key: chunks} if count else out

    def __getattr__(self, name):  # only called for attributes this wrapper lacks
        if name in ("inner", "patterns") or name.startswith("__"):  # copy/deepcopy probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.inner, name)

    @staticmethod
    def with_trigger(tokenizer, ids: tuple[int, ...], entry: dict, trigger: str, advice: str) -> "TriggerTokenizer":
        """`tokenizer` (a plain one or a TriggerTokenizer) with `trigger` (token ids `ids`) read as `entry`; a trigger
        already taken is refused with `advice` (what the node that speaks can do)."""
        if isinstance(tokenizer, TriggerTokenizer):
            inner, patterns = tokenizer.inner, dict(tokenizer.patterns)
        else:
            inner, patterns = tokenizer, {}
        if ids in patterns:
            raise ValueError(f"Two identities use the trigger word {trigger!r}. {advice}")
        patterns[ids] = entry
        return TriggerTokenizer(inner, patterns)
