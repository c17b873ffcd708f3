"""Distributed setup from torchrun or Slurm, and the collectives the losses need. A plain
`python script.py` is one process with no process group: every helper here then reduces to the
identity, so losses and tests run unchanged without `torch.distributed`."""
import datetime
import os

import torch
import torch.distributed as dist


def launch_env():
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK or srun's
    SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; (0, 1, 0) for a plain `python script.py`.
    Known before the process group exists, so that arguments can be checked early."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return 0, 1, 0


def setup_distributed():
    """Join the launch's process group (none for one process; under srun the master is the
    job's first host) and return this process's device; a second call only returns the device.
    NCCL on CUDA, gloo on CPU; the timeout turns a dead peer into an error instead of a hang."""
    rank, world, local_rank = launch_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # every step has the same shapes: cuDNN times its convolution algorithms on the first
        # and keeps the fastest (as the official MoCo code does); not bit-reproducible on GPUs
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if "RANK" not in os.environ:  # srun: torch.distributed reads torchrun's variables
            from common.slurm import set_torchrun_env  # only under srun
            set_torchrun_env(rank, world, local_rank)
        cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=30))
    return device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over ranks and keeps its own: every
    rank's loss depends on every rank's embeddings, so rank r's slice gets the sum over ranks s
    of d(loss_s)/d(slice_r). (A backward that returns only the local slice of the local gradient
    silently drops the other ranks' terms.)"""

    @staticmethod
    def forward(ctx, x):
        return all_gather_tensor(x)

    @staticmethod
    def backward(ctx, grad):  # grad: [world * n, ...]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """Concatenate `x` [n, ...] from all ranks in rank order -> [world * n, ...], with gradients."""
    return x if get_world_size() == 1 else _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward is an all_reduce(SUM) of the gradients. When every rank
    computes the same loss from y = sum_r x_r, the gradient reaching x_r must be sum_s
    d(loss_s)/dy = world x dL/dy, so that DDP's average over ranks gives the gradient of the one
    global loss. An in-place `dist.all_reduce` in the forward is invisible to autograd and gives
    gradients 1/world too small (the Barlow Twins bug of a peer library)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceWithGrad.forward(ctx, grad)


def all_reduce_with_grad(x):
    """Sum of `x` over all ranks (same shape on every rank), differentiable as explained above."""
    return x if get_world_size() == 1 else _AllReduceWithGrad.apply(x)


@torch.no_grad()
def all_gather_tensor(x):
    """Concatenate `x` [n, ...] from all ranks (no gradient). Same n on every rank."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank (e.g. a timestamped run directory)."""
    box = [obj]
    if get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """[every rank's value of a picklable object], in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag, device):
    """True on every rank if `flag` is true on any rank (e.g. a stop signal that reached one)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
