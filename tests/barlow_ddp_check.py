"""Worker for tests/test_barlow.py, launched by torchrun with 2 processes (gloo, CPU).

Each rank takes its half of a fixed global batch and runs it through barlow.py's own code: the
BarlowTwins forward (one DDP call, one pass per view) and barlow_twins_loss, whose batch
statistics and cross-correlation are summed over ranks by all_reduce_with_grad. The network in
front of the loss has no BatchNorm: SyncBatchNorm does not run on CPU, and a per-process BN
would make the two computations differ for a reason other than the loss. Rank 0 saves the loss
terms of both ranks and the DDP-averaged gradient of every parameter, for the test to compare
with one process on the whole batch.

Two controls run the same step with broken sums, keeping the forward values:
- `c_plain`: the official code's arrangement, an all-reduce of C invisible to autograd while the
  batch statistics keep correct gradients (as SyncBN's backward gives them): the gradients must
  be exactly 1/world of the correct ones, the bug a peer library shipped;
- `all_plain`: every sum invisible to autograd: the gradients must be wrong as well.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import barlow
from common.model import distribute
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)

GLOBAL_BATCH, IN_DIM, FEATURES, DIM, LAMBD = 16, 12, 24, 10, 0.05


class Tiny(barlow.BarlowTwins):
    """barlow.BarlowTwins (its forward: one pass per view) around a network without BN."""

    def __init__(self):
        nn.Module.__init__(self)
        self.backbone = nn.Sequential(nn.Linear(IN_DIM, FEATURES), nn.ReLU())
        self.projector = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(),
                                       nn.Linear(32, DIM, bias=False))


def make_model():
    torch.manual_seed(0)
    return Tiny()


def make_batch():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)
    return x1, 0.5 * x1 + torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)  # correlated views


def step(model, x1, x2):
    """Loss terms [3] and gradients of one step, as barlow.py takes it."""
    model.zero_grad()
    loss, on_diag, off_diag = barlow.barlow_twins_loss(*model(x1, x2), LAMBD)
    loss.backward()
    grads = {k.removeprefix("module."): p.grad.clone() for k, p in model.named_parameters()}
    return torch.stack([loss, on_diag, off_diag]).detach(), grads


def plain_all_reduce(x):
    """The sum over ranks in the forward, but a backward that passes the local gradient only:
    what an in-place dist.all_reduce gives."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x).detach()


def main(out):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    x1, x2 = make_batch()
    n = GLOBAL_BATCH // world
    mine = slice(rank * n, (rank + 1) * n)
    model = distribute(make_model(), device, world)
    terms, grads = step(model, x1[mine], x2[mine])
    all_terms = all_gather_tensor(terms[None])                    # [world, 3]

    correct = barlow.all_reduce_with_grad
    barlow.all_reduce_with_grad = lambda x: plain_all_reduce(x) if x.dim() == 2 else correct(x)
    c_terms, c_plain = step(model, x1[mine], x2[mine])            # only C's sum is broken
    barlow.all_reduce_with_grad = plain_all_reduce
    a_terms, all_plain = step(model, x1[mine], x2[mine])          # every sum is broken
    barlow.all_reduce_with_grad = correct
    if rank == 0:
        torch.save({"world": world, "terms": all_terms, "grads": grads, "c_plain": c_plain,
                    "all_plain": all_plain, "control_terms": torch.stack([c_terms, a_terms])}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
