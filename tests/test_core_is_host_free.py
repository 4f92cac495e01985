"""sefi_core is plain torch: it must not import ComfyUI."""
import ast
from pathlib import Path

HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                "execution", "node_helpers", "latent_preview"}


def test_sefi_core_imports_nothing_from_the_host():
    core = Path(__file__).resolve().parent.parent / "sefi_core"
    offenders = []
    for path in sorted(core.rglob("*.py")):  # sub-packages (pva/) too
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{path.relative_to(core)}: {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert list(core.glob("*.py")) and list(core.glob("pva/*.py")), "sefi_core (or its pva/) has no modules"
    assert offenders == []
