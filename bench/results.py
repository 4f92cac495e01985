"""Where a benchmark's figures go, so every figure in the README can be traced to a run: each benchmark writes
bench/results/<benchmark>-<device>.json (the machine, the host's version, the pack's commit, the command, its settings,
the raw figures and the README rows they make), committed with the README table that bench/report.py writes from
those files. A later run on the same kind of device replaces the file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    version_file = Path(os.environ.get("COMFYUI_PATH", "")) / "comfyui_version.py"  # the host it ran against
    found = re.search(r'__version__ = "([^"]+)"', version_file.read_text()) if version_file.is_file() else None
    comfyui = found[1] if found else "unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"device": device_name(), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "comfyui": comfyui, "pack_commit": commit.stdout.strip() or "unknown"}


def save(benchmark: str, settings: dict, figures: dict, rows: list[tuple[str, str]]) -> Path:
    """Write one run's results; `rows` are the README table's (what, result) lines they back."""
    slug = re.sub(r"[^a-z0-9]+", "-", ("cuda " + device_name() if torch.cuda.is_available() else "cpu").lower())
    path = RESULTS / f"{benchmark}-{slug.strip('-')}.json"
    record = {"benchmark": benchmark, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
              "machine": machine(), "settings": settings, "figures": figures,
              "rows": [{"what": what, "result": result} for what, result in rows]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results written to {path.relative_to(ROOT)}; `python bench/report.py` puts them in the README")
    return path
