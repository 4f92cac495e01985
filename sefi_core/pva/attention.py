"""Parallel visual attention (Xu et al., WACV 2024, §3): in each cross-attention layer, beside the text's
Q, K, V, visual projections Q', K', V' (each starting as a copy of the layer's own), and ONE softmax over the text keys
and the visual keys together, the output projection shared:

    out = W_o softmax([Q K_t^T, Q' K_v^T] / sqrt(d)) [V_t ; V_v]

with Q = W_q x, K_t = W_k c, V_t = W_v c for the image features x and text context c, and Q' = W'_q x, K_v = W'_k f,
V_v = W'_v f for the visual tokens f. Not IP-Adapter's sum of two softmaxes: the text and visual keys compete.

`joint_attention` computes it with ONE call of an ordinary multi-head attention function (the host's, so every backend
and dtype the host has serves it), on queries and keys concatenated head by head: per head, [q, q'] . [k, 0] = q . k
for a text key and [q, q'] . [0, k'] = q' . k' for a visual key; values [v, 0] and [v', 0] put the result in the first
half. The head width doubles to 2d, so the queries are scaled by sqrt(2) to keep the 1/sqrt(d) of the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Attention = Callable[..., torch.Tensor]  # (q, k, v, heads, mask=None) -> (B, N, heads * D), scale 1/sqrt(D)


@dataclass
class VisualProjections:
    """One layer's W'_q (inner, query_dim), W'_k and W'_v (inner, context_dim); no biases (SD's to_q/k/v have none)."""

    to_q: torch.Tensor
    to_k: torch.Tensor
    to_v: torch.Tensor
    _cast: dict = field(default_factory=dict, repr=False, compare=False)  # (device, dtype) -> the weights there

    @classmethod
    def copy_of(cls, to_q: torch.Tensor, to_k: torch.Tensor, to_v: torch.Tensor) -> "VisualProjections":
        """The paper's initialisation: copies of the layer's own projections, in fp32."""
        return cls(*(w.detach().to("cpu", torch.float32).clone() for w in (to_q, to_k, to_v)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.to_q, self.to_k, self.to_v

    def weights_for(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The weights on `device` in `dtype`. Kept there while they are not being trained: sampling would otherwise
        copy all 16 layers' projections (~63 MB in fp16 for SD1.5) to the GPU at every step."""
        if any(w.requires_grad for w in self.tensors()):
            return tuple(w.to(device=device, dtype=dtype) for w in self.tensors())  # differentiable, every call
        key = (torch.device(device), dtype)
        if key not in self._cast:
            self._cast.clear()  # one place at a time
            self._cast[key] = tuple(w.to(device=device, dtype=dtype) for w in self.tensors())
        return self._cast[key]

    def project(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q', K_v, V_v) in x's dtype and device; differentiable in the weights and the tokens."""
        w_q, w_k, w_v = self.weights_for(x.device, x.dtype)
        tokens = tokens.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w_q), F.linear(tokens, w_k), F.linear(tokens, w_v)


def visual_bias(strength: float, queries: int, text_keys: int, visual_keys: int,
                like: torch.Tensor) -> torch.Tensor | None:
    """The additive attention mask (1, queries, keys) that gives the visual keys `strength` times their weight in the
    softmax (log strength on their logits); None at strength 1, where nothing changes. Every query has its row: the
    host's chunked backends slice the mask by query."""
    if strength == 1.0:
        return None
    bias = torch.zeros(1, queries, text_keys + visual_keys, dtype=like.dtype, device=like.device)
    bias[..., text_keys:] = math.log(strength)
    return bias


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_visual: torch.Tensor, k_visual: torch.Tensor,
                    v_visual: torch.Tensor, heads: int, attention: Attention, strength: float = 1.0,
                    **attention_kwargs) -> torch.Tensor:
    """softmax([q k^T, q' k'^T] / sqrt(d)) [v; v'] per head, before the output projection.
    q, q_visual: (B, N, H*d); k, v: (B, T, H*d); k_visual, v_visual: (B, M, H*d). `attention` is an ordinary
    multi-head attention (e.g. the host's optimized_attention) with the scale 1/sqrt(its head width)."""
    if strength <= 0:
        raise ValueError(f"strength {strength} must be above 0 here; at 0 the layer is the original one")
    b, n, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d)
    zeros = lambda t: torch.zeros_like(split(t))
    queries = torch.cat([split(q), split(q_visual)], dim=-1) * math.sqrt(2.0)
    keys = torch.cat([torch.cat([split(k), zeros(k)], -1), torch.cat([zeros(k_visual), split(k_visual)], -1)], dim=1)
    values = torch.cat([torch.cat([split(v), zeros(v)], -1), torch.cat([split(v_visual), zeros(v_visual)], -1)], dim=1)
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], heads * 2 * d)
    mask = visual_bias(strength, n, k.shape[1], k_visual.shape[1], q)
    if mask is not None:
        attention_kwargs["mask"] = mask
    out = attention(flat(queries), flat(keys), flat(values), heads, **attention_kwargs)
    return out.reshape(b, n, heads, 2 * d)[..., :d].reshape(b, n, inner)
