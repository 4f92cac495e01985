"""Cross-attention maps per word (paper Fig. 1, Fig. 6): which image regions each word of the prompt
attends to, on a shared scale, as heatmaps over the image with the word as label."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..plot import font
from ..tokens import find_spans
from .losses import attention_probs

LABEL_SIZE = 30  # px: readable when the frontend shrinks a 3-4 tile grid to a node's width
LABEL_HEIGHT = 44
COLOUR_BAR_HEIGHT = 64
MAX_COLUMNS = 4


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) averaged over heads: q (B, N, D), k (B, T, D) -> (B, N, T)."""
    return attention_probs(q, k, heads).mean(1)


def prompt_words(prompt: str) -> list[str]:
    """The distinct words of a prompt, in order, without prompt-weight syntax or punctuation."""
    words = re.findall(r"[\w'-]+", re.sub(r":\s*[\d.]+", " ", prompt).lower())
    return list(dict.fromkeys(w for w in words if not w.replace(".", "").isdigit()))


@dataclass(frozen=True)
class WordTokens:
    word: str
    positions: tuple[int, ...]  # token positions over all chunks
    occurrences: int

    @property
    def label(self) -> str:
        return self.word if self.occurrences == 1 else f"{self.word} (x{self.occurrences})"


def word_positions(chunks: list[list[tuple]], word: str, ids: Sequence[int] | None,
                   is_word_marker: Callable[[object], bool] = lambda token: False) -> WordTokens:
    """Token positions of every occurrence of a word (its id sequence, or marker entries for a trigger)."""
    tokens = [entry[0] for chunk in chunks for entry in chunk]
    if any(is_word_marker(t) for t in tokens):
        found = [i for i, t in enumerate(tokens) if is_word_marker(t)]
        return WordTokens(word, tuple(found), len(found))
    starts = find_spans(tokens, ids or ())
    return WordTokens(word, tuple(s + j for s in starts for j in range(len(ids))), len(starts))


def word_maps(layer_probs: Sequence[torch.Tensor], words: Sequence[WordTokens], height: int, width: int) -> torch.Tensor:
    """layer_probs: (N_l, T) maps of one image at square-ish layer grids; -> (words, height, width), the
    sum over each word's tokens, averaged over layers, resized to the image, on one shared 0-1 scale."""
    resized = []
    for probs in layer_probs:
        n = probs.shape[0]
        h = round(math.sqrt(n * height / width))
        grid = probs.T.reshape(-1, 1, h, n // h)  # (T, 1, h, w)
        resized.append(F.interpolate(grid.float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0])
    per_token = torch.stack(resized).mean(0)  # (T, H, W)
    maps = torch.stack([per_token[list(w.positions)].sum(0) for w in words])
    return maps / maps.max().clamp(min=1e-12)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) for `count` tiles: up to four per row."""
    columns = min(count, MAX_COLUMNS)
    return math.ceil(count / columns), columns


def _heat(value: np.ndarray) -> np.ndarray:
    """0-1 -> RGB 'inferno-like' ramp: black, purple, orange, yellow."""
    stops = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32) / 255
    x = np.clip(value, 0, 1) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    frac = (x - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def render_grid(image: np.ndarray, maps: np.ndarray, labels: Sequence[str], tile: int = 256,
                opacity: float = 0.6) -> np.ndarray:
    """image (H, W, 3) 0-1, maps (words, H, W) on a shared 0-1 scale -> one picture: a tile per word (heatmap over
    the image, the word written above it) and a colour bar for the shared scale below."""
    rows, columns = grid_shape(len(labels))
    h, w = image.shape[:2]
    tile_h = round(tile * h / w)
    width = max(columns * tile, 2 * tile)
    canvas = Image.new("RGB", (width, rows * (tile_h + LABEL_HEIGHT) + COLOUR_BAR_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    label_font = font(LABEL_SIZE)
    base = Image.fromarray((image * 255).astype(np.uint8)).resize((tile, tile_h), Image.BILINEAR)
    for i, (word_map, label) in enumerate(zip(maps, labels)):
        r, c = divmod(i, columns)
        heat = Image.fromarray((_heat(word_map) * 255).astype(np.uint8)).resize((tile, tile_h), Image.BILINEAR)
        x, y = c * tile, r * (tile_h + LABEL_HEIGHT)
        canvas.paste(Image.blend(base, heat, opacity), (x, y + LABEL_HEIGHT))
        draw.text((x + tile // 2, y + LABEL_HEIGHT // 2), _fit(draw, label, label_font, tile - 8), fill="black",
                  font=label_font, anchor="mm")
    _colour_bar(draw, canvas, canvas.height - COLOUR_BAR_HEIGHT, width)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _fit(draw: ImageDraw.ImageDraw, label: str, label_font, width: int) -> str:
    """The label, shortened with an ellipsis if it is wider than its tile."""
    if draw.textlength(label, font=label_font) <= width:
        return label
    while label and draw.textlength(label + "...", font=label_font) > width:
        label = label[:-1]
    return label + "..."


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, top: int, width: int) -> None:
    """The heat colours from 0 to 1 (1: the strongest attention of any word at any pixel), with ticks."""
    margin, bar_h = 24, 18
    ramp = _heat(np.linspace(0, 1, width - 2 * margin))[None].repeat(bar_h, 0)
    canvas.paste(Image.fromarray((ramp * 255).astype(np.uint8)), (margin, top + 8))
    tick_font = font(18)
    below = top + 14 + bar_h
    draw.text((margin, below), "0", fill="black", font=tick_font, anchor="lt")
    draw.text((width - margin, below), "1", fill="black", font=tick_font, anchor="rt")
    draw.text((width // 2, below), "attention (one scale for all words)", fill="black", font=tick_font, anchor="mt")
