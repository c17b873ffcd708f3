"""Options every script shares: --optimizer and LARS's clipping, --save-every, no abbreviated
flags, the note when warmup covers the whole run; and BYOL's --tau-schedule."""
import importlib
import os
import shutil

import pytest
import torch
import torch.nn as nn

from common.args import format_args
from common.errors import UserError
from common.optim import LARS, param_groups
from tests.helpers import TINY, assert_same_tensors, read_log

METHODS = ["simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg", "mocov3", "dino"]
OFFICIAL = {"simclr": "lars", "moco": "sgd", "byol": "lars", "simsiam": "sgd", "swav": "lars",
            "barlow": "lars", "vicreg": "lars", "mocov3": "lars", "dino": "lars"}
# 32 synthetic images, batch 32: one step per epoch
FLAGS = ["--data", "synthetic", *TINY, "--synthetic-size", "32", "--knn-every", "0"]


def test_lars_clip_by_hand():
    """LARC's clipping (apex LARC, clip=True): the update is lr * min(trust / lr, 1) * d, i.e.
    min(trust, lr) * d: the trust ratio itself is the rate, capped at lr."""
    def one_step(lr, **lars):
        torch.manual_seed(0)
        model = nn.Linear(4, 3, bias=False)
        w = model.weight.detach().clone()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        d = model.weight.grad + 0.1 * w
        LARS(param_groups(model, 0.1), lr=lr, momentum=0.9, eta=0.001, **lars).step()
        return w, d, 0.001 * w.norm() / d.norm(), model.weight.detach()

    w, d, trust, clipped = one_step(10.0, clip=True)        # trust << lr: the rate is trust
    assert trust < 10.0 and torch.allclose(clipped, w - trust * d, atol=1e-9)
    assert torch.allclose(clipped, one_step(1.0)[3], atol=1e-9)  # = unclipped LARS at lr 1
    assert not torch.allclose(clipped, one_step(10.0)[3], atol=1e-3)  # unclipped at lr 10: 10x
    w, d, trust, clipped = one_step(1e-5, clip=True)        # trust > lr: capped, plain SGD step
    assert trust > 1e-5 and torch.allclose(clipped, w - 1e-5 * d, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_defaults_and_no_abbreviations(method, capsys):
    module = importlib.import_module(method)
    args = module.get_args(["--data", "synthetic", "--epochs", "100"])
    assert (args.optimizer, args.momentum, args.lars_eta, args.lars_clip, args.save_every) == \
        (OFFICIAL[method], 0.9, 0.001, False, 0)
    assert "never leaves its linear warmup" not in format_args(args)
    for abbreviated in (["--batch", "32"], ["--warmup", "0"], ["--optim", "sgd"]):
        with pytest.raises(SystemExit):
            module.get_args(["--data", "synthetic", *abbreviated])
        assert f"unrecognized arguments: {abbreviated[0]}" in capsys.readouterr().err
    with pytest.raises(UserError, match="--lars-eta and --lars-clip apply to --optimizer lars"):
        module.get_args(["--data", "synthetic", "--optimizer", "adamw", "--lars-eta", "0.02"])


@pytest.mark.parametrize("method", ["simclr", "byol", "swav", "barlow", "vicreg", "mocov3"])
def test_note_when_warmup_is_the_whole_run(method):
    """A line after the arguments printed at start (format_args), only when it applies."""
    module = importlib.import_module(method)
    args = module.get_args(["--data", "synthetic", "--epochs", "1"])  # 10 warmup epochs
    assert format_args(args).endswith("note: --warmup-epochs 10 >= --epochs 1: the learning rate "
                                      "never leaves its linear warmup, so the recipe's peak rate "
                                      "and cosine are never reached (give --warmup-epochs a "
                                      "fraction of the run)")
    args = module.get_args(["--data", "synthetic", "--epochs", "1", "--warmup-epochs", "0.5"])
    assert "never leaves" not in format_args(args)


def test_note_for_fp16_on_a_cpu(monkeypatch):
    """fp16 on a CPU took 20 times fp32's time (BYOL, ResNet-18, 2 cores), without a word."""
    byol = importlib.import_module("byol")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for precision, noted in (("fp16", True), ("bf16", False), ("fp32", False)):
        args = byol.get_args(["--data", "synthetic", "--precision", precision])
        assert ("note: --precision fp16 on a CPU" in format_args(args)) == noted, precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU: fp16 is fast
    assert "on a CPU" not in format_args(byol.get_args(["--data", "synthetic", "--precision", "fp16"]))


@pytest.mark.parametrize("choice", [
    ["--optimizer", "sgd", "--momentum", "0.8"],
    ["--optimizer", "adamw", "--momentum", "0.85", "--lr", "0.001"],
    ["--optimizer", "lars", "--lars-eta", "0.02", "--lars-clip"]])
def test_the_chosen_optimizer_trains(choice, tmp_path, capsys):
    """simclr.py (LARS by default) trained by each choice: the checkpoint holds that optimizer's
    state and settings, and the start-up line names it."""
    import simclr
    simclr.main([*FLAGS, *choice, "--run-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    group, state = ckpt["optimizer"]["param_groups"][0], ckpt["optimizer"]["state"][0]
    out = capsys.readouterr().out
    if choice[1] == "sgd":
        assert "eta" not in group and group["momentum"] == 0.8 and "momentum_buffer" in state
        assert "(SGD, momentum 0.8;" in out
    elif choice[1] == "adamw":
        assert group["betas"] == (0.85, 0.999) and "exp_avg" in state
        assert "(AdamW, beta1 0.85;" in out
    else:
        assert (group["eta"], group["clip"]) == (0.02, True) and "momentum_buffer" in state
        assert "(LARS, momentum 0.9, eta 0.02, clipped;" in out
    assert torch.isfinite(torch.tensor(read_log(tmp_path)[-1]["loss"]))


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_lars_and_adamw_leave_1d_parameters_alone_for_every_method(optimizer):
    """--optimizer lars (and adamw, the ViT recipes') on MoCo (one group, SGD's decay on
    everything) and SimSiam (the predictor's own group): every 1-D parameter lands in a group
    without weight decay (or LARS adaptation), every weight keeps its decay, and SimSiam's
    fixed-lr predictor flag survives."""
    import moco
    import simsiam
    from common.optim import LARS
    for script, build in ((moco, lambda m, a: moco.build_optimizer(
            [{"params": list(m.parameters()), "weight_decay": a.weight_decay}], a)),
                          (simsiam, simsiam.simsiam_optimizer)):
        args = script.get_args(["--data", "synthetic", "--arch", "resnet18", "--optimizer",
                                optimizer, "--weight-decay", "0.5"])
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        if script is simsiam:
            model.predictor = nn.Linear(2, 2)
            args.fix_pred_lr = True
        opt = build(model, args)
        assert isinstance(opt, LARS if optimizer == "lars" else torch.optim.AdamW)
        seen = 0
        for group in opt.param_groups:
            for p in group["params"]:
                seen += 1
                assert group["lars_exclude"] == (p.ndim == 1)
                assert group["weight_decay"] == (0.0 if p.ndim == 1 else 0.5)
        assert seen == len(list(model.parameters()))
        if script is simsiam:
            assert [g["fix_lr"] for g in opt.param_groups if g["params"][0] is
                    model.predictor.weight] == [True]
    # the control: SGD keeps MoCo's single group, decay on every parameter
    args = moco.get_args(["--data", "synthetic", "--weight-decay", "0.5"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = moco.build_optimizer([{"params": list(model.parameters()), "weight_decay": 0.5}], args)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5


def test_save_every_keeps_resumable_epochs(tmp_path):
    """--save-every 2 over 3 epochs keeps epoch 2's checkpoint and backbone; resuming from that
    copy ends exactly where the uninterrupted run ended."""
    import simclr
    flags = [*FLAGS, "--epochs", "3", "--warmup-epochs", "1"]
    straight = tmp_path / "straight"
    simclr.main([*flags, "--save-every", "2", "--run-dir", str(straight)])
    kept = sorted(p.name for p in straight.iterdir() if "_epoch" in p.name)
    assert kept == ["backbone_epoch2.pt", "checkpoint_epoch2.pt"]
    at2 = torch.load(straight / "checkpoint_epoch2.pt", weights_only=False)
    final = torch.load(straight / "checkpoint.pt", weights_only=False)
    assert (at2["epoch"], final["epoch"]) == (2, 3)
    backbone2 = torch.load(straight / "backbone_epoch2.pt")
    assert_same_tensors(backbone2, {k[len("backbone."):]: v for k, v in at2["model"].items()
                                    if k.startswith("backbone.") and not k.startswith("backbone.fc")})
    assert not torch.equal(backbone2["conv1.weight"], final["model"]["backbone.conv1.weight"])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint_epoch2.pt", resumed / "checkpoint.pt")
    simclr.main([*flags, "--run-dir", str(resumed)])
    assert_same_tensors(final["model"], torch.load(resumed / "checkpoint.pt",
                                                   weights_only=False)["model"])
    assert not any("_epoch" in name for name in os.listdir(resumed))  # off by default


def test_tau_schedules():
    from byol import target_momentum
    assert [target_momentum(k, 10, 0.99, "constant") for k in (0, 5, 10)] == [0.99] * 3
    cosine = [target_momentum(k, 10, 0.99) for k in (0, 5, 10)]
    assert cosine[0] == pytest.approx(0.99) and cosine[1] == pytest.approx(0.995)
    assert cosine[2] == pytest.approx(1.0)


def test_byol_constant_tau_run(tmp_path):
    import byol
    byol.main([*FLAGS, "--epochs", "2", "--tau-base", "0.9", "--tau-schedule", "constant",
               "--hidden-dim", "32", "--proj-dim", "16", "--run-dir", str(tmp_path)])
    taus = [r["tau"] for r in read_log(tmp_path) if "tau" in r]
    assert len(taus) == 4 and set(taus) == {0.9}  # 2 steps and 2 epoch summaries
