"""Takes the pack's pictures in ComfyUI's real frontend: template thumbnails (workflows/<name>.jpg), the README's
screenshots and the help pages' pictures (web/docs/img/). It starts the real server with this pack installed, a
random-weight checkpoint and the sample photos, runs workflows 1 and 5 there (small sizes) and photographs the
canvas. Needs Debian's chromium and `pip install playwright`; run after changing a node or a workflow:

    COMFYUI_PATH=/path/to/ComfyUI python tests/tools/make_pictures.py [--only 6_pva_face_inpainting ...]

--only takes the pictures of the named workflows alone (a new workflow's thumbnail without re-running the others).
Each picture taken is recorded in tests/data/pictures.json with a digest of what it shows (sefi_testkit/pictures.py),
which tests/host/test_workflows.py checks against the current nodes and workflows.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "web" / "docs" / "img"
THUMBNAIL = (480, 270)
DEMO = {  # small settings so the runs take minutes on a CPU; the checkpoint has random weights
    "CheckpointLoaderSimple": {"ckpt_name": "tiny.safetensors"},
    "LoadImage": {"image": "astronaut.png"},
    "SefiTrainIdentity": {"steps": 150, "resolution": 128, "overwrite": True, "preview_every": 50},
    "KSampler": {"steps": 12, "seed": 1},
    "EmptyLatentImage": {"width": 256, "height": 256},
    "SefiAttentionMapPreview": {"layers": "all layers"},
}


def set_widgets(frontend, values_by_type: dict) -> None:
    """Sets widget values on the loaded graph, as typing them would."""
    frontend.page.evaluate("""values => { for (const node of app.graph._nodes) {
        for (const [name, value] of Object.entries(values[node.type] || {})) {
            const widget = (node.widgets || []).find(w => w.name === name);
            if (widget) { widget.value = value; widget.callback?.(value); } } } app.graph.setDirtyCanvas(true, true) }""",
                           values_by_type)


def node_picture(frontend, node_id: int, path: Path, scale: float = 1.25) -> None:
    """The node alone, drawn at `scale` (sharper than the 80% overview), then the saved view back."""
    saved = frontend.view()
    _, (x, y, _, _) = frontend.node_rects()[str(node_id)]
    frontend.page.evaluate("""([scale, x, y]) => { app.canvas.ds.scale = scale; app.canvas.ds.offset = [40 / scale - x,
        40 / scale - y]; app.canvas.setDirty(true, true); app.canvas.draw(true, true) }""", [scale, x, y])
    frontend.page.wait_for_timeout(500)
    frontend.screenshot(path, clip=screen_rect(frontend, node_id))
    frontend.page.evaluate("""v => { app.canvas.ds.scale = v.scale; app.canvas.ds.offset = v.offset;
        app.canvas.setDirty(true, true) }""", saved)


def screen_rect(frontend, node_id: int, pad: int = 8) -> dict:
    """Where a node is drawn on the page, its title bar included."""
    view, canvas = frontend.view(), frontend.canvas_rect()
    _, (x, y, w, h) = frontend.node_rects()[str(node_id)]
    scale, (ox, oy) = view["scale"], view["offset"]
    return {"x": canvas[0] + (x + ox) * scale - pad, "y": canvas[1] + (y + oy) * scale - pad,
            "width": w * scale + 2 * pad, "height": h * scale + 2 * pad}


def save_jpeg(png: Path, target: Path, size=None, quality: int = 85) -> None:
    image = Image.open(png).convert("RGB")
    if size:
        image.thumbnail(size, Image.LANCZOS)
    image.save(target, "JPEG", quality=quality, optimize=True)


def output_image(server, node_id: int) -> bytes:
    """The first image a node of the last run showed (its UI preview), fetched as the frontend fetches it."""
    history = server.get_json("/api/history")
    entry = max(history.values(), key=lambda h: h["status"]["messages"][-1][1]["timestamp"])
    image = entry["outputs"][str(node_id)]["images"][0]
    status, _, body = server.get(f"/api/view?filename={image['filename']}&subfolder={image['subfolder']}"
                                 f"&type={image['type']}")
    if status != 200:
        raise RuntimeError(f"could not fetch the output of node {node_id}: {status}")
    return body


def node_id_of(workflow: dict, node_type: str, title: str | None = None) -> int:
    return next(n["id"] for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title))


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from sefi_testkit import pack
    pack.prepare()  # sefi_core importable, the repository root off sys.path
    from sefi_testkit.checkpoint import write_checkpoint
    from sefi_testkit.comfy_env import find_comfyui
    from sefi_testkit.frontend import Frontend, prepare_user_settings
    from sefi_testkit.host import Host
    from sefi_testkit.pictures import record
    from sefi_testkit.server import ComfyServer

    from check_frontend_layout import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="WORKFLOW", help="workflow names (without .json) to photograph")
    args = parser.parse_args()
    comfy_path = find_comfyui()
    if comfy_path is None:
        sys.exit("Set COMFYUI_PATH to a ComfyUI checkout (see README).")
    work, shots = Path(tempfile.mkdtemp(prefix="sefi-pictures-")), Path(tempfile.mkdtemp(prefix="sefi-shots-"))
    prepare_user_settings(work)
    write_checkpoint(work / "models" / "checkpoints" / "tiny.safetensors", "tiny")
    (work / "input").mkdir(parents=True, exist_ok=True)
    for image in (ROOT / "tests" / "data").glob("*.png"):
        shutil.copy(image, work / "input" / image.name)
    IMAGES.mkdir(parents=True, exist_ok=True)
    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows").glob("*.json"))
                 if not args.only or p.stem in args.only}
    if args.only and set(args.only) - set(workflows):
        sys.exit(f"no such workflow: {sorted(set(args.only) - set(workflows))}; choose from workflows/*.json")
    prepare(work, workflows)  # the files they name, as placeholders: the pickers show them and no error covers a picture

    taken = {}  # picture (from the repository root) -> the workflow it shows
    shot = lambda path, name: taken.setdefault(str(path.relative_to(ROOT)), name)
    with ComfyServer(comfy_path, ROOT, work) as server, Frontend(server) as frontend:
        for name, workflow in workflows.items():
            frontend.load(workflow)
            if name in ("1_train_and_generate", "5_attention_preview"):
                set_widgets(frontend, DEMO)
                frontend.queue_and_wait()
                print(f"ran {name}")
            frontend.screenshot(shots / f"{name}.png")
            save_jpeg(shots / f"{name}.png", ROOT / "workflows" / f"{name}.jpg", THUMBNAIL)
            shot(ROOT / "workflows" / f"{name}.jpg", name)
            if name == "1_train_and_generate":
                (IMAGES / "loss_curve.png").write_bytes(output_image(server, node_id_of(workflow, "SefiTrainIdentity")))
                save_jpeg(shots / f"{name}.png", IMAGES / "workflow_1.jpg", (1440, 810))
                for node_type, file in (("SefiTrainIdentity", "train_node.png"), ("SefiApplyStageTokens", "apply_node.png")):
                    node_picture(frontend, node_id_of(workflow, node_type), IMAGES / file)
                for file in ("loss_curve.png", "workflow_1.jpg", "train_node.png", "apply_node.png"):
                    shot(IMAGES / file, name)
            if name == "2_saved_identity_prompts":
                node_picture(frontend, node_id_of(workflow, "SefiLoadIdentity"), IMAGES / "load_node.png")
                shot(IMAGES / "load_node.png", name)
            if name == "6_pva_face_inpainting":
                save_jpeg(shots / f"{name}.png", IMAGES / "pva_workflow.jpg", (1440, 810))
                shot(IMAGES / "pva_workflow.jpg", name)
            if name == "7_sefi_vs_pva":
                likeness = node_id_of(workflow, "PVAIdentitySimilarity", "PVA's likeness")
                node_picture(frontend, likeness, IMAGES / "identity_similarity_node.png")
                shot(IMAGES / "identity_similarity_node.png", name)
            if name == "5_attention_preview":
                with_identity = node_id_of(workflow, "SefiAttentionMapPreview", "With the identity")
                node_picture(frontend, with_identity, IMAGES / "preview_node.png", scale=1.0)
                (shots / "attention_preview.png").write_bytes(output_image(server, with_identity))
                save_jpeg(shots / "attention_preview.png", IMAGES / "attention_preview.jpg")
                shot(IMAGES / "preview_node.png", name)
                shot(IMAGES / "attention_preview.jpg", name)
    host = Host(comfy_path, ROOT, tempfile.mkdtemp(prefix="sefi-registry-"))  # the nodes' schemas, for the record
    record(host.nodes.NODE_CLASS_MAPPINGS, taken)
    print(f"pictures written and recorded in tests/data/pictures.json; screenshots kept in {shots}, the server's work "
          f"folder in {work}")


if __name__ == "__main__":
    main()
