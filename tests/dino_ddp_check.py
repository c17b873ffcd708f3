"""Worker for tests/test_dino.py, launched by torchrun with 2 processes (gloo, CPU).

STEPS DINO training steps as dino.py takes them (forward of the teacher on the 2 global crops and
of the student on every crop, grouped by resolution; dino_loss with the current centre; the
centre's update, all-reduced over the processes; backward through DDP; SGD step; the teacher's
EMA) on a fixed global batch of 4 crops (2 x 12 px + 2 x 8 px), each rank taking its half of the
images. The backbone is a conv + pooling network with NO BatchNorm (CPU processes cannot
synchronise BN): the only coupling between samples is the centre, so the comparison with one
process is exact. Everything runs in float64.

Rank 0 saves per step both ranks' losses, the (DDP-averaged) gradient of every student
parameter and the centre after the step, and a CONTROL: the same steps with the centre's sum
left local (each rank centring with its own samples only), which must give other centres and,
from the second step on, other losses and gradients.
"""
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import dino
from common.model import distribute, unwrap
from common.dist import all_gather_tensor, cleanup_distributed, get_rank, get_world_size, setup_distributed

GLOBAL_BATCH, SIZES, OUT_DIM, STEPS, LR, TAU = 8, (12, 12, 8, 8), 10, 3, 0.5, 0.9
STUDENT_TEMP, TEACHER_TEMP, CENTER_MOMENTUM = 0.1, 0.04, 0.9


def make_model():
    """dino.DINO with a small BN-free backbone and head in place of its own."""
    torch.manual_seed(0)
    model = dino.DINO("resnet18", small_images=True, out_dim=OUT_DIM, hidden_dim=16,
                      bottleneck_dim=8)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = dino.Head(8, OUT_DIM, hidden_dim=16, bottleneck_dim=8)
    model.student_backbone, model.student_head = backbone, head
    model.backbone = copy.deepcopy(backbone).requires_grad_(False)
    model.head = copy.deepcopy(head).requires_grad_(False)
    return model.double()


def make_crops(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(GLOBAL_BATCH, 3, s, s, generator=g, dtype=torch.float64) for s in SIZES]


def train(rank, world, device):
    """STEPS DINO steps; returns per step (loss of every rank, gradients, centre)."""
    model = distribute(make_model(), device, world, sync_bn="off")
    net = unwrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    n = GLOBAL_BATCH // world
    records = []
    for step in range(STEPS):
        student_out, teacher_out = model([c[rank * n:(rank + 1) * n] for c in make_crops(step)])
        loss, _ = dino.dino_loss(student_out, teacher_out, net.center, STUDENT_TEMP, TEACHER_TEMP)
        net.center.copy_(dino.next_center(teacher_out, net.center, CENTER_MOMENTUM))
        optimizer.zero_grad()
        loss.backward()
        records.append({"losses": all_gather_tensor(loss.detach()[None]),
                        "grads": {k: p.grad.clone() for k, p in net.named_parameters()
                                  if p.requires_grad},
                        "center": net.center.clone()})
        optimizer.step()
        net.update_teacher(TAU)
    return records


def main(out):
    device = setup_distributed()
    rank, world = get_rank(), get_world_size()
    records = train(rank, world, device)
    # CONTROL: each rank's centre from its own samples only
    dino.all_reduce_with_grad, dino.get_world_size = (lambda x: x), (lambda: 1)
    control = train(rank, world, device)
    if rank == 0:
        torch.save({"world": world, "steps": records, "control": control}, out)
    dist.barrier()
    cleanup_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
