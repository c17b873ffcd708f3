"""Worker for tests/test_mae.py, launched by torchrun with 2 processes (gloo, CPU).

STEPS MAE steps as mae.py takes them (each process's rows of the step's mask noise, the model
through DDP, mae_loss, backward, SGD step) on a fixed global batch, each rank taking its half, in
float64. A ViT has no BatchNorm and every image hides as many patches as every other, so the mean
of the two ranks' losses (what DDP's gradient average follows) is the loss of one process on the
whole batch: two processes must compute what one computes.

Rank 0 saves per step both ranks' losses and the DDP-averaged gradients, the final weights, and a
CONTROL: the first step again, from the start, with every rank taking rank 0's rows of the noise
(the same masks on both halves of the batch, not the whole batch's).
"""
import sys

import torch
import torch.distributed as dist

import mae
from common.dist import all_gather_tensor, cleanup_distributed, get_rank, get_world_size, setup_distributed
from common.model import distribute, unwrap

GLOBAL_BATCH, SIZE, STEPS, LR, MASK_RATIO, SEED = 8, 16, 2, 0.1, 0.75, 3
PATCHES = (SIZE // 4) ** 2  # vit_tiny's patch 4 at <= 64 px


def make_model():
    torch.manual_seed(0)
    return mae.MAE("vit_tiny", small_images=True, img_size=SIZE, decoder_dim=32, decoder_depth=1,
                   decoder_heads=4).double().train()


def make_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)


def step_loss(model, images, step, rank, per_rank):
    noise = mae.mask_noise(SEED, step, GLOBAL_BATCH, PATCHES, rank, per_rank).double()
    pred, mask, _ = model(images, noise, MASK_RATIO)
    return mae.mae_loss(images, pred, mask, 4, norm_pix_loss=True)


def train(steps, rank, world, device, noise_rank=None):
    model = distribute(make_model(), device, world, sync_bn="off")
    net = unwrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR,
                                momentum=0.9)
    n = GLOBAL_BATCH // world
    records = []
    for step in range(steps):
        images = make_batch(step)[rank * n:(rank + 1) * n]
        loss = step_loss(model, images, step, rank if noise_rank is None else noise_rank, n)
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
    control, _ = train(1, rank, world, device, noise_rank=0)
    if rank == 0:
        torch.save({"world": world, "steps": records, "state": state, "control": control[0]}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
