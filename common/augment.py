"""View augmentation: one recipe per view (`ViewRecipe`: its paper's crop, colour jitter,
grayscale, blur and solarize), made by `ViewPipeline(recipes, mode)`, the loader's transform
(image -> its views) whose `to_device` finishes them in the training step. Modes:

- "fast" (default): in the loader workers, torch's antialiased uint8 resize (about 3x faster than
  PIL's), then PIL's uint8 colour operations and blur filter (about 5x faster than torchvision's);
  the device normalises the uint8 views. Its random draws are torchvision's, in torchvision's
  order (for a seeded sample the same crop, flip, jitter, grayscale, blur and solarize); the
  resize rounds differently (one level on about a quarter of the values; bicubic up to 3) and
  the blur is PIL's box-pass approximation of the Gaussian (tests/test_augment.py measures both).
- "gpu" (--gpu-aug): workers only crop, resize and flip; the rest runs batched on the device.
- "device" (--data-on-device): the train set held on the device, every view made there.
- "torchvision" (--torchvision-aug): the standard composition, the reference.
The last three load common/gpu_aug.py; docs/performance.md measures them.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from common.data import IMAGENET_MEAN, IMAGENET_STD, image_pixels
from common.dist import get_rank


@dataclass(frozen=True)
class ViewRecipe:
    """One augmented view: a random resized crop to `size` px covering `scale` of the image with
    aspect ratio in `ratio`, a horizontal flip (p 0.5), colour jitter (strengths of brightness,
    contrast, saturation, hue, in random order) with probability `jitter_p`, grayscale with
    `gray_p`, blur (sigma ~ U(blur_sigma)) with `blur_p`, solarize (>= 128) with `solarize_p`."""
    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"  # or "bicubic"


def ssl_view(size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
             blur_p=0.0, solarize_p=0.0, interpolation="bilinear"):
    """The usual SSL view as a recipe, from lists too (the flags' values)."""
    return ViewRecipe(size, tuple(scale), jitter=tuple(jitter), jitter_p=jitter_p, gray_p=gray_p,
                      blur_p=blur_p, solarize_p=solarize_p, interpolation=interpolation)


def multi_crop(counts, sizes, scales, **view):
    """Multi-crop (SwAV, Caron et al. 2020): counts[i] views of sizes[i] px whose crop covers a
    fraction scales[i] of the image, e.g. 2 x 224 px at (0.14, 1) + 6 x 96 px at (0.05, 0.14);
    every crop gets the same flip, colour, blur and solarize recipe (`ssl_view`'s other
    arguments). Returns the list of recipes, in the order of `counts`."""
    if not (len(counts) == len(sizes) == len(scales)):
        raise ValueError("multi_crop: counts, sizes and scales need one entry per crop group")
    return [ssl_view(size, scale, **view) for n, size, scale in zip(counts, sizes, scales)
            for _ in range(n)]


def crop_and_flip(pixels, recipe):
    """Random resized crop and horizontal flip: uint8 [H, W, 3] -> uint8 [3, size, size],
    drawing from torch's generator as T.RandomResizedCrop and T.RandomHorizontalFlip do."""
    top, left, h, w = T.RandomResizedCrop.get_params(pixels.permute(2, 0, 1), list(recipe.scale),
                                                     list(recipe.ratio))
    crop = pixels[top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0)
    x = torch.nn.functional.interpolate(crop.contiguous(memory_format=torch.channels_last),
                                        size=(recipe.size, recipe.size),
                                        mode=recipe.interpolation, antialias=True)[0]
    return x.flip(-1) if torch.rand(1) < 0.5 else x


class CropOnlyView:
    """The workers' part of --gpu-aug: image (PIL or its pixels) -> uint8 [3, size, size]."""

    def __init__(self, recipe):
        self.recipe = recipe

    def __call__(self, pixels):
        if isinstance(pixels, Image.Image):
            pixels = image_pixels(pixels)
        return crop_and_flip(pixels, self.recipe)


class FastView(CropOnlyView):
    """The whole recipe: the crop, then PIL's uint8 colour jitter, grayscale, blur and solarize."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.jitter = T.ColorJitter(*recipe.jitter)  # on PIL images: PIL's ImageEnhance ops

    def __call__(self, pixels):
        r = self.recipe
        img = Image.fromarray(np.ascontiguousarray(super().__call__(pixels).permute(1, 2, 0)))
        if not r.jitter_p < torch.rand(1):  # the draws of T.RandomApply, T.RandomGrayscale, ...
            img = self.jitter(img)
        if torch.rand(1) < r.gray_p:
            img = img.convert("L").convert("RGB")
        if r.blur_p > 0 and not r.blur_p < torch.rand(1):
            sigma = torch.empty(1).uniform_(*r.blur_sigma).item()
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))  # box passes, radius sigma
        if r.solarize_p > 0 and torch.rand(1).item() < r.solarize_p:
            img = ImageOps.solarize(img, 128)
        return image_pixels(img).permute(2, 0, 1)


class ViewPipeline:
    """`pipeline(img)` -> [view_1, ..., view_k] (the dataset transform, in the workers);
    `pipeline.to_device(views, device, step)` -> the batched views as normalised floats on the
    device (in the training step; with --gpu-aug, augmented there, with random parameters
    seeded from (seed, step, rank) so that a resumed run draws the same ones)."""

    def __init__(self, recipes, mode="fast", seed=0, channels_last=True):
        if mode not in ("fast", "gpu", "torchvision", "device"):
            raise ValueError(f"unknown augmentation mode {mode!r}")
        self.recipes, self.mode, self.seed, self.rank = list(recipes), mode, seed, get_rank()
        self.channels_last = channels_last
        make = {"fast": FastView, "gpu": CropOnlyView}.get(mode)  # "device": no work in workers
        if mode == "torchvision":
            from common.gpu_aug import reference_view as make  # only for --torchvision-aug
        self.views = [make(r) for r in self.recipes] if make else []
        self.images = None  # "device": every train image, uint8 [N, 3, H, W] (`hold_images`)

    def __call__(self, img):
        if self.mode != "torchvision":
            img = image_pixels(img)  # decoded and converted once for all views
        return [view(img) for view in self.views]

    def hold_images(self, dataset, workers=0):
        """--data-on-device: every image of `dataset`, read once, to be held on the device and
        cropped there; returns what the DataLoader reads instead, batches of indices."""
        from common.gpu_aug import ResidentImages
        return ResidentImages(dataset, self, workers)

    def to_device(self, views, device, step=0):
        if self.mode in ("gpu", "device"):  # views made or finished on the device, in [0, 1]
            from common.gpu_aug import device_views
            # the step's random parameters are fixed by (seed, step, rank): a resumed run's too
            seed = ((self.seed * 1_000_003 + step) * 10_007 + self.rank) % 2**63
            views = device_views(self, views, device, torch.Generator().manual_seed(seed))
        else:
            views = [x.to(device, non_blocking=True) for x in views]
        if self.mode == "fast":
            views = [x.float().div_(255) for x in views]
        if self.mode != "torchvision":  # its views are normalised already
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device, non_blocking=True)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device, non_blocking=True)
            views = [x.sub_(mean).div_(std) for x in views]
        if self.channels_last:  # on CUDA, the batches in the model's memory layout
            views = [x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
                     for x in views]
        return views
