"""Worker for tests/test_vicreg.py, launched by torchrun with 2 processes (gloo, CPU).

Each rank takes its half of a fixed global batch and runs vicreg.py's model-side code (the
forward of vicreg.VICReg: one pass per view in a single DDP call) on a small network without
BatchNorm, wrapped by common.distribute (DDP), then vicreg.vicreg_loss, which gathers the
embeddings through common.dist.gather_with_grad. BatchNorm is left out because SyncBatchNorm does not
exist on CPU: per-process BN statistics would make the comparison with one process inexact.
Rank 0 saves every rank's loss and terms and the DDP-averaged gradients. Two controls save the
gradients obtained with a broken gather: common.all_gather_tensor (no gradient at all through
the gathered batch) and a gather whose gradient reaches only this rank's own slice without the
sum over ranks (the bug of a peer library); the test checks that both DIFFER from one process.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from common.model import distribute
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)
import vicreg

GLOBAL_BATCH, COEFFS = 8, (25.0, 25.0, 1.0)


class Tiny(nn.Module):
    """A backbone and an expander without BatchNorm; forward is VICReg's own."""

    forward = vicreg.VICReg.forward

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(12, 32), nn.ReLU())
        self.expander = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16, bias=False))


def make_model():
    torch.manual_seed(0)
    return Tiny()


def make_batch(n=GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1)
    # scaled so that some embedding dimensions have a std below 1 (active hinge) and some above
    return 20 * torch.randn(n, 12, generator=g), 20 * torch.randn(n, 12, generator=g)


def grads_and_loss(model, x1, x2):
    """One forward and backward as vicreg.py's loop takes them. Returns the loss and its three
    terms [4] and the gradient of every parameter (names without DDP's `module.`)."""
    model.zero_grad()
    z1, z2 = model(x1, x2)
    loss, *terms = vicreg.vicreg_loss(z1.float(), z2.float(), *COEFFS)
    loss.backward()
    grads = {k.removeprefix("module."): p.grad.clone() for k, p in model.named_parameters()}
    return torch.stack([loss, *terms]).detach(), grads


def own_slice_gather(z):
    """A gather whose gradient reaches this rank's own slice only, not summed over ranks."""
    parts = list(all_gather_tensor(z).chunk(dist.get_world_size()))
    parts[get_rank()] = z
    return torch.cat(parts)


def main(out):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    x1, x2 = make_batch()
    n = x1.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    model = distribute(make_model(), device, world)
    values, grads = grads_and_loss(model, x1[mine], x2[mine])
    values = all_gather_tensor(values[None])                       # [world, 4]

    broken = {}
    for name, gather in (("no_grad", all_gather_tensor), ("own_slice", own_slice_gather)):
        vicreg.gather_with_grad = gather
        broken[name] = grads_and_loss(model, x1[mine], x2[mine])[1]
    if rank == 0:
        torch.save({"world": world, "values": values, "grads": grads, "broken": broken}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
