"""The pack's code as the suite and the benchmarks reach it outside the host: `sefi_core` importable on its own, and
the repository root kept off sys.path (`python -m pytest` puts the working directory there; from the repository root
that would make the pack's `nodes/` package shadow ComfyUI's `nodes` module). Inside the host, the loaded pack's own
modules come from `Host.module(name)`."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def keep_repo_root_off_path() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]


def register_core() -> None:
    """Make `import sefi_core` load the repository's sefi_core/ (with its sefi/ and pva/ wings)."""
    if "sefi_core" in sys.modules:
        return
    package_dir = REPO_ROOT / "sefi_core"
    spec = importlib.util.spec_from_file_location(
        "sefi_core", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sefi_core"] = module
    spec.loader.exec_module(module)


def prepare() -> None:
    keep_repo_root_off_path()
    register_core()
