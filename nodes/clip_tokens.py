"""The host's CLIP vocabulary: a word's token ids and input embedding, a fingerprint of the model family, and the
tokenizer through which both systems' trigger words mean learned embeddings. A CLIP has one text encoder, as the host
gives it for SD1.x (CLIP-L, token key "l") and SD2 (OpenCLIP ViT-H, key "h"; PVA's alone), or two for SDXL (CLIP-L
"l" and OpenCLIP bigG "g", whose outputs the host concatenates in that order into one 2048-wide context). A word
embedding here is the encoders' embeddings side by side, in that order: each encoder reads its own part."""
from __future__ import annotations

import hashlib

import torch

from ..sefi_core.tokens import mark_triggers


SDXL_KEYS = ("l", "g")  # SDXL's encoders, in the order of their parts of the context


def token_keys(clip) -> tuple[str, ...]:
    """The keys of the CLIP's text encoders in the host's token dicts (and its modules' `clip_<key>`): ("l",),
    ("h",), or ("l", "g") for SDXL."""
    encoder = clip.cond_stage_model
    name = getattr(encoder, "clip_name", None)
    return (name,) if name is not None else tuple(k for k in SDXL_KEYS if hasattr(encoder, f"clip_{k}"))


def token_key(clip) -> str:
    """The key of a CLIP of one text encoder (SD1.x, SD2)."""
    return token_keys(clip)[0]


def text_encoder(clip, key: str | None = None):
    """The host's model of one of the CLIP's text encoders (an SDClipModel: `transformer` is the text model)."""
    return getattr(clip.cond_stage_model, f"clip_{key or token_key(clip)}")


def token_embedding_table(clip, key: str | None = None) -> torch.Tensor:
    return text_encoder(clip, key).transformer.get_input_embeddings().weight


def token_widths(clip) -> tuple[int, ...]:
    """The width of each text encoder's word embeddings, in token_keys order: (768,), (1024,), (768, 1280)."""
    return tuple(token_embedding_table(clip, key).shape[1] for key in token_keys(clip))


def word_token_ids(clip, word: str) -> tuple[int, ...]:
    """The token ids the host's own tokenizer gives a word, without start/end/padding (the same in both of SDXL's
    tokenizers: one vocabulary)."""
    tokenizer = getattr(clip.tokenizer, f"clip_{token_key(clip)}")
    chunk = tokenizer.tokenize_with_weights(word)[0]
    ids = [e[0] for e in chunk[1:]]
    return tuple(ids[: ids.index(tokenizer.end_token)])


def word_embedding(clip, word: str) -> torch.Tensor:
    """A word's input embedding, each encoder's side by side: (768,) for SD1.x, (1024,) for SD2, (2048,) for SDXL;
    the mean of its tokens when the tokenizer splits it."""
    ids = torch.tensor(word_token_ids(clip, word))
    return torch.cat([token_embedding_table(clip, key)[ids].detach().to("cpu", torch.float32).mean(0)
                      for key in token_keys(clip)])


def split_by_encoder(clip_keys: tuple[str, ...], widths: tuple[int, ...], embedding: torch.Tensor) -> dict:
    """A word embedding's part for each text encoder: key -> (..., width)."""
    return dict(zip(clip_keys, embedding.split(widths, dim=-1)))


def model_fingerprint(clip) -> str:
    """Short hash of the text encoders' word embeddings: tells model families apart cheaply."""
    rows = [token_embedding_table(clip, key)[:64].detach().to("cpu", torch.float32) for key in token_keys(clip)]
    return hashlib.sha256(b"".join(r.numpy().tobytes() for r in rows)).hexdigest()[:16]


class TriggerTokenizer:
    """A CLIP clone's tokenizer in which each trigger word's tokens become one entry (sefi_core/tokens.py): an
    embedding entry the host's encoder reads as a word (PVA's learned word), or one that also marks SeFi's identity.
    It wraps the CLIP's own tokenizer, so the CLIP a node received keeps tokenizing as before; everything else is
    delegated. Apply nodes chained on one CLIP, of either system, extend one wrapper."""

    def __init__(self, inner, patterns: dict[str, dict[tuple[int, ...], dict]]):
        self.inner = inner
        self.patterns = patterns  # per text encoder's token key: trigger token ids -> the entry that replaces them

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        out = dict(self.inner.tokenize_with_weights(text, return_word_ids, **kwargs))
        for key, patterns in self.patterns.items():
            if key in out:  # SDXL's encode node tokenizes each encoder's prompt on its own and takes one key
                out[key], _ = mark_triggers(out[key], patterns)
        return out

    def __getattr__(self, name):  # only called for attributes this wrapper lacks
        if name in ("inner", "patterns") or name.startswith("__"):  # copy/deepcopy probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.inner, name)

    @staticmethod
    def with_trigger(tokenizer, ids: tuple[int, ...], entries: dict[str, dict], trigger: str,
                     advice: str) -> "TriggerTokenizer":
        """`tokenizer` (a plain one or a TriggerTokenizer) with `trigger` (token ids `ids`) read, in each text encoder's
        tokens, as its entry (`entries`: token key -> entry); a trigger already taken is refused with `advice` (what
        the node that speaks can do)."""
        if isinstance(tokenizer, TriggerTokenizer):
            inner, patterns = tokenizer.inner, {key: dict(p) for key, p in tokenizer.patterns.items()}
        else:
            inner, patterns = tokenizer, {}
        if any(ids in patterns.get(key, {}) for key in entries):
            raise ValueError(f"Two identities use the trigger word {trigger!r}. {advice}")
        for key, entry in entries.items():
            patterns.setdefault(key, {})[ids] = entry
        return TriggerTokenizer(inner, patterns)
