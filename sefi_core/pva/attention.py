"""Parallel visual attention (Xu et al., WACV 2024, §3): in each cross-attention layer, beside the text's
Q, K, V, visual projections Q', K', V' (each starting as a copy of the layer's own), and ONE softmax over the text keys
and the visual keys together, the output projection shared:

    out = W_o softmax([Q K_t^T, Q' K_v^T] / sqrt(d)) [V_t ; V_v]

with Q = W_q x, K_t = W_k c, V_t = W_v c for the image features x and text context c, and Q' = W'_q x, K_v = W'_k f,
V_v = W'_v f for the visual tokens f. Not IP-Adapter's sum of two softmaxes: the text and visual keys compete.

Q' is never formed. Per head h, Q'_h K_v,h^T = x (W'_q,h^T K_v,h^T): the visual logits are the image features times a
(query width x M) matrix that depends on the identity alone (M = 10 visual tokens). `VisualProjections.visual_keys`
forms these matrices (all heads in one, 1/sqrt(d) in it) and V_v once per device and dtype while the projections and
tokens are fixed (sampling), and at every call, differentiably, while they are trained. `joint_attention` then computes
the text logits Q K_t^T as the layer would, puts the visual logits beside them and takes one softmax over the T + M
keys per head: at T + M = 87 keys that is little more than the layer's own attention, where forming Q' (a second W_q)
and attending with doubled head widths cost a sixth of a sampling step.

The joint softmax is computed here in plain torch, not by the host's attention function: with 87 keys the
(batch, heads, queries, 87) logits are small, and no host backend can then drop a part of them (an additive mask
carrying the visual logits would be silently ignored where a backend takes no mask, e.g. SageAttention). Logits,
softmax and the weighted sum are in fp32 for fp16/bf16 inputs (as PyTorch's fused attention computes inside), the
result in the input's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class VisualKeys:
    """What one layer's visual tokens bring to its attention, for every batch row alike."""

    logit_map: torch.Tensor  # (heads * M, query width): row h*M + j maps x to q'_h . k'_hj / sqrt(d)
    values: torch.Tensor  # (M, heads * d): V_v

    def to(self, device: torch.device, dtype: torch.dtype) -> "VisualKeys":
        return VisualKeys(self.logit_map.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the joint softmax computes in for inputs of `dtype`: fp32 for fp16/bf16 (as fused attention kernels do
    inside), else the inputs' own."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class VisualProjections:
    """One layer's W'_q (inner, query_dim), W'_k and W'_v (inner, context_dim); no biases (SD's to_q/k/v have none)."""

    to_q: torch.Tensor
    to_k: torch.Tensor
    to_v: torch.Tensor
    _keys: dict = field(default_factory=dict, repr=False, compare=False)  # (device, dtype, heads) -> (tokens, keys)

    @classmethod
    def copy_of(cls, to_q: torch.Tensor, to_k: torch.Tensor, to_v: torch.Tensor) -> "VisualProjections":
        """The paper's initialisation: copies of the layer's own projections, in fp32."""
        return cls(*(w.detach().to("cpu", torch.float32).clone() for w in (to_q, to_k, to_v)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.to_q, self.to_k, self.to_v

    def visual_keys(self, tokens: torch.Tensor, heads: int, device: torch.device, dtype: torch.dtype) -> VisualKeys:
        """The visual logit map and values of `tokens` (M, context width) on `device`, for inputs of `dtype` (in
        compute_dtype(dtype)). Differentiable in
        the weights and the tokens, formed anew at every call, while any of them requires grad (a training changes
        them in place); else kept for these tokens (the same tensor) on that device and dtype: frozen weights are
        never changed in place."""
        dtype = compute_dtype(dtype)
        if tokens.requires_grad or any(w.requires_grad for w in self.tensors()):
            return self._form_keys(tokens, heads).to(device, dtype)
        key = (torch.device(device), dtype, heads)
        kept = self._keys.get(key)
        if kept is None or kept[0] is not tokens:
            self._keys.clear()  # one identity, one place at a time
            with torch.no_grad():
                kept = self._keys[key] = (tokens, self._form_keys(tokens, heads).to(device, dtype))
        return kept[1]

    def _form_keys(self, tokens: torch.Tensor, heads: int) -> VisualKeys:
        """Where the weights are, in (at least) fp32: per head, W'_q,h^T K_v,h^T / sqrt(d) as a linear map's weight."""
        w_q, w_k, w_v = self.tensors()
        compute = compute_dtype(w_q.dtype)
        w_q, w_k, w_v = (w.to(compute) for w in (w_q, w_k, w_v))
        tokens = tokens.to(device=w_q.device, dtype=compute)
        inner, query_width = w_q.shape
        d, m = inner // heads, tokens.shape[0]
        k_visual = F.linear(tokens, w_k).reshape(m, heads, d)
        logit_map = torch.einsum("mhd,hdc->hmc", k_visual, w_q.reshape(heads, d, query_width)) / math.sqrt(d)
        return VisualKeys(logit_map.reshape(heads * m, query_width), F.linear(tokens, w_v))


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, visual: VisualKeys,
                    heads: int, strength: float = 1.0) -> torch.Tensor:
    """softmax([q k^T, q' k'^T + log strength] / sqrt(d)) [v; v'] per head, before the output projection, with
    q' k'^T from the image features x: q: (B, N, H*d); k, v: (B, T, H*d); x: (B, N, query width). Strength scales the
    visual keys' weights in the softmax (the logits get log strength)."""
    if strength <= 0:
        raise ValueError(f"strength {strength} must be above 0 here; at 0 the layer is the original one")
    b, n, inner = q.shape
    t, d, m = k.shape[1], inner // heads, visual.values.shape[0]
    compute = compute_dtype(q.dtype)
    queries = q.to(compute).reshape(b, n, heads, d).transpose(1, 2)  # (B, H, N, d)
    keys = (k.to(compute) / math.sqrt(d)).reshape(b, t, heads, d).permute(0, 2, 3, 1)  # (B, H, d, T)
    logit_map = visual.logit_map.to(compute)
    bias = None if strength == 1.0 else logit_map.new_full((heads * m,), math.log(strength))
    seen = F.linear(x.to(compute), logit_map, bias).reshape(b, n, heads, m).transpose(1, 2)  # (B, H, N, M)
    weights = torch.cat([queries @ keys, seen], dim=-1).softmax(dim=-1)  # (B, H, N, T + M)
    values = torch.cat([v.to(compute).reshape(b, t, heads, d),
                        visual.values.to(compute).reshape(1, m, heads, d).expand(b, -1, -1, -1)], dim=1)
    out = weights @ values.transpose(1, 2)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(q.dtype)
