"""Worker for tests/test_ddp.py, launched by torchrun with 2 processes (gloo, CPU).

Each rank takes its half of a fixed global batch, runs a small projector wrapped by
common.distribute (DDP) and simclr.nt_xent_loss (which gathers embeddings through
common.gather_with_grad), and rank 0 saves the rank-averaged loss and the DDP-averaged gradients.
With a second argument C > 2 (`ddp_check.py OUT 3`), the batch holds C crops per image and the
loss is simclr.multi_crop_nt_xent_loss (tests/test_simclr_multicrop.py).
As a control, it also saves the gradients obtained when the gather drops gradients (a plain
all_gather): the test checks those DIFFER, so it can tell a broken gather from a correct one.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from common.model import distribute
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)
import simclr


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 8))


def make_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randn(n, 12, generator=g)


def grads_and_loss(model, x1, x2, temperature=0.5):
    model.zero_grad()
    z = model(torch.cat([x1, x2]))
    loss = simclr.nt_xent_loss(*z.chunk(2), temperature)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def make_crops(num_crops, n=8):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, 12, generator=g) for _ in range(num_crops)]


def multi_crop_grads_and_loss(model, *crops, temperature=0.5):
    model.zero_grad()
    z = model(torch.cat(crops))                                  # crop-major
    loss = simclr.multi_crop_nt_xent_loss(z, len(crops), temperature)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def main(out, num_crops=2):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    crops = make_batch() if num_crops == 2 else make_crops(num_crops)
    step = grads_and_loss if num_crops == 2 else multi_crop_grads_and_loss
    n = crops[0].shape[0] // world
    mine = [x[rank * n:(rank + 1) * n] for x in crops]
    model = distribute(make_model(), device, world)
    loss, grads = step(model, *mine)
    loss = all_gather_tensor(loss[None]).mean()

    # Control: the same step with a gather that does not carry gradients back to other ranks.
    simclr.gather_with_grad = all_gather_tensor
    _, broken = step(model, *mine)
    if rank == 0:
        torch.save({"loss": loss, "grads": {k.removeprefix("module."): v for k, v in grads.items()},
                    "broken": {k.removeprefix("module."): v for k, v in broken.items()},
                    "world": world}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
