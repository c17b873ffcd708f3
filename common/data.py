"""Datasets, view augmentations and loaders.

`--data` is an ImageFolder root with train/ and val/ (ImageNet layout), `cifar10`, `cifar100`,
`stl10` (torchvision, in `--data-dir`, downloaded when online) or `synthetic` (random images
with a learnable class structure, for offline smoke runs and tests).
"""
import os
import signal
import sys

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from common.augment import IMAGENET_MEAN, IMAGENET_STD, image_pixels
from common.log import UserError

TORCHVISION_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
DOWNLOAD_FILES = {"cifar10": "cifar-10-python.tar.gz (or its folder cifar-10-batches-py/)",
                  "cifar100": "cifar-100-python.tar.gz (or its folder cifar-100-python/)",
                  "stl10": "stl10_binary.tar.gz (or its folder stl10_binary/)"}


def default_img_size(data):
    return {"cifar10": 32, "cifar100": 32, "synthetic": 32, "stl10": 96}.get(data, 224)


# ---------------------------------------------------------------- evaluation transforms

def eval_transform(size):
    """Resize + centre crop (ImageNet: 256 -> 224); small images are only resized."""
    resize = size if size <= 64 else round(size / 0.875)
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def linear_train_transform(size):
    """Random resized crop + flip: the standard linear-evaluation training augmentation."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---------------------------------------------------------------- datasets

class SyntheticImages(Dataset):
    """Deterministic random RGB images with a class structure a network can learn: each class
    has its own colour and stripe orientation, each image a random phase and noise."""

    def __init__(self, n, size, transform, num_classes=10, seed=0):
        self.n, self.size, self.transform, self.seed = n, size, transform, seed
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        c = self.targets[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        colour = torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(c))
        angle = torch.tensor(3.14159 * c / len(self.classes))
        ys, xs = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        phase = torch.rand((), generator=g) * 6.28
        stripes = torch.sin((xs * torch.cos(angle) + ys * torch.sin(angle)) * 0.8 + phase)
        img = 0.5 * colour + 0.25 * stripes + 0.15 * torch.randn(3, self.size, self.size, generator=g)
        pixels = (img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        x = Image.fromarray(pixels)
        return (self.transform(x) if self.transform else x), c


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder in which an unreadable image (truncated, corrupt) does not stop training:
    it is reported on stderr, its path appended to `bad_log` (one line per failure, from any
    worker or rank), and the next readable image takes its place (deterministically)."""

    bad_log = None

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f).convert("RGB")
                break
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
                print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); "
                      f"replaced by another sample", file=sys.stderr, flush=True)
                if self.bad_log:
                    with open(self.bad_log, "a") as log:
                        log.write(path + "\n")
        else:
            raise UserError(f"no readable image in {self.root}")
        return (self.transform(img) if self.transform else img), target


def count_bad_images(log_path):
    """How many image reads have failed so far (lines of SafeImageFolder's `bad_log`)."""
    if not log_path or not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        return sum(1 for _ in f)


def _torchvision_dataset(name, split, transform, data_dir, rank):
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]
    if name == "stl10":
        kwargs = {"split": {"ssl": "train+unlabeled", "train": "train", "val": "test"}[split]}
    else:
        kwargs = {"train": split != "val"}

    def make(download):
        return cls(data_dir, transform=transform, download=download, **kwargs)

    try:
        return make(download=False)
    except RuntimeError:  # not there yet: rank 0 downloads, the others wait for it
        pass
    try:
        if rank == 0:
            os.makedirs(data_dir, exist_ok=True)
            make(download=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return make(download=False)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{TORCHVISION_DATASETS[name]} is not in {os.path.abspath(data_dir)} and could not be "
            f"downloaded ({reason}). Put {DOWNLOAD_FILES[name]} in that folder (--data-dir), "
            f"or use --data /path/to/imagefolder (with train/ and val/) or --data synthetic.") from None


def _image_folder(root, split, transform):
    sub = "val" if split == "val" else "train"
    path = os.path.join(root, sub)
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: no such directory (expected an ImageFolder root with "
                        f"train/ and val/, or one of cifar10, cifar100, stl10, synthetic)")
    if not os.path.isdir(path):
        raise UserError(f"--data {root}: no {sub}/ folder in it (expected the ImageNet layout "
                        f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")
    try:
        return SafeImageFolder(path, transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"--data {root}: {e}") from None


def build_dataset(data, split, transform, data_dir="data", synthetic_size=512, img_size=32,
                  rank=0):
    """`split`: 'ssl' (images for self-supervised training; STL-10 adds its unlabeled set),
    'train' (labelled train split, for kNN and linear evaluation) or 'val'."""
    if data == "synthetic":
        n = synthetic_size if split != "val" else max(synthetic_size // 4, 10)
        return SyntheticImages(n, img_size, transform, seed=0 if split != "val" else 1)
    if data in TORCHVISION_DATASETS:
        return _torchvision_dataset(data, split, transform, data_dir, rank)
    return _image_folder(data, split, transform)


# ---------------------------------------------------------------- labelled subsets

def class_balanced_indices(targets, percent, seed=0):
    """Sorted indices of a seeded, class-balanced floor(N * percent / 100) of the items, built as
    the published 1% and 10% ImageNet lists are (12 or 13 images of each class for 1%, 128 or
    129 for 10%): every class gets the same count L (all its images if it has fewer), and a
    seeded choice of the classes one more, to reach the total exactly; within a class, the
    images are drawn at random."""
    targets = torch.as_tensor(targets)
    labels, counts = targets.unique(return_counts=True)
    total = int(len(targets) * percent / 100)
    level = 0  # the largest L whose quotas fit in the total
    while level < counts.max() and counts.clamp(max=level + 1).sum() <= total:
        level += 1
    quota = counts.clamp(max=level)
    g = torch.Generator().manual_seed(seed)
    room = (counts > level).nonzero().flatten()
    quota[room[torch.randperm(len(room), generator=g)[:total - quota.sum()]]] += 1
    members = torch.argsort(targets, stable=True).split(counts.tolist())  # by class, in order
    chosen = [m[torch.randperm(len(m), generator=g)[:q]] for m, q in zip(members, quota.tolist())]
    return torch.cat(chosen).sort().values.tolist()


def listed_indices(dataset, path):
    """Sorted indices of the images of an ImageFolder named in the text file `path`, one per
    line, by file name (the published lists: `n01440764_10026.JPEG`) or class/file name."""
    if not hasattr(dataset, "samples"):
        raise UserError("--train-subset lists file names: it needs an ImageFolder --data")
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--train-subset {path}: {e.strerror}") from None
    index, ambiguous = {}, set()
    for i, (file, _) in enumerate(dataset.samples):
        name = os.path.basename(file)
        if name in index:
            ambiguous.add(name)
        index[name] = index[os.path.relpath(file, dataset.root)] = i
    unknown = [n for n in names if n not in index or n in ambiguous]
    if unknown:
        raise UserError(f"--train-subset {path}: {len(unknown)} of its {len(names)} names are not "
                        f"(or not uniquely) in {dataset.root}, e.g. {unknown[0]}")
    return sorted({index[n] for n in names})


def labelled_subset(dataset, percent=None, list_file=None, seed=0):
    """The labelled training images of semi-supervised evaluation: those listed in `list_file`,
    else a class-balanced `percent` (`class_balanced_indices`), else all. The same on every rank
    and in every run with the same arguments."""
    if list_file is None and percent is None:
        return dataset
    targets = getattr(dataset, "targets", None)
    targets = getattr(dataset, "labels", None) if targets is None else targets
    idx = (listed_indices(dataset, list_file) if list_file
           else class_balanced_indices(targets, percent, seed))
    subset = torch.utils.data.Subset(dataset, idx)
    subset.classes, subset.targets = dataset.classes, [int(targets[i]) for i in idx]
    return subset


# ---------------------------------------------------------------- loaders

class SeededSamples(Dataset):
    """Wraps a dataset so that item (index, seed) is transformed under `torch.manual_seed(seed)`:
    a sample's augmentation depends only on (run seed, epoch, index), not on which worker or
    process loads it, so a resumed run sees exactly the views an uninterrupted run would."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (it also serves a single process: rank 0 of 1) whose epoch can be
    entered part-way: `set_epoch(epoch, skip_batches)` drops the batches already trained on.
    With `seeded`, it yields (index, seed) pairs for `SeededSamples`."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, shuffle=True, seed=0,
                 drop_last=True, seeded=False):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size, self.skip, self.seeded = batch_size, 0, seeded

    def set_epoch(self, epoch, skip_batches=0):
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        if self.seeded:
            base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
            return iter([(i, (base + i) % 2**63) for i in indices])
        return iter(indices)

    def __len__(self):
        return max(0, self.num_samples - self.skip)


def ignore_stop_signals(worker_id=None):
    """Loader workers leave SIGUSR1 and SIGTERM to the main process, which saves at a step
    boundary. Slurm signals every process of a job step, workers included, and a worker killed by
    one (the default action; with the spawn or forkserver start methods workers do not inherit
    the main process's handlers) would crash the run before it could save."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, workers, rank=0, world_size=1, shuffle=True, seed=0,
                drop_last=True, seeded=False):
    """DataLoader over this rank's shard; `batch_size` is per rank. `seeded`: each sample's
    augmentation is seeded from (seed, epoch, index), see SeededSamples. A dataset whose
    transform is a ViewPipeline in "device" mode (`--data-on-device`) gets `DeviceBatches`."""
    if getattr(getattr(dataset, "transform", None), "mode", None) == "device":
        sampler = ResumableSampler(dataset, batch_size, rank, world_size, shuffle, seed, drop_last)
        return DeviceBatches(dataset, sampler, batch_size, workers, rank)
    sampler = ResumableSampler(dataset, batch_size, rank, world_size, shuffle, seed, drop_last,
                               seeded)
    return DataLoader(SeededSamples(dataset) if seeded else dataset, batch_size=batch_size,
                      sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=workers > 0,
                      worker_init_fn=ignore_stop_signals)


# ---------------------------------------------------------------- the train set on the device

def load_pixels(dataset, workers=0):
    """Every image of `dataset` (its transform bypassed) as one uint8 tensor [N, 3, H, W] and
    its labels [N], on the CPU. torchvision's CIFAR and STL-10 hold theirs as arrays already;
    other datasets are decoded once, by `workers` processes. All images must have one size."""
    data = getattr(dataset, "data", None)
    if hasattr(data, "ndim") and data.ndim == 4:  # CIFAR: [N, H, W, 3]; STL-10: [N, 3, H, W]
        pixels = torch.as_tensor(data)
        pixels = pixels.permute(0, 3, 1, 2) if pixels.shape[-1] == 3 else pixels
        labels = getattr(dataset, "targets", None)
        return pixels.contiguous(), torch.as_tensor(getattr(dataset, "labels", None)
                                                    if labels is None else labels)
    transform, dataset.transform = dataset.transform, image_pixels
    try:
        loader = DataLoader(dataset, batch_size=256, num_workers=workers)
        batches = list(loader)
    except RuntimeError as e:  # the default collate stacks: images of several sizes
        raise UserError(f"--data-on-device needs images of one size ({str(e).splitlines()[0]}); "
                        f"resize them, or leave the flag out") from None
    finally:
        dataset.transform = transform
    return (torch.cat([x for x, _ in batches]).permute(0, 3, 1, 2).contiguous(),
            torch.cat([y for _, y in batches]))


class DeviceBatches:
    """The loader of `--data-on-device`: the batches of indices of the same seeded, sharded,
    resumable sampler as the DataLoader's, each as ([indices] * views, labels). The images
    themselves are handed to the dataset's ViewPipeline, which holds them on the device and
    makes each step's views there. No loader workers, no per-image Python work in the epoch."""

    def __init__(self, dataset, sampler, batch_size, workers=0, rank=0):
        self.sampler, self.batch_size, self.pipeline = sampler, batch_size, dataset.transform
        self.pipeline.images, self.labels = load_pixels(dataset, workers)
        if rank == 0:
            n, c, h, w = self.pipeline.images.shape
            print(f"--data-on-device: {n} images of {w}x{h} px, {n * c * h * w / 2**20:.0f} MiB "
                  f"as uint8 on the device", flush=True)

    def __len__(self):
        return len(self.sampler) // self.batch_size  # the last incomplete batch is dropped

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [idx] * len(self.pipeline.recipes), self.labels[idx]
