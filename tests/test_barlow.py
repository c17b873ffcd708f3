"""barlow.py: the loss against a naive loop over the cross-correlation matrix and hand-computed
values, its gradient under DDP (2 gloo processes vs one, with controls that reproduce the
1/world bug), the recipes, views, optimizer groups and schedule, and the script end to end
(linear_eval.py on its checkpoint, real JPEGs, exact resume)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from barlow import (BarlowTwins, barlow_optimizer, barlow_twins_loss, barlow_views, get_args,
                    main)
from common.optim import set_lr
from tests import barlow_ddp_check as ddp
from tests.helpers import assert_same_tensors, cifar10_subset, ok, read_log, run, run_until_stopped


# ------------------------------------------------------------------------------- loss

def naive_barlow(z1, z2, lambd):
    """The official form: BatchNorm1d(affine=False) in training mode standardises each view,
    then each entry of the cross-correlation matrix is summed over the batch in explicit loops."""
    n, d = z1.shape
    bn = nn.BatchNorm1d(d, affine=False).to(z1.dtype).train()
    a, b = bn(z1), bn(z2)
    on_diag = off_diag = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            if i == j:
                on_diag = on_diag + (1 - c_ij) ** 2
            else:
                off_diag = off_diag + c_ij ** 2
    return on_diag + lambd * off_diag, on_diag, off_diag


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_loss_matches_naive_loops_value_and_gradient(dtype, rtol):
    g = torch.Generator().manual_seed(0)
    z1 = (torch.randn(9, 6, generator=g, dtype=dtype) * 3 + 1).requires_grad_()
    z2 = (0.7 * z1.detach() + torch.randn(9, 6, generator=g, dtype=dtype)).requires_grad_()
    fast, slow = barlow_twins_loss(z1, z2, 0.3), naive_barlow(z1, z2, 0.3)
    for a, b in zip(fast, slow):  # loss, on-diagonal, off-diagonal
        assert torch.allclose(a, b, rtol=rtol), (a, b)
    for a, b in zip(torch.autograd.grad(fast[0], (z1, z2)), torch.autograd.grad(slow[0], (z1, z2))):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max())
    # invariances: the order of the batch, and swapping the views (C becomes its transpose)
    perm = torch.randperm(9, generator=g)
    assert torch.allclose(barlow_twins_loss(z1[perm], z2[perm], 0.3)[0], fast[0], rtol=rtol)
    assert torch.allclose(barlow_twins_loss(z2, z1, 0.3)[0], fast[0], rtol=rtol)


def test_loss_by_hand():
    # 2 features, 4 samples, z2 = z1. Feature x = (1, -1, 1, -1): mean 0, biased variance 1.
    # Feature y = (2, 0, 0, -2): mean 0, variance 2. Standardised with eps: x / sqrt(1 + eps),
    # y / sqrt(2 + eps). C_11 = 1 / (1 + eps), C_22 = 2 / (2 + eps), and
    # C_12 = C_21 = (1*2 + 0 + 0 + (-1)(-2)) / 4 / sqrt((1+eps)(2+eps)) = 1 / sqrt((1+eps)(2+eps))
    # so on-diagonal = (eps / (1 + eps))^2 + (eps / (2 + eps))^2 (about 1.25e-10: 0 but for eps)
    # and off-diagonal = 2 / ((1 + eps)(2 + eps)) (about 1).
    eps = 1e-5
    z = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, -2.0]], dtype=torch.float64)
    loss, on_diag, off_diag = barlow_twins_loss(z, z.clone(), lambd=0.25)
    on_hand = (eps / (1 + eps)) ** 2 + (eps / (2 + eps)) ** 2
    off_hand = 2 / ((1 + eps) * (2 + eps))
    assert on_diag.item() == pytest.approx(on_hand, rel=1e-9)
    assert off_diag.item() == pytest.approx(off_hand, rel=1e-12)
    assert loss.item() == pytest.approx(on_hand + 0.25 * off_hand, rel=1e-12)

    # perfectly correlated, random: C_ii = v_i / (v_i + eps), on-diagonal sum (eps / (v + eps))^2
    g = torch.Generator().manual_seed(3)
    z = torch.randn(32, 16, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 16)
    v = z.var(dim=0, unbiased=False)
    _, on_diag, _ = barlow_twins_loss(z, z, 0.0051)
    assert on_diag.item() == pytest.approx((eps / (v + eps)).pow(2).sum().item(), rel=1e-6)
    assert on_diag.item() < 1e-8  # 0 but for eps
    # anti-correlated: C_ii = -v_i / (v_i + eps), on-diagonal sum (1 + v / (v + eps))^2 ~ 4 D
    _, on_diag, off_neg = barlow_twins_loss(z, -z, 0.0051)
    assert on_diag.item() == pytest.approx((1 + v / (v + eps)).pow(2).sum().item(), rel=1e-9)
    assert on_diag.item() == pytest.approx(4 * 16, rel=1e-4)
    # the off-diagonal term does not see the sign flip of all features
    assert off_neg.item() == pytest.approx(barlow_twins_loss(z, z, 0.0051)[2].item(), rel=1e-9)


# ------------------------------------------------------------------------------- DDP

@pytest.mark.full
def test_two_processes_equal_one_and_the_controls_are_off(tmp_path):
    """2 gloo processes x 8 samples == 1 process x 16: loss terms (every rank) and the gradient
    of every parameter. Controls: an all-reduce of C invisible to autograd (the official code's
    arrangement, and the peer library's bug) gives exactly 1/world of every gradient; with every
    sum invisible to autograd the gradients are wrong too."""
    out = tmp_path / "barlow_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/barlow_ddp_check.py", out], timeout=180))
    res = torch.load(out)
    world = res["world"]
    assert world == 2

    terms, grads = ddp.step(ddp.make_model(), *ddp.make_batch())
    for rank_terms in res["terms"]:  # every rank computed the global loss
        assert torch.allclose(rank_terms, terms, rtol=1e-5), (rank_terms, terms)
    for control_terms in res["control_terms"]:  # the controls change gradients, not values
        assert torch.allclose(control_terms, terms, rtol=1e-5)
    assert grads.keys() == res["grads"].keys() == res["c_plain"].keys()
    assert len(grads) == 5
    for name, g in grads.items():
        assert g.abs().max() > 1e-4, name  # every parameter takes part
        tol = dict(rtol=1e-5, atol=1e-6 * g.abs().max().item())
        assert torch.allclose(res["grads"][name], g, **tol), name
        assert torch.allclose(res["c_plain"][name], g / world, **tol), name
    assert all(not torch.allclose(res["all_plain"][k], g, rtol=1e-3)
               and not torch.allclose(res["all_plain"][k], g / world, rtol=1e-3)
               for k, g in grads.items())


# ------------------------------------------------------------------------------- recipe

def test_recipes_optimizer_groups_and_asymmetric_views():
    a = get_args(["--data", "/imagenet"])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.lr_biases, a.weight_decay) == (
        "resnet50", 1000, 2048, 0.2, 0.0048, 1e-6)
    assert (a.lambd, a.projector, a.warmup_epochs) == (0.0051, "8192-8192-8192", 10)
    s = get_args(["--data", "cifar10"])
    assert (s.arch, s.epochs, s.batch_size, s.lr, s.weight_decay, s.projector) == (
        "resnet18", 1000, 256, 0.3, 1e-4, "2048-2048-2048")
    assert s.lr_biases == pytest.approx(0.3 * 0.0048 / 0.2)  # the official ratio of rates
    assert get_args(["--data", "cifar10", "--projector", "64-32"]).projector == "64-32"
    with pytest.raises(SystemExit):  # a UserError, reported in one line by main()
        main(["--data", "synthetic", "--projector", "64-x-8"])

    # the projector: Linear (no bias) - BN - ReLU per width but the last, then Linear (no bias)
    model = BarlowTwins("resnet18", small_images=True, projector="64-48-16")
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [
        (512, 64, None), (64, 48, None), (48, 16, None)]
    assert torch.all(model.backbone.layer1[0].bn2.weight == 0)  # zero_init_residual

    # two groups: weights (decayed, adapted) and 1-D parameters (neither, at lr x 0.0048 / 0.2)
    flags = SimpleNamespace(weight_decay=1e-6, lr=0.2, lr_biases=0.0048, optimizer="lars",
                            momentum=0.9, lars_eta=0.001, lars_clip=False)
    optimizer = barlow_optimizer(model, flags)
    weights, vectors = optimizer.param_groups
    assert all(p.ndim > 1 for p in weights["params"])
    assert all(p.ndim == 1 for p in vectors["params"])
    assert len(weights["params"]) + len(vectors["params"]) == len(list(model.parameters()))
    assert (weights["weight_decay"], weights["lars_exclude"]) == (1e-6, False)
    assert (vectors["weight_decay"], vectors["lars_exclude"]) == (0.0, True)
    set_lr(optimizer, 1.6)  # 0.2 x 2048/256
    assert weights["lr"] == 1.6 and vectors["lr"] == pytest.approx(0.0048 * 2048 / 256, rel=1e-12)
    # one step by hand: a BN scale moves by lr_biases x grad (no decay, no trust ratio), a weight
    # by lr x eta ||w|| / ||g + wd w|| x (g + wd w)
    bias, weight = model.projector[1].weight, model.projector[0].weight
    bias.grad, weight.grad = torch.full_like(bias, 0.5), torch.randn_like(weight)
    before_b, before_w, g_w = bias.detach().clone(), weight.detach().clone(), weight.grad.clone()
    optimizer.step()
    assert torch.allclose(bias, before_b - vectors["lr"] * 0.5)
    d = g_w + 1e-6 * before_w
    assert torch.allclose(weight, before_w - 1.6 * 0.001 * before_w.norm() / d.norm() * d,
                          rtol=1e-5, atol=1e-8)

    for args, blur in ((a, (1.0, 0.1)), (s, (0.0, 0.0))):
        v1, v2 = barlow_views(args)
        assert (v1.blur_p, v2.blur_p) == blur and (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
        for view in (v1, v2):
            assert view.scale == (0.08, 1.0) and view.interpolation == "bicubic"
            assert (view.jitter, view.jitter_p, view.gray_p) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)


# ------------------------------------------------------------------------------- end to end

# One 2-epoch run on synthetic images serves the end-to-end checks and is the reference of the
# resume test: 48 images, batch 16, 6 steps, 3 of warmup, kNN at epochs 0 and 2.
FLAGS = ["barlow.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
         "--synthetic-size", "48", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
         "--knn-every", "2", "--lr", "2.0", "--warmup-epochs", "1", "--projector", "128-128",
         "--lambd", "0.01"]


@pytest.fixture(scope="module")
def straight(module_tmp):
    run_dir = module_tmp("barlow") / "straight"
    ok(run([*FLAGS, "--workers", "0", "--run-dir", run_dir]))
    return run_dir


def test_synthetic_run_logs_its_terms_then_linear_eval(straight, tmp_path):
    log = read_log(straight)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:  # loss = on-diagonal + lambda x off-diagonal, as logged
        assert r["loss"] == pytest.approx(r["on_diag"] + 0.01 * r["off_diag"], rel=1e-5)
        assert r["on_diag"] > 0 and r["off_diag"] > 0
    summaries = [r for r in log if "step" not in r]
    assert [r["epoch"] for r in summaries] == [0, 1, 2]
    assert "knn_top1" in summaries[0] and "knn_top1" in summaries[2]
    for summary, epoch_steps in ((summaries[1], steps[:3]), (summaries[2], steps[3:])):
        for key in ("loss", "on_diag", "off_diag"):  # the epoch summary averages its steps
            assert summary[key] == pytest.approx(sum(r[key] for r in epoch_steps) / 3, rel=1e-5)

    ckpt = torch.load(straight / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["method"], ckpt["args"]["projector"]) == (2, "barlow", "128-128")
    sd = ckpt["model"]
    # 128-128: Linear (512 -> 128, no bias), BN, ReLU, Linear (128 -> 128, no bias), nothing after
    assert sd["projector.0.weight"].shape == (128, 512) and "projector.0.bias" not in sd
    assert sd["projector.3.weight"].shape == (128, 128) and "projector.3.bias" not in sd
    assert sd["projector.1.weight"].shape == (128,)
    assert not any(k.startswith("projector.4") for k in sd)
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[1]["lr_scale"] == pytest.approx(0.0072 / 2.0)
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.0072 / 2.0)

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", straight / "checkpoint.pt", "--data", "synthetic",
            "--synthetic-size", "48", "--workers", "0", "--img-size", "16", "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100
    backbone = torch.load(straight / "backbone.pt")
    assert all(torch.equal(backbone[k], sd["backbone." + k]) for k in backbone)


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 2, 2)  # 20 + 20 images
    run_dir = tmp_path / "run"
    ok(run(["barlow.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "10", "--epochs", "1", "--workers", "0", "--log-every", "1",
            "--run-dir", run_dir]))
    args = json.loads((run_dir / "args.json").read_text())
    assert args["small_images"] and args["projector"] == "2048-2048-2048"
    assert args["blur_probs"] == [0.0, 0.0] and args["lr"] == 0.3 and args["weight_decay"] == 1e-4
    log = read_log(run_dir)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and log[-1]["epoch"] == 1
    for r in steps:
        assert r["loss"] == pytest.approx(r["on_diag"] + 0.0051 * r["off_diag"], rel=1e-5)
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "5", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly_and_the_schedule(straight, tmp_path):
    """2 epochs straight == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal)
    and resumed: weights, BN statistics and optimizer state bit-identical; both runs follow the
    schedule: 3 warmup steps, then a cosine towards 0.001 x peak, biases and BN at lr x 0.0072 /
    2."""
    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*FLAGS, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=4)  # in epoch 2
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1

    proc = ok(run([*FLAGS, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert_same_tensors(a["model"], b["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for i in state_a:
        assert torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]), i
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]

    peak, final = 2.0 * 16 / 256, 0.001 * 2.0 * 16 / 256
    for run_dir in (straight, resumed):
        records = [r for r in read_log(run_dir) if "step" in r]
        assert [r["step"] for r in records] == list(range(1, 7))
        for r in records:
            k = r["step"] - 1
            expected = (peak * k / 3 if k < 3 else
                        final + (peak - final) * 0.5 * (1 + math.cos(math.pi * (k - 3) / 3)))
            assert r["lr"] == pytest.approx(expected, abs=2e-6), r
            assert r["lr_biases"] == pytest.approx(expected * 0.0072 / 2.0, abs=1e-6), r
        # steps k = 4, 5 give lr = f + (peak - f) h with h = 3/4 and 1/4: the end value f of
        # the cosine is (3 lr_5 - lr_4) / 2, whatever the peak (0 for a cosine to 0)
        lr4, lr5 = records[4]["lr"], records[5]["lr"]
        assert (3 * lr5 - lr4) / 2 == pytest.approx(final, rel=0.05)
