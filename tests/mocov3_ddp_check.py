"""Worker for tests/test_mocov3.py, launched by torchrun with 2 processes (gloo, CPU).

STEPS MoCo v3 steps as mocov3.py takes them (predictions through DDP, momentum update, keys,
mocov3_loss with the keys of both ranks gathered and the labels offset by rank, backward, SGD
step) on a fixed global batch, each rank taking its half, in float64. The network is
mocov3.MoCoV3 on vit_tiny (patch 4, 12 heads, the frozen patch projection; no BatchNorm in the
backbone) with small heads whose BatchNorm layers run in eval mode: CPU processes cannot
synchronise BN (SyncBatchNorm is GPU-only), and with batch statistics each rank would normalise
its own half; with fixed statistics the contrastive loss is the only coupling between samples,
so two processes must compute exactly what one computes on the whole batch.

Rank 0 saves per step both ranks' losses and the DDP-averaged gradients, the final state of the
model (base and momentum encoders), and a CONTROL: the first step again, from the start, with
the labels NOT offset by rank (each rank taking keys 0..n-1 as its positives).
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import mocov3
from common.model import distribute, unwrap
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)

GLOBAL_BATCH, SIZE, STEPS, LR, TEMPERATURE = 8, 16, 3, 0.5, 0.2
MOMENTA = (0.9, 0.95, 0.99)  # a schedule's values, one per step


def make_model():
    """The model in float64, train mode but every BatchNorm in eval mode (fixed statistics)."""
    torch.manual_seed(0)
    model = mocov3.MoCoV3("vit_tiny", small_images=True, hidden_dim=16, out_dim=8).double()
    return batchnorm_frozen(model)


def batchnorm_frozen(model):
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.eval()
    return model


def make_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
            for _ in range(2)]


def train(steps, rank, world, device):
    model = distribute(make_model(), device, world, sync_bn="off")
    net = unwrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR,
                                momentum=0.9)
    n = GLOBAL_BATCH // world
    mine = slice(rank * n, (rank + 1) * n)
    records = []
    for step in range(steps):
        x1, x2 = (x[mine] for x in make_batch(step))
        q1, q2 = model(x1, x2)
        net.momentum_update(MOMENTA[step])
        k1, k2 = net.keys(x1, x2)
        loss = mocov3.mocov3_loss(q1, q2, k1, k2, TEMPERATURE)
        optimizer.zero_grad()
        loss.backward()
        records.append({"losses": all_gather_tensor(loss.detach()[None]),
                        "grads": {k: p.grad.clone() for k, p in net.named_parameters()
                                  if p.requires_grad}})
        optimizer.step()
    return records, net.state_dict()


def main(out):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    records, state = train(STEPS, rank, world, device)
    mocov3.get_rank = lambda: 0  # CONTROL: every rank's positives taken at rows 0..n-1
    control, _ = train(1, rank, world, device)
    if rank == 0:
        torch.save({"world": world, "steps": records, "state": state, "control": control[0]},
                   out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
