"""What the Comfy Registry and ComfyUI Manager read: pyproject.toml through the host's own copy of comfy-cli's parser
(comfy_config), the checks `comfy node publish` makes, and what the published zip leaves out."""
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
VERSION_SPEC = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?$")  # comfy-cli's rule


def test_pyproject_passes_the_registrys_checks(host):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO_ROOT))
    project, comfy = config.project, config.tool_comfy
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,99}", project.name) and "comfyui" not in project.name.lower()
    assert SEMVER.match(project.version)
    assert project.license.file and (REPO_ROOT / project.license.file).is_file()
    assert project.urls.repository.startswith("https://github.com/") and project.urls.issues.startswith("https://")
    assert comfy.publisher_id and comfy.display_name
    assert comfy.models and all(m.location.startswith("/") and m.model_url.startswith("https://") for m in comfy.models)
    assert all(VERSION_SPEC.match(part.strip()) for part in project.supported_comfyui_version.split(","))
    assert project.supported_os == ["OS Independent"] and project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    requirements = (REPO_ROOT / "requirements.txt").read_text().split()
    assert sorted(project.dependencies) == sorted(requirements)  # the Manager installs requirements.txt


def test_readme_installs_from_the_repository_in_pyproject():
    repository = re.search(r'^Repository = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)[1]
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"git clone {repository} sefi-ide" in readme and repository in readme.split("## Install")[1]
    assert "<this repository>" not in readme


def test_the_published_zip_leaves_out_tests_benchmarks_and_ci():
    ignored = (REPO_ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".ci/"} <= set(ignored)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    shipped = [f for f in tracked if not any(f.startswith(prefix) for prefix in ignored)]
    assert "web/docs/SefiTrainIdentity.md" in shipped and "workflows/1_train_and_generate.jpg" in shipped
    assert not [f for f in shipped if f.endswith((".safetensors", ".ckpt"))]


def oldest_host_ci_runs() -> str:
    """The oldest ComfyUI version .ci/run proves (its required_hosts)."""
    hosts = re.search(r"^required_hosts=\(([^)]*)\)", (REPO_ROOT / ".ci" / "run").read_text(), re.M)[1].split()
    return min(hosts, key=lambda v: tuple(int(part) for part in v.split(".")))


def test_the_registry_offers_the_pack_only_to_hosts_ci_runs_it_on():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == f">={oldest_host_ci_runs()}"
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"v{oldest_host_ci_runs()} (the oldest supported)" in readme


def test_the_registry_shows_both_systems_and_an_icon_from_this_repository():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    comfy, project = pyproject["tool"]["comfy"], pyproject["project"]
    assert all(word in text for text in (comfy["DisplayName"], project["description"]) for word in ("SeFi", "PVA"))
    raw = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(raw)
    icon = REPO_ROOT / comfy["Icon"][len(raw):]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(icon)], cwd=REPO_ROOT, capture_output=True)
    assert tracked.returncode == 0, f"{icon.name} is not committed"
    with Image.open(icon) as image:
        assert image.format == "PNG" and image.width == image.height >= 128


def test_a_version_tag_publishes_exactly_pyprojects_version_to_the_registry():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads a bare `on` as true
    assert triggers == {"push": {"tags": ["v*"]}}
    steps = workflow["jobs"]["publish"]["steps"]
    publish = [s for s in steps if s.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert len(publish) == 1 and publish[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    check = next(s["run"] for s in steps[:steps.index(publish[0])] if "run" in s)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for tag, ok in ((f"v{project['version']}", True), ("v99.0.0", False)):
        result = subprocess.run(["bash", "-c", check], cwd=REPO_ROOT, env={**os.environ, "GITHUB_REF_NAME": tag},
                                capture_output=True, text=True)
        assert (result.returncode == 0) == ok, (tag, result.stderr)
