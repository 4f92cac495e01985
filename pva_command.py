"""PVA's commands, run from a ComfyUI install (README: "PVA's encoder on many GPUs", "Measuring identity"):

    torchrun --standalone --nproc-per-node 8 ComfyUI/custom_nodes/sefi-ide/pva_command.py train-encoder \\
        --checkpoint sd-v1-5-inpainting.ckpt --recognizer ms1mv3_arcface_r50.pth --dataset /data/people --name mine
    python ComfyUI/custom_nodes/sefi-ide/pva_command.py evaluate ...

ComfyUI is the folder this pack sits in (ComfyUI/custom_nodes/<pack>), else $COMFYUI_PATH. Each process takes the GPU
torchrun gives it (LOCAL_RANK), or the CPU where there is none (gloo), before the host picks its device; then the
host's extra_model_paths.yaml and any --extra-model-paths-config are read, as ComfyUI's main.py reads them, and the
pack is loaded as ComfyUI loads it. The commands are nodes/pva/<command>_command.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent
HOST_MARKERS = ("main.py", "folder_paths.py", "comfy")
COMMANDS = {"train-encoder": "train_encoder_command", "evaluate": "evaluate_command"}


def find_comfyui() -> Path:
    for candidate in (PACK.parent.parent, os.environ.get("COMFYUI_PATH", "")):
        path = Path(candidate).expanduser().resolve() if str(candidate).strip() else None
        if path is not None and all((path / marker).exists() for marker in HOST_MARKERS):
            return path
    sys.exit(f"{PACK.name}/pva_command.py: ComfyUI not found. Install the pack in ComfyUI/custom_nodes, or set "
             "COMFYUI_PATH to the ComfyUI folder.")


def take_device():
    """This process's device and torch.distributed's process group (torchrun's environment), before the host picks
    its device: the GPU of LOCAL_RANK with NCCL, or the CPU with gloo."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return cuda


def prepare_host(root: Path, cuda: bool, configs: list[str]) -> None:
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = not cuda
    importlib.import_module("utils.extra_config")  # as main.py: first, so that `utils` is ComfyUI's package
    from utils.extra_config import load_extra_path_config

    for config in [str(root / "extra_model_paths.yaml"), *configs]:
        if os.path.isfile(config):
            load_extra_path_config(config)


def load_pack(command: str):
    spec = importlib.util.spec_from_file_location("sefi_ide_pack", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{spec.name}.nodes.pva.{COMMANDS[command]}")


def extra_configs(argv: list[str]) -> list[str]:
    """The --extra-model-paths-config files (the command's parser documents them): read before the pack loads."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--extra-model-paths-config", action="append", default=[])
    return parser.parse_known_args(argv)[0].extra_model_paths_config


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: pva_command.py {{{','.join(COMMANDS)}}} [--help | settings]: train PVA's identity encoder "
                 "(on every process torchrun starts), or measure identity similarity on a dataset's test people")
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank}: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the host's database set-up, not this run's news
    prepare_host(find_comfyui(), take_device(), extra_configs(sys.argv[2:]))
    command = load_pack(sys.argv[1])
    try:
        command.main(sys.argv[2:])
    except BaseException as error:  # named here too: torchrun's summary gives the traceback of the first failure
        if not isinstance(error, SystemExit):
            logging.getLogger("pva_train_encoder").error("rank %s failed: %s: %s", rank, type(error).__name__, error)
        raise


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
