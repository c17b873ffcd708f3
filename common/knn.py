"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", arXiv 1805.01978): cosine
similarity, the k = 200 nearest training features vote with weight exp(sim / T), T = 0.07."""
import torch
import torch.nn.functional as F

from common.data import build_dataset, eval_transform, labels_of, make_loader
from common.dist import all_gather_tensor, get_world_size
from common.log import Progress
from common.model import autocast


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, workers, device, precision="fp32",
                     normalize=True, progress=None):
    """Features [N, D] (L2-normalised unless `normalize` is False) and labels [N] of `dataset`
    in its own order, on every rank, each rank computing a shard; every item counts once. The
    model must already be in eval mode. `progress`: a description, to show a progress bar or
    lines (rank 0)."""
    loader = make_loader(dataset, batch_size, workers, shuffle=False, drop_last=False)
    loader.sampler.set_epoch(0)
    order = torch.tensor(list(iter(loader.sampler)), device=device)  # padded to equal shards
    feats, labels = [], []
    bar = Progress(loader, len(loader), progress) if progress else None
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
    feats, labels = all_gather_tensor(torch.cat(feats)), all_gather_tensor(torch.cat(labels))
    order = all_gather_tensor(order)
    out_f = torch.empty(len(dataset), feats.shape[1], device=device)
    out_y = torch.empty(len(dataset), dtype=labels.dtype, device=device)
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


def knn_accuracy(backbone, train_set, val_set, num_classes, batch_size, workers, device,
                 precision="fp32", k=200, temperature=0.07):
    """Weighted-kNN top-1 accuracy (%) of `backbone` (switched to eval mode and back)."""
    was_training = backbone.training
    backbone.eval()
    args = (batch_size, workers, device, precision)
    train_f, train_y = extract_features(backbone, train_set, *args)
    val_f, val_y = extract_features(backbone, val_set, *args)
    backbone.train(was_training)
    pred = knn_predict(train_f, train_y, val_f, num_classes, k, temperature).argmax(1)
    return 100.0 * (pred == val_y).float().mean().item()


def capped(dataset, cap, seed=0):
    """A fixed random subset of at most `cap` items (keeps kNN monitoring cheap on ImageNet)."""
    if len(dataset) <= cap:
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:cap]
    subset = torch.utils.data.Subset(dataset, idx.sort().values.tolist())
    labels = labels_of(dataset)  # STL-10's are `labels`, not `targets`
    subset.targets = [int(labels[i]) for i in subset.indices]
    return subset


def knn_monitor(args, device, max_train=100_000, max_val=10_000):
    """The training scripts' kNN monitor: a function backbone -> top-1 (%) on the val split,
    with the labelled train split (centre crops, at most `max_train` images) as memory."""
    kw = dict(data_dir=args.data_dir, synthetic_size=args.synthetic_size, img_size=args.img_size)
    train = build_dataset(args.data, "train", eval_transform(args.img_size), **kw)
    val = build_dataset(args.data, "val", eval_transform(args.img_size), **kw)
    num_classes = len(train.classes)
    train, val = capped(train, max_train), capped(val, max_val)
    batch = max(1, args.batch_size // get_world_size())
    return lambda backbone: knn_accuracy(backbone, train, val, num_classes, batch, args.workers,
                                         device, args.precision)
