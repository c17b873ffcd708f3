"""--probe: an online linear classifier on the backbone's features of each training batch,
trained beside pre-training and reported as val top-1 after every epoch, as the official BYOL
code and solo-learn do (solo-learn's CIFAR tables report this number).

The features are caught by a forward hook on the backbone (its first call of each training
step: both views where a script forwards them together, view 1 where it forwards them one by
one, the large crops with multi-crop) and detached, so no gradient reaches the backbone; the
classifier has its own optimizer: SGD, momentum 0.9, lr --probe-lr (solo-learn's CIFAR
classifier rate, 0.1), constant, no weight decay. With several processes its gradients are
averaged, so every rank holds the same classifier, as one process with the global batch.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.dist import get_world_size
from common.knn import monitor_features, monitor_split


class OnlineProbe:
    def __init__(self, backbone, args, device, ckpt=None):
        self.val, num_classes = monitor_split(args, "val", 10_000)
        self.args, self.device = args, device
        generator = torch.Generator().manual_seed(args.seed)  # same on every rank; the global
        self.head = nn.Linear(backbone.feature_dim, num_classes)  # RNG is left untouched
        with torch.no_grad():
            bound = backbone.feature_dim ** -0.5  # nn.Linear's default initialisation
            for p in self.head.parameters():
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        self.head.to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=args.probe_lr, momentum=0.9)
        if ckpt and ckpt.get("probe"):  # resumed
            self.head.load_state_dict(ckpt["probe"]["head"])
            self.optimizer.load_state_dict(ckpt["probe"]["optimizer"])
        self.features = None
        backbone.register_forward_hook(self._catch)

    def _catch(self, module, inputs, output):
        if module.training and self.features is None:  # not the kNN's or evaluation's calls
            self.features = output.detach().float()

    def step(self, labels):
        """One SGD step on the features caught in this training step; returns its loss."""
        features, self.features = self.features, None
        labels = labels.to(features.device)
        labels = labels.repeat(features.shape[0] // labels.shape[0])  # views are stacked
        loss = F.cross_entropy(self.head(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if get_world_size() > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= get_world_size()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def top1(self, backbone):
        """Val top-1 (%) of the classifier on the backbone's features (centre crops)."""
        features, labels = monitor_features(backbone, self.val, self.args, self.device, False,
                                            progress="online probe: val")
        return 100.0 * (self.head(features).argmax(1) == labels).float().mean().item()

    def state_dict(self):
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}


def online_probe(args, backbone, device, ckpt=None):
    """The OnlineProbe of --probe (restored from a resumed checkpoint `ckpt`), None without it."""
    return OnlineProbe(backbone, args, device, ckpt) if args.probe else None
