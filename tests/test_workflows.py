"""The shipped workflows: they load against the real host's registry (types exist, links type-check, widget values
are valid) and their API form runs end to end on the suite's small checkpoint."""
import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sefi_core.identity import Identity, save_identity
from sefi_testkit.workflow_format import VIRTUAL_NODES, combo_errors, link_type_errors, to_api

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
USER_FILES = {"ckpt_name": "tiny.safetensors", "image": "astronaut.png"}  # the user's own files, picked in the UI


def load(path):
    return json.loads(path.read_text())


def test_all_five_workflows_ship():
    assert [p.stem for p in WORKFLOWS] == ["1_train_and_generate", "2_saved_identity_prompts", "3_two_identities",
                                          "4_face_inpainting", "5_attention_preview"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_against_the_host_registry(host, path):
    workflow, registry = load(path), host.nodes.NODE_CLASS_MAPPINGS
    types = {n["type"] for n in workflow["nodes"]}
    assert types - VIRTUAL_NODES <= set(registry), f"unknown node types {types - VIRTUAL_NODES - set(registry)}"
    assert "Note" in types, "every workflow explains its steps in Note nodes"
    assert link_type_errors(workflow, registry) == []
    assert combo_errors(to_api(workflow, registry), registry) == []
    prompt = small(to_api(workflow, registry))
    make_identities(host)
    host.checkpoint("tiny")
    ok, error, _, node_errors = asyncio.run(host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert ok, (error, node_errors)


def small(prompt, mask_image=None):
    """The user's files swapped for the suite's, sizes and step counts made small."""
    for node in prompt.values():
        inputs = node["inputs"]
        for name, value in USER_FILES.items():
            if name in inputs and isinstance(inputs[name], str):
                inputs[name] = mask_image if name == "image" and mask_image else value
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inputs.update(steps=2)
        if node["class_type"] == "SefiTrainIdentity":
            inputs.update(steps=2, resolution=64, overwrite=True)
        if node["class_type"] == "SefiAttentionMapPreview":
            inputs.update(layers="all layers")  # the tiny model has no 1/2-latent layers
    return prompt


def make_identities(host):
    g = torch.Generator().manual_seed(0)
    for name, trigger in (("my_identity", "sks"), ("friend", "zwx")):
        path = host.identity_dir / f"{name}.safetensors"
        if not path.exists():
            save_identity(Identity(torch.randn(5, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g) * 0.02,
                                   trigger), path)


def face_mask_image(host) -> str:
    """astronaut.png with the face made transparent: LoadImage turns transparency into the mask."""
    rgba = np.array(Image.open(host.input_dir / "astronaut.png").convert("RGBA"))
    rgba[60:230, 150:330, 3] = 0
    Image.fromarray(rgba).save(host.input_dir / "astronaut_face_masked.png")
    return "astronaut_face_masked.png"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end(host, path):
    make_identities(host)
    prompt = small(to_api(load(path), host.nodes.NODE_CLASS_MAPPINGS), mask_image=face_mask_image(host))
    result = host.run(prompt)
    assert result.success, result.error or result.node_errors
    images = [i for out in result.outputs.values() for i in out.get("images", [])]
    assert images, "the workflow produced no image"


# Smallest sizes the frontend (1.27.10) draws these nodes at (LGraphNode.computeSize, measured in headless Chromium
# with tests/sefi_testkit/frontend.py); a saved size below it would be enlarged, and could then overlap a neighbour.
MIN_SIZE = {"CheckpointLoaderSimple": (210, 98), "LoadImage": (215, 102), "SefiTrainIdentity": (228, 382),
            "SefiApplyStageTokens": (210, 170), "CLIPTextEncode": (211, 88), "EmptyLatentImage": (210, 106),
            "KSampler": (210, 262), "VAEDecode": (140, 46), "SaveImage": (210, 58), "SefiLoadIdentity": (210, 78),
            "VAEEncodeForInpaint": (213, 98), "SefiAttentionMapPreview": (213, 264), "Note": (210, 88)}
TITLE = 30  # the title bar is drawn above a node's position
CANVAS = (1856, 870)  # the canvas of a maximised browser on a 1920x1080 screen, below ComfyUI's menu bar


def rect(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, x + w, y + h


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_ready_to_read(path):
    """Every node at least as big as the frontend draws it, none overlapping, the whole graph (Notes first) inside
    the saved view at 80% or more, every wire running left to right."""
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        w, h = MIN_SIZE[node["type"]]
        assert node["size"][0] >= w and node["size"][1] >= h, f"{node['type']} {node['id']} is smaller than drawn"
    boxes = [(n["id"], rect(n)) for n in nodes.values()]
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"
    view = workflow["extra"]["ds"]
    assert view["scale"] >= 0.8
    left, top = -view["offset"][0], -view["offset"][1]
    right, bottom = left + CANVAS[0] / view["scale"], top + CANVAS[1] / view["scale"]
    for node_id, (x0, y0, x1, y1) in boxes:
        assert left <= x0 and x1 <= right and top <= y0 and y1 <= bottom, f"node {node_id} is outside the saved view"
    for link_id, source, _, target, *_ in workflow["links"]:
        assert rect(nodes[source])[2] <= rect(nodes[target])[0], f"link {link_id} runs right to left"


@pytest.mark.parametrize("path", WORKFLOWS[1:], ids=lambda p: p.stem)
def test_workflows_with_saved_identities_say_which_files_and_how_to_make_them(path):
    notes = sorted((n for n in load(path)["nodes"] if n["type"] == "Note"), key=lambda n: (n["pos"][1], n["pos"][0]))
    files = {n["widgets_values"][0] for n in load(path)["nodes"] if n["type"] == "SefiLoadIdentity"}
    first = notes[0]["widgets_values"][0]
    assert all(f in first for f in files) and "workflow 1_train_and_generate" in first
