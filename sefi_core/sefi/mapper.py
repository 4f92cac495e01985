"""The token mapper (paper §3.2, §6.2, Fig. 11): two self-attention layers and one feed-forward layer map
the class word's embedding to S (K, V) token pairs. Only this module learns; SD stays frozen."""
from __future__ import annotations

import torch
from torch import nn


class TokenMapper(nn.Module):
    """class embedding (C,) -> K tokens (S, C) and V tokens (S, C).

    Each of the 2S outputs starts as the class embedding plus a learned slot embedding; the output
    projection starts at zero, so training begins exactly at the class word (our choice, not the paper's).

    Scale: Adam moves every weight by about lr per step, all of a row the same way at first, so an output
    of a C-wide linear layer over normalised features moves by about lr * 0.8 * C per step. The residual is
    scaled by |class embedding| / C, so a token moves by at most ~0.8 * lr * |class embedding| per dimension
    per step (about a tenth of its size at the paper's lr 0.005), like Textual Inversion's embeddings.
    Unscaled, tokens grew to 10^4 times a word embedding's size within 300 steps and the text encoder
    could no longer put them in context.

    `widths`: the parts of the embedding each text encoder reads (SDXL: CLIP-L's 768, then bigG's 1280). Each part
    is scaled by its own class embedding's size, so a token moves alike, relative to its size, in both encoders'
    spaces however different their embeddings' sizes are; the mapper itself sees the parts side by side, so one
    identity is learned for both.
    """

    def __init__(self, class_embedding: torch.Tensor, stage_count: int = 5, heads: int = 8,
                 widths: tuple[int, ...] | None = None):
        super().__init__()
        channels = class_embedding.shape[-1]
        widths = tuple(widths or (channels,))
        if sum(widths) != channels:
            raise ValueError(f"token widths {widths} do not add up to the class embedding's {channels}")
        self.stage_count = stage_count
        self.register_buffer("class_embedding", class_embedding.detach().float().clone())
        self.slots = nn.Parameter(torch.randn(2 * stage_count, channels) * 0.02)  # (2S, C): K slots, then V slots
        self.attn = nn.ModuleList(nn.MultiheadAttention(channels, heads, batch_first=True) for _ in range(2))
        self.attn_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(2))
        self.ff_norm = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.out_norm = nn.LayerNorm(channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        parts = self.class_embedding.split(widths)
        scale = torch.cat([part.norm().expand(len(part)) for part in parts]) / channels
        self.register_buffer("scale", scale, persistent=False)  # (C,): from the class embedding, not learned

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.class_embedding
        h = (cls / (cls.norm() + 1e-8) + self.slots).unsqueeze(0)  # (1, 2S, C)
        for attn, norm in zip(self.attn, self.attn_norms):
            x = norm(h)
            h = h + attn(x, x, x, need_weights=False)[0]
        h = h + self.ff(self.ff_norm(h))
        tokens = cls + self.scale * self.out(self.out_norm(h[0]))  # (2S, C)
        return tokens[: self.stage_count], tokens[self.stage_count:]
