"""The three augmentation pipelines of common/augment.py against torchvision's transforms.

"fast" draws its random numbers exactly as the torchvision composition does, so for the same
seed it must produce the same pixels (its blur, PIL's filter, is compared separately); the
workers' part of "gpu" must be the reference crop and flip; the device part (common/gpu_aug.py,
tested op by op in test_gpu_aug.py) is compared here through the statistics of whole pipelines.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from common.augment import (IMAGENET_MEAN, IMAGENET_STD, CropOnlyView, FastView, ViewPipeline,
                            reference_view, ssl_view)
from tests.helpers import ok, read_log, run, run_until_signal

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


@pytest.mark.parametrize("recipe", [
    ssl_view(32, jitter=(0.8, 0.8, 0.8, 0.2), solarize_p=0.5),              # SimCLR-like
    ssl_view(24, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.5,
             solarize_p=0.2, interpolation="bicubic"),                       # Barlow-like
    ssl_view(16, scale=(0.05, 0.14), jitter=(0.4, 0.0, 0.4, 0.0), jitter_p=1.0),
])
def test_fast_view_equals_the_torchvision_composition_for_the_same_seed(recipe):
    img, ref, fast = photo(), reference_view(recipe), FastView(recipe)
    changed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        expected = ref(img)
        torch.manual_seed(seed)
        got = fast(img)
        assert got.dtype == torch.uint8 and got.shape == (3, recipe.size, recipe.size)
        assert torch.allclose(normalised(got), expected, atol=1e-5), seed
        changed += not torch.equal(got, fast(img))  # a different draw gives another view
    assert changed == 40


def test_fast_blur_is_close_to_torchvision_gaussian_blur():
    """PIL's Gaussian filter (box passes, radius = sigma) against torchvision's exact kernel
    (23 px at 224), with the same crop and the same sigma: on average within 1/255, every pixel
    within 12/255 (measured: mean 0.3/255, max 9/255)."""
    recipe = ssl_view(224, jitter_p=0.0, gray_p=0.0, blur_p=1.0)
    img = photo(500, 375)
    ref, fast = reference_view(recipe), FastView(recipe)
    for seed in range(6):
        torch.manual_seed(seed)
        expected = ref(img)
        torch.manual_seed(seed)
        got = fast(img)
        diff = (normalised(got) - expected) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        assert diff.abs().mean() < 1.0 and diff.abs().max() <= 12.0, (seed, diff.abs().max())
    # and blurring did happen: without it the views differ far more
    torch.manual_seed(0)
    unblurred = normalised(CropOnlyView(recipe)(img))
    torch.manual_seed(0)
    assert ((unblurred - ref(img)) * 0.226 * 255).abs().mean() > 2.0


def test_gpu_mode_workers_do_the_reference_crop_and_flip():
    recipe = ssl_view(24, scale=(0.14, 1.0), jitter_p=0.0, gray_p=0.0)  # crop and flip only
    img, ref, crop = photo(), reference_view(recipe), CropOnlyView(recipe)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = ref(img)
        torch.manual_seed(seed)
        assert torch.allclose(normalised(crop(img)), expected, atol=1e-5), seed


def test_to_device_normalises_like_totensor_and_normalize():
    img = photo(24, 24)
    pipeline = ViewPipeline([ssl_view(24)], "fast")
    batch = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1)] * 2)
    (x,) = pipeline.to_device([batch], CPU)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(img))
    assert x.dtype == torch.float32 and torch.allclose(x[1], expected, atol=1e-6)


def test_gpu_augmentation_is_seeded_by_step_and_rank():
    """What makes --gpu-aug resumable: a step's augmentations depend on (seed, step, rank)."""
    recipes = [ssl_view(16, blur_p=0.5, solarize_p=0.2)] * 2 + [ssl_view(8, scale=(0.05, 0.3))]
    batch = [torch.stack([CropOnlyView(r)(photo(seed=i)) for i in range(8)]) for r in recipes]

    def augment(step, rank=0, seed=0):
        return ViewPipeline(recipes, "gpu", seed, rank).to_device(batch, CPU, step)
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


def test_fast_and_torchvision_pipelines_train_identically(tmp_path):
    """SimCLR's small-image recipe has no blur, the one operation the fast pipeline implements
    differently: a run with it and a run with --torchvision-aug see the same pixels."""
    fast, reference = tmp_path / "fast", tmp_path / "reference"
    ok(run([*FLAGS, "--epochs", "1", "--run-dir", fast]))
    ok(run([*FLAGS, "--epochs", "1", "--torchvision-aug", "--run-dir", reference]))
    assert [r["loss"] for r in read_log(fast)] == [r["loss"] for r in read_log(reference)]


def test_gpu_aug_run_resumes_exactly(tmp_path):
    """--gpu-aug (on the CPU here): stopped by SIGUSR1 in epoch 2 and resumed, the run ends
    with the weights of an uninterrupted one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run([*FLAGS, "--gpu-aug", "--run-dir", straight]))
    stopped = run_until_signal([*FLAGS, "--gpu-aug", "--run-dir", resumed], resumed, after_step=5)
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1
    ok(run([*FLAGS, "--gpu-aug", "--run-dir", resumed]))
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fast = read_log(straight)[0]["loss"]
    ok(run([*FLAGS, "--epochs", "1", "--run-dir", tmp_path / "fast"]))
    assert read_log(tmp_path / "fast")[0]["loss"] != fast  # the device augmentation did run
