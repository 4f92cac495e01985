"""ComfyUI's saved-workflow format (what the frontend saves and loads, version 0.4) <-> the API prompt format
the executor runs, using the host's own node registry for input order and types."""
from __future__ import annotations

from dataclasses import dataclass, field

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(registry, node_type) -> list[tuple[str, str, dict]]:
    """(name, type, options) for every input in the order the frontend lays them out."""
    spec = registry[node_type].INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, value in spec.get(group, {}).items():
            kind = "COMBO" if isinstance(value[0], list) else value[0]
            out.append((name, kind, value[1] if len(value) > 1 else {}))
    return out


def _has_control_widget(name: str, kind: str, options: dict) -> bool:
    """The frontend adds 'control after generate' to INT inputs named seed/noise_seed unless told otherwise."""
    return bool(options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")))


def _extra_widget_values(name: str, kind: str, options: dict) -> list:
    """Values the frontend stores after a widget: 'control after generate', the upload button."""
    return ["fixed"] * _has_control_widget(name, kind, options) + ["image"] * bool(options.get("image_upload"))


def is_widget(kind: str) -> bool:
    return kind in WIDGET_TYPES


def outputs(registry, node_type) -> list[tuple[str, str]]:
    cls = registry[node_type]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return list(zip(names, cls.RETURN_TYPES))


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)  # input name -> value (defaults otherwise)
    # input name -> (source node id, output slot), or (source node id, output slot, [(x, y), ...]): the link runs through
    # the frontend's own reroute points (LiteGraph native reroutes) at those positions. Links from one output that
    # pass the same points share those reroutes, like a bus.
    links: dict = field(default_factory=dict)
    size: tuple[int, int] = (320, 160)
    title: str | None = None


@dataclass
class Note:
    id: int
    pos: tuple[int, int]
    text: str
    size: tuple[int, int] = (360, 180)


def provenance(registry, pack: tuple[str, str], host_version: str):
    """node type -> the properties a frontend writes on save to say where a node comes from: `cnr_id` (the Comfy
    Registry id, which ComfyUI Manager offers to install for missing nodes) and `ver`. `pack`: this pack's (id,
    version); every other node is core's ("comfy-core", the host's version)."""
    def properties(node_type: str) -> dict:
        module = getattr(registry[node_type], "RELATIVE_PYTHON_MODULE", "nodes")
        cnr_id, ver = pack if module.startswith("custom_nodes.") else ("comfy-core", host_version)
        return {"cnr_id": cnr_id, "ver": ver}
    return properties


def build(items: list, registry, view: dict | None = None, properties=lambda node_type: {}) -> dict:
    """A saved workflow from Node and Note descriptions; `view` is the saved canvas view {"scale", "offset"};
    `properties(node_type)`: what each node's properties hold besides its search name (see provenance)."""
    links, link_id, reroutes, extensions = [], 0, {}, []
    nodes = {item.id: _node_json(item, registry, properties) for item in items}
    for item in items:
        if not isinstance(item, Node):
            continue
        target = nodes[item.id]
        for name, (source, slot, *route) in item.links.items():
            link_id += 1
            socket = next(i for i in target["inputs"] if i["name"] == name)
            kind = nodes[source]["outputs"][slot]["type"]
            socket["link"] = link_id
            nodes[source]["outputs"][slot]["links"].append(link_id)
            links.append([link_id, source, slot, item.id, target["inputs"].index(socket), kind])
            parent = None
            for point in (route[0] if route else []):
                key = (source, slot, tuple(point))
                if key not in reroutes:
                    reroutes[key] = {"id": len(reroutes) + 1, "parentId": parent, "pos": list(point), "linkIds": []}
                if reroutes[key]["parentId"] != parent:
                    raise ValueError(f"reroute {point} of output {source}:{slot} is reached from two directions")
                reroutes[key]["linkIds"].append(link_id)
                parent = reroutes[key]["id"]
            if parent is not None:
                extensions.append({"id": link_id, "parentId": parent})
    extra = {"ds": view or {"scale": 0.8, "offset": [0, 0]}}
    if reroutes:
        extra.update(reroutes=[{k: v for k, v in r.items() if v is not None} for r in reroutes.values()],
                     linkExtensions=extensions)
    return {"last_node_id": max(nodes), "last_link_id": link_id, "nodes": list(nodes.values()), "links": links,
            "groups": [], "config": {}, "extra": extra, "version": 0.4}


def _node_json(item, registry, properties) -> dict:
    base = {"id": item.id, "pos": list(item.pos), "size": list(item.size), "flags": {}, "order": item.id, "mode": 0}
    if isinstance(item, Note):
        return {**base, "type": "Note", "properties": {"text": ""}, "widgets_values": [item.text],
                "color": "#432", "bgcolor": "#653"}
    widgets, sockets = [], []
    for name, kind, options in _inputs(registry, item.type):
        if is_widget(kind):
            value = item.widgets[name] if name in item.widgets else options.get("default")
            if value is None:
                raise ValueError(f"{item.type}: no value for widget {name!r}")
            widgets += [value, *_extra_widget_values(name, kind, options)]
        else:
            sockets.append({"name": name, "type": kind, "link": None})
    unknown = set(item.widgets) - {n for n, k, _ in _inputs(registry, item.type) if is_widget(k)}
    if unknown:
        raise ValueError(f"{item.type} has no widget {sorted(unknown)}")
    node = {**base, "type": item.type, "inputs": sockets, "properties": {**properties(item.type), "Node name for S&R": item.type},
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(outputs(registry, item.type))], "widgets_values": widgets}
    if item.title:
        node["title"] = item.title
    return node


def to_api(workflow: dict, registry) -> dict:
    """The executor's prompt for a saved workflow; frontend-only nodes are dropped."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        values, inputs = list(node.get("widgets_values", [])), {}
        sockets = {s["name"]: s for s in node.get("inputs", [])}
        for name, kind, options in _inputs(registry, node["type"]):
            if is_widget(kind):
                inputs[name] = values.pop(0)
                del values[:len(_extra_widget_values(name, kind, options))]
            if name in sockets and sockets[name].get("link") is not None:
                _, source, slot, *_ = links[sockets[name]["link"]]
                inputs[name] = [str(source), slot]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values too many")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


USER_FILE_INPUTS = ("ckpt_name", "image", "identity_file", "pva_identity_file", "recognizer_file", "encoder_file",
                    "clip_name", "continue_from")


def combo_errors(prompt: dict, registry, user_files=USER_FILE_INPUTS) -> list[str]:
    """Combo values not among their options (the user's own file lists excepted): the server does not check
    these for every node schema, so a shifted widget value can slip through validation."""
    errors = []
    for node_id, node in prompt.items():
        for name, kind, options in _inputs(registry, node["class_type"]):
            spec = registry[node["class_type"]].INPUT_TYPES()
            raw = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
            choices = raw if isinstance(raw, list) else options.get("options")
            value = node["inputs"].get(name)
            if kind == "COMBO" and name not in user_files and choices and not isinstance(value, list) and value not in choices:
                errors.append(f"node {node_id} {node['class_type']}.{name} = {value!r} not in {choices}")
    return errors


def link_type_errors(workflow: dict, registry) -> list[str]:
    """Links whose type differs from the source's output type or the target's input type."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    errors = []
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        out_type = outputs(registry, nodes[source]["type"])[slot][1]
        socket = nodes[target]["inputs"][target_slot]
        in_type = dict((n, k) for n, k, _ in _inputs(registry, nodes[target]["type"]))[socket["name"]]
        if not (out_type == kind == in_type):
            errors.append(f"link {link_id}: {nodes[source]['type']}[{slot}] {out_type} -> "
                          f"{nodes[target]['type']}.{socket['name']} {in_type} (says {kind})")
    return errors
