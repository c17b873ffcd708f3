"""--sync-bn: the processes whose batch statistics a SyncBatchNorm shares. Loaded only for SyncBN
over several GPUs (common/model.py `distribute`)."""
import socket

import torch.distributed as dist

from common.errors import UserError


def sync_bn_group(mode):
    """This rank's process group under --sync-bn `mode`: None (all processes) for "global"; for
    "node", the processes on this host (host names gathered, so any launcher and any number of
    processes per node work); for a number N, N consecutive ranks, as SwAV's
    --syncbn_process_group_size. A collective: every rank creates every group, in one order."""
    if mode == "global":
        return None
    world = dist.get_world_size()
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
    return dist.new_subgroups_by_enumeration(members)[0]
