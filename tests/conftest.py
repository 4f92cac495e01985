"""Shared fixtures. Host-free tests (tests/core) import `sefi_core` directly; host tests (tests/host) use the `host`
fixture, which needs a real ComfyUI checkout named by $COMFYUI_PATH and is skipped without one (under CI it fails)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sefi_testkit.comfy_env import ENV_VAR, find_comfyui
from sefi_testkit.pack import REPO_ROOT, prepare

TESTS_DIR = REPO_ROOT / "tests"


def _share_the_cores() -> None:
    """Under pytest-xdist (the README's `-n 2`), each worker's torch gets its share of the cores: two workers with
    torch's default of one thread per core each would contend for every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


prepare()  # sefi_core importable, the repository root off sys.path (sefi_testkit/pack.py)
_share_the_cores()


class _RepoRootAsPlainDir:
    """The repo root holds the pack's __init__.py, so pytest would collect it as a Package and
    import that __init__.py in setup, which needs the host. Collect it as a plain directory.
    Registered as a plugin because conftest hooks do not apply to the conftest's parent dir."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RepoRootAsPlainDir(), "sefi-repo-root-dir")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_SdxlOnOneWorker(), "sefi-sdxl-on-one-worker")
    config.addinivalue_line("markers", "host: runs against the real ComfyUI at $COMFYUI_PATH")


def _missing_host_reason() -> str:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return f"{ENV_VAR} is not set: host tests need a real ComfyUI checkout (see README)"
    return f"{ENV_VAR}={raw} is not a ComfyUI checkout: host tests need a real ComfyUI checkout (see README)"


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


# The longest test files on 2 CPU cores, longest first. Under pytest-xdist (`-n 2 --dist loadfile`) they are handed
# out first, so that the two workers end together instead of one running the longest file alone at the end.
LONGEST_FILES = ("host/pva/test_train_encoder_command.py", "host/sefi/test_half_precision.py",
                 "host/sefi/test_train_identity.py", "host/pva/test_train_encoder.py", "host/pva/test_fine_tune.py",
                 "host/test_workflows.py", "host/sefi/test_training_matches_apply.py")


def is_sdxl(nodeid: str) -> bool:
    """A test on the tiny SDXL checkpoint (its name or parameters say so)."""
    return "sdxl" in nodeid


def pytest_collection_modifyitems(config, items):
    """Tests that use the host carry the `host` marker: `-m "not host"` runs only the host-free part."""
    for item in items:
        if {"host", "host_clean"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.host)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        rank = {name: k for k, name in enumerate(LONGEST_FILES)}
        key = lambda item: -1 if is_sdxl(item.nodeid) else \
            rank.get(Path(item.path).relative_to(TESTS_DIR).as_posix(), len(LONGEST_FILES))
        items.sort(key=key)  # stable: file order kept otherwise


class _SdxlOnOneWorker:
    """`--dist loadfile`, with every SDXL test in one unit handed out first: a process training on SDXL peaks near
    10 GB (the 32-layer bigG's weights are kept for the backward pass, the 2048-wide mapper has Adam's moments), so
    the two workers must not both do it at once on a 24 GB machine. The unit is the longest, hence first. Registered
    only where pytest-xdist is installed (pytest refuses a hook it does not know)."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        if config.getoption("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadFileScheduling

        class SdxlTogether(LoadFileScheduling):
            def _split_scope(self, nodeid):
                return "sdxl" if is_sdxl(nodeid) else super()._split_scope(nodeid)

        return SdxlTogether(config, log)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The one headless ComfyUI host of this session, with the pack loaded. Checkpoints
    `tiny.safetensors` and `sd1_layout.safetensors` are generated on first use."""
    comfy_path = find_comfyui()
    if comfy_path is None:
        if running_under_ci():  # CI must prove the host tests, not report green without them
            pytest.fail(f"{_missing_host_reason()}. Under CI the host tests must run: set {ENV_VAR} "
                        "(.ci/run unpacks ../shared/hosts/comfyui-*.tar.gz when it is there).", pytrace=False)
        pytest.skip(_missing_host_reason())
    from sefi_testkit.host import Host

    return Host(comfy_path, REPO_ROOT, tmp_path_factory.mktemp("comfy_host"), data_dir=TESTS_DIR / "data")


@pytest.fixture
def host_clean(host):
    """The session host with executor caches, progress, events and interrupts reset around the test."""
    host.reset()
    yield host
    host.reset()
