"""Multi-crop SimCLR (simclr.multi_crop_nt_xent_loss, the crop flags, the grouped forward) and the
projector depth (--proj-layers), against naive re-implementations written here."""
import math

import pytest
import torch
import torch.nn as nn

import simclr
from common.model import resnet_backbone
from common.augment import ssl_view
from tests.ddp_check import make_crops, make_model, multi_crop_grads_and_loss
from tests.helpers import ok, run


def naive_multi_crop(z, num_crops, temperature):
    """VISSL's multi-crop SimCLR loss (vissl/losses/multicrop_simclr_info_nce_loss.py), one
    (anchor, positive) pair at a time. z: [C*N, D], crop c of image i at row c*N + i. Each anchor
    a pairs with every other crop p of its image; the pair's denominator is the positive plus every
    crop of the OTHER images. VISSL returns the mean over the pairs; we compare with twice that."""
    n = z.shape[0] // num_crops
    u = [v / v.norm() for v in z]
    image = [k % n for k in range(len(u))]
    terms = []
    for a in range(len(u)):
        negatives = sum(torch.exp(u[a] @ u[k] / temperature)
                        for k in range(len(u)) if image[k] != image[a])
        for p in range(len(u)):
            if p != a and image[p] == image[a]:
                positive = torch.exp(u[a] @ u[p] / temperature)
                terms.append(-torch.log(positive / (positive + negatives)))
    assert len(terms) == num_crops * (num_crops - 1) * n
    return 2 * sum(terms) / len(terms)


# 2 + 3 = 5: crops of two groups (e.g. 2 large + 3 small) are all alike to the loss
@pytest.mark.parametrize("num_crops", [2, 3, 4, 2 + 3])
def test_matches_naive_loop_value_and_gradient(num_crops):
    torch.manual_seed(num_crops)
    z = torch.randn(num_crops * 4, 6, dtype=torch.float64, requires_grad=True)
    for temperature in (0.1, 0.5, 1.0):
        fast = simclr.multi_crop_nt_xent_loss(z, num_crops, temperature)
        slow = naive_multi_crop(z, num_crops, temperature)
        assert torch.allclose(fast, slow, rtol=1e-10), (temperature, fast, slow)
        (g_fast,), (g_slow,) = torch.autograd.grad(fast, z), torch.autograd.grad(slow, z)
        assert torch.allclose(g_fast, g_slow, rtol=1e-8, atol=1e-12), temperature


def test_two_crops_equal_nt_xent():
    torch.manual_seed(0)
    z = torch.randn(2 * 7, 5, dtype=torch.float64, requires_grad=True)
    for temperature in (0.1, 0.5):
        multi = simclr.multi_crop_nt_xent_loss(z, 2, temperature)
        pair = simclr.nt_xent_loss(*z.chunk(2), temperature)
        assert torch.allclose(multi, pair, rtol=1e-12), (multi, pair)
        (g_multi,), (g_pair,) = torch.autograd.grad(multi, z), torch.autograd.grad(pair, z)
        assert torch.allclose(g_multi, g_pair, rtol=1e-10, atol=1e-14)


def test_uniform_embeddings_and_invariances():
    # All crops identical: each pair's denominator holds 1 positive + C(N - 1) negatives, all
    # equal, so the loss is 2 log(C(N - 1) + 1) (the other positives are not in the denominator).
    C, N = 4, 5
    assert math.isclose(simclr.multi_crop_nt_xent_loss(torch.ones(C * N, 3), C, 0.5).item(),
                        2 * math.log(C * (N - 1) + 1), rel_tol=1e-6)
    torch.manual_seed(2)
    z = torch.randn(C, N, 8)
    base = simclr.multi_crop_nt_xent_loss(z.flatten(0, 1), C, 0.2)
    images, crops = torch.randperm(N), torch.tensor([2, 0, 3, 1])
    for permuted in (z[:, images], z[crops], 3 * z):  # image order, crop order, scale
        assert torch.allclose(base, simclr.multi_crop_nt_xent_loss(permuted.flatten(0, 1), C, 0.2),
                              atol=1e-6)
    # but crops must stay aligned: mixing images within one crop changes the loss
    z[1] = z[1].roll(1, dims=0)
    assert not torch.allclose(base, simclr.multi_crop_nt_xent_loss(z.flatten(0, 1), C, 0.2))


@pytest.mark.full
def test_two_processes_equal_one(tmp_path):
    """DDP, 2 gloo processes x 4 images x 3 crops == 1 process x 8 images x 3 crops (the
    mechanism of tests/test_ddp.py, whose worker tests/ddp_check.py takes the crop count)."""
    out = tmp_path / "ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/ddp_check.py", out, 3], timeout=180))
    ddp = torch.load(out)
    assert ddp["world"] == 2
    loss, grads = multi_crop_grads_and_loss(make_model(), *make_crops(3))
    assert torch.allclose(ddp["loss"], loss, rtol=1e-5, atol=1e-6), (ddp["loss"], loss)
    for name, g in grads.items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-5, atol=1e-6), name
    # control: a gather without gradient gives other gradients, so the check above can fail
    assert any(not torch.allclose(ddp["broken"][k], g, rtol=1e-3, atol=1e-5)
               for k, g in grads.items())


# ------------------------------------------------------------------------------- flags, crops

def test_default_crops_are_the_papers_two_views():
    """Without crop flags, simclr_crops gives what simclr_view gave before multi-crop: 2 crops of
    --img-size, scale (0.08, 1), SimCLR's colour strength and blur, in both recipes, resized
    bicubically as the official data_util.py."""
    for argv, size, s, blur in ((["--data", "synthetic"], 32, 0.5, 0.0),
                                (["--data", "/imagenet"], 224, 1.0, 0.5)):
        old_view = ssl_view(size, scale=(0.08, 1.0), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                            jitter_p=0.8, gray_p=0.2, blur_p=blur, interpolation="bicubic")
        assert simclr.simclr_crops(simclr.get_args(argv)) == [old_view] * 2


def test_multi_crop_flags():
    args = simclr.get_args(["--data", "/imagenet", "--num-crops", "2", "4", "--crop-sizes", "160",
                            "96", "--crop-scales", "0.08", "1", "0.05", "0.14"])
    recipes = simclr.simclr_crops(args)
    assert [(r.size, r.scale) for r in recipes] == ([(160, (0.08, 1.0))] * 2
                                                    + [(96, (0.05, 0.14))] * 4)
    assert all(r.jitter == (0.8, 0.8, 0.8, 0.2) and r.blur_p == 0.5 for r in recipes)


@pytest.mark.parametrize("flags, message", [
    (["--num-crops", "2", "2", "--crop-sizes", "16"], "--num-crops has 2 group(s)"),
    (["--num-crops", "2", "2", "--crop-sizes", "16", "8"], "--num-crops has 2 group(s)"),
    (["--num-crops", "1"], "at least 2 crops in all"),
    (["--crop-scales", "0.5", "0.2"], "0 < MIN <= MAX <= 1"),
    (["--proj-layers", "0"], "--proj-layers 0"),
])
def test_bad_flags_one_clear_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        simclr.main(["--data", "synthetic", "--run-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


# ------------------------------------------------------------------------------- model

def test_forward_groups_crops_by_resolution():
    """2 x 16 px + 3 x 8 px: each resolution is one backbone pass (its own BN statistics), the
    projector sees all 5 crops at once; the paper's two views are one pass of both, as before."""
    torch.manual_seed(0)
    model = simclr.SimCLR("resnet18", small_images=True, hidden_dim=32, out_dim=8).train()
    big, small = torch.randn(2, 4, 3, 16, 16), torch.randn(3, 4, 3, 8, 8)
    crops = [*big, *small]
    with torch.no_grad():
        expected = model.projector(torch.cat([model.backbone(big.flatten(0, 1)),
                                              model.backbone(small.flatten(0, 1))]))
        assert torch.allclose(model(crops), expected, atol=1e-6)
        one_at_a_time = model.projector(torch.cat([model.backbone(x) for x in crops]))
        assert not torch.allclose(model(crops), one_at_a_time, atol=1e-4)  # BN: the test can fail
        before_multi_crop = model.projector(model.backbone(torch.cat([big[0], big[1]])))
        assert torch.equal(model([big[0], big[1]]), before_multi_crop)


def old_simclr(arch, small_images, hidden_dim=None, out_dim=128):
    """simclr.SimCLR's constructor as it was before --proj-layers, copied."""
    model = nn.Module()
    model.backbone = resnet_backbone(arch, cifar_stem=small_images, zero_init_residual=True)
    hidden_dim = hidden_dim or model.backbone.feature_dim
    model.projector = nn.Sequential(
        nn.Linear(model.backbone.feature_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    model.projector[-1].bias.requires_grad_(False)
    for layer in model.projector:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.01)
    return model


def test_two_layer_projector_is_unchanged():
    torch.manual_seed(3)
    old = old_simclr("resnet18", True, 64, 16)
    torch.manual_seed(3)
    new = simclr.SimCLR("resnet18", True, 64, 16)  # default: 2 layers
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(old_sd) == list(new_sd)  # same keys, same order
    for k in old_sd:
        assert torch.equal(old_sd[k], new_sd[k]), k
    assert ([(k, p.requires_grad) for k, p in old.named_parameters()]
            == [(k, p.requires_grad) for k, p in new.named_parameters()])


def test_three_layer_projector_is_simclr_v2s():
    model = simclr.SimCLR("resnet18", True, hidden_dim=64, out_dim=16, proj_layers=3)
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [
        (512, 64, None), (64, 64, None), (64, 16, None)]
    bns = [m for m in model.projector if isinstance(m, nn.BatchNorm1d)]
    # hidden BNs scale and shift (centre), the last one only scales
    assert [m.bias.requires_grad for m in bns] == [True, True, False]
    assert model([torch.randn(2, 3, 16, 16)] * 2).shape == (4, 16)
