"""Face-wise attention loss (paper §3.1, Eq. 1, Algorithm 1): with the same queries Q of a cross-attention
layer, A_t = softmax(Q K_t^T / sqrt(d)) from the target prompt and A_r = softmax(Q K_r^T / sqrt(d)) from the
reference prompt (class word in the trigger's place); L_attn = MSE(A_t, A_r)."""
from __future__ import annotations

import torch

ATTENTION_OPTIONS = {
    "all tokens (#3, paper)": "all",  # every one of the 77 token maps: the paper's choice
    "trigger only (#1)": "trigger",  # only the trigger's map
    "prompt tokens (#2)": "prompt",  # the maps of the prompt's own tokens (start..end)
}


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, D), k (B, T, D) -> softmax(Q K^T / sqrt(d)) per head, (B, heads, N, T)."""
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # (B, heads, len, d)
    q, k = split(q), split(k)
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def attention_loss(q: torch.Tensor, k_target: torch.Tensor, k_reference: torch.Tensor, heads: int,
                   token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between target and reference attention maps, over the tokens selected by token_mask (T,) bool
    (None: all tokens, option #3)."""
    a_t = attention_probs(q, k_target, heads)
    a_r = attention_probs(q, k_reference, heads)
    if token_mask is not None:
        a_t, a_r = a_t[..., token_mask], a_r[..., token_mask]
    return torch.mean((a_t - a_r) ** 2)


def token_mask(option: str, length: int, trigger_positions: list[int], end_position: int) -> torch.Tensor | None:
    if option == "all":
        return None
    mask = torch.zeros(length, dtype=torch.bool)
    if option == "trigger":
        mask[trigger_positions] = True
    elif option == "prompt":
        mask[: end_position + 1] = True
    else:
        raise ValueError(f"unknown attention-loss option {option!r}; use one of {list(ATTENTION_OPTIONS.values())}")
    return mask
