"""The host's CLIP-L vocabulary: a word's token ids and input embedding, and a fingerprint of the model family."""
from __future__ import annotations

import hashlib

import torch


def token_embedding_table(clip) -> torch.Tensor:
    return clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight


def word_token_ids(clip, word: str) -> tuple[int, ...]:
    """The CLIP-L token ids the host's own tokenizer gives a word, without start/end/padding."""
    tokenizer = clip.tokenizer.clip_l
    chunk = tokenizer.tokenize_with_weights(word)[0]
    ids = [e[0] for e in chunk[1:]]
    return tuple(ids[: ids.index(tokenizer.end_token)])


def word_embedding(clip, word: str) -> torch.Tensor:
    """(768,) input embedding of a word; the mean of its tokens when the tokenizer splits it."""
    ids = torch.tensor(word_token_ids(clip, word))
    return token_embedding_table(clip)[ids].detach().to("cpu", torch.float32).mean(0)


def model_fingerprint(clip) -> str:
    """Short hash of the text encoder's word embeddings: tells SD1.x families apart cheaply."""
    rows = token_embedding_table(clip)[:64].detach().to("cpu", torch.float32)
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
