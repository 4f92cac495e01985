"""Data parallelism's two pieces (sefi_core/pva/distributed.py): how a step's samples are shared out over the ranks,
and the gradients' sum, here over 2 real processes (torchrun, gloo) against the sum computed independently."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from sefi_core.pva.distributed import World, sum_gradients
from sefi_testkit.pack import REPO_ROOT


def test_each_rank_takes_a_contiguous_share_and_uneven_steps_are_refused_with_what_to_do():
    assert [list(World(rank, 2).share(4)) for rank in (0, 1)] == [[0, 1], [2, 3]]
    assert list(World().share(3)) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"3 samples do not split evenly over 2 processes.*multiple of 2"):
        World(1, 2).share(3)
    assert World(0, 4).writes and not World(3, 4).writes


def test_on_one_process_nothing_is_sent_and_the_gradients_stay():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    loss = torch.tensor(0.5)
    assert sum_gradients(World(), [p], loss) == 0
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and float(loss) == 0.5


SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from sefi_testkit import pack
    pack.prepare()
    import torch
    torch.distributed.init_process_group("gloo")
    from sefi_core.pva.distributed import World, sum_gradients
    world = World.of_process_group()
    g = torch.Generator().manual_seed(world.rank)
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]
    for p in params[:2]:  # the third gets no gradient on this rank: it counts as zeros
        p.grad = torch.randn(p.shape, generator=g)
    if world.rank == 1:
        params[2].grad = torch.tensor([3.0])
    mine = [None if p.grad is None else p.grad.tolist() for p in params]
    loss = torch.tensor(float(world.rank + 1))
    sent = sum_gradients(world, params, loss)
    out = {{"mine": mine, "summed": [p.grad.tolist() for p in params], "loss": float(loss), "sent": sent,
           "world": [world.rank, world.size]}}
    with open(os.path.join({folder!r}, f"rank{{world.rank}}.json"), "w") as f:
        json.dump(out, f)
""")


def test_two_processes_sum_every_gradient_and_the_loss_in_one_all_reduce(tmp_path):
    script = tmp_path / "sum.py"
    script.write_text(SCRIPT.format(tests=str(REPO_ROOT / "tests"), folder=str(tmp_path)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]
    for index in range(3):
        grads = [torch.tensor(r["mine"][index]) if r["mine"][index] is not None else None for r in ranks]
        like = next(g for g in grads if g is not None)
        expected = sum(g if g is not None else torch.zeros_like(like) for g in grads)
        for r in ranks:
            assert torch.allclose(torch.tensor(r["summed"][index]), expected, atol=1e-6)
    assert all(r["loss"] == 3.0 for r in ranks)
    assert all(r["sent"] == (6 + 4 + 1 + 1) * 4 for r in ranks)  # the gradients and the loss, fp32
