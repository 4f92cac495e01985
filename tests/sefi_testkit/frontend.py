"""ComfyUI's real frontend in headless Chromium (Playwright driving Debian's /usr/bin/chromium), on a ComfyServer:
load a workflow as a user would, read what the canvas shows, take screenshots. For pictures and checks by hand;
the test suite itself does not need a browser."""
from __future__ import annotations

import json
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
VIEWPORT = {"width": 1920, "height": 1080}
# No template gallery on the first visit, no minimap over the canvas.
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def prepare_user_settings(work_dir: Path) -> None:
    """Settings a returning user has; call before the server starts."""
    folder = Path(work_dir) / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps(FIRST_RUN_SETTINGS))


class Frontend:
    def __init__(self, server, viewport: dict = VIEWPORT):
        self.server, self.viewport = server, viewport

    def __enter__(self) -> "Frontend":
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        self.page = self.browser.new_page(viewport=self.viewport)
        self.page.goto(self.server.url, wait_until="networkidle")
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
        return self

    def __exit__(self, *exc):
        self.browser.close()
        self._playwright.stop()

    def load(self, workflow: dict, settle: float = 2.0) -> None:
        """Open a workflow as dragging its file onto the canvas does (its saved view included)."""
        self.page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
        time.sleep(settle)

    def view(self) -> dict:
        return self.page.evaluate("() => ({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")

    def node_rects(self) -> dict:
        """node id -> (title, [x, y, width, height]) as drawn, in graph units, the title bar included."""
        return self.page.evaluate("""() => Object.fromEntries(app.graph._nodes.map(n => [n.id, [n.title,
            [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]]]))""")

    def canvas_rect(self) -> list:
        return self.page.evaluate("() => { const r = app.canvas.canvas.getBoundingClientRect(); "
                                  "return [r.x, r.y, r.width, r.height] }")

    def screenshot(self, path: Path, clip: dict | None = None) -> None:
        self.page.screenshot(path=str(path), clip=clip)

    def queue_and_wait(self, timeout: float = 600) -> None:
        """Press Run (queue the prompt) and wait until the queue is empty again."""
        self.page.evaluate("() => app.queuePrompt(0, 1)")
        deadline = time.monotonic() + timeout
        time.sleep(1)
        while time.monotonic() < deadline:
            queue = self.server.get_json("/api/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                time.sleep(2)
                return
            time.sleep(1)
        raise TimeoutError("the prompt did not finish")
