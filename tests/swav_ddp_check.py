"""Worker for tests/test_swav.py, launched by torchrun with 2 processes (gloo, CPU).

Two SwAV training steps as swav.py takes them (normalise the prototypes, forward of the crops
grouped by resolution, queue scored then pushed, swav_loss with its distributed Sinkhorn,
backward through DDP, SGD step) on a fixed global batch of 4 crops (2 x 12 px + 2 x 8 px) and a
fixed initial queue, each rank taking its half of the batch and of the queue. The network in
front of the loss has NO BatchNorm (a conv + pooling "backbone" and a Linear-ReLU-Linear
projector replace swav.SwAV's): CPU processes cannot synchronise BN, and without it the only
coupling between samples is Sinkhorn, so the comparison with one process is exact. Everything
runs in float64.

With `vit` as second argument the network is swav.SwAV's own ViT variant instead (vit_tiny with
patch 4, MoCo v3's init with its frozen patch projection, the projector without BN that SwAV's
ViT recipe uses): a Vision Transformer has no BatchNorm either, so the comparison stays exact.

Rank 0 saves per step both ranks' losses and the (DDP-averaged) gradient of every parameter,
the final queue of each rank and the gathered queue that a checkpoint holds, and a CONTROL: the
first step again with Sinkhorn's sums left local (no all-reduce, each rank normalising over its
own samples only).
"""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import swav
from common.model import distribute, unwrap
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)

GLOBAL_BATCH, SIZES, PROTOTYPES, DIM, QUEUE, STEPS, LR = 8, (12, 12, 8, 8), 10, 6, 8, 2, 0.5
TEMPERATURE, EPSILON, ITERS = 0.1, 0.05, 3


def make_model(arch="toy"):
    torch.manual_seed(0)
    model = swav.SwAV("vit_tiny" if arch == "vit" else "resnet18", small_images=True,
                      hidden_dim=16, out_dim=DIM, num_prototypes=PROTOTYPES)
    if arch == "toy":
        model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten())
        model.projector = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, DIM))
    return model.double()


def make_crops(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GLOBAL_BATCH, 3, s, s, generator=g, dtype=torch.float64) for s in SIZES]


def make_queue():
    """The global queue [2, QUEUE, DIM] of unit rows; rank r holds the r-th half of the rows."""
    g = torch.Generator().manual_seed(7)
    return nn.functional.normalize(torch.randn(2, QUEUE, DIM, generator=g, dtype=torch.float64),
                                   dim=2)


def train(steps, rank, world, device, arch):
    """`steps` SwAV steps; returns per step (loss of every rank, gradients) and the local queue."""
    model = distribute(make_model(arch), device, world, sync_bn="off")
    net = unwrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    n, rows = GLOBAL_BATCH // world, QUEUE // world
    queue = make_queue()[:, rank * rows:(rank + 1) * rows].clone()
    records = []
    for step in range(steps):
        net.normalize_prototypes()
        z, scores = model([c[rank * n:(rank + 1) * n] for c in make_crops(step)])
        with torch.no_grad():
            queue_scores = queue @ net.prototypes.weight.T
            swav.push_queue(queue, z.detach(), n)
        loss = swav.swav_loss(scores, n, TEMPERATURE, EPSILON, ITERS, queue_scores)
        optimizer.zero_grad()
        loss.backward()
        records.append({"losses": all_gather_tensor(loss.detach()[None]),
                        "grads": {k: p.grad.clone() for k, p in net.named_parameters()
                                  if p.requires_grad}})
        optimizer.step()
    return records, queue


def main(out, arch="toy"):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    records, queue = train(STEPS, rank, world, device, arch)
    queues = all_gather_tensor(queue[None])                       # [world, 2, QUEUE / world, D]
    full_queue = swav.gather_queue(queue)                         # [2, QUEUE, D], as checkpointed
    # CONTROL: Sinkhorn normalised over each rank's own samples only
    swav.all_reduce_with_grad, swav.get_world_size = (lambda x: x), (lambda: 1)
    control, _ = train(1, rank, world, device, arch)
    if rank == 0:
        torch.save({"world": world, "steps": records, "queues": queues, "full_queue": full_queue,
                    "control": control[0]}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
