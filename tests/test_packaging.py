"""What the Comfy Registry and ComfyUI Manager read: pyproject.toml through the host's own copy of comfy-cli's parser
(comfy_config), the checks `comfy node publish` makes, and what the published zip leaves out."""
import re
import subprocess
from pathlib import Path

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
