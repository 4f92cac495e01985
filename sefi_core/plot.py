"""The loss curve as a picture (an IMAGE output an artist can look at)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

MARGIN = 40


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> np.ndarray:
    """(height, width, 3) float32 in 0-1: raw loss in grey, its moving average in blue."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = np.asarray(losses, dtype=np.float64)
    draw.text((MARGIN, 8), f"SeFi training loss ({len(values)} steps)", fill="black")
    if len(values):
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0
        to_xy = lambda i, v, n: (MARGIN + (width - 2 * MARGIN) * i / max(n - 1, 1),
                                 height - MARGIN - (height - 2 * MARGIN) * (v - low) / span)
        draw.line([to_xy(i, v, len(values)) for i, v in enumerate(values)], fill=(190, 190, 190), width=1)
        offset = (len(values) - len(smooth)) / 2
        draw.line([to_xy(i + offset, v, len(values)) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
        draw.text((4, MARGIN - 6), f"{high:.3g}", fill="black")
        draw.text((4, height - MARGIN - 6), f"{low:.3g}", fill="black")
    draw.rectangle([MARGIN, MARGIN, width - MARGIN, height - MARGIN], outline="black")
    draw.text((width // 2 - 10, height - MARGIN + 8), "step", fill="black")
    return np.asarray(image, dtype=np.float32) / 255.0
