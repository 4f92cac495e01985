"""Host tests never pass silently without a host under CI; on a developer's machine they skip, saying why."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_TEST = "tests/host/test_harness.py::test_tiny_checkpoint_gives_finite_conditioning"


def run_pytest(*args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "CI")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO_ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_host_fails_under_ci(ci):
    result = run_pytest(HOST_TEST, "-q", CI=ci)
    assert result.returncode != 0, result.stdout
    assert "Under CI the host tests must run: set COMFYUI_PATH" in result.stdout
    assert "1 error" in result.stdout


def test_missing_host_skips_with_its_reason_elsewhere():
    result = run_pytest(HOST_TEST, "-q", "-rs", CI="false")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout and "COMFYUI_PATH is not set" in result.stdout


def test_host_marker_selects_the_host_free_part():
    result = run_pytest("tests/core/sefi/test_stages.py", HOST_TEST, "-q", "-m", "not host")
    assert result.returncode == 0, result.stdout
    assert "1 deselected" in result.stdout and "skipped" not in result.stdout


@pytest.mark.parametrize("present, missing", [("0.3.64", "0.33.0"), ("0.33.0", "0.3.64")])
def test_ci_run_fails_in_seconds_when_either_host_tarball_is_missing(tmp_path, present, missing):
    """.ci/run proves both supported hosts: with one tarball absent from ../shared/hosts it stops before installing
    anything, naming the missing version."""
    (tmp_path / "repo" / ".ci").mkdir(parents=True)
    (tmp_path / "repo" / ".ci" / "run").write_text((REPO_ROOT / ".ci" / "run").read_text())
    (tmp_path / "shared" / "hosts").mkdir(parents=True)
    (tmp_path / "shared" / "hosts" / f"comfyui-{present}-0123abcd.tar.gz").write_bytes(b"")
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run(["bash", str(tmp_path / "repo" / ".ci" / "run")], env={**environ, "CI": "true"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"CI: no ComfyUI v{missing} host." in result.stderr
    assert not any(tmp_path.glob("sefi-ci.*")) and "pip" not in result.stdout
