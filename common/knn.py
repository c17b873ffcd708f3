"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", arXiv 1805.01978): cosine
similarity, the k = 200 nearest training features vote with weight exp(sim / T), T = 0.07."""
import torch
import torch.nn.functional as F

from common.data import build_dataset, eval_transform, labels_of, make_loader
from common.dist import all_gather_tensor, get_world_size
from common.errors import UserError
from common.log import Progress
from common.model import autocast


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, workers, device, precision="fp32",
                     normalize=True, progress=None, leave=True):
    """Features [N, D] (L2-normalised if `normalize`) and labels [N] of `dataset` in its own
    order, on every rank, each rank computing a shard; every item counts once. The model must
    already be in eval mode. `progress`: a description, to show a progress bar or lines (rank 0;
    `leave`: as Progress's)."""
    loader = make_loader(dataset, batch_size, workers, shuffle=False, drop_last=False)
    loader.sampler.set_epoch(0)
    order = torch.tensor(list(iter(loader.sampler)), device=device)  # padded to equal shards
    feats, labels = [], []
    bar = Progress(loader, len(loader), progress, leave) if progress else None
    for i, (x, y) in enumerate(bar or loader):
        if bar and (i + 1) % max(1, len(loader) // 10) == 0:
            bar.update({})  # a plain line every tenth of the way in a log file
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with autocast(precision, device):
            f = backbone(x).float()
        feats.append(F.normalize(f, dim=1) if normalize else f)
        labels.append(y.to(device))
    feats, labels, order = map(all_gather_tensor, (torch.cat(feats), torch.cat(labels), order))
    out_f, out_y = feats.new_empty(len(dataset), feats.shape[1]), labels.new_empty(len(dataset))
    out_f[order], out_y[order] = feats, labels  # padding repeats indices with equal values
    return out_f, out_y


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=200, temperature=0.07, chunk=1024):
    """Class scores [M, C] of each test feature: sum over its k nearest training features
    (cosine similarity) of exp(sim / T) for the neighbour's class."""
    k = min(k, train_f.shape[0])
    scores = []
    for start in range(0, test_f.shape[0], chunk):
        sim = test_f[start:start + chunk] @ train_f.T                 # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)                          # [m, k]
        votes = torch.zeros(top_idx.shape[0], num_classes, device=test_f.device)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def capped(dataset, cap):
    """A fixed random subset of at most `cap` items (keeps kNN monitoring cheap on ImageNet)."""
    if len(dataset) <= cap:
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:cap]
    subset = torch.utils.data.Subset(dataset, idx.sort().values.tolist())
    labels = labels_of(dataset)  # STL-10's are `labels`, not `targets`
    subset.targets = [int(labels[i]) for i in subset.indices]
    return subset


def monitor_split(args, split, cap):
    """The training scripts' monitors' images of `split` (centre crops, at most `cap` of them)
    and its number of classes."""
    try:
        dataset = build_dataset(args.data, split, eval_transform(args.img_size), args.data_dir,
                                args.synthetic_size, args.img_size)
    except UserError as e:  # pre-training itself reads train/ only: say how to train without val/
        if split != "val":
            raise
        raise UserError(f"{e}; the kNN monitor and --probe read it: without them (--knn-every 0) "
                        f"pre-training reads train/ only") from None
    return capped(dataset, cap), len(dataset.classes)


def monitor_features(backbone, dataset, args, device, normalize=True, progress=None):
    """`extract_features` for the training scripts' monitors: in eval mode (then back), with
    the per-rank share of --batch-size; on a terminal, a bar while it lasts."""
    was_training = backbone.training
    backbone.eval()
    features = extract_features(backbone, dataset, max(1, args.batch_size // get_world_size()),
                                args.workers, device, args.precision, normalize, progress, leave=False)
    backbone.train(was_training)
    return features


def knn_monitor(args, device):
    """The training scripts' kNN monitor: a function backbone -> top-1 (%) on the val split
    (at most 10,000 images), with the labelled train split (at most 100,000) as memory."""
    train, num_classes = monitor_split(args, "train", 100_000)
    val, _ = monitor_split(args, "val", 10_000)

    def top1(backbone):
        train_f, train_y = monitor_features(backbone, train, args, device, progress="kNN monitor: train")
        val_f, val_y = monitor_features(backbone, val, args, device, progress="kNN monitor: val")
        pred = knn_predict(train_f, train_y, val_f, num_classes).argmax(1)
        return 100.0 * (pred == val_y).float().mean().item()
    return top1
