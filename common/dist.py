"""Distributed setup from torchrun or Slurm, and the collectives the losses need.

A plain `python script.py` is one process with no process group: every helper here then
reduces to the identity, so losses and tests run unchanged without `torch.distributed`.
"""
import datetime
import os
import re
import socket
import subprocess

import torch
import torch.distributed as dist

from common.log import UserError


def _slurm_master_addr():
    """First host of SLURM_JOB_NODELIST (e.g. 'gpu[03-05]' -> 'gpu03')."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def first_host(nodelist):
    """The first host of a Slurm node list, without scontrol: 'gpu[03-05,07],cpu1' -> 'gpu03',
    'a,b' -> 'a', 'n[1-2]-ib' -> 'n1-ib'."""
    head = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)?", nodelist).group(0)
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def setup_distributed(timeout_minutes=30):
    """Return (rank, world_size, local_rank, device), joining a process group if launched.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; `srun` sets SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID, and the master is the first host of the job's node list.
    NCCL on CUDA, gloo on CPU. The timeout turns a dead peer into an error instead of a hang.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        rank, world, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local_rank)
    else:
        rank, world, local_rank = 0, 1, 0

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # every step has the same shapes: cuDNN times its convolution algorithms on the first
        # and keeps the fastest (as the official MoCo code does); not bit-reproducible on GPUs
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return rank, world, local_rank, device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over ranks and keeps its own.

    Every rank's loss depends on every rank's embeddings, so the gradient reaching rank r's
    slice is the sum of d(loss_s)/d(slice_r) over all ranks s: an all_reduce(SUM) of the
    stacked gradients, then rank r keeps slice r. (A backward that returns only the local
    slice of the local gradient silently drops the other ranks' terms.)
    """

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):  # grad: [world, n, ...]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_with_grad(x):
    """Concatenate `x` [n, ...] from all ranks in rank order -> [world * n, ...], with gradients."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x).flatten(0, 1)


class _AllReduceWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward is an all_reduce(SUM) of the gradients.

    When every rank computes the same loss from y = sum_r x_r, the gradient reaching x_r must
    be sum_s d(loss_s)/dy = world x dL/dy, so that DDP's average over ranks gives the gradient of
    the one global loss. An in-place `dist.all_reduce` in the forward is invisible to autograd
    and gives gradients 1/world too small (the Barlow Twins bug of a peer library).
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x):
    """Sum of `x` over all ranks (same shape on every rank), differentiable as explained above;
    `x` itself when torch.distributed is not initialised."""
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def all_gather_tensor(x):
    """Concatenate `x` [n, ...] from all ranks (no gradient). Same n on every rank."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sync_bn_group(mode):
    """The process group whose batch statistics a SyncBatchNorm shares under --sync-bn `mode`:
    None (all processes) for "global"; for "node", the processes on this host (host names
    gathered, so any launcher and any number of processes per node work); for a number N, N
    consecutive ranks, as SwAV's --syncbn_process_group_size. new_group is collective: every
    rank creates every group, in the same order, and keeps its own."""
    if mode == "global":
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if mode == "node":
        hosts = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        members = [[r for r in range(world) if hosts[r] == h] for h in sorted(set(hosts))]
    else:
        size = int(mode)
        if world % size:
            raise UserError(f"--sync-bn {size}: the {world} processes do not split into groups "
                            f"of {size}")
        members = [list(range(start, start + size)) for start in range(0, world, size)]
    groups = [dist.new_group(ranks) for ranks in members]
    return next(g for g, ranks in zip(groups, members) if rank in ranks)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank (e.g. a timestamped run directory)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_flag(flag, device):
    """True on every rank if `flag` is true on any rank (e.g. a stop signal that reached one)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
