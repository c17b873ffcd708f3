"""Batched augmentation on the device, imported only by three flags: the colour jitter,
grayscale, blur and solarize of --gpu-aug; also the images, random resized crop and flip of
--data-on-device; and --torchvision-aug's composition, which the others are tested against.

Each op takes per-sample factors and matches, image by image, torchvision's functional op on
float images (torchvision.transforms.v2.functional). The random parameters are drawn on the
CPU, as torchvision's transforms draw them per image, so that a seeded generator reproduces a
step's augmentations exactly (resume) and selecting samples needs no device-to-host sync."""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from common.data import IMAGENET_MEAN, IMAGENET_STD, image_pixels, labels_of
from common.dist import get_rank
from common.errors import UserError

# torchvision's rgb_to_grayscale weights (0.2989, not 0.299), so that contrast, saturation and
# grayscale agree with it to float precision
GRAY = (0.2989, 0.587, 0.114)
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def blur_kernel_size(size):
    """Odd kernel width of about 10% of the view (23 px at 224, 9 at 96, 3 at 32), as the
    official SimCLR and BYOL code (kernel_size = size // 10, made odd)."""
    return 2 * (size // 20) + 1


def reference_view(recipe):
    """The standard torchvision composition of `recipe`, with float normalised output."""
    ops = [T.RandomResizedCrop(recipe.size, recipe.scale, recipe.ratio,
                               INTERPOLATION[recipe.interpolation]),
           T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_p),
           T.RandomGrayscale(p=recipe.gray_p)]
    if recipe.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(recipe.size), recipe.blur_sigma)],
                                 p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=recipe.solarize_p))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _per_sample(f, x):
    # [n] -> [n, 1, 1, 1]; non_blocking: the host queues the copy, no wait for the device's queue
    return f.to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _luma(x):
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _blend(x, other, f):
    f = _per_sample(f, x)
    return (x * f + other * (1 - f)).clamp(0, 1)


def adjust_brightness(x, f):
    return (x * _per_sample(f, x)).clamp(0, 1)


def adjust_contrast(x, f):
    return _blend(x, _luma(x).mean(dim=(-2, -1), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _luma(x), f)


def adjust_hue(x, shift):
    r, g, b = x.split(1, dim=1)
    v, lo = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    d = v - lo
    # gray pixels (d == 0) get hue 0 and saturation 0; the divisors are made safe rather than
    # the NaNs cleaned up afterwards. Where two channels tie for the maximum, both branches
    # give the same hue.
    s = d / torch.where(v > 0, v, 1.0)
    dd = torch.where(d > 0, d, 1.0)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))
    h = torch.remainder(torch.remainder(h / 6, 1.0) + _per_sample(shift, x), 1.0)
    # back to RGB in closed form, n = 5, 3, 1 for r, g, b: no sector lookup needed
    k = torch.remainder(torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                        + 6 * h, 6.0)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def grayscale(x):
    # a real copy, not an expanded view: callers normalise the result in place
    return _luma(x).repeat(1, 3, 1, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Per-sample sigma [n]; reflect padding, as F.gaussian_blur(img, [k, k], [s, s])."""
    n, c, height, width = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    w = torch.exp(-t ** 2 / (2 * _per_sample(sigma, x).view(-1, 1) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per image channel
    p = kernel_size // 2
    # the Gaussian is separable: padding once, then a row pass and a column pass, gives the
    # same result as the 2-D kernel on the padded image, at 2k instead of k^2 products a pixel
    y = F.pad(x, (p, p, p, p), mode="reflect").reshape(1, n * c, height + 2 * p, width + 2 * p)
    y = F.conv2d(y, w.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, w.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, height, width)


def solarize(x, mask):
    # 0.5 lies midway between 127/255 and 128/255, so images that came from uint8 flip exactly
    # the pixels RandomSolarize(128) flips on the uint8 image, whatever the float rounding
    mask = mask.to(x.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mask & (x >= 0.5), 1 - x, x)


def sample_params(n, recipe, generator):
    """Per-sample random parameters for n images, drawn on the CPU from `generator`, as
    torchvision draws them per image: *_on [n] bool masks, brightness / contrast / saturation
    [n] ~ U(max(0, 1 - s), 1 + s), hue [n] ~ U(-h, h), order [n, 4] a random permutation of the
    four jitter ops (ColorJitter's randperm(4)), sigma [n] ~ U(blur_sigma). A dict of CPU
    tensors; every entry is always drawn, so the generator's stream does not depend on p."""
    rand = partial(torch.rand, generator=generator)

    def uniform(lo, hi):
        return lo + (hi - lo) * rand(n)

    b, c, s, h = recipe.jitter
    return {
        "jitter_on": rand(n) < recipe.jitter_p,
        "brightness": uniform(max(0.0, 1 - b), 1 + b),
        "contrast": uniform(max(0.0, 1 - c), 1 + c),
        "saturation": uniform(max(0.0, 1 - s), 1 + s),
        "hue": uniform(-h, h),
        "order": rand(n, 4).argsort(1),  # sorting i.i.d. uniforms: a uniform permutation
        "gray_on": rand(n) < recipe.gray_p,
        "blur_on": rand(n) < recipe.blur_p,
        "sigma": uniform(*recipe.blur_sigma),
        "solarize_on": rand(n) < recipe.solarize_p,
    }


def _on_subset(x, mask, fn, *factors):
    """x with fn(x[mask], factors[mask]) written back, in place. The mask is read on the CPU
    (no sync), and only the selected images are computed."""
    idx = mask.nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    factors = [f[idx] for f in factors]
    if len(idx) == len(x):
        return fn(x, *factors)
    idx_dev = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx_dev, fn(x[idx_dev], *factors))


def apply_params(x, params, recipe):
    """x: float [n, 3, H, W] in [0, 1] on any device, overwritten -> the augmented images, float
    in [0, 1]: colour jitter (each sample's ops in its own order), grayscale, Gaussian blur
    (kernel size from the image's width), solarize, each where its (CPU) mask is on."""
    jitter = (("brightness", adjust_brightness), ("contrast", adjust_contrast),
              ("saturation", adjust_saturation), ("hue", adjust_hue))
    for slot in range(4):
        for j, (name, op) in enumerate(jitter):
            if recipe.jitter[j] == 0:  # ColorJitter leaves out an op of strength 0
                continue
            x = _on_subset(x, params["jitter_on"] & (params["order"][:, slot] == j), op, params[name])
    x = _on_subset(x, params["gray_on"], grayscale)
    k = blur_kernel_size(x.shape[-1])
    x = _on_subset(x, params["blur_on"], lambda y, s: gaussian_blur(y, s, k), params["sigma"])
    if params["solarize_on"].any():
        x = solarize(x, params["solarize_on"])
    return x


def gpu_augment(x_uint8, recipe, generator):
    """uint8 [n, 3, H, W] (on the device) -> augmented float [n, 3, H, W] in [0, 1], not
    normalised; a new tensor, safe to modify in place."""
    params = sample_params(len(x_uint8), recipe, generator)
    return apply_params(x_uint8.float().div(255), params, recipe)


def crop_boxes(n, height, width, recipe, generator):
    """n random resized crops of a height x width image, as T.RandomResizedCrop.get_params draws
    them (up to 10 tries of an area in `recipe.scale` and a log-uniform aspect in `recipe.ratio`,
    the first that fits wins, else the central crop of the ratio nearest the image's), and n
    horizontal flips (p 0.5). CPU tensors: top, left, h, w [n] (integral floats), flip [n]."""
    rand = partial(torch.rand, generator=generator)
    lo, hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    area = height * width * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * rand(n, 10))
    aspect = torch.exp(lo + (hi - lo) * rand(n, 10))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # [n, 10]
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top, left = (rand(n) * (height - h + 1)).floor(), (rand(n) * (width - w + 1)).floor()
    ratio = width / height  # the fallback: the whole image, cut to the nearest allowed ratio
    fw = width if ratio <= recipe.ratio[1] else round(height * recipe.ratio[1])
    fh = height if ratio >= recipe.ratio[0] else round(width / recipe.ratio[0])
    found = fits.any(1)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    h, w = torch.where(found, h, float(fh)), torch.where(found, w, float(fw))
    return top, left, h, w, rand(n) < 0.5


def _resize_weights(start, length, size, extent, mode):
    """[n, size, extent]: row i the weights over an image axis of output pixel i of the box
    [start, start + length) resized to `size`, as torch's (and PIL's) antialiased resize: the
    triangle, or the cubic with a = -0.5, centred at (i + 0.5) * length / size, widened by that
    ratio when shrinking, cut at the box's edges and normalised."""
    ratio = (length / size).clamp(min=1)[:, None, None]                       # [n, 1, 1]
    centre = (torch.arange(size, device=start.device) + 0.5) * (length / size)[:, None]
    j = torch.arange(extent, device=start.device) - start[:, None, None]      # [n, 1, extent]
    x = ((j + 0.5 - centre[:, :, None]) / ratio).abs()                         # [n, size, extent]
    if mode == "bilinear":
        w = (1 - x).clamp(min=0)
    else:
        a = -0.5
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        w = torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    w = w * ((j >= 0) & (j < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def crop_resize_flip(images, boxes, size, mode="bilinear"):
    """uint8 [n, 3, H, W] on the device and crop_boxes' (top, left, h, w, flip) -> float
    [n, 3, size, size] in [0, 1]: each box resized as the CPU pipeline's resize (to one level
    after rounding), as two batched matrix products, then flipped where asked, and rounded to
    1/255 as the CPU pipeline's uint8 result."""
    _, _, height, width = images.shape
    top, left, h, w, flip = (t.to(images.device, non_blocking=True) for t in boxes)
    rows = _resize_weights(top, h, size, height, mode)                          # [n, size, H]
    cols = _resize_weights(left, w, size, width, mode)                          # [n, size, W]
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    # columns first, rounded and clipped to uint8 levels in between, as the uint8 resize does
    # (it matters for bicubic, whose overshoot the intermediate uint8 image clips)
    x = torch.einsum("nchw,ntw->ncht", images.float(), cols).clamp_(0, 255).round_()
    x = torch.einsum("nsh,ncht->ncst", rows, x)
    return x.clamp_(0, 255).round_().div_(255)


def _per_recipe(recipes, make):
    """The views of each recipe (SwAV's crops of one size) made as one batch, make(recipe,
    which) for the views `which`, and split back into the views."""
    out = [None] * len(recipes)
    for recipe in dict.fromkeys(recipes):
        which = [i for i, r in enumerate(recipes) if r == recipe]
        for i, x in zip(which, make(recipe, which).chunk(len(which))):
            out[i] = x
    return out


def resident_views(images, index_batches, recipes, generator):
    """Views of the images held on the device: for each view, its batch of indices [n] -> crop,
    resize, flip, then its recipe's colour operations -> float [n, 3, size, size] in [0, 1]."""
    height, width = images.shape[-2:]

    def make(recipe, which):
        idx = torch.cat([index_batches[i] for i in which])
        boxes = crop_boxes(len(idx), height, width, recipe, generator)
        x = crop_resize_flip(images[idx.to(images.device, non_blocking=True)], boxes,
                             recipe.size, recipe.interpolation)
        return apply_params(x, sample_params(len(idx), recipe, generator), recipe)
    return _per_recipe(recipes, make)


def device_views(pipeline, views, device, generator):
    """A step's views from a ViewPipeline in mode "gpu" (the workers' uint8 crops, augmented
    here) or "device" (batches of indices into the images it holds, moved to the device at the
    first step) -> float [n, 3, size, size] in [0, 1], before normalisation."""
    if pipeline.mode == "gpu":
        views = [x.to(device, non_blocking=True) for x in views]
        return _per_recipe(pipeline.recipes, lambda recipe, which: gpu_augment(
            torch.cat([views[i] for i in which]), recipe, generator))
    if pipeline.images.device != device:
        pipeline.images = pipeline.images.to(device)  # once: the whole train set, uint8
    return resident_views(pipeline.images, views, pipeline.recipes, generator)


def load_pixels(dataset, workers=0):
    """Every image of `dataset` (its transform bypassed) as one uint8 tensor [N, 3, H, W] and
    its labels [N], on the CPU. torchvision's CIFAR and STL-10 hold theirs as arrays already;
    other datasets are decoded once, by `workers` processes. All images must have one size."""
    data = getattr(dataset, "data", None)
    if hasattr(data, "ndim") and data.ndim == 4:  # CIFAR: [N, H, W, 3]; STL-10: [N, 3, H, W]
        pixels, labels = torch.as_tensor(data), torch.as_tensor(labels_of(dataset))
    else:
        transform, dataset.transform = dataset.transform, image_pixels
        try:
            pixels, labels = zip(*DataLoader(dataset, batch_size=256, num_workers=workers))
        except RuntimeError as e:  # the default collate stacks: images of several sizes
            raise UserError(f"--data-on-device needs images of one size ({str(e).splitlines()[0]}); "
                            f"resize them, or leave the flag out") from None
        finally:
            dataset.transform = transform
        pixels, labels = torch.cat(pixels), torch.cat(labels)
    return (pixels.permute(0, 3, 1, 2) if pixels.shape[-1] == 3 else pixels).contiguous(), labels


class ResidentImages(Dataset):
    """What the DataLoader of `--data-on-device` reads: each batch of indices of the usual seeded,
    sharded, resumable sampler, fetched at once (`__getitems__`) as ([indices] * views, labels).
    The images go to the ViewPipeline `pipeline`, which holds them on the device and makes each
    step's views there: no loader workers, no per-image Python work in the epoch."""

    def __init__(self, dataset, pipeline, workers=0):
        self.views = len(pipeline.recipes)
        pipeline.images, self.labels = load_pixels(dataset, workers)
        if get_rank() == 0:
            n, c, h, w = pipeline.images.shape
            print(f"--data-on-device: {n} images of {w}x{h} px, {n * c * h * w / 2**20:.0f} MiB "
                  f"as uint8 on the device", flush=True)

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [idx] * self.views, self.labels[idx]
