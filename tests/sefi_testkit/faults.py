"""Run pva_command.py ($SEFI_TEST_COMMAND) in a torchrun process with a fault injected or its writes recorded.

SEFI_TEST_FAULT="<kind>:<rank>:<call>": on that rank, at that call of torch.distributed.all_reduce (1 = the first
step's gradients), `raise` raises a RuntimeError, `oom` torch's OutOfMemoryError, `kill` sends the process SIGKILL.
SEFI_TEST_WRITES_LOG=<folder>: each process lists in <folder>/rank<N>.txt every path it opened for writing, renamed,
replaced or removed (Python's audit events), so a test can tell which ranks wrote what."""
import os
import runpy
import signal
import sys

import torch
import torch.distributed

RANK = int(os.environ.get("RANK", "0"))


def inject(kind: str, rank: int, call: int) -> None:
    original, calls = torch.distributed.all_reduce, [0]

    def all_reduce(*args, **kwargs):
        calls[0] += 1
        if RANK == rank and calls[0] == call:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise (torch.OutOfMemoryError if kind == "oom" else RuntimeError)(f"injected {kind} on rank {rank}")
        return original(*args, **kwargs)

    torch.distributed.all_reduce = all_reduce


def record_writes(folder: str) -> None:
    log = open(os.path.join(folder, f"rank{RANK}.txt"), "w", buffering=1)

    def hook(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                log.write(f"open {args[0]}\n")
        elif event == "os.rename":  # os.replace's event too
            log.write(f"{event} {args[0]} -> {args[1]}\n")
        elif event in ("os.remove", "os.mkdir"):  # os.unlink's event is os.remove
            log.write(f"{event} {args[0]}\n")

    sys.addaudithook(hook)


fault = os.environ.get("SEFI_TEST_FAULT", "")
if fault:
    kind, rank, call = fault.split(":")
    inject(kind, int(rank), int(call))
if os.environ.get("SEFI_TEST_WRITES_LOG"):
    record_writes(os.environ["SEFI_TEST_WRITES_LOG"])
sys.argv[0] = os.environ["SEFI_TEST_COMMAND"]
runpy.run_path(sys.argv[0], run_name="__main__")
