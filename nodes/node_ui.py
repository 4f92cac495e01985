"""What a node shows in the frontend while it runs, beyond the progress bar."""
from __future__ import annotations


def show_text_on_node(node_id: str | None, text: str) -> None:
    """Text shown on the node in the frontend while it runs (the host's progress-text message)."""
    from server import PromptServer  # the running server; imported late, as it imports the whole host

    if node_id is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)
