"""Datasets, evaluation transforms and loaders.

`--data` is an ImageFolder root with train/ and val/ (ImageNet layout), or one of the names
`cifar10`, `cifar100`, `stl10` and `synthetic` (common/named_data.py, loaded only for them).
"""
import atexit
import multiprocessing
import os
import signal
import sys

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from common.dist import get_rank, get_world_size
from common.errors import UserError

NAMED_DATASETS = ("cifar10", "cifar100", "stl10", "synthetic")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_img_size(data):
    return {"cifar10": 32, "cifar100": 32, "synthetic": 32, "stl10": 96}.get(data, 224)


def eval_transform(size):
    """Resize + centre crop (ImageNet: 256 -> 224); small images are only resized."""
    resize = size if size <= 64 else round(size / 0.875)
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_pixels(img):
    """PIL image -> its uint8 pixels [H, W, 3] (one conversion per image, for all its views)."""
    return torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB")))


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder in which an unreadable image (truncated, corrupt) does not stop training:
    it is reported on stderr, its path appended to `bad_log` (one line per failure, from any
    worker or rank), and the next readable image takes its place (deterministically)."""

    bad_log = None

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
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
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        return sum(1 for _ in f)


def labels_of(dataset):
    """The class index of every item: `targets` (ImageFolder, CIFAR) or `labels` (STL-10)."""
    labels = getattr(dataset, "targets", None)
    return getattr(dataset, "labels", None) if labels is None else labels


def build_dataset(data, split, transform, data_dir="data", synthetic_size=512, img_size=32):
    """`split`: 'ssl' (images for self-supervised training; STL-10 adds its unlabeled set),
    'train' (labelled train split, for kNN and linear evaluation) or 'val'."""
    if data in NAMED_DATASETS:
        from common.named_data import named_dataset  # only for them
        return named_dataset(data, split, transform, data_dir, synthetic_size, img_size)
    sub = "val" if split == "val" else "train"
    if not os.path.isdir(data):
        raise UserError(f"--data {data}: no such directory (expected an ImageFolder root with "
                        f"train/ and val/, or one of cifar10, cifar100, stl10, synthetic)")
    if not os.path.isdir(os.path.join(data, sub)):
        raise UserError(f"--data {data}: no {sub}/ folder in it (expected the ImageNet layout "
                        f"{data}/train/<class>/*.jpg and {data}/val/<class>/*.jpg)")
    try:
        return SafeImageFolder(os.path.join(data, sub), transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        flat = "class folder" in str(e)  # images right under train/: unlabelled, most likely
        raise UserError(f"--data {data}: {e}" + (" Unlabelled images go in one class folder "
                        f"({data}/{sub}/images/, say), with --knn-every 0" if flat else "")) from None


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

    def __init__(self, dataset, batch_size, shuffle, seed, drop_last, seeded):
        super().__init__(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
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


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGUSR1, SIGTERM and SIGINT to the main process, which saves at a
    step boundary. Slurm signals every process of a job step, and Ctrl-C every process of the
    terminal's foreground group, workers included; a worker ended by one (the default action;
    with the spawn or forkserver start methods workers do not inherit the main process's
    handlers) would crash the run before it could save."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def kill_workers_at_exit():
    """Loader workers still running when the process exits are killed: an exception's traceback
    can hold their loader alive to the end. They ignore SIGTERM (above), all that
    multiprocessing's own exit handler sends them before it waits for them, forever; registered
    after it (at its import), this runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill
    for child in multiprocessing.active_children():
        if child.daemon:  # a DataLoader's workers are daemons
            child.kill()


def make_loader(dataset, batch_size, workers, shuffle=True, seed=0, drop_last=True, seeded=False):
    """A DataLoader over this process's shard (its rank's share of a DistributedSampler's order,
    resumable part-way through an epoch); `batch_size` is per process. `seeded`: each sample's
    augmentation is seeded from (seed, epoch, index), see SeededSamples."""
    # --data-on-device: the views' ViewPipeline holds the images (common/gpu_aug.py) and the
    # loader reads whole batches of indices (`__getitems__`), with no workers
    on_device = getattr(getattr(dataset, "transform", None), "mode", None) == "device"
    sampler = ResumableSampler(dataset, batch_size, shuffle, seed, drop_last, seeded and not on_device)
    if on_device:
        return DataLoader(dataset.transform.hold_images(dataset, workers), batch_size=batch_size,
                          sampler=sampler, drop_last=drop_last, collate_fn=lambda batch: batch)
    if workers > 0:
        atexit.unregister(kill_workers_at_exit)  # once
        atexit.register(kill_workers_at_exit)
    # A generator of its own for the workers' base seed, which a DataLoader otherwise draws from
    # the global generator at every epoch: a resumed run's global random numbers (stochastic
    # depth, dropout) then continue as an uninterrupted run's
    return DataLoader(SeededSamples(dataset) if seeded else dataset, batch_size=batch_size,
                      sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=workers > 0,
                      worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed))
