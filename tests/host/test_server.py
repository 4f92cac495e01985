"""What ComfyUI's real server (main.py, the pack installed in custom_nodes as ComfyUI Manager installs it) serves to
the frontend: each node's help page at the address the frontend (1.27) asks for, their pictures, and the
workflows with their template thumbnails."""
import json
import re
from pathlib import Path

import pytest

from sefi_testkit.server import ComfyServer

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES = ["SefiTrainIdentity", "SefiLoadIdentity", "SefiApplyStageTokens", "SefiAttentionMapPreview",
         "PVALoadFaceRecognizer", "PVAClipVisionFeatures", "PVALoadEncoder", "PVATrainEncoder", "PVAFineTuneIdentity",
         "PVALoadIdentity", "PVAApply", "PVAIdentitySimilarity"]
WORKFLOWS = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    with ComfyServer(host.comfy_path, REPO_ROOT, tmp_path_factory.mktemp("comfy_server")) as running:
        yield running


def pack_name(server, node_id):
    """The frontend's rule (extractCustomNodeName): the second part of the node's python_module."""
    module = server.get_json(f"/api/object_info/{node_id}")[node_id]["python_module"]
    parts = module.split(".")
    assert parts[0] == "custom_nodes", module
    return parts[1].split("@")[0]


@pytest.mark.parametrize("node_id", NODES)
def test_each_node_has_a_help_page_where_the_frontend_asks_for_it(server, node_id):
    pack = pack_name(server, node_id)
    status, _, _ = server.get(f"/extensions/{pack}/docs/{node_id}/en.md")  # asked first; none: it falls back
    assert status == 404
    status, _, body = server.get(f"/extensions/{pack}/docs/{node_id}.md")
    assert status == 200
    page = body.decode()
    info = server.get_json(f"/api/object_info/{node_id}")[node_id]
    assert page.startswith(f"# {info['display_name']}\n")
    inputs = [name for group in ("required", "optional") for name in info["input"].get(group, {})]
    missing = [name for name in inputs if f"`{name}`" not in page]
    assert not missing, f"the help page does not explain {missing}"
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert pictures, "every help page shows a picture"
    for src in pictures:  # relative to /extensions/<pack>/docs/, as the frontend resolves them
        status, content_type, _ = server.get(f"/extensions/{pack}/docs/{src}")
        assert status == 200 and content_type.startswith("image/"), (src, status, content_type)


def test_every_node_of_the_pack_is_listed_here_and_tooltips_every_input(server):
    pack = pack_name(server, NODES[0])
    info = server.get_json("/api/object_info")
    ours = {node_id: node for node_id, node in info.items()
            if node["python_module"].split(".")[:1] == ["custom_nodes"]
            and node["python_module"].split(".")[1].split("@")[0] == pack}
    assert sorted(ours) == sorted(NODES)
    untold = [f"{node_id}.{name}" for node_id, node in ours.items() for group in ("required", "optional")
              for name, spec in node["input"].get(group, {}).items()
              if len(spec) < 2 or not (spec[1] or {}).get("tooltip")]
    assert not untold, f"inputs without a tooltip: {untold}"


def test_the_node_search_finds_every_node_by_its_aliases_where_the_host_serves_them(server):
    """The host's node info carries search_aliases where its schema has them (v0.33; core nodes use them); there every
    node of the pack brings words an artist may search for. Older hosts serve none, and the pack loads there all the
    same (the field is left out of its schema)."""
    info = server.get_json("/api/object_info")
    if not any(node.get("search_aliases") for node in info.values()):
        assert not any(info[node_id].get("search_aliases") for node_id in NODES)
        return
    for node_id in NODES:
        aliases = info[node_id].get("search_aliases") or []
        assert len(aliases) >= 3 and all(a == a.lower().strip() and a for a in aliases), (node_id, aliases)
    assert "textual inversion" in info["SefiTrainIdentity"]["search_aliases"]
    assert "inpaint face" in info["PVAApply"]["search_aliases"]


def test_workflows_are_templates_with_thumbnails(server):
    pack = pack_name(server, NODES[0])
    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed[pack]) == WORKFLOWS
    for name in WORKFLOWS:
        status, content_type, body = server.get(f"/api/workflow_templates/{pack}/{name}.jpg")
        assert status == 200 and content_type == "image/jpeg" and len(body) > 2000, name
        status, _, body = server.get(f"/api/workflow_templates/{pack}/{name}.json")
        assert status == 200 and json.loads(body)["nodes"]
