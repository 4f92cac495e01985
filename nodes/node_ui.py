"""What a node shows in the frontend while it runs, beyond the progress bar: its text, a training's progress and
previews, and the loss curve every training node gives as an output."""
from __future__ import annotations

import dataclasses
import logging

import torch
from PIL import Image

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..sefi_core.plot import loss_curve_image, smoothed, smoothing_span

log = logging.getLogger(__name__)
PREVIEW_SHOWN_SIZE = 512  # the longest side of a preview on the node


def schema(**fields) -> io.Schema:
    """A node's io.Schema with the fields this host's schema takes: `search_aliases` (the words the node search also
    finds it by, as core nodes have) exists in newer hosts' schema only and is left out on older ones."""
    if "search_aliases" not in {f.name for f in dataclasses.fields(io.Schema)}:
        fields.pop("search_aliases", None)
    return io.Schema(**fields)


def show_text_on_node(node_id: str | None, text: str) -> None:
    """Text shown on the node in the frontend while it runs (the host's progress-text message)."""
    from server import PromptServer  # the running server; imported late, as it imports the whole host

    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)


class TrainingProgress:
    """A training loop's on_step: the progress bar every step (Cancel is checked there), and the smoothed loss as the
    node's text whenever new losses were read back (in the log every 100 steps, under the node's name). show_preview
    puts an image on the node as the host's progress preview, as KSampler's live previews."""

    def __init__(self, total_steps: int, node_id: str | None, node: str):
        self.total_steps, self.node_id, self.node = total_steps, node_id, node
        self.bar = comfy.utils.ProgressBar(total_steps)
        self.span, self.shown = smoothing_span(total_steps), 0
        self.previewed = False  # whether show_preview put a picture on the node this run

    def __call__(self, step: int, losses: list[float]) -> None:
        self.bar.update_absolute(step + 1, self.total_steps)
        if len(losses) > self.shown:
            self.shown = len(losses)
            loss = smoothed(losses[-10 * self.span:], self.span)[-1]  # older steps weigh < e^-20
            show_text_on_node(self.node_id, f"step {len(losses)}/{self.total_steps}: loss {loss:.4f} (smoothed)")
            if len(losses) % 100 == 0 or len(losses) == self.total_steps:
                log.info("%s: step %d/%d loss %.4f (smoothed)", self.node, len(losses), self.total_steps, loss)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def show_preview(self, step: int, image) -> None:
        self.bar.update_absolute(step, self.total_steps, ("JPEG", Image.fromarray(image), PREVIEW_SHOWN_SIZE))
        self.previewed = True

    def end_on(self, curve: torch.Tensor) -> None:
        """After a run that showed previews, the loss curve (an IMAGE) as the last one: frontends keep a node's last
        progress preview over the images it outputs, so without it the node would end on a preview."""
        if self.previewed:
            picture = Image.fromarray((curve[0].numpy() * 255).round().astype("uint8"))
            self.bar.update_absolute(self.total_steps, self.total_steps, ("PNG", picture, max(picture.size)))


def loss_curve(losses: list[float], total_steps: int, title: str) -> torch.Tensor:
    """The loss curve as an IMAGE (1, H, W, 3): a training node's loss_curve output, also shown on the node."""
    return torch.from_numpy(loss_curve_image(losses, total_steps, title)).unsqueeze(0)
