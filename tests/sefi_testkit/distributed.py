"""PVA's encoder training command (pva_command.py train-encoder) run as its users run it: `torchrun` (torch.distributed.run)
starting N processes on the CPU (gloo), against the real host at $COMFYUI_PATH, its model folders those of the test
host (an extra_model_paths.yaml), so that the test reads what the run wrote with the pack's own loaders.

`faults.py` beside this file is what the processes run instead of the command when a test injects a fault or records
every file a process writes: it wraps the command and nothing else."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .pack import REPO_ROOT

COMMAND = REPO_ROOT / "pva_command.py"
FAULTS = Path(__file__).with_name("faults.py")


@dataclass
class Launch:
    returncode: int
    output: str  # stdout and stderr of torchrun and every process


def model_paths_config(host, folder: Path) -> Path:
    """An extra_model_paths.yaml giving the command the test host's model folders (written to by default)."""
    folders = {"checkpoints": host.checkpoint_dir, "face_recognizers": host.face_recognizer_dir,
               "pva_encoders": host.pva_encoder_dir, "sefi_training_state": host.train_state_dir,
               "embeddings": host.embedding_dir}
    lines = ["sefi_tests:", f"  base_path: {host.work_dir}", "  is_default: true"]
    lines += [f"  {name}: {path}" for name, path in folders.items()]
    path = folder / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(host, processes: int, args: list[str], config: Path, fault: str = "", writes_log: Path | None = None,
           timeout: int = 600) -> Launch:
    """torchrun --standalone --nproc-per-node `processes` pva_command.py train-encoder `args`. `fault`: "<kind>:<rank>:<call>"
    (faults.py); `writes_log`: a folder where each process lists the files it wrote. A run that outlives `timeout`
    seconds fails the test (subprocess.TimeoutExpired): nothing may hang."""
    env = {**os.environ, "COMFYUI_PATH": str(host.comfy_path), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "SEFI_TEST_FAULT": fault, "SEFI_TEST_WRITES_LOG": str(writes_log or ""), "SEFI_TEST_COMMAND": str(COMMAND)}
    script = FAULTS if (fault or writes_log) else COMMAND
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "--monitor-interval=0.5", str(script), "train-encoder", *args, "--extra-model-paths-config", str(config)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    return Launch(done.returncode, done.stdout)
