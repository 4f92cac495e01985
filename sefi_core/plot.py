"""Pictures an artist reads at a glance: every training's loss curve, the strip of SeFi's training previews, and the
shared pieces (a scalable font, nice axis ticks) SeFi's attention preview uses too."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RAW = (200, 200, 200)
SMOOTH = (30, 80, 200)
INK = (20, 20, 20)
GRID = (232, 232, 232)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at `size` pixels (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def smoothing_span(total_steps: int) -> int:
    """The window of the smoothed loss: a twentieth of the run (the raw loss swings with the timestep)."""
    return max(5, total_steps // 20)


def smoothed(values, span: int) -> np.ndarray:
    """Exponential moving average with the bias correction of Adam's moments, so the start is not pulled to 0."""
    values = np.asarray(values, dtype=np.float64)
    alpha, mean, out = 2.0 / (span + 1), 0.0, np.empty_like(values)
    for i, v in enumerate(values):
        mean = (1 - alpha) * mean + alpha * v
        out[i] = mean / (1 - (1 - alpha) ** (i + 1))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2 or 5 times a power of ten) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def loss_curve_image(losses: list[float], total_steps: int | None = None, title: str = "Training loss",
                     width: int = 768, height: int = 432) -> np.ndarray:
    """(height, width, 3) float32 in 0-1: the raw loss per step in grey, its smoothed value in blue over it, axes
    with step numbers and loss values, and the final smoothed loss in the title."""
    total = total_steps or len(losses)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, tick_font = font(22), font(16)
    values = np.asarray(losses, dtype=np.float64)
    finite = values[np.isfinite(values)]
    left, right, top, bottom = 78, width - 24, 54, height - 52
    smooth = smoothed(values, smoothing_span(total)) if len(values) else values
    title = f"{title}, {len(values)} steps"
    if len(values):
        title += f": smoothed {smooth[-1]:.4f} at the end"
    draw.text((left, 14), title, fill=INK, font=title_font)
    if len(finite):
        low, high = float(finite.min()), float(finite.max())
        low, high = (low - 0.5, high + 0.5) if high == low else (low, high)
        to_x = lambda step: left + (right - left) * step / max(total - 1, 1)
        to_y = lambda v: bottom - (bottom - top) * (v - low) / (high - low)
        for tick in nice_ticks(low, high):
            if low <= tick <= high:
                draw.line([(left, to_y(tick)), (right, to_y(tick))], fill=GRID)
                draw.text((left - 8, to_y(tick)), _label(tick), fill=INK, font=tick_font, anchor="rm")
        for tick in nice_ticks(0, max(total - 1, 1)):
            draw.line([(to_x(tick), bottom), (to_x(tick), bottom + 5)], fill=INK)
            draw.text((to_x(tick), bottom + 8), f"{tick:g}", fill=INK, font=tick_font, anchor="mt")
        points = [(to_x(i), to_y(v)) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=RAW, width=1)
            draw.line([(to_x(i), to_y(v)) for i, v in enumerate(smooth) if math.isfinite(v)], fill=SMOOTH, width=3)
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) // 2, height - 20), "step", fill=INK, font=tick_font, anchor="mm")
    draw.text((right, height - 20), "grey: per step   blue: smoothed", fill=(90, 90, 90), font=tick_font, anchor="rm")
    return np.asarray(image, dtype=np.float32) / 255.0


def preview_strip(images: list[np.ndarray], steps: list[int]) -> np.ndarray:
    """Training previews side by side, each labelled with its step: (H, W, 3) uint8 pictures -> one (H', W', 3)."""
    height = max(image.shape[0] for image in images)
    label = max(14, height // 12)
    strip = Image.new("RGB", (sum(image.shape[1] for image in images), height + label + 6), "white")
    draw, left = ImageDraw.Draw(strip), 0
    for image, step in zip(images, steps):
        strip.paste(Image.fromarray(image), (left, 0))
        draw.text((left + image.shape[1] // 2, height + 3), f"step {step}", fill=INK, font=font(label), anchor="mt")
        left += image.shape[1]
    return np.asarray(strip)
