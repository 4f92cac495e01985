"""Opens every shipped workflow in ComfyUI's real frontend (headless Chromium, 1920x1080) and checks what the user
sees: every node, title bar included, drawn inside the part of the canvas that no menu, side bar or toolbar covers.
Prints, per workflow, fits / does not fit and the worst margin (screen pixels between a node and the nearest covered
or off-screen pixel; negative: that much of it is hidden), and the frontend's measured geometry (canvas, covered
rectangles, title height, smallest drawn node sizes), the numbers behind FRONTENDS in tests/sefi_testkit/frontends.py.
Not part of pytest; needs Debian's chromium and `pip install playwright`. The frontend is the one the host's Python
has installed (comfyui-frontend-package):

    COMFYUI_PATH=/path/to/ComfyUI python tests/tools/check_frontend_layout.py [--shots /tmp/frontend_shots]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
STEP = 2  # screen pixels between the points probed with document.elementFromPoint

# Which element is at each probed point, on an empty graph: 1 where it is the graph canvas itself (or a transparent,
# click-through layer over it), 0 where a menu, tab bar, side bar or toolbar covers it. Also the covering elements:
# for each covered point, the hit element's highest ancestor that is still small (under a quarter of the screen).
PROBE = """step => {
    const canvas = app.canvas.canvas, W = innerWidth, H = innerHeight, rows = [], covers = new Set();
    const small = el => { const r = el.getBoundingClientRect(); return r.width * r.height < W * H / 4 };
    for (let y = step / 2; y < H; y += step) {
        let row = '';
        for (let x = step / 2; x < W; x += step) {
            const el = document.elementFromPoint(x, y);
            if (el === canvas) { row += '1'; continue }
            row += '0';
            let top = el;
            while (top && top.parentElement && top.parentElement !== document.body && small(top.parentElement)
                   && getComputedStyle(top.parentElement).pointerEvents !== 'none')
                top = top.parentElement;
            if (top && small(top)) covers.add(top);
        }
        rows.push(row);
    }
    const rects = [...covers].map(el => { const r = el.getBoundingClientRect();
        return [Math.floor(r.left), Math.floor(r.top), Math.ceil(r.right), Math.ceil(r.bottom),
                (el.className && el.className.baseVal === undefined ? el.className : el.tagName).slice(0, 60)] });
    return {rows, rects, width: W, height: H};
}"""

# Each node as drawn after loading: its rectangle on the page (title bar included), its saved and drawn size, the
# smallest size the frontend would draw it at (computeSize), and the view the frontend applied.
NODES = """() => {
    const c = app.canvas, r = c.canvas.getBoundingClientRect(), s = c.ds.scale, [ox, oy] = c.ds.offset;
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph._nodes.map(n => {
        const min = n.computeSize();
        return {id: String(n.id), type: n.type, title: n.title, size: [...n.size], min: [min[0], min[1]],
                screen: [r.left + (n.pos[0] + ox) * s, r.top + (n.pos[1] - title + oy) * s,
                         r.left + (n.pos[0] + n.size[0] + ox) * s, r.top + (n.pos[1] + n.size[1] + oy) * s]} });
    const popups = [...document.querySelectorAll('.p-toast-message, .p-dialog, [role=dialog]')]
        .map(el => el.getBoundingClientRect()).filter(b => b.width > 0 && b.height > 0)
        .map(b => [Math.floor(b.left), Math.floor(b.top), Math.ceil(b.right), Math.ceil(b.bottom)]);
    return {nodes, popups, view: {scale: s, offset: [ox, oy]}, title, canvas: [r.left, r.top, r.width, r.height],
            pixels: [c.canvas.width, c.canvas.height], dpr: devicePixelRatio};
}"""


class Visible:
    """The probed visibility mask with a summed-area table, for 'is this whole rectangle visible' in O(1)."""

    def __init__(self, rows: list[str], width: int, height: int):
        self.mask = np.array([[ch == "1" for ch in row] for row in rows], dtype=np.int32)
        self.sums = np.pad(self.mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        self.width, self.height = width, height

    def whole(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Every probed point in the rectangle is canvas, and the rectangle lies on the screen."""
        if x0 < 0 or y0 < 0 or x1 > self.width or y1 > self.height:
            return False
        # probed points sit at STEP/2 + k*STEP; the columns k with x0 <= point <= x1
        j0, j1 = int(np.ceil((x0 - STEP / 2) / STEP)), int(np.floor((x1 - STEP / 2) / STEP))
        i0, i1 = int(np.ceil((y0 - STEP / 2) / STEP)), int(np.floor((y1 - STEP / 2) / STEP))
        j0, i0 = max(j0, 0), max(i0, 0)
        j1, i1 = min(j1, self.mask.shape[1] - 1), min(i1, self.mask.shape[0] - 1)
        if j1 < j0 or i1 < i0:
            return True
        s = self.sums
        count = s[i1 + 1, j1 + 1] - s[i0, j1 + 1] - s[i1 + 1, j0] + s[i0, j0]
        return count == (i1 - i0 + 1) * (j1 - j0 + 1)

    def margin(self, rect) -> float:
        """The largest d (screen px, to STEP) such that the rectangle grown by d is wholly visible; negative: it must
        shrink by -d to be."""
        x0, y0, x1, y1 = rect
        grown = lambda d: self.whole(x0 - d, y0 - d, x1 + d, y1 + d)
        if grown(0):
            d = 0
            while d < 400 and grown(d + 1):
                d += 1
            return d
        d = 0
        while d < min(x1 - x0, y1 - y0) / 2 and not grown(-d):
            d += 1
        return -d

    def geometry(self) -> tuple[list[int], list[list[int]]]:
        """The covered bands along the screen's edges (menu, tab and side bars) as the rectangle they leave, and the
        covered patches inside it (floating toolbars) as bounding rectangles, all in screen pixels."""
        covered = self.mask == 0
        rows, cols = covered.shape

        def band(lines) -> int:
            n = 0
            for line in lines:
                if not line.all():
                    break
                n += 1
            return n

        top = band(covered)
        bottom = rows - band(covered[::-1])
        left = band(covered[top:bottom].T)
        right = cols - band(covered[top:bottom].T[::-1])
        inner = covered[top:bottom, left:right]
        seen, patches = np.zeros_like(inner), []
        for i, j in zip(*np.nonzero(inner)):
            if seen[i, j]:
                continue
            stack, box = [(i, j)], [j, i, j, i]
            seen[i, j] = True
            while stack:
                a, b = stack.pop()
                box = [min(box[0], b), min(box[1], a), max(box[2], b), max(box[3], a)]
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < inner.shape[0] and 0 <= d < inner.shape[1] and inner[c, d] and not seen[c, d]:
                        seen[c, d] = True
                        stack.append((c, d))
            patches.append([int(v) for v in [(left + box[0]) * STEP, (top + box[1]) * STEP, (left + box[2] + 1) * STEP,
                            (top + box[3] + 1) * STEP]])
        return [int(v) * STEP for v in (left, top, right, bottom)], sorted(patches)

def frontend_version(page) -> str:
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    return version or metadata.version("comfyui_frontend_package")


MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "SefiLoadIdentity": "sefi_identities",
                 "PVALoadIdentity": "pva_identities", "PVALoadEncoder": "pva_encoders",
                 "PVALoadFaceRecognizer": "face_recognizers", "CLIPVisionLoader": "clip_vision"}  # each loader's file, under models/


def prepare(work: Path, workflows: dict) -> None:
    """The files the workflows name, so that their pickers hold them (placeholders: nothing here runs)."""
    from sefi_testkit.frontend import prepare_user_settings

    prepare_user_settings(work)
    for workflow in workflows.values():
        for node in workflow["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] in MODEL_FOLDERS:
                target = work / "models" / MODEL_FOLDERS[node["type"]] / values[0]
            elif node["type"] == "LoadImage":
                target = work / "input" / values[0]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / "tests" / "data" / "astronaut.png", target)
                continue
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=Path, default=Path("/tmp/frontend_shots"),
                        help="folder for a screenshot of each workflow and the visibility mask (default /tmp/frontend_shots)")
    parser.add_argument("--json", type=Path, help="also write the measurements there")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from sefi_testkit import pack
    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.frontend import Frontend
    from sefi_testkit.server import ComfyServer

    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows").glob("*.json"))}
    work = Path(tempfile.mkdtemp(prefix="sefi-layout-"))
    prepare(work, workflows)
    args.shots.mkdir(parents=True, exist_ok=True)
    report, all_fit = {"workflows": {}}, True

    with ComfyServer(comfy_path, ROOT, work) as server, Frontend(server) as frontend:
        page = frontend.page
        version = frontend_version(page)
        page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true) }")
        page.wait_for_timeout(1000)
        probe = page.evaluate(PROBE, STEP)
        visible = Visible(probe["rows"], probe["width"], probe["height"])
        covers = sorted({tuple(r[:4]): r[4] for r in probe["rects"] if r[2] > r[0] and r[3] > r[1]}.items())
        covers = [(r, name) for r, name in covers  # drop rectangles inside another
                  if not any(o != r and o[0] <= r[0] and o[1] <= r[1] and r[2] <= o[2] and r[3] <= o[3] for o, _ in covers)]
        report.update(version=version, viewport=[probe["width"], probe["height"]], covered=covers)
        Image.fromarray((visible.mask * 255).astype(np.uint8)).save(args.shots / f"{version}_visible_mask.png")
        print(f"frontend {version}, viewport {probe['width']}x{probe['height']}")
        inner, patches = visible.geometry()
        report.update(visible=inner, patches=patches)
        print(f"  visible canvas: {visible.mask.mean():.1%} of the screen, inside {inner} (left, top, right, bottom) "
              f"less the patches {patches}; the covering elements:")
        for r, name in covers:
            print(f"    {list(r)}  {name}")
        min_sizes: dict[str, list] = {}
        for name, workflow in workflows.items():
            frontend.load(workflow)
            drawn = page.evaluate(NODES)
            saved = workflow["extra"]["ds"]
            same_view = (abs(drawn["view"]["scale"] - saved["scale"]) < 1e-6
                         and all(abs(a - b) < 1e-3 for a, b in zip(drawn["view"]["offset"], saved["offset"])))
            saved_sizes = {str(n["id"]): n["size"] for n in workflow["nodes"]}
            margins = {n["id"]: visible.margin(n["screen"]) for n in drawn["nodes"]}
            for popup in drawn["popups"]:  # a dialog or message opened on load covers nodes too
                for n in drawn["nodes"]:
                    x0, y0, x1, y1 = n["screen"]
                    if x0 < popup[2] and popup[0] < x1 and y0 < popup[3] and popup[1] < y1:
                        margins[n["id"]] = min(margins[n["id"]], -1)
            enlarged = [n["id"] for n in drawn["nodes"] if n["size"][0] > saved_sizes[n["id"]][0] + 0.5
                        or n["size"][1] > saved_sizes[n["id"]][1] + 0.5]
            for n in drawn["nodes"]:
                old = min_sizes.get(n["type"], [0, 0])
                min_sizes[n["type"]] = [max(old[0], n["min"][0]), max(old[1], n["min"][1])]
            worst = min(margins, key=margins.get)
            fits = margins[worst] >= 0 and not enlarged
            all_fit &= fits
            worst_node = next(n for n in drawn["nodes"] if n["id"] == worst)
            print(f"  {name}: {'fits' if fits else 'DOES NOT FIT'}, worst margin {margins[worst]:g} px "
                  f"(node {worst} {worst_node['title']!r}); view {'as saved' if same_view else drawn['view']}"
                  + (f"; enlarged by the frontend: {enlarged}" if enlarged else "")
                  + (f"; popups {drawn['popups']}" if drawn["popups"] else ""))
            report["workflows"][name] = {"fits": fits, "worst_margin": margins[worst], "worst_node": worst,
                                         "view": drawn["view"], "saved_view": saved, "enlarged": enlarged,
                                         "margins": margins, "popups": drawn["popups"]}
            report.update(canvas=drawn["canvas"], pixels=drawn["pixels"], dpr=drawn["dpr"], title=drawn["title"])
            shot = args.shots / f"{version}_{name}.png"
            frontend.screenshot(shot)
            print(f"    screenshot {shot}")
        report["min_size"] = {k: [int(np.ceil(v[0])), int(np.ceil(v[1]))] for k, v in sorted(min_sizes.items())}
        print(f"  canvas element {report['canvas']} (device pixels {report['pixels']}, ratio {report['dpr']}), "
              f"title bar {report['title']} px")
        print(f"  smallest drawn sizes: {json.dumps(report['min_size'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print("all workflows fit" if all_fit else "SOME WORKFLOWS DO NOT FIT")
    return 0 if all_fit else 1


if __name__ == "__main__":
    sys.exit(main())
