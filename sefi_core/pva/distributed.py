"""Data parallelism for PVA's encoder training over torch.distributed (launched by torchrun; gloo on CPUs, NCCL on
GPUs): every rank holds the whole run (the frozen UNet, the trainables, the optimiser, the step generator) and
computes its share of each step's samples; only the trainables' gradients (and the step's loss) are summed across
ranks before the optimiser step, so every rank takes the same step and no parameter is ever sent.

A step's samples are drawn each from its own generator, seeded from the run's step generator (sefi_core/pva/train.py),
so which rank computes a sample changes nothing but the order of the gradients' sum: N ranks with b samples each end
where one rank with N x b ends, up to fp32 rounding, and a run saved at one world size resumes at another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: rank `rank` of `size` (one process: the default)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def of_process_group(cls) -> "World":
        """The world torch.distributed was initialised with (one process where it was not)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files: rank 0 alone, so that every file has one writer."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's samples of a step of `count` (a contiguous block; count must divide by the world's size)."""
        if count % self.size:
            raise ValueError(f"a step's {count} samples do not split evenly over {self.size} processes: make batch "
                             f"size x accumulation a multiple of {self.size} (e.g. {self.size * max(1, count // self.size)}"
                             f"), or run on a number of processes that divides {count}")
        each = count // self.size
        return range(self.rank * each, (self.rank + 1) * each)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every rank, in place (one process: unchanged)."""
        if self.size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def sum_gradients(world: World, parameters: list[torch.Tensor], loss: torch.Tensor) -> int:
    """Each parameter's gradient and the step's loss (a 0-d tensor) summed over the world, in one all-reduce of one
    flat fp32 buffer; a parameter this rank's samples gave no gradient counts as zeros. Returns the bytes sent in."""
    if world.size == 1:
        return 0
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in parameters]
    flat = torch.cat([*(g.float() for g in grads), loss.reshape(1).float()])
    world.sum(flat)
    offset = 0
    for p in parameters:
        size = p.numel()
        p.grad = flat[offset:offset + size].view_as(p).to(p.dtype)
        offset += size
    loss.copy_(flat[-1])
    return flat.numel() * flat.element_size()
