"""vicreg.py: the loss against a naive loop and hand values, DDP equivalence with 2 gloo processes
(loss and every gradient, with controls that must fail), the recipes, views and lr schedule, and
the script end to end (synthetic and real JPEGs, linear_eval.py on its checkpoint, exact resume)."""
import json
import math

import pytest
import torch

import vicreg
from common.errors import UserError
from common.data import build_dataset, make_loader
from common.augment import ViewPipeline
from common.model import resnet_backbone
from tests import vicreg_ddp_check as ddp
from tests.helpers import assert_same_tensors, cifar10_subset, ok, read_log, run, run_until_stopped


# ---------------------------------------------------------------- loss

def naive_vicreg_loss(z1, z2, sim_coeff, std_coeff, cov_coeff, eps=1e-4):
    """The same loss with explicit loops: means, variances feature by feature, covariances entry
    by entry over every pair i != j. Returns (loss, invariance, variance, covariance)."""
    n, D = z1.shape
    invariance = sum((z1[b, d] - z2[b, d]) ** 2 for b in range(n) for d in range(D)) / (n * D)

    def hinge_and_cov(z):
        mean = [sum(z[b, d] for b in range(n)) / n for d in range(D)]
        hinge = 0.0
        for d in range(D):
            var = sum((z[b, d] - mean[d]) ** 2 for b in range(n)) / (n - 1)
            hinge = hinge + torch.relu(1 - torch.sqrt(var + eps))
        cov = 0.0
        for i in range(D):
            for j in range(D):
                if i != j:
                    c_ij = sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(n))
                    cov = cov + (c_ij / (n - 1)) ** 2
        return hinge / D, cov / D

    (h1, c1), (h2, c2) = hinge_and_cov(z1), hinge_and_cov(z2)
    variance, covariance = (h1 + h2) / 2, c1 + c2
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, invariance, variance, covariance


def test_loss_matches_naive_loops_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.3, 0.6, 1.5, 3.0, 0.8])  # some stds below 1 (active hinge), some above
    z1 = (torch.randn(6, 5, generator=g, dtype=torch.float64) * scale).requires_grad_()
    z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) * scale).requires_grad_()
    std = torch.sqrt(torch.cat([z1, z2]).detach().view(2, 6, 5).var(dim=1) + 1e-4)
    assert (std < 1).any() and (std > 1).any()
    fast = vicreg.vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    slow = naive_vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-12), (fast, slow)
    for a, b in zip(torch.autograd.grad(fast[0], (z1, z2)), torch.autograd.grad(slow[0], (z1, z2))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # other coefficients weight the same unweighted terms
    other = vicreg.vicreg_loss(z1, z2, 2.0, 3.0, 5.0)
    assert torch.allclose(other[0], 2 * slow[1] + 3 * slow[2] + 5 * slow[3], rtol=1e-12)
    # invariances: the order of the images, and the order of the two views
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(vicreg.vicreg_loss(z1[perm], z2[perm], 25.0, 25.0, 1.0)[0], fast[0])
    assert torch.allclose(vicreg.vicreg_loss(z2, z1, 25.0, 25.0, 1.0)[0], fast[0])


def test_loss_hand_values():
    terms = lambda z1, z2: [t.item() for t in vicreg.vicreg_loss(z1, z2, 25.0, 25.0, 1.0)]
    # identical views: invariance 0
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert terms(z, z.clone())[1] == 0.0
    # every feature with std >= 1 (here the unbiased variance is exactly 1 or 4): variance 0
    z = torch.tensor([[-1.0, 2.0], [0.0, 0.0], [1.0, -2.0]])
    assert terms(z, 3 * z)[2] == 0.0

    # 3 samples, 2 features. z1 = [a, b] with a = (0, 0.5, 1), b = (1, -1, 0); z2 = 2 z1.
    #   invariance: mean of z1^2 over 6 entries = (0 + .25 + 1 + 1 + 1 + 0) / 6 = 3.25 / 6
    #   z1: centred a = (-.5, 0, .5), var 0.5 / 2 = 0.25 -> hinge 1 - sqrt(0.2501);
    #       centred b = (1, -1, 0), var 2 / 2 = 1 -> hinge 0;
    #       C_ab = (-.5 * 1 + 0 + .5 * 0) / 2 = -0.25 -> (C_ab^2 + C_ba^2) / D = 0.0625
    #   z2 = 2 z1: variances 1 and 4 -> hinges 0; C_ab = -1 -> (1 + 1) / 2 = 1
    #   variance = ((1 - sqrt(0.2501)) / 2) / 2 + 0 / 2; covariance = 0.0625 + 1
    z1 = torch.tensor([[0.0, 1.0], [0.5, -1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, inv, var, cov = terms(z1, 2 * z1)
    assert inv == pytest.approx(3.25 / 6, rel=1e-12)
    assert var == pytest.approx((1 - math.sqrt(0.2501)) / 4, rel=1e-12)
    assert cov == pytest.approx(1.0625, rel=1e-12)
    hand = 25 * 3.25 / 6 + 25 * (1 - math.sqrt(0.2501)) / 4 + 1.0625
    assert loss == pytest.approx(hand, rel=1e-12)

    # decorrelated features: centred, mutually orthogonal columns (a Hadamard matrix) give
    # covariance 0; their variance is 4/3 >= 1 and the two views agree: the whole loss is 0
    h = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert terms(h, h) == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-15)
    # ... and the same columns once correlated are not (control)
    assert terms(h[:, [0, 0, 1]], h)[3] > 0.1


# ---------------------------------------------------------------- DDP

# fp32 sums in a different order: agreement to ~1e-7 relative; we allow 1e-5.
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.full
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "vicreg_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/vicreg_ddp_check.py", out], timeout=180))
    res = torch.load(out)
    assert res["world"] == 2
    x1, x2 = ddp.make_batch()
    values, grads = ddp.grads_and_loss(ddp.make_model(), x1, x2)  # one process, whole batch
    per_rank = res["values"]                                      # [2, 4] loss, inv, var, cov
    # the variance and covariance terms come from the gathered batch: the same on both ranks
    # and equal to one process's; invariance and loss are per-rank means: their average is
    assert torch.equal(per_rank[0, 2:], per_rank[1, 2:])
    assert not torch.allclose(per_rank[0, :2], per_rank[1, :2])
    assert torch.allclose(per_rank.mean(0), values, rtol=RTOL, atol=ATOL), (per_rank, values)
    assert values[2] > 0.05 and values[3] > 0.05  # both gathered terms take part
    assert grads.keys() == res["grads"].keys() and len(grads) == 5
    for name, g in grads.items():
        assert torch.allclose(res["grads"][name], g, rtol=RTOL, atol=ATOL), name
    # Controls: a gather without gradient, or one whose gradient reaches only the own slice
    # (not summed over ranks), gives other gradients: the comparison above can fail.
    for broken in res["broken"].values():
        for name, g in grads.items():
            assert not torch.allclose(broken[name], g, rtol=1e-3, atol=1e-5), name


# ---------------------------------------------------------------- recipes, views, schedule

def test_recipes_views_and_bad_expander(capsys):
    a = vicreg.get_args(["--data", "/imagenet"])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.weight_decay, a.warmup_epochs) == (
        "resnet50", 1000, 2048, 0.2, 1e-6, 10)
    assert (a.expander, a.sim_coeff, a.std_coeff, a.cov_coeff) == ("8192-8192-8192", 25, 25, 1)
    small = vicreg.get_args(["--data", "cifar10"])
    assert (small.arch, small.epochs, small.batch_size, small.lr, small.weight_decay,
            small.expander) == ("resnet18", 1000, 256, 0.3, 1e-4, "2048-2048-2048")
    assert vicreg.get_args(["--data", "cifar10", "--expander", "64-32"]).expander == "64-32"
    net = vicreg.VICReg("resnet18", small_images=True, expander="64-48-32").expander
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                               "BatchNorm1d", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in net[::3]] == [
        (512, 64, True), (64, 48, True), (48, 32, False)]

    v1, v2 = vicreg.vicreg_views(a)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert v1.interpolation == "bicubic" and v1.scale == (0.08, 1.0)
    assert (v1.jitter, v1.jitter_p) == ((0.4, 0.4, 0.2, 0.1), 0.8)
    assert v1.gray_p == v2.gray_p == 0.2
    v1, v2 = vicreg.vicreg_views(small)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (0.0, 0.0, 0.0, 0.2)

    with pytest.raises(UserError):
        vicreg.get_args(["--data", "cifar10", "--expander", "64-0"])
    with pytest.raises(SystemExit) as exit_info:  # in-process: main() exits like the script
        vicreg.main(["--data", "synthetic", "--expander", "64x64"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --expander 64x64: expected positive")
    with pytest.raises(SystemExit):
        vicreg.main(["--help"])
    assert "0.8 at batch 128, 0.5 at 256, 0.4 at 512" in " ".join(capsys.readouterr().out.split())


def official_lr(step, total, warmup, peak):
    """The official adjust_learning_rate, written out: linear warmup from 0, then a cosine
    from the peak to 0.001 x peak."""
    if step < warmup:
        return peak * step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return peak * q + 0.001 * peak * (1 - q)


def test_lr_schedule_formula():
    assert official_lr(0, 100, 10, 2.0) == 0.0
    assert official_lr(5, 100, 10, 2.0) == pytest.approx(1.0)
    assert official_lr(10, 100, 10, 2.0) == pytest.approx(2.0)        # peak at the end of warmup
    assert official_lr(55, 100, 10, 2.0) == pytest.approx(1.001)      # halfway down
    assert official_lr(100, 100, 10, 2.0) == pytest.approx(0.002)     # 0.001 x peak at the end


# ---------------------------------------------------------------- end to end

# One 2-epoch run on synthetic data serves the end-to-end checks and is the uninterrupted
# reference of the resume test: 64 images, batch 16, 4 steps per epoch, 1 warmup epoch.
FLAGS = ["vicreg.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
         "--synthetic-size", "64", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
         "--expander", "64-64-64", "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def straight_run(module_tmp):
    run_dir = module_tmp("vicreg") / "straight"
    ok(run([*FLAGS, "--workers", "0", "--run-dir", run_dir]))
    return run_dir


def test_synthetic_run_terms_schedule_then_linear_eval(straight_run, tmp_path):
    log = read_log(straight_run)
    steps = [r for r in log if "step" in r]
    epochs = [r for r in log if "step" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and "knn_top1" in epochs[-1]
    # every record carries the three unweighted terms, and the loss is 25 / 25 / 1 times them
    for r in steps + epochs[1:]:
        assert r["invariance"] >= 0 and 0 <= r["variance"] <= 1 and r["covariance"] >= 0, r
        weighted = 25 * r["invariance"] + 25 * r["variance"] + r["covariance"]
        assert r["loss"] == pytest.approx(weighted, abs=1e-4), r
    for e, summary in enumerate(epochs[1:]):  # the summary averages the epoch's steps
        for key in vicreg.TERMS:
            mean = sum(r[key] for r in steps[4 * e:4 * e + 4]) / 4
            assert summary[key] == pytest.approx(mean, rel=1e-5, abs=1e-5), key
    # lr per step k = step - 1: warmup over the first 4 steps, then the cosine to 0.001 x peak
    peak = 0.3 * 16 / 256
    for r in steps:
        assert r["lr"] == pytest.approx(official_lr(r["step"] - 1, 8, 4, peak), abs=1e-6), r
    assert steps[4]["lr"] == pytest.approx(peak, abs=1e-6) and epochs[-1]["lr"] == steps[-1]["lr"]

    # Step 1, recomputed in this process: the initial network (vicreg.py seeds 0 + rank before
    # building it), the seeded views of the first batch, one forward pass per view.
    margs = vicreg.get_args(FLAGS[1:])
    pipeline = ViewPipeline(vicreg.vicreg_views(margs))
    views = build_dataset("synthetic", "ssl", pipeline, synthetic_size=64, img_size=16)
    loader = make_loader(views, 16, 0, seed=0, seeded=True)
    loader.sampler.set_epoch(0)
    (x1, x2), _ = next(iter(loader))
    x1, x2 = pipeline.to_device([x1, x2], torch.device("cpu"), step=0)
    torch.manual_seed(0)
    model = vicreg.VICReg("resnet18", small_images=True, expander="64-64-64").train()
    with torch.no_grad():
        first = [t.item() for t in vicreg.vicreg_loss(*model(x1, x2), 25.0, 25.0, 1.0)]
        joint = model.expander(model.backbone(torch.cat([x1, x2]))).chunk(2)  # BN over both views
        control = [t.item() for t in vicreg.vicreg_loss(*joint, 25.0, 25.0, 1.0)]
    logged = [steps[0][k] for k in vicreg.TERMS]
    assert first == pytest.approx(logged, rel=1e-4, abs=1e-5)
    assert control != pytest.approx(logged, rel=1e-3)

    ckpt = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (2, 0, "vicreg")
    assert ckpt["args"]["expander"] == "64-64-64" and ckpt["args"]["small_images"]
    assert {k.split(".")[0] for k in ckpt["model"]} == {"backbone", "expander"}
    lrs = [group["lr"] for group in ckpt["optimizer"]["param_groups"]]
    assert len(lrs) == 2 and lrs[0] == lrs[1] == pytest.approx(steps[-1]["lr"], abs=1e-6)
    backbone = resnet_backbone("resnet18", cifar_stem=True)
    backbone.load_state_dict(torch.load(straight_run / "backbone.pt"))  # strict: every key

    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", straight_run / "checkpoint.pt", "--data", "synthetic",
            "--synthetic-size", "64", "--img-size", "16", "--workers", "0", "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 4, 2)
    run_dir = tmp_path / "run"
    ok(run(["vicreg.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "20", "--epochs", "1", "--workers", "0", "--log-every", "1",
            "--run-dir", run_dir]))
    args = json.loads((run_dir / "args.json").read_text())
    assert args["small_images"] and args["expander"] == "2048-2048-2048"
    assert args["blur_probs"] == [0.0, 0.0] and args["solarize_probs"] == [0.0, 0.2]
    assert (args["lr"], args["weight_decay"]) == (0.3, 1e-4)
    log = read_log(run_dir)
    assert [r["step"] for r in log if "step" in r] == [1, 2] and log[-1]["epoch"] == 1
    assert all(key in log[-1] for key in vicreg.TERMS)
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "5", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly(straight_run, tmp_path):
    """The straight run == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal) and
    resumed: weights (BN statistics included) and the optimizer state bit for bit, the same logged
    steps. The interrupted run uses 2 loader workers, the straight one none."""
    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*FLAGS, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=5)  # in epoch 2
    assert stopped["epoch"] == 1 and 1 <= stopped["batch_in_epoch"] <= 3  # mid-epoch

    proc = ok(run([*FLAGS, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight_run / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert_same_tensors(a["model"], b["model"])
    assert not torch.equal(a["model"]["expander.0.weight"], stopped["model"]["expander.0.weight"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for i in state_a:
        assert torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]), i
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    # the resumed run logs the remaining steps with the straight run's values
    straight = {r["step"]: r for r in read_log(straight_run) if "step" in r}
    records = [r for r in read_log(resumed) if "step" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        for key in (*vicreg.TERMS, "lr"):
            assert r[key] == straight[r["step"]][key], (r, key)
