"""The shipped workflows: they load against the real host's registry (types exist, links type-check, widget values
are valid) and their API form runs end to end on the suite's small checkpoint."""
import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sefi_core.sefi.identity import Identity, load_identity, save_identity
from sefi_testkit import pictures
from sefi_testkit.frontends import FRONTENDS, TITLE
from sefi_testkit.pva import write_dataset, write_pva_identity
from sefi_testkit.workflow_format import VIRTUAL_NODES, combo_errors, link_type_errors, to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"), key=lambda p: int(p.stem.split("_")[0]))
# The user's own files, picked in the UI, and the suite's stand-ins (the random recognizer and encoder of pva_files).
USER_FILES = {"ckpt_name": "tiny.safetensors", "image": "astronaut.png", "recognizer_file": "r18.safetensors",
              "encoder_file": "random.safetensors", "clip_name": "placeholder_clip_vision.safetensors"}
# Which workflow or node makes each file a workflow picks (node type, input), as its first Note must say.
MADE_BY = {("SefiLoadIdentity", "identity_file"): "workflow 1_train_and_generate",
           ("SefiTrainIdentity", "continue_from"): "workflow 1_train_and_generate",
           ("PVALoadIdentity", "pva_identity_file"): "workflow 6_pva_face_inpainting",
           ("PVALoadEncoder", "encoder_file"): "PVA Train Encoder",
           ("PVALoadFaceRecognizer", "recognizer_file"): "face_recognizers"}


def load(path):
    return json.loads(path.read_text())


def test_all_ten_workflows_ship():
    assert [p.stem for p in WORKFLOWS] == ["1_train_and_generate", "2_saved_identity_prompts", "3_two_identities",
                                          "4_face_inpainting", "5_attention_preview", "6_pva_face_inpainting",
                                          "7_sefi_vs_pva", "8_pva_train_encoder", "9_continue_training",
                                          "10_sdxl_train_and_generate"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_against_the_host_registry(host, path, pva_files):
    workflow, registry = load(path), host.nodes.NODE_CLASS_MAPPINGS
    types = {n["type"] for n in workflow["nodes"]}
    assert types - VIRTUAL_NODES <= set(registry), f"unknown node types {types - VIRTUAL_NODES - set(registry)}"
    assert "Note" in types, "every workflow explains its steps in Note nodes"
    assert link_type_errors(workflow, registry) == []
    assert combo_errors(to_api(workflow, registry), registry) == []
    prompt = small(to_api(workflow, registry))
    make_identities(host)
    host.checkpoint("tiny")
    host.checkpoint("tiny_inpaint")
    host.checkpoint("tiny_sdxl")
    ok, error, _, node_errors = asyncio.run(host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert ok, (error, node_errors)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_says_which_pack_it_comes_from(host, path):
    """What a frontend writes on save, and ComfyUI Manager reads to offer 'install missing nodes' to whoever gets
    the file: the pack's nodes carry its Registry id and version (pyproject.toml), core's nodes 'comfy-core' and a
    ComfyUI version; Notes and reroutes (the frontend's own) carry neither."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    registry = host.nodes.NODE_CLASS_MAPPINGS
    for node in load(path)["nodes"]:
        properties, kind = node["properties"], node["type"]
        if kind in VIRTUAL_NODES:
            assert "cnr_id" not in properties, kind
        elif getattr(registry[kind], "RELATIVE_PYTHON_MODULE", "nodes").startswith("custom_nodes."):
            assert (properties.get("cnr_id"), properties.get("ver")) == (project["name"], project["version"]), kind
        else:
            assert properties.get("cnr_id") == "comfy-core" and re.fullmatch(r"\d+\.\d+\.\d+", properties.get("ver", "")), kind


MODEL_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "PVALoadFaceRecognizer": "recognizer_file",
                 "CLIPVisionLoader": "clip_name"}  # loaders of files one downloads (the others load what the pack made)


def readme_models() -> dict[str, dict]:
    """The README's Models table: each file's name -> its row (folder, what, source, size, licence, used by)."""
    section = (ROOT / "README.md").read_text().split("\n## Models\n")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        for path in re.findall(r"`([^`]+)`", cells[0]):
            folder, name = path.split("/")
            rows[name] = dict(zip(("folder", "what", "source", "size", "licence", "used_by"), [folder, *cells[1:]]))
    return rows


def plain(markdown: str) -> str:
    """Markdown cell text as a Note writes it: links by their text, no emphasis."""
    return re.sub(r"\[([^]]+)\]\([^)]+\)", r"\1", markdown).replace("**", "")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_model_a_workflow_loads_is_named_with_its_source(host, path):
    """Each downloaded model a loader picks is in the README's Models table, and the workflow's first Note names it
    with its folder, size, where the official copy is and its licence, as the table does."""
    workflow, models = load(path), readme_models()
    notes = sorted((n for n in workflow["nodes"] if n["type"] == "Note"), key=lambda n: (n["pos"][1], n["pos"][0]))
    first = notes[0]["widgets_values"][0]
    loaders = [n for n in workflow["nodes"] if n["type"] in MODEL_LOADERS]
    assert loaders, "every workflow loads a checkpoint"
    api = to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    for node in loaders:
        file = api[str(node["id"])]["inputs"][MODEL_LOADERS[node["type"]]]
        assert file in models, f"{file} is not in the README's Models table"
        row = models[file]
        source = re.search(r"\[([^]]+)\]", row["source"])[1]  # the official copy's name (its link's text)
        licence = re.split(r"[:(]", plain(row["licence"]))[0].strip()
        for wanted in (f"{row['folder']}/{file}", row["size"], source, licence):
            assert wanted in first, f"{path.stem}'s first Note does not say {wanted!r} of {file}"


def test_the_registry_lists_the_models_one_downloads_directly():
    """pyproject's [tool.comfy] Models: exactly the README's Hugging Face files, each from the repository it names."""
    models = readme_models()
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["Models"]
    hub = {name: row for name, row in models.items() if "huggingface.co/" in row["source"]}
    assert {entry["location"] for entry in listed} == {f"/{row['folder']}/{name}" for name, row in hub.items()}
    for entry in listed:
        row = hub[entry["location"].rsplit("/", 1)[1]]
        repository = re.search(r"huggingface\.co/([^)]+)\)", row["source"])[1]
        assert entry["model_url"].startswith(f"https://huggingface.co/{repository}/resolve/main/"), entry


@pytest.mark.parametrize("node, kind", [("PVALoadFaceRecognizer", "face_recognizers"),
                                        ("PVAClipVisionFeatures", "clip_vision")])
def test_help_pages_name_the_models_the_readme_names(node, kind):
    page = (ROOT / "web" / "docs" / f"{node}.md").read_text()
    files = [name for name, row in readme_models().items() if row["folder"] == kind]
    assert files and all(name in page for name in files), (node, files)


def small(prompt, mask_image=None):
    """The user's files swapped for the suite's, sizes and step counts made small."""
    on_sdxl = any("_xl_" in str(node["inputs"].get("ckpt_name", "")) for node in prompt.values())
    for node in prompt.values():
        inputs = node["inputs"]
        for name, value in USER_FILES.items():
            if name in inputs and isinstance(inputs[name], str):
                inpainting = name == "ckpt_name" and "inpainting" in inputs[name]
                sdxl = name == "ckpt_name" and "_xl_" in inputs[name]
                inputs[name] = (mask_image if name == "image" and mask_image else
                                "tiny_inpaint.safetensors" if inpainting else
                                "tiny_sdxl.safetensors" if sdxl else value)
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs.update(steps=2)
        if node["class_type"] in ("SefiTrainIdentity", "PVAFineTuneIdentity"):
            inputs.update(steps=2, resolution=64, overwrite=True)
        if node["class_type"] == "SefiTrainIdentity" and on_sdxl:
            inputs.update(kv_pairs="1", preview_every=0)  # fewer encodes through SDXL's 32-layer bigG on the CPU
        if node["class_type"] == "PVATrainEncoder":
            inputs.update(steps=1, resolution=64, batch_size=1, accumulation=1, timesteps_per_sample=1, resume=False,
                          name=f"workflow_encoder_{uuid.uuid4().hex[:8]}")
        if node["class_type"] == "SefiAttentionMapPreview":
            inputs.update(layers="all layers")  # the tiny model has no 1/2-latent layers
    return prompt


def make_identities(host):
    """The files the workflows pick that the pack makes (identities), a CLIP vision name and a dataset folder."""
    g = torch.Generator().manual_seed(0)
    for name, trigger in (("my_identity", "sks"), ("friend", "zwx")):
        path = host.identity_dir / f"{name}.safetensors"
        if not path.exists():
            save_identity(Identity(torch.randn(5, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g) * 0.02,
                                   trigger), path)
    if not (host.pva_identity_dir / "my_pva_identity.safetensors").exists():
        write_pva_identity(host, "my_pva_identity.safetensors")
    clip_vision = Path(host.folder_paths.get_folder_paths("clip_vision")[0]) / USER_FILES["clip_name"]
    clip_vision.parent.mkdir(parents=True, exist_ok=True)
    clip_vision.write_bytes(b"")  # a name for the picker: workflow 8's CLIP vision nodes are left unconnected
    write_dataset(host)  # input/pva_dataset, the folder workflow 8 trains on


def face_mask_image(host) -> str:
    """astronaut.png at 128 px (the inpainting graphs sample and decode at the photo's size) with the face made
    transparent: LoadImage turns transparency into the mask."""
    rgba = np.array(Image.open(host.input_dir / "astronaut.png").convert("RGBA").resize((128, 128)))
    rgba[15:58, 37:83, 3] = 0
    Image.fromarray(rgba).save(host.input_dir / "astronaut_face_masked.png")
    return "astronaut_face_masked.png"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end(host, path, pva_files):
    make_identities(host)
    registry = host.nodes.NODE_CLASS_MAPPINGS
    prompt = small(to_api(load(path), registry), mask_image=face_mask_image(host))
    continued = [n["inputs"] for n in prompt.values() if n["inputs"].get("continue_from", "none").endswith(".safetensors")]
    if continued:  # the identity it continues, trained with its state by workflow 1 (at the same small settings)
        first = small(to_api(load(WORKFLOWS[0]), registry))
        assert host.run(first).success
        assert continued[0]["continue_from"] == f"{continued[0]['name'].removesuffix('_more')}.safetensors"
    result = host.run(prompt)
    assert result.success, result.error or result.node_errors
    images = [i for out in result.outputs.values() for i in out.get("images", [])]
    assert images, "the workflow produced no image"
    if continued:
        assert load_identity(host.identity_dir / f"{continued[0]['name']}.safetensors").training["steps"] == 4


MIN_SCALE = 0.8


def rect(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


def screen_rect(box, view, frontend):
    """Where a graph rectangle is drawn on the page under the saved view."""
    (cx, cy), scale, (ox, oy) = frontend["canvas"], view["scale"], view["offset"]
    x0, y0, x1, y1 = box
    return cx + (x0 + ox) * scale, cy + (y0 + oy) * scale, cx + (x1 + ox) * scale, cy + (y1 + oy) * scale


def margin(box, frontend) -> float:
    """Page pixels between a drawn rectangle and the nearest covered or off-canvas pixel; negative: hidden."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = frontend["visible"]
    gaps = [x0 - left, y0 - top, right - x1, bottom - y1]
    gaps += [max(cx0 - x1, x0 - cx1, cy0 - y1, y0 - cy1) for cx0, cy0, cx1, cy1 in frontend["covered"]]
    return min(gaps)


def view_margins(workflow, view=None) -> dict:
    """(frontend version, node id) -> the node's margin when the workflow opens with `view` (default its saved one)."""
    view = view or workflow["extra"]["ds"]
    return {(version, n["id"]): margin(screen_rect(rect(n), view, frontend), frontend)
            for version, frontend in FRONTENDS.items() for n in workflow["nodes"]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
@pytest.mark.parametrize("version", FRONTENDS)
def test_workflow_opens_ready_to_read(path, version):
    """Every node at least as big as the frontend draws it, none overlapping, the whole graph (Notes first) inside
    the visible canvas of the saved view at 80% or more, every wire running left to right."""
    workflow, frontend = load(path), FRONTENDS[version]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        w, h = frontend["min_size"][node["type"]]
        assert node["size"][0] >= w and node["size"][1] >= h, f"{node['type']} {node['id']} is smaller than drawn"
    boxes = [(n["id"], rect(n)) for n in nodes.values()]
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"
    view = workflow["extra"]["ds"]
    assert view["scale"] >= MIN_SCALE
    for node_id, box in boxes:
        hidden = margin(screen_rect(box, view, frontend), frontend)
        assert hidden >= 0, f"node {node_id} is {-hidden:g} px under a bar or off the canvas in {version}"
    for link_id, source, _, target, *_ in workflow["links"]:
        assert rect(nodes[source])[2] <= rect(nodes[target])[0], f"link {link_id} runs right to left"


@pytest.mark.parametrize("path", WORKFLOWS[1:9], ids=lambda p: p.stem)  # 1 and 10 make their own identity
def test_workflows_with_saved_files_say_which_and_how_to_make_them(host, path):
    """The first Note names every file the workflow's loaders pick and what makes it."""
    workflow = load(path)
    notes = sorted((n for n in workflow["nodes"] if n["type"] == "Note"), key=lambda n: (n["pos"][1], n["pos"][0]))
    first = notes[0]["widgets_values"][0]
    api = to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    loaded = {(key, node["inputs"][key[1]]) for node in api.values() for key in MADE_BY
              if node["class_type"] == key[0] and key[1] in node["inputs"]}
    loaded = {(key, file) for key, file in loaded if not file.startswith("none")}  # continue_from: a new identity
    assert loaded, "workflows 2-9 pick saved files"
    for key, file in loaded:
        assert Path(file).stem in first and MADE_BY[key] in first, (key, file)


def test_no_picture_is_stale(host):
    """Every picture make_pictures.py takes (README, help pages, thumbnails) is recorded with a digest of the workflow
    and the node schemas it shows, and the current nodes and workflows still give that digest: a node that gained an
    input or a workflow that changed makes its pictures stale until `tests/tools/make_pictures.py` takes them again."""
    records = json.loads(pictures.PICTURES.read_text())
    assert sorted(records) == pictures.shipped_pictures(), "a picture without its record, or a record without its picture"
    stale = {path: r["workflow"] for path, r in records.items()
             if r["digest"] != pictures.digest(host.nodes.NODE_CLASS_MAPPINGS, r["workflow"])}
    assert not stale, f"pictures taken from older nodes or workflows; take them again with make_pictures.py: {stale}"
