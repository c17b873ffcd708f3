"""The augmentation pipelines of common/augment.py against torchvision's transforms.

Both draw their random numbers as the torchvision composition does: the same crop boxes and
flips (torch's uint8 resize within a few levels of PIL's), and for "fast" then exactly torchvision's
colour pixels (its blur, PIL's filter, is compared separately). The device part of "gpu"
(common/gpu_aug.py, tested op by op in test_gpu_aug.py) is compared here through the
statistics of whole pipelines.
"""
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from common.augment import (IMAGENET_MEAN, IMAGENET_STD, CropOnlyView, FastView,
                            ViewPipeline, crop_and_flip, image_pixels, ssl_view)
from common.data import build_dataset
from common.gpu_aug import INTERPOLATION, load_pixels, reference_view
from common.errors import UserError
from tests.helpers import assert_same_tensors, make_image_folder, ok, read_log, run

CPU = torch.device("cpu")


def photo(w=72, h=54, seed=0):
    """A structured RGB image (smooth colour gradients + noise), so crops and jitter matter."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 / w, ys * 255 / h, (xs + ys) * 127 / (w + h) + 64], -1)
    img = img + rng.normal(0, 20, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def normalised(x_uint8):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


RECIPES = [
    ssl_view(32, jitter=(0.8, 0.8, 0.8, 0.2), solarize_p=0.5),              # SimCLR-like
    ssl_view(24, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.5,
             solarize_p=0.2, interpolation="bicubic"),                       # Barlow-like
    ssl_view(16, scale=(0.05, 0.14), jitter=(0.4, 0.0, 0.4, 0.0), jitter_p=1.0),
]


def after_the_crop(recipe):
    """The torchvision composition of `recipe` without its crop and flip (and with its
    ToTensor and Normalize), to apply to our crop."""
    return T.Compose(reference_view(recipe).transforms[2:])


@pytest.mark.parametrize("recipe", RECIPES)
def test_crop_and_flip_match_torchvision(recipe):
    """The same crop boxes and flips as T.RandomResizedCrop + T.RandomHorizontalFlip for the
    same seed; torch's antialiased uint8 resize against PIL's: they round differently, so about
    a quarter of the values differ by one level (bicubic: up to 3 levels)."""
    img = photo()
    crop_flip = T.Compose([T.RandomResizedCrop(recipe.size, recipe.scale, recipe.ratio,
                                               INTERPOLATION[recipe.interpolation]),
                           T.RandomHorizontalFlip(), T.PILToTensor()])
    for seed in range(40):
        torch.manual_seed(seed)
        expected = crop_flip(img).int()
        torch.manual_seed(seed)
        got = crop_and_flip(image_pixels(img), recipe)
        assert got.dtype == torch.uint8 and got.shape == (3, recipe.size, recipe.size)
        diff = (got.int() - expected).abs()
        assert diff.max() <= 3 and diff.float().mean() < 0.4, (seed, diff.max())


@pytest.mark.parametrize("recipe", RECIPES)
def test_fast_view_draws_and_colours_as_torchvision(recipe):
    """After the crop, the fast view's jitter (factors and order), grayscale and solarize give
    exactly torchvision's pixels for the same seed: it draws the same random numbers in the
    same order and applies the same PIL operations."""
    img, fast, rest = photo(), FastView(recipe), after_the_crop(recipe)
    changed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        cropped = crop_and_flip(image_pixels(img), recipe)  # the crop's draws come first
        expected = rest(Image.fromarray(np.ascontiguousarray(cropped.permute(1, 2, 0))))
        torch.manual_seed(seed)
        got = fast(img)
        assert got.dtype == torch.uint8 and got.shape == (3, recipe.size, recipe.size)
        assert torch.allclose(normalised(got), expected, atol=1e-5), seed
        changed += not torch.equal(got, fast(img))  # a different draw gives another view
    assert changed == 40


def test_fast_blur_is_close_to_torchvision_gaussian_blur():
    """PIL's Gaussian filter (box passes, radius = sigma) against torchvision's exact kernel
    (23 px at 224), on the same crop with the same sigma: on average within 1/255, every pixel
    within 12/255 (measured: mean 0.3/255, max 9/255)."""
    recipe = ssl_view(224, jitter_p=0.0, gray_p=0.0, blur_p=1.0)
    img = photo(500, 375)
    fast, rest = FastView(recipe), after_the_crop(recipe)
    for seed in range(6):
        torch.manual_seed(seed)
        cropped = crop_and_flip(image_pixels(img), recipe)
        expected = rest(Image.fromarray(np.ascontiguousarray(cropped.permute(1, 2, 0))))
        torch.manual_seed(seed)
        got = fast(img)
        diff = (normalised(got) - expected) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        assert diff.abs().mean() < 1.0 and diff.abs().max() <= 12.0, (seed, diff.abs().max())
        # and blurring did happen: the unblurred crop differs far more
        unblurred = (normalised(cropped) - expected) * 0.226 * 255
        assert unblurred.abs().mean() > 2.0


def test_gpu_mode_workers_crop_and_flip_only():
    recipe = ssl_view(24, scale=(0.14, 1.0), blur_p=1.0, solarize_p=1.0)
    img = photo()
    pipeline = ViewPipeline([recipe, recipe], "gpu")
    torch.manual_seed(3)
    views = pipeline(img)
    torch.manual_seed(3)
    pixels = image_pixels(img)
    expected = [crop_and_flip(pixels, recipe), crop_and_flip(pixels, recipe)]
    assert all(torch.equal(v, e) for v, e in zip(views, expected))
    assert not torch.equal(views[0], views[1])


def test_to_device_normalises_like_totensor_and_normalize():
    img = photo(24, 24)
    pipeline = ViewPipeline([ssl_view(24)], "fast")
    batch = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1)] * 2)
    (x,) = pipeline.to_device([batch], CPU)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))
    assert x.dtype == torch.float32 and torch.allclose(x[1], expected, atol=1e-6)


def test_gpu_augmentation_is_seeded_by_step_and_rank(monkeypatch):
    """What makes --gpu-aug resumable: a step's augmentations depend on (seed, step, rank)."""
    recipes = [ssl_view(16, blur_p=0.5, solarize_p=0.2)] * 2 + [ssl_view(8, scale=(0.05, 0.3))]
    batch = [torch.stack([CropOnlyView(r)(photo(seed=i)) for i in range(8)]) for r in recipes]

    def augment(step, rank=0, seed=0):
        monkeypatch.setattr("common.augment.get_rank", lambda: rank)  # a process of that rank
        return ViewPipeline(recipes, "gpu", seed).to_device(batch, CPU, step)
    a = augment(step=5)
    assert [tuple(x.shape) for x in a] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, augment(step=5)))
    for other in (augment(step=6), augment(step=5, rank=1), augment(step=5, seed=1)):
        assert not torch.equal(a[0], other[0])
    assert not torch.equal(a[0], a[1])  # views 1 and 2 share a recipe, not their parameters


def grayscale_rate(views):
    """Fraction of views whose three channels are equal (before normalisation)."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x = views * std + mean
    return ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-3).float().mean().item()


def test_gpu_pipeline_agrees_statistically_with_the_reference():
    """Over 3000 views of one image: the grayscale rate, the mean brightness and its spread of
    the --gpu-aug pipeline match the torchvision composition (within sampling error)."""
    recipe = ssl_view(8, scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2,
                      solarize_p=0.2)
    img, n = photo(16, 16), 3000
    torch.manual_seed(0)
    ref = torch.stack([reference_view(recipe)(img) for _ in range(n)])
    torch.manual_seed(0)
    crops = torch.stack([CropOnlyView(recipe)(img) for _ in range(n)])
    (gpu,) = ViewPipeline([recipe], "gpu", seed=0).to_device([crops], CPU, step=0)
    se = (0.2 * 0.8 / n) ** 0.5
    assert abs(grayscale_rate(ref) - 0.2) < 4 * se and abs(grayscale_rate(gpu) - 0.2) < 4 * se
    ref_mean, gpu_mean = ref.mean((1, 2, 3)), gpu.mean((1, 2, 3))
    assert abs(ref_mean.mean() - gpu_mean.mean()) < 4 * ref_mean.std() / n ** 0.5 * 2 ** 0.5
    assert gpu_mean.std() == pytest.approx(ref_mean.std().item(), rel=0.1)


FLAGS = ["simclr.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
         "--synthetic-size", "64", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
         "--knn-every", "0", "--workers", "0"]


@pytest.mark.full
def test_the_three_pipelines_train_on_the_same_views(tmp_path):
    """SimCLR's small-image recipe has no blur: the fast and torchvision pipelines give the same
    views up to the bicubic resize's rounding (up to 3 levels), so the first step's loss (same
    initial network) agrees to 5e-4; the --gpu-aug run draws its colour parameters elsewhere
    and differs by more."""
    losses = {}
    for name, flag in (("fast", []), ("torchvision", ["--torchvision-aug"]), ("gpu", ["--gpu-aug"])):
        ok(run([*FLAGS, "--epochs", "1", *flag, "--run-dir", tmp_path / name]))
        losses[name] = read_log(tmp_path / name)[0]["loss"]
    assert losses["fast"] == pytest.approx(losses["torchvision"], rel=5e-4)
    assert losses["gpu"] != pytest.approx(losses["torchvision"], rel=2e-3)


def test_device_pipeline_agrees_statistically_with_the_reference():
    """--data-on-device: 3000 views of one image made from the image held as uint8 (crop,
    resize, flip and colour on the device side): grayscale rate, mean brightness and its spread
    as the torchvision composition's (within sampling error)."""
    recipe = ssl_view(8, scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2,
                      solarize_p=0.2)
    img, n = photo(16, 16), 3000
    torch.manual_seed(0)
    ref = torch.stack([reference_view(recipe)(img) for _ in range(n)])
    pipeline = ViewPipeline([recipe], "device", seed=0)
    pipeline.images = image_pixels(img).permute(2, 0, 1)[None]  # the whole "train set"
    (views,) = pipeline.to_device([torch.zeros(n, dtype=torch.long)], CPU, step=0)
    se = (0.2 * 0.8 / n) ** 0.5
    assert abs(grayscale_rate(views) - 0.2) < 4 * se
    ref_mean, dev_mean = ref.mean((1, 2, 3)), views.mean((1, 2, 3))
    assert abs(ref_mean.mean() - dev_mean.mean()) < 4 * ref_mean.std() / n ** 0.5 * 2 ** 0.5
    assert dev_mean.std() == pytest.approx(ref_mean.std().item(), rel=0.1)


def test_load_pixels_of_arrays_and_image_folders(tmp_path):
    cifar = type("CifarLike", (), {})()  # torchvision's CIFAR holds data [N, H, W, 3], targets
    cifar.data = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    cifar.targets = [1, 0]
    pixels, labels = load_pixels(cifar)
    assert torch.equal(pixels, torch.from_numpy(cifar.data).permute(0, 3, 1, 2))
    assert labels.tolist() == [1, 0]
    root = make_image_folder(tmp_path / "images", classes=2, train_per_class=3, size=20)
    folder = build_dataset(str(root), "train", None)
    pixels, labels = load_pixels(folder)
    assert pixels.shape == (6, 3, 20, 20) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(pixels[4], image_pixels(Image.open(folder.samples[4][0])).permute(2, 0, 1))
    Image.new("RGB", (30, 20)).save(root / "train" / "class1" / "wide.jpg")
    with pytest.raises(UserError, match="--data-on-device needs images of one size"):
        load_pixels(build_dataset(str(root), "train", None))


@pytest.mark.full
@pytest.mark.parametrize("mode", ["--gpu-aug", "--data-on-device"])
def test_device_augmentation_run_resumes_exactly(tmp_path, monkeypatch, capsys, mode):
    """--gpu-aug and --data-on-device (on the CPU here; the second loads the train set once):
    a run stopped by SIGUSR1 in epoch 2 and resumed ends with the weights and per-step losses
    of an uninterrupted one. In-process, the signal sent by the loader's iterator as it hands
    out epoch 2's second batch."""
    import simclr
    from common.log import Progress

    class SignalInEpochTwo(Progress):
        def __iter__(self):
            for j, item in enumerate(super().__iter__()):
                if self.desc.startswith("epoch 2/") and j == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                yield item

    flags = [str(f) for f in FLAGS[1:]] + [mode]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        simclr.main([*flags, "--run-dir", str(tmp_path / "straight")])
        loaded = "--data-on-device: 64 images of 16x16 px" in capsys.readouterr().out
        assert loaded == (mode == "--data-on-device")
        monkeypatch.setattr("common.run.Progress", SignalInEpochTwo)
        simclr.main([*flags, "--run-dir", str(tmp_path / "resumed")])
        stopped = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
        assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 2)
        monkeypatch.setattr("common.run.Progress", Progress)
        simclr.main([*flags, "--run-dir", str(tmp_path / "resumed")])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert_same_tensors(a, b)
    straight = [r["loss"] for r in read_log(tmp_path / "straight") if "step" in r]
    assert [r["loss"] for r in read_log(tmp_path / "resumed") if "step" in r] == straight
