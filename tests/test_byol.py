"""byol.py: the loss against a naive loop and hand values, the EMA update and its schedule, the
stop-gradient, the recipe presets, and the script end to end (synthetic and real JPEGs, exact
resume of the online AND target networks, linear_eval.py on its checkpoint)."""
import json
import math

import pytest
import torch
import torch.nn as nn

from byol import BYOL, byol_loss, byol_views, ema_update, get_args
from common.optim import LARS, param_groups, set_lr, warmup_cosine
from tests.helpers import (TINY, assert_same_tensors, cifar10_subset, ok, read_log, run,
                           run_until_stopped)


# ---------------------------------------------------------------- loss

def naive_byol_loss(p1, p2, z1, z2):
    """One sample and one view order at a time, with explicit sums: for each image,
    (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)); then the mean over images."""
    def cos(a, b):
        dot = sum(a[d] * b[d] for d in range(len(a)))
        return dot / (torch.sqrt(sum(v * v for v in a)) * torch.sqrt(sum(v * v for v in b)))
    total = 0.0
    for b in range(p1.shape[0]):
        total = total + (2 - 2 * cos(p1[b], z2[b].detach())) + (2 - 2 * cos(p2[b], z1[b].detach()))
    return total / p1.shape[0]


def test_loss_matches_naive_loop_value_and_gradient():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, dtype=torch.float64, requires_grad=True) for _ in range(4))
    fast, slow = byol_loss(p1, p2, z1, z2), naive_byol_loss(p1, p2, z1, z2)
    assert torch.allclose(fast, slow, rtol=1e-12), (fast, slow)
    for a, b in zip(torch.autograd.grad(fast, (p1, p2)), torch.autograd.grad(slow, (p1, p2))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_loss_scale_by_hand():
    # The two view orders are SUMMED: identical directions give 0, opposite ones 4 + 4 = 8,
    # orthogonal ones 2 + 2 = 4 (an average of the two terms would give 0, 4 and 2).
    a = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    assert byol_loss(a, 2 * a, 3 * a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(a, a, -a, -2 * a).item() == pytest.approx(8.0, rel=1e-6)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(e1, e1, e2, e2).item() == pytest.approx(4.0, rel=1e-6)
    # p1 = (1, 0) vs z2 = (1, 1): 2 - 2/sqrt(2); p2 = (0, 2) vs z1 = (3, 0): 2. Batch of one.
    loss = byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]),
                     torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert loss.item() == pytest.approx(4 - math.sqrt(2), rel=1e-6)


def test_stop_gradient_in_the_loss():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # no gradient flows into the target's outputs
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


# ---------------------------------------------------------------- EMA and its schedule

def test_tau_schedule_values():
    # tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, as computed at byol.py's call site
    K, base = 1000, 0.99
    tau = lambda k: warmup_cosine(k, K, 0, base, final=1.0)
    assert tau(0) == pytest.approx(0.99, abs=1e-12)
    assert tau(K // 2) == pytest.approx(0.995, abs=1e-12)
    assert tau(K) == pytest.approx(1.0, abs=1e-12)
    assert tau(250) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)


def test_ema_update_by_hand():
    online = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    target = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        online[0].bias.fill_(-1.0)
        target[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
        target[0].bias.fill_(5.0)
    online(torch.tensor([[1.0, 0.0], [3.0, 1.0]]))  # train mode: moves online's running stats
    ema_update(online, target, tau=0.9)
    assert torch.allclose(target[0].weight, torch.tensor([[0.9 * 3 + 0.1 * 1, 0.9 * 4 + 0.1 * 2]]))
    assert torch.allclose(target[0].bias, torch.tensor([0.9 * 5 + 0.1 * -1]))
    assert torch.allclose(target[1].weight, torch.ones(1))  # BN scales both 1: stays 1
    # BN running statistics follow the online network (copied, not averaged)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    assert torch.equal(target[1].running_var, online[1].running_var)
    assert target[1].num_batches_tracked.item() == 1
    assert online[0].weight.tolist() == [[1.0, 2.0]]  # the online network is untouched


def test_training_step_target_gets_no_gradient_and_moves_after_the_step():
    torch.manual_seed(0)
    model = BYOL("resnet18", small_images=True, hidden_dim=32, out_dim=16).train()
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("target_")), name
    optimizer = LARS(param_groups(model, 1e-6), lr=0.0, momentum=0.9)
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in owned for p in model.target_backbone.parameters())
    set_lr(optimizer, 0.5)
    old_target = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("target_")}
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)

    # the loop body of byol.py: forward, loss, backward, optimizer step, THEN the EMA step
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.requires_grad and not z1.requires_grad and not z2.requires_grad  # target: no graph
    loss = byol_loss(p1, p2, z1, z2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    tau = 0.7
    model.update_target(tau)

    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert p.grad is None, name
    for online_name in ("backbone", "projector"):
        target_name = "target_" + online_name
        online, target = getattr(model, online_name), getattr(model, target_name)
        for (name, p_online), p_target in zip(online.named_parameters(), target.parameters()):
            expected = tau * old_target[f"{target_name}.{name}"] + (1 - tau) * p_online
            assert torch.allclose(p_target, expected, rtol=1e-5, atol=1e-7), name
        for b_online, b_target in zip(online.buffers(), target.buffers()):
            assert torch.equal(b_online, b_target)
    # the step did move the online network, so the comparison above can fail
    before = old_target["target_backbone.conv1.weight"]  # the initial online weights as well
    assert not torch.allclose(model.backbone.conv1.weight, before)


# ---------------------------------------------------------------- recipe

def test_presets_and_asymmetric_views():
    def get(*flags):
        return get_args(["--data", "/imagenet", *flags])
    a = get()
    assert (a.epochs, a.lr, a.tau_base, a.weight_decay) == (1000, 0.2, 0.996, 1.5e-6)
    assert (a.arch, a.batch_size, a.warmup_epochs) == ("resnet50", 4096, 10)
    a = get("--epochs", "100")
    assert (a.lr, a.tau_base, a.weight_decay) == (0.45, 0.99, 1e-6)
    assert a.preset.startswith("official ImageNet preset for 100 epochs")
    assert (get("--epochs", "40").tau_base, get("--epochs", "300").lr) == (0.97, 0.3)
    a = get("--epochs", "100", "--lr", "0.3", "--tau-base", "0.98")  # given flags win
    assert (a.lr, a.tau_base, a.weight_decay) == (0.3, 0.98, 1e-6)
    small = get_args(["--data", "cifar10"])
    assert (small.arch, small.batch_size, small.lr, small.tau_base, small.weight_decay,
            small.epochs) == ("resnet18", 512, 1.0, 0.996, 1e-6, 800)

    v1, v2 = byol_views(get())
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    for v in (v1, v2):  # saturation 0.2, not SimCLR's 0.8; bicubic as utils/dataset.py
        assert (v.scale, v.jitter, v.jitter_p, v.gray_p) == ((0.08, 1.0), (0.4, 0.4, 0.2, 0.1),
                                                             0.8, 0.2)
        assert v.interpolation == "bicubic"
    v1, v2 = byol_views(small)
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (0.0, 0.0, 0.0, 0.2)


# ---------------------------------------------------------------- end to end

def test_one_step_run_ema_after_the_step_then_linear_eval(tmp_path):
    """One optimizer step (32 images, batch 32, no warmup) with tau_base 0.5: the saved target
    must be 0.5 * init + 0.5 * (online after the step). Had the EMA come before the step, the
    target would still equal the initial weights."""
    run_dir = tmp_path / "run"
    ok(run(["byol.py", "--data", "synthetic", *TINY, "--synthetic-size", "32", "--warmup-epochs",
            "0", "--tau-base", "0.5", "--run-dir", run_dir]))
    log = read_log(run_dir)
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == [1] and steps[0]["tau"] == 0.5
    assert 0 <= steps[0]["loss"] <= 8
    assert log[0]["epoch"] == 0 and "knn_top1" in log[0] and log[-1]["tau"] == 0.5

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["method"]) == (1, 0, "byol")
    assert tuple(ckpt["args"]["solarize_probs"]) == (0.0, 0.2)
    sd = ckpt["model"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    torch.manual_seed(0)  # byol.py seeds 0 + rank before it builds the model
    init = BYOL("resnet18", small_images=True).state_dict()
    moved = 0
    for k, v in sd.items():
        if not k.startswith(("target_backbone.", "target_projector.")):
            continue
        online = sd[k[len("target_"):]]
        if v.is_floating_point() and k.endswith(("weight", "bias")):
            assert torch.allclose(v, 0.5 * init[k] + 0.5 * online, rtol=1e-5, atol=1e-6), k
            moved += not torch.allclose(v, init[k])
        else:  # BN running statistics: copied from the online network
            assert torch.equal(v, online), k
    assert moved > 10

    common = ["--data", "synthetic", "--synthetic-size", "64", "--workers", "0", "--img-size", "16"]
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", *common, "--cached-features",
            "--epochs", "2",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100
    # linear_eval.py reads the ONLINE backbone: the same weights as the exported backbone.pt
    backbone = torch.load(run_dir / "backbone.pt")
    assert all(torch.equal(backbone[k], sd["backbone." + k]) for k in backbone)
    assert not torch.equal(backbone["conv1.weight"], sd["target_backbone.conv1.weight"])


def test_real_cifar10_jpegs(tmp_path, cifar10_dir):
    root = cifar10_subset(cifar10_dir, tmp_path / "cifar10", 4, 2)
    run_dir = tmp_path / "run"
    ok(run(["byol.py", "--data", root, "--img-size", "32", "--arch", "resnet18",
            "--batch-size", "20", "--epochs", "1", "--workers", "0", "--log-every", "1",
            "--run-dir", run_dir]))
    args = json.loads((run_dir / "args.json").read_text())
    assert args["small_images"] and args["blur_probs"] == [0.0, 0.0] and args["lr"] == 1.0
    log = read_log(run_dir)
    assert [r["step"] for r in log if "step" in r] == [1, 2] and log[-1]["epoch"] == 1
    out = tmp_path / "linear.json"
    ok(run(["linear_eval.py", "--ckpt", run_dir / "checkpoint.pt", "--data", root,
            "--cached-features", "--epochs", "5", "--workers", "0",
            "--batch-size", "16", "--out", out, "--run-dir", tmp_path / "linear_eval"]))
    result = json.loads(out.read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.full
def test_interrupted_run_resumes_exactly_with_the_target(tmp_path):
    """2 epochs straight == the same run stopped in epoch 2 (--stop-at-step, as by a stop signal)
    and resumed: online and target networks (BN statistics included) and the optimizer state are
    bit-identical, and tau follows its schedule across the restart."""
    flags = ["byol.py", "--data", "synthetic", "--arch", "resnet18", "--img-size", "16",
             "--synthetic-size", "48", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
             "--knn-every", "0", "--tau-base", "0.99", "--hidden-dim", "512", "--proj-dim", "64"]
    straight = tmp_path / "straight"
    ok(run([*flags, "--workers", "0", "--run-dir", straight]))

    resumed = tmp_path / "resumed"
    stopped = run_until_stopped([*flags, "--workers", "2", "--run-dir", resumed], resumed,
                                after_step=4)  # in epoch 2
    assert stopped["epoch"] == 1 and stopped["batch_in_epoch"] >= 1

    proc = ok(run([*flags, "--workers", "2", "--run-dir", resumed]))
    assert "resumed from" in proc.stdout
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert any(k.startswith("target_backbone.") for k in a["model"])
    assert_same_tensors(a["model"], b["model"])
    assert not torch.equal(a["model"]["target_backbone.conv1.weight"],
                           a["model"]["backbone.conv1.weight"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]), i

    # tau per logged step k = step - 1 of K = 6: 1 - 0.01 (cos(pi k / 6) + 1) / 2, both runs
    for run_dir in (straight, resumed):
        records = [r for r in read_log(run_dir) if "step" in r]
        assert [r["step"] for r in records] == list(range(1, 7))
        for r in records:
            expected = 1 - 0.01 * (math.cos(math.pi * (r["step"] - 1) / 6) + 1) / 2
            assert r["tau"] == pytest.approx(expected, abs=2e-6), r
        epochs = [r for r in read_log(run_dir) if "step" not in r]
        last = 1 - 0.01 * (math.cos(math.pi * 5 / 6) + 1) / 2  # the summary: tau at k = 5
        assert epochs[-1]["tau"] == pytest.approx(last, abs=2e-6)


def test_ema_update_of_a_network_without_buffers():
    # a ViT backbone has no BN buffers: the update of its parameters alone
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * t + 0.1 * o for t, o in zip(target.parameters(), online.parameters())]
    ema_update(online, target, tau=0.9)
    for got, want in zip(target.parameters(), expected):
        assert torch.allclose(got, want)
