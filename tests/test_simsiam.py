"""simsiam.py: the loss against a naive loop and hand-computed values, the stop-gradient, the
collapse indicator, the optimizer (weight decay everywhere, fixed predictor lr), and the
script end to end (linear_eval.py on its checkpoint, real JPEGs, exact resume)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from common.optim import warmup_cosine
from simsiam import SimSiam, get_args, set_simsiam_lr, simsiam_loss, simsiam_optimizer
from tests.helpers import assert_same_tensors, cifar10_subset, ok, read_log, run, run_until_stopped


# ------------------------------------------------------------------------------- loss

def naive_simsiam(p1, p2, z1, z2):
    """One sample at a time with explicit sums; z enters as plain numbers (no graph at all)."""
    z1, z2 = z1.tolist(), z2.tolist()

    def neg_cos(p, z):  # p: a tensor row, z: a list of floats
        dot = sum(p[k] * z[k] for k in range(len(z)))
        return -dot / (torch.sqrt(sum(v * v for v in p)) * math.sqrt(sum(v * v for v in z)))

    n = p1.shape[0]
    return sum(0.5 * neg_cos(p1[i], z2[i]) + 0.5 * neg_cos(p2[i], z1[i]) for i in range(n)) / n


def test_matches_naive_loop_value_and_gradient():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, dtype=torch.float64, requires_grad=True) for _ in range(4))
    fast = simsiam_loss(p1, p2, z1, z2)
    slow = naive_simsiam(p1, p2, z1, z2)
    assert torch.allclose(fast, slow, rtol=1e-12), (fast, slow)
    g_fast = torch.autograd.grad(fast, (p1, p2))
    g_slow = torch.autograd.grad(slow, (p1, p2))
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_hand_computed_values():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    # predictions equal to the other view's output, up to a positive scale: cos = 1, loss = -1
    assert math.isclose(simsiam_loss(3 * z, 0.5 * z, z, z).item(), -1.0, rel_tol=1e-6)
    # predictions orthogonal to the other view's output: cos = 0, loss = 0
    ortho = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, -2.0]])
    assert abs(simsiam_loss(ortho, ortho, z, z).item()) < 1e-7
    # view 1 at 60 degrees from z2 (cos 1/2), view 2 equal to z1 (cos 1): -(1/2 + 1)/2 = -0.75
    z1 = torch.tensor([[1.0, 0.0]])
    z2 = torch.tensor([[2.0, 0.0]])
    p1 = torch.tensor([[0.5, math.sqrt(3) / 2]])
    assert math.isclose(simsiam_loss(p1, z1, z1, z2).item(), -0.75, rel_tol=1e-6)
    # the terms pair p1 with z2 and p2 with z1 (not p1 with z1): swap z and the value changes
    zb = torch.tensor([[0.0, 1.0]])
    assert math.isclose(simsiam_loss(z1, zb, zb, z1).item(), -1.0, rel_tol=1e-6)
    assert math.isclose(simsiam_loss(z1, zb, z1, zb).item(), 0.0, abs_tol=1e-7)


def test_stop_gradient():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # no path from the loss to z
    assert p1.grad is not None and p1.grad.abs().sum() > 0

    # Through a predictor p = h(z), the gradient reaching z is exactly the one through h: the
    # same as when z enters the loss as a constant copy, and not the one without stop-gradient.
    h = nn.Linear(6, 6)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    g = torch.autograd.grad(simsiam_loss(h(z1), h(z2), z1, z2), (z1, z2))
    c1, c2 = z1.detach().clone(), z2.detach().clone()
    g_const = torch.autograd.grad(simsiam_loss(h(z1), h(z2), c1, c2), (z1, z2))
    cos = nn.functional.cosine_similarity
    no_sg = -0.5 * (cos(h(z1), z2).mean() + cos(h(z2), z1).mean())
    g_no_sg = torch.autograd.grad(no_sg, (z1, z2))
    for a, b, c in zip(g, g_const, g_no_sg):
        assert torch.allclose(a, b) and not torch.allclose(a, c, atol=1e-4)


# ------------------------------------------------------------------------------- model, optimizer

def sgd(**args):
    """The optimizer flags of simsiam.py's defaults (the official SGD), plus `args`."""
    return SimpleNamespace(optimizer="sgd", momentum=0.9, lars_eta=0.001, lars_clip=False, **args)


def test_heads_and_weight_decay_on_every_parameter():
    model = SimSiam("resnet18", small_images=True, proj_layers=3, dim=64, pred_dim=16)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is None) for m in linears] == \
        [(512, 64, True), (64, 64, True), (64, 64, True)]
    assert not model.projector[-1].affine  # last BN: no scale, no shift
    assert [type(m) for m in model.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.predictor[0].bias is None and model.predictor[3].bias is not None
    assert model.predictor[3].out_features == 64 and model.predictor[0].out_features == 16
    assert all(bn.weight.abs().sum() == 0 for name, bn in model.backbone.named_modules()
               if name.endswith("bn2"))  # zero-init residual (BasicBlock)
    assert len([m for m in SimSiam("resnet18", True, 2, 64, 16).projector
                if isinstance(m, nn.Linear)]) == 2

    opt = simsiam_optimizer(model, sgd(weight_decay=5e-4, fix_pred_lr=True))
    assert isinstance(opt, torch.optim.SGD)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(list(model.parameters())) == len(set(map(id, in_groups)))
    for g in opt.param_groups:  # BN scales/shifts and biases decay too, as in the paper
        assert g["weight_decay"] == 5e-4 and g["momentum"] == 0.9
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.predictor.parameters()}

    # One SGD step with zero gradients on a 1-D parameter: only the decay moves it.
    bias = model.predictor[3].bias
    before = bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    set_simsiam_lr(opt, 0.02, 0.1)
    opt.step()
    assert torch.allclose(bias, before * (1 - 0.1 * 5e-4))  # predictor: the fixed peak lr


def test_lr_setting_follows_the_schedule_except_a_fixed_predictor():
    model = SimSiam("resnet18", small_images=True, proj_layers=2, dim=32, pred_dim=8)
    peak, total = 0.06, 100
    for fix in (True, False):
        opt = simsiam_optimizer(model, sgd(weight_decay=1e-4, fix_pred_lr=fix))
        for step in (0, 37, 50, 99, 100):
            lr = warmup_cosine(step, total, 0, peak)
            set_simsiam_lr(opt, lr, peak)
            assert opt.param_groups[0]["lr"] == lr
            assert opt.param_groups[1]["lr"] == (peak if fix else lr)
    assert warmup_cosine(50, total, 0, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(100, total, 0, peak) == 0.0
    # the flag and the recipes
    assert get_args(["--data", "synthetic"]).fix_pred_lr is True
    assert get_args(["--data", "synthetic", "--no-fix-pred-lr"]).fix_pred_lr is False
    small, big = get_args(["--data", "cifar10"]), get_args(["--data", "/imagenet"])
    assert (small.arch, small.lr, small.weight_decay, small.batch_size, small.epochs,
            small.blur_prob, small.proj_layers) == ("resnet18", 0.03, 5e-4, 512, 800, 0.0, 2)
    assert (big.arch, big.lr, big.weight_decay, big.batch_size, big.epochs, big.blur_prob,
            big.proj_layers, big.warmup_epochs) == ("resnet50", 0.05, 1e-4, 512, 100, 0.5, 3, 0.0)


# ------------------------------------------------------------------------------- end to end

# 32 synthetic images at 16 px, batch 8: 4 steps per epoch, 2 epochs, a record every step.
FLAGS = ["simsiam.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
         "--synthetic-size", "32", "--batch-size", "8", "--epochs", "2", "--log-every", "1",
         "--proj-dim", "256", "--pred-hidden-dim", "64"]
PEAK = 0.03 * 8 / 256
STEPS = 8


@pytest.fixture(scope="module")
def straight_run(module_tmp):
    run_dir = module_tmp("simsiam") / "straight"
    ok(run([*FLAGS, "--workers", "0", "--run-dir", run_dir]))
    return run_dir


def test_synthetic_run_logs_and_linear_eval(straight_run, tmp_path):
    log = read_log(straight_run)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert log[0]["epoch"] == 0 and "knn_top1" in log[0]
    for r in steps:
        assert -1 <= r["loss"] <= 1
        assert r["lr"] == pytest.approx(warmup_cosine(r["step"] - 1, STEPS, 0, PEAK), abs=1e-6)
        # BN without affine ends the projector: at the start the outputs are spread, std ~ 1/sqrt(D)
        assert 0.5 < r["embedding_std"] * math.sqrt(256) < 1.1, r
    ends = [r for r in log if "step" not in r and r["epoch"] > 0]
    assert [r["epoch"] for r in ends] == [1, 2]
    for end, epoch_steps in zip(ends, (steps[:4], steps[4:])):
        assert end["loss"] == pytest.approx(sum(r["loss"] for r in epoch_steps) / 4, abs=1e-5)
        mean_std = sum(r["embedding_std"] for r in epoch_steps) / 4
        assert end["embedding_std"] == pytest.approx(mean_std, abs=1e-5)
        assert 0 <= end["knn_top1"] <= 100

    args = json.loads((straight_run / "args.json").read_text())
    assert (args["lr"], args["weight_decay"], args["blur_prob"], args["proj_layers"]) == \
        (0.03, 5e-4, 0.0, 2)
    assert args["fix_pred_lr"] and args["small_images"]
    ckpt = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (2, 0, "simsiam")
    assert any(k.startswith("predictor.") for k in ckpt["model"])

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", straight_run / "checkpoint.pt", "--data", "synthetic",
            "--synthetic-size", "32", "--img-size", "16", "--workers", "0", "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_checkpoint_keeps_predictor_lr_at_peak(straight_run):
    """After the last step the predictor's group still holds the peak lr, the other group the
    cosine value of that step (step 7 of 8, 3.8% of the peak)."""
    groups = torch.load(straight_run / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["fix_lr"] for g in groups] == [False, True]
    assert groups[0]["lr"] == pytest.approx(warmup_cosine(STEPS - 1, STEPS, 0, PEAK), rel=1e-12)
    assert groups[0]["lr"] < 0.05 * PEAK
    assert groups[1]["lr"] == PEAK
    assert len(groups[1]["params"]) == 5  # predictor: 2 weights, BN scale and shift, 1 bias
    assert all(g["weight_decay"] == 5e-4 for g in groups)


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 5, 3)
    run_dir = tmp_path / "run"
    ok(run(["simsiam.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "25", "--epochs", "1", "--workers", "0", "--proj-dim", "256",
            "--pred-hidden-dim", "64", "--run-dir", run_dir]))
    log = read_log(run_dir)
    assert log[-1]["epoch"] == 1 and -1 <= log[-1]["loss"] <= 1 and log[-1]["embedding_std"] > 0
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "2", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly(straight_run, tmp_path):
    """The straight run == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal) and
    resumed (with 2 loader workers instead of none: the augmentations are seeded per sample)."""
    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*FLAGS, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=5)  # in epoch 2
    assert stopped["epoch"] == 1 and 1 <= stopped["batch_in_epoch"] < 4
    last = 4 + stopped["batch_in_epoch"] - 1  # the step whose lr the optimizer holds
    groups = stopped["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(warmup_cosine(last, STEPS, 0, PEAK), rel=1e-12)
    assert groups[1]["lr"] == PEAK

    proc = ok(run([*FLAGS, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert_same_tensors(a["model"], b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:  # SGD momentum buffers
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), k
    steps = [r for r in read_log(resumed) if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    straight_steps = [r for r in read_log(straight_run) if "step" in r]
    assert [r["loss"] for r in steps] == [r["loss"] for r in straight_steps]
