"""What each shipped picture was taken from, so a stale one is noticed: the README's and help pages' pictures
(web/docs/img) and the workflow thumbnails (workflows/*.jpg) are all screenshots of a shipped workflow, or of one of
its nodes or outputs, taken by tests/tools/make_pictures.py. Beside them, PICTURES (tests/data/pictures.json) records
for each picture its workflow and a digest of what it shows: that workflow's file and the schema (inputs, outputs,
names) of every node of this pack in it. tests/host/test_workflows.py recomputes the digests with the host's registry:
a node that gained an input, or a workflow that moved, makes its pictures stale until they are taken again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PICTURES = REPO_ROOT / "tests" / "data" / "pictures.json"
WORKFLOWS = REPO_ROOT / "workflows"


def is_pack_node(registry, node_type: str) -> bool:
    return getattr(registry.get(node_type), "RELATIVE_PYTHON_MODULE", "nodes").startswith("custom_nodes.")


def node_schema(registry, node_type: str) -> dict:
    """What a picture of the node shows: its id, each input's name, kind and default, each output's name and
    type. Not combos' options and defaults (file lists change with the folders; the workflow holds the values shown)
    nor tooltips."""
    cls = registry[node_type]
    inputs = []
    for group, specs in cls.INPUT_TYPES().items():
        if group == "hidden":
            continue
        for name, spec in specs.items():
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 else {}
            inputs.append([group, name, kind, None if kind == "COMBO" else options.get("default")])
    outputs = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    return {"name": node_type, "inputs": inputs, "outputs": [outputs, list(cls.RETURN_TYPES)]}


def digest(registry, workflow_name: str) -> str:
    """The digest of a workflow as shipped and of the schemas of this pack's nodes in it."""
    text = (WORKFLOWS / f"{workflow_name}.json").read_text()
    types = sorted({n["type"] for n in json.loads(text)["nodes"] if is_pack_node(registry, n["type"])})
    schemas = {t: node_schema(registry, t) for t in types}
    return hashlib.sha256((text + json.dumps(schemas, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def record(registry, pictures: dict[str, str]) -> None:
    """Write down what each picture (its path from the repository root -> its workflow) was just taken from, keeping
    the records of pictures not taken this time."""
    records = json.loads(PICTURES.read_text()) if PICTURES.exists() else {}
    for path, workflow_name in pictures.items():
        records[path] = {"workflow": workflow_name, "digest": digest(registry, workflow_name)}
    PICTURES.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")


def shipped_pictures() -> list[str]:
    """Every picture that make_pictures.py takes (the icon is drawn by hand, not taken)."""
    images = [p for p in (REPO_ROOT / "web" / "docs" / "img").iterdir() if p.suffix in (".png", ".jpg")]
    return sorted(str(p.relative_to(REPO_ROOT)) for p in [*images, *WORKFLOWS.glob("*.jpg")])
