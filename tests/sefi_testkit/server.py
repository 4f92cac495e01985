"""The real ComfyUI server (its main.py, as an artist starts it) with this pack installed as ComfyUI Manager would
install it: a copy of the repository in custom_nodes/. For tests of what the server serves, and for pictures
taken in the real frontend, and for the GPU check (bench/gpu_check.py), which starts the host as an artist does."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR_NAME = "sefi-ide"  # the folder a git clone of the registry's repository gets
_NOT_INSTALLED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "bench", "*.pyc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`with ComfyServer(comfy_path, repo_root, work_dir) as server:` starts `main.py --cpu` on a free port with
    work_dir as its base directory (models, custom_nodes, input, output, user) and stops it on exit. cpu=False starts
    it as on a GPU machine (the host's defaults there, dynamic VRAM included), `flags` adds command-line flags."""

    def __init__(self, comfy_path: Path, repo_root: Path, work_dir: Path, startup_timeout: float = 180.0,
                 cpu: bool = True, flags: tuple[str, ...] = ()):
        self.comfy_path, self.repo_root, self.work_dir = Path(comfy_path), Path(repo_root), Path(work_dir)
        self.startup_timeout, self.cpu, self.flags = startup_timeout, cpu, tuple(flags)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pack_dir = self.work_dir / "custom_nodes" / PACK_DIR_NAME
        self.log_path = self.work_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        if not self.pack_dir.exists():
            shutil.copytree(self.repo_root, self.pack_dir, ignore=_NOT_INSTALLED)
        for folder in ("models/checkpoints", "input", "output", "user"):
            (self.work_dir / folder).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), *self.flags, "--base-directory",
                   str(self.work_dir), "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                   "--database-url", "sqlite:///:memory:"]
        environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=environment)
        self._wait_until_ready()
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI's server exited ({self.process.returncode}):\n{self.log()}")
            try:
                self.get("/api/object_info/SefiTrainIdentity")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI's server did not answer in {self.startup_timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def get(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET; 4xx/5xx are returned, not raised."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read()

    def post_json(self, path: str, data: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def get_json(self, path: str):
        status, _, body = self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
        return json.loads(body)
