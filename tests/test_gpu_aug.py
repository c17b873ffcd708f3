"""common/gpu_aug.py: each batched op against torchvision's functional op applied image by
image with the same factor, the whole chain against torchvision's sequential chain, and the
statistics and determinism of the sampled parameters."""
import itertools
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from common.augment import ViewRecipe, crop_and_flip
from common.gpu_aug import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                            apply_params, blur_kernel_size, crop_boxes, crop_resize_flip, gaussian_blur,
                            gpu_augment, grayscale, resident_views, sample_params, solarize)

from tests.helpers import assert_same_tensors

SIZES = [(32, 32), (96, 96), (7, 11)]
ATOL = 1e-5


def images(n, height, width, seed=0):
    """Random floats with the awkward cases planted: gray pixels (max == min), black and white
    pixels, and uint8-quantised pixels with ties between the largest channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, height, width, generator=g)
    x[:, :, 0] = x[:, :1, 0]  # first row gray
    x[:, :, 1, :2] = 0.0
    x[:, :, 1, 2:4] = 1.0
    x[:, :, -1] = torch.randint(0, 4, (n, 3, width), generator=g) * 85 / 255  # many ties
    return x


def per_image(fn, x, factors):
    return torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])


def check(fn, ref, factors, height, width):
    x = images(len(factors), height, width)
    factors = torch.tensor(factors)
    out = fn(x, factors)
    expected = per_image(ref, x, factors)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("height,width", SIZES)
def test_brightness(height, width):
    # 1.8 and 2.5 push most pixels past 1: the clamp must match
    check(adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 1.0, 1.4, 1.8, 2.5], height, width)


@pytest.mark.parametrize("height,width", SIZES)
def test_contrast(height, width):
    check(adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 3.0], height, width)


@pytest.mark.parametrize("height,width", SIZES)
def test_saturation(height, width):
    check(adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 3.0], height, width)


@pytest.mark.parametrize("height,width", SIZES)
def test_hue(height, width):
    check(adjust_hue, TF.adjust_hue, [-0.5, -0.37, -0.1, 0.0, 0.05, 0.25, 0.5], height, width)


def test_hue_of_gray_pixels_is_identity():
    x = torch.rand(4, 1, 8, 8).repeat(1, 3, 1, 1)
    out = adjust_hue(x, torch.tensor([-0.5, -0.2, 0.3, 0.5]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width", SIZES)
def test_grayscale(height, width):
    x = images(3, height, width)
    out = grayscale(x)
    expected = torch.stack([TF.rgb_to_grayscale(img, num_output_channels=3) for img in x])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    out.add_(1)  # a real tensor, not an expanded view (callers normalise in place)


@pytest.mark.parametrize("kernel_size,size", [(3, 32), (9, 32), (9, 96), (23, 32), (23, 96)])
def test_blur_per_sample_sigma(kernel_size, size):
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 4.0])
    x = images(len(sigmas), size, size)
    out = gaussian_blur(x, sigmas, kernel_size)
    expected = torch.stack([TF.gaussian_blur(img, [kernel_size, kernel_size], [float(s), float(s)])
                            for img, s in zip(x, sigmas)])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_blur_non_square():
    sigmas = torch.tensor([0.3, 1.9])
    x = images(2, 20, 13)
    out = gaussian_blur(x, sigmas, 9)
    expected = torch.stack([TF.gaussian_blur(img, [9, 9], [float(s), float(s)])
                            for img, s in zip(x, sigmas)])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_solarize_matches_random_solarize_on_uint8():
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    u8[:, 0, 0, :6] = torch.tensor([0, 126, 127, 128, 129, 255], dtype=torch.uint8)
    mask = torch.tensor([True, False, True, True, False, True])
    out = solarize(u8.float() / 255, mask)
    flip = T.RandomSolarize(threshold=128, p=1.0)
    expected_u8 = torch.stack([flip(img) if m else img for img, m in zip(u8, mask)])
    # exactly the same pixels change, and to the same values
    assert torch.equal(out != u8.float() / 255, expected_u8 != u8)
    torch.testing.assert_close(out, expected_u8.float() / 255, atol=1e-6, rtol=0)


def reference_chain(x, params, recipe):
    """Image by image with torchvision's functional ops, in each sample's own jitter order."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    k = blur_kernel_size(x.shape[-1])
    out = []
    for i, img in enumerate(x):
        if params["jitter_on"][i]:
            for j in params["order"][i].tolist():
                if recipe.jitter[j] != 0:
                    img = ops[j](img, float(params[names[j]][i]))
        if params["gray_on"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params["blur_on"][i]:
            s = float(params["sigma"][i])
            img = TF.gaussian_blur(img, [k, k], [s, s])
        if params["solarize_on"][i]:
            img = TF.solarize(img, threshold=0.5)  # see gpu_aug.solarize: 128 on uint8
        out.append(img)
    return torch.stack(out)


def fixed_params(n, everything=False):
    perms = list(itertools.permutations(range(4)))
    g = torch.Generator().manual_seed(3)
    params = {
        "jitter_on": torch.arange(n) % 5 != 4,
        "brightness": 0.6 + 0.8 * torch.rand(n, generator=g),
        "contrast": 0.6 + 0.8 * torch.rand(n, generator=g),
        "saturation": 0.6 + 0.8 * torch.rand(n, generator=g),
        "hue": 0.2 * torch.rand(n, generator=g) - 0.1,
        "order": torch.tensor([perms[(7 * i) % 24] for i in range(n)]),
        "gray_on": torch.arange(n) % 3 == 0,
        "blur_on": torch.arange(n) % 2 == 0,
        "sigma": 0.1 + 1.9 * torch.rand(n, generator=g),
        "solarize_on": torch.arange(n) % 4 == 1,
    }
    if everything:  # every op on every image: the no-subset path
        params.update({k: torch.ones(n, dtype=torch.bool) for k in params if k.endswith("_on")})
    return params


@pytest.mark.parametrize("jitter,everything", [((0.4, 0.4, 0.4, 0.1), False),
                                               ((0.4, 0.0, 0.2, 0.0), False),
                                               ((0.4, 0.4, 0.4, 0.1), True)])
@pytest.mark.parametrize("size", [32, 96])
def test_apply_params_matches_sequential_chain(jitter, everything, size):
    recipe = ViewRecipe(size=size, jitter=jitter, blur_p=0.5, solarize_p=0.2)
    params = fixed_params(16, everything)
    x = torch.randint(0, 256, (16, 3, size, size), generator=torch.Generator().manual_seed(2))
    x = x.float() / 255
    out = apply_params(x.clone(), params, recipe)
    torch.testing.assert_close(out, reference_chain(x, params, recipe), atol=ATOL, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_gpu_augment_is_seeded_and_equals_apply_params():
    recipe = ViewRecipe(size=32, blur_p=0.5, solarize_p=0.2)
    u8 = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = gpu_augment(u8, recipe, torch.Generator().manual_seed(5))
    b = gpu_augment(u8, recipe, torch.Generator().manual_seed(5))
    params = sample_params(8, recipe, torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32 and a.shape == u8.shape
    assert torch.equal(a, b)
    assert torch.equal(a, apply_params(u8.float() / 255, params, recipe))
    assert 0 <= a.min() and a.max() <= 1


def test_nothing_on_leaves_images_unchanged():
    recipe = ViewRecipe(size=32, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(gpu_augment(u8, recipe, torch.Generator().manual_seed(0)), u8.float() / 255)


# ---------------------------------------------------------------- sampled parameters

N = 20000
STATS_RECIPE = ViewRecipe(size=32, jitter=(0.4, 1.5, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                          blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.1)


@pytest.fixture(scope="module")
def params():
    return sample_params(N, STATS_RECIPE, torch.Generator().manual_seed(1234))


def test_param_shapes_and_types(params):
    for name in ("jitter_on", "gray_on", "blur_on", "solarize_on"):
        assert params[name].dtype == torch.bool and params[name].shape == (N,)
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert params[name].dtype == torch.float32 and params[name].shape == (N,)
    assert params["order"].dtype == torch.long and params["order"].shape == (N, 4)
    assert all(v.device.type == "cpu" for v in params.values())


@pytest.mark.parametrize("name,p", [("jitter_on", 0.8), ("gray_on", 0.2), ("blur_on", 0.5),
                                    ("solarize_on", 0.1)])
def test_rates(params, name, p):
    se = math.sqrt(p * (1 - p) / N)
    assert abs(params[name].float().mean().item() - p) < 4 * se


@pytest.mark.parametrize("name,lo,hi", [("brightness", 0.6, 1.4), ("contrast", 0.0, 2.5),
                                        ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1),
                                        ("sigma", 0.1, 2.0)])
def test_uniform_ranges_and_means(params, name, lo, hi):
    v = params[name]
    width = hi - lo
    assert lo <= v.min().item() < lo + 1e-3 * width  # contrast 1.5: the lower bound is 0
    assert hi - 1e-3 * width < v.max().item() <= hi
    se = width / math.sqrt(12 * N)
    assert abs(v.mean().item() - (lo + hi) / 2) < 4 * se


def test_probabilities_zero_and_one():
    recipe = ViewRecipe(size=32, jitter_p=1.0, gray_p=0.0, blur_p=1.0, solarize_p=0.0)
    p = sample_params(1000, recipe, torch.Generator().manual_seed(0))
    assert p["jitter_on"].all() and p["blur_on"].all()
    assert not p["gray_on"].any() and not p["solarize_on"].any()


def test_orders_are_uniform_permutations(params):
    order = params["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(N, 4))
    counts = {}
    for row in order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 24
    expected = N / 24
    sd = math.sqrt(N * (1 / 24) * (23 / 24))
    assert all(abs(c - expected) < 5 * sd for c in counts.values()), counts
    # each op equally likely in each slot
    for slot in range(4):
        per_op = torch.bincount(order[:, slot], minlength=4).float()
        assert (per_op - N / 4).abs().max() < 4 * math.sqrt(N * 0.25 * 0.75), (slot, per_op)


def test_same_seed_same_params_and_resume():
    recipe = STATS_RECIPE
    a = sample_params(64, recipe, torch.Generator().manual_seed(7))
    b = sample_params(64, recipe, torch.Generator().manual_seed(7))
    c = sample_params(64, recipe, torch.Generator().manual_seed(8))
    assert_same_tensors(a, b)
    assert not torch.equal(a["brightness"], c["brightness"])
    # restoring a generator's state mid-run draws the same next batch
    g = torch.Generator().manual_seed(9)
    sample_params(64, recipe, g)
    state = g.get_state()
    first = sample_params(64, recipe, g)
    g.set_state(state)
    again = sample_params(64, recipe, g)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    recipe = ViewRecipe(size=96, blur_p=0.5, solarize_p=0.2)
    u8 = torch.randint(0, 256, (32, 3, 96, 96), dtype=torch.uint8)
    cpu = gpu_augment(u8, recipe, torch.Generator().manual_seed(0))
    gpu = gpu_augment(u8.cuda(), recipe, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- --data-on-device: crop and flip

def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, values, right=True) / len(x)
    return (cdf(a) - cdf(b)).abs().max().item()


def torchvision_boxes(n, height, width, scale, seed=0):
    """T.RandomResizedCrop.get_params n times: [n, 4] (top, left, h, w)."""
    torch.manual_seed(seed)
    img = torch.zeros(3, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                         for _ in range(n)], dtype=torch.float)


@pytest.mark.parametrize("height,width", [(32, 32), (96, 96), (40, 24)])
def test_crop_boxes_follow_random_resized_crop(height, width):
    n, recipe = 20000, ViewRecipe(32)
    top, left, h, w, flip = crop_boxes(n, height, width, recipe, torch.Generator().manual_seed(1))
    ref = torchvision_boxes(n, height, width, recipe.scale)
    assert ((h >= 1) & (h + top <= height) & (w >= 1) & (w + left <= width)).all()
    # KS critical value at alpha 0.001 for two samples of 20,000: 1.95 * sqrt(2 / n) = 0.0195
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]),
                         (top, ref[:, 0]), (left, ref[:, 1])):
        assert ks_distance(ours, theirs) < 0.0195
    assert abs(flip.float().mean().item() - 0.5) < 0.015  # 4.2 standard deviations
    # the control: crops of another scale range are told apart by the same test
    wider = torchvision_boxes(n, height, width, (0.2, 1.0))
    assert ks_distance(h * w, wider[:, 2] * wider[:, 3]) > 0.05


def test_crop_boxes_fall_back_to_the_central_crop_as_torchvision():
    # a 32 x 8 image with crops of its whole area and aspects in (3/4, 4/3): no try ever fits
    recipe = ViewRecipe(8, scale=(1.0, 1.0))
    top, left, h, w, _ = crop_boxes(50, 8, 32, recipe, torch.Generator().manual_seed(0))
    ref = torchvision_boxes(1, 8, 32, recipe.scale)[0]
    assert ref.tolist() == [0, 10, 8, 11]  # torchvision: height 8, width 8 x 4/3, centred
    assert (top == 0).all() and (left == 10).all() and (h == 8).all() and (w == 11).all()


@pytest.mark.parametrize("mode,share", [("bilinear", 0.2), ("bicubic", 0.02)])
@pytest.mark.parametrize("side,size", [(32, 32), (96, 32), (40, 16)])
def test_crop_resize_flip_gives_the_cpu_pipelines_pixels(mode, share, side, size):
    """For the same box and flip, the view equals the fast CPU pipeline's (crop_and_flip: the
    cropped pixels resized by torch's antialiased uint8 interpolation), enlarging or shrinking,
    bilinear or bicubic: to 2 levels, on a small share of the pixels (the uint8 resize rounds
    its fixed-point weights)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, side, side * 3 // 4 if side == 40 else side), dtype=torch.uint8,
                      generator=g)
    recipe = ViewRecipe(size, interpolation=mode)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = crop_and_flip(x.permute(1, 2, 0), recipe)  # draws the box, then the flip
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(x, list(recipe.scale), list(recipe.ratio))
        flip = torch.rand(1) < 0.5
        boxes = tuple(torch.tensor([float(v)]) for v in box) + (flip,)
        diff = (crop_resize_flip(x[None], boxes, size, mode)[0] * 255 - expected.float()).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() < share, (seed, box, diff.max())


def test_resident_views_seeded_by_step_and_batched_by_recipe():
    images = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8)
    small, large = ViewRecipe(8, scale=(0.05, 0.14)), ViewRecipe(16, blur_p=0.5)
    idx = [torch.tensor([3, 1, 4]), torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9])]
    recipes = [large, large, small]
    a = resident_views(images, idx, recipes, torch.Generator().manual_seed(7))
    b = resident_views(images, idx, recipes, torch.Generator().manual_seed(7))
    c = resident_views(images, idx, recipes, torch.Generator().manual_seed(8))
    assert [tuple(v.shape) for v in a] == [(3, 3, 16, 16), (3, 3, 16, 16), (3, 3, 8, 8)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # the same seed: the same views
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two views of the same images differ
    assert all(0 <= v.min() and v.max() <= 1 for v in a)
