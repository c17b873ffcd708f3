"""Worker for tests/test_moco.py, launched by torchrun with 2 processes (gloo, CPU).

A few MoCo training steps as moco.py takes them (momentum update, queries through DDP, keys with
shuffle BN across the two ranks, loss, SGD step, enqueue of the keys of both ranks) on a fixed
global batch, each rank taking its half. Rank 0 saves, per step, the key encoder that computed
the keys and the global key views, and at the end the queue and pointer of EVERY rank, so that
the test can recompute the keys in one process and check the queue on both ranks.
"""
import sys

import torch
import torch.distributed as dist

from common.model import distribute, unwrap
from common.dist import (all_gather_tensor, cleanup_distributed, get_rank, get_world_size,
                         setup_distributed)
import moco

GLOBAL_BATCH, QUEUE, STEPS, MOMENTUM, TEMPERATURE = 8, 16, 3, 0.9, 0.2


def make_model():
    torch.manual_seed(0)
    return moco.MoCo("resnet18", small_images=True, out_dim=16, queue_size=QUEUE)


def make_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x1 = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
    return x1, torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)


def shuffle_seed(step):
    return 1000 + step


def main(out):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    model = distribute(make_model(), device, world, sync_bn="off")
    net = unwrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5,
                                momentum=0.9)
    n = GLOBAL_BATCH // world
    mine = slice(rank * n, (rank + 1) * n)
    model.train()
    snapshots, views = [], []
    for step in range(STEPS):
        x1, x2 = make_batch(step)
        net.momentum_update(MOMENTUM)
        state = net.state_dict()  # the key encoder that computes this step's keys
        snapshots.append({k: v.clone() for k, v in state.items() if k.startswith("key_")})
        views.append(x2)
        q = model(x1[mine])[0]
        k = net.keys(x2[mine], shuffle_seed(step))
        loss = moco.moco_loss(q, k, net.queue, TEMPERATURE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        net.enqueue(k)
    queues = all_gather_tensor(net.queue[None])          # [world, K, D]
    ptrs = all_gather_tensor(net.queue_ptr[None])        # [world]
    if rank == 0:
        torch.save({"world": world, "snapshots": snapshots, "views": views, "queues": queues,
                    "ptrs": ptrs}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
