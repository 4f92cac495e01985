"""PVA's identity encoder (paper §3.2, as the authors build it): the face features of 1-5 reference photos and
10 learned queries, through one linear layer and a 4-layer transformer encoder, become 10 visual tokens of the context
width. The references carry no position, so their order does not matter; the tokens get a learned position (from 0).
"""
from __future__ import annotations

import torch
from torch import nn

from .face import FEATURE_DIM

VISUAL_TOKENS = 10
MAX_REFERENCES = 5


class IdentityEncoder(nn.Module):
    """(B, N, 512) face features of N reference photos -> (B, 10, context width) visual tokens."""

    def __init__(self, context_dim: int = 768, layers: int = 4, heads: int = 8, dropout: float = 0.1,
                 tokens: int = VISUAL_TOKENS, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, feature_dim))
        self.project = nn.Linear(feature_dim, context_dim)
        layer = nn.TransformerEncoderLayer(context_dim, heads, dropout=dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(context_dim),
                                                 enable_nested_tensor=False)
        self.position = nn.Parameter(torch.zeros(tokens, context_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.queries.shape[-1]:
            raise ValueError(f"expected face features (batch, references, {self.queries.shape[-1]}); "
                             f"got {tuple(features.shape)}")
        queries = self.queries.to(features).expand(features.shape[0], -1, -1)
        x = self.transformer(self.project(torch.cat([features, queries], dim=1)))
        return x[:, -self.queries.shape[0]:] + self.position.to(x)
