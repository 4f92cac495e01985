"""The pack's layout, read from the code's own imports, so that it cannot erode:
- sefi_core/ is plain torch: it imports nothing from ComfyUI, and nothing from nodes/;
- in nodes/ and sefi_core/ alike, `sefi/` is SeFi-IDE's wing and `pva/` PVA's: the wings never import each other;
- the top level of each (the shared floor) imports neither wing; only the pack's own __init__.py, which registers
  the nodes, imports both."""
import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                "execution", "node_helpers", "latent_preview"}
TOPS, WINGS = ("nodes", "sefi_core"), ("sefi", "pva")


def pack_modules() -> dict[str, Path]:
    """Every module of nodes/ and sefi_core/ by its dotted name in the pack ("nodes.sefi.patches"), and the pack's own
    __init__.py as ""."""
    modules = {"": REPO_ROOT / "__init__.py"}
    for top in TOPS:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(name: str, source: str, known: set[str]) -> list[tuple[str, bool, int]]:
    """(what is imported, whether it is inside the pack, line) for a module's source: relative imports resolved to
    pack modules (`from .. import pva` to "nodes.pva"), absolute ones by their top-level name."""
    package = name.split(".") if name == "" or name in PACKAGES else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], False, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module.split(".")[0], False, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append((sub if sub in known else target, True, node.lineno))
    return found


MODULES = pack_modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def wing(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] in TOPS and parts[1] in WINGS else None


def layout_problems(name: str, source: str) -> list[str]:
    problems = []
    for target, inside, line in imports(name, source, set(MODULES)):
        where = f"{name or '__init__'}:{line} imports {target}"
        if name.startswith("sefi_core") and not inside and target in HOST_MODULES:
            problems.append(f"{where}: sefi_core is host-free")
        if name.startswith("sefi_core") and inside and target.split(".")[0] == "nodes":
            problems.append(f"{where}: sefi_core never imports nodes/")
        if inside and wing(name) and wing(target) and wing(target) != wing(name):
            problems.append(f"{where}: the {wing(name)} wing imports the {wing(target)} wing")
        if inside and name and wing(name) is None and wing(target):
            problems.append(f"{where}: a shared floor imports the {wing(target)} wing")
    return problems


def test_both_wings_exist_in_nodes_and_in_the_core():
    for top in TOPS:
        for name in WINGS:
            assert f"{top}.{name}" in PACKAGES and any(m.startswith(f"{top}.{name}.") for m in MODULES), (top, name)


def test_the_code_keeps_its_layout():
    problems = [p for name, path in MODULES.items() for p in layout_problems(name, path.read_text())]
    assert problems == []


@pytest.mark.parametrize("module, source, problem", [
    ("nodes.sefi.patches", "from ..pva.patch import VisualIdentity", "the sefi wing imports the pva wing"),
    ("nodes.pva.apply", "from .. import sefi", "the pva wing imports the sefi wing"),
    ("nodes.pva.apply", "from ...sefi_core.sefi.identity import Identity", "the pva wing imports the sefi wing"),
    ("sefi_core.pva.train", "from ..sefi.train import loss_scaler", "the pva wing imports the sefi wing"),
    ("nodes.training", "from .sefi.patches import OPTIONS_KEY", "a shared floor imports the sefi wing"),
    ("sefi_core.files", "import folder_paths", "sefi_core is host-free"),
    ("sefi_core.sefi.train", "from ...nodes.checks import first", "sefi_core never imports nodes/"),
])
def test_a_planted_import_across_the_layout_is_caught(module, source, problem):
    assert any(problem in p for p in layout_problems(module, source))


def test_the_packs_init_registers_both_wings():
    targets = {target for target, inside, _ in imports("", MODULES[""].read_text(), set(MODULES)) if inside}
    assert {"nodes.sefi", "nodes.pva"} <= targets


def test_no_test_module_imports_another():
    """What several test modules share lives in a conftest file or the test kit (sefi_testkit/)."""
    tests = REPO_ROOT / "tests"
    test_modules = {path.stem for path in tests.rglob("test_*.py")}
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{path.relative_to(tests)} imports {n}" for n in names if n.split(".")[0] in test_modules]
    assert test_modules and offenders == []
