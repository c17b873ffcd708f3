"""The datasets `--data` names instead of an ImageFolder root: torchvision's CIFAR-10, CIFAR-100
and STL-10 (in `--data-dir`, downloaded when online), and `synthetic` (random images with a
learnable class structure, for offline smoke runs and tests). Loaded only for them."""
import os

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from common.dist import get_rank
from common.errors import UserError

TORCHVISION_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}
DOWNLOAD_FILES = {"cifar10": "cifar-10-python.tar.gz (or its folder cifar-10-batches-py/)",
                  "cifar100": "cifar-100-python.tar.gz (or its folder cifar-100-python/)",
                  "stl10": "stl10_binary.tar.gz (or its folder stl10_binary/)"}


def named_dataset(data, split, transform, data_dir, synthetic_size, img_size):
    """`data` (one of common/data.py's NAMED_DATASETS) for `split`, as `build_dataset`;
    synthetic: `synthetic_size` training images, a quarter of them for val."""
    if data == "synthetic":
        n = synthetic_size if split != "val" else max(synthetic_size // 4, 10)
        return SyntheticImages(n, img_size, transform, seed=0 if split != "val" else 1)
    if data == "stl10":
        kwargs = {"split": {"ssl": "train+unlabeled", "train": "train", "val": "test"}[split]}
    else:
        kwargs = {"train": split != "val"}

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[data]

    def make(download):
        return cls(data_dir, transform=transform, download=download, **kwargs)

    try:
        return make(download=False)
    except RuntimeError:  # not there yet: rank 0 downloads, the others wait for it
        pass
    try:
        if get_rank() == 0:
            os.makedirs(data_dir, exist_ok=True)
            make(download=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return make(download=False)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{TORCHVISION_DATASETS[data]} is not in {os.path.abspath(data_dir)} and could not be "
            f"downloaded ({reason}). Put {DOWNLOAD_FILES[data]} in that folder (--data-dir), "
            f"or use --data /path/to/imagefolder (with train/ and val/) or --data synthetic.") from None


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
        x = Image.fromarray((img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy())
        return (self.transform(x) if self.transform else x), c


def stl10_recipe_note(args):
    """The start-up note of an STL-10 run at the ImageNet recipe (images over 64 px)."""
    return (f"note: STL-10's {args.img_size} px images take the ImageNet recipe ({args.arch}, "
            f"batch {args.batch_size}, {args.epochs} epochs): no paper of these methods gives an "
            f"STL-10 recipe; on one GPU, e.g. --arch resnet18 --batch-size 256, or --img-size 64 "
            f"for the small-image recipe")
