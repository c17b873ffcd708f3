"""Run by tests/test_sync_bn.py under torchrun (4 gloo processes): for each --sync-bn mode, the
process group each converted SyncBatchNorm holds, and a sum over that group. Host names are
faked (host0/host1 alternating by rank) so that "node" must group ranks 0, 2 and 1, 3."""
import json
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from common.dist import get_rank, get_world_size, setup_distributed
from common.sync_bn import sync_bn_group

if __name__ == "__main__":
    setup_distributed()
    rank, world = get_rank(), get_world_size()
    socket.gethostname = lambda: f"host{rank % 2}"
    result = {}
    for mode in ("global", "node", "2", "1"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, sync_bn_group(mode))
        groups = [m.process_group for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=groups[0])  # a collective over the group the BN would use
        result[mode] = {"ranks": [dist.get_process_group_ranks(g or dist.group.WORLD)
                                  for g in groups], "sum": total.item()}
    with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
