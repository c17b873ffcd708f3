"""dino.py: the loss against a reference written from the official DINOLoss (2+0, 2+2 and 2+8
crops, across the teacher-temperature warmup; values, gradients, centre) and by hand; the
details users get wrong, each tested: only the global crops reach the teacher, no crop is
compared with itself, the centre is averaged over all processes (two processes = one:
tests/dino_ddp_check.py), the STUDENT's last layer is frozen in the first epoch and the teacher
only follows by EMA, clipping per parameter after the AMP unscale, weight decay never on biases
and norms, stochastic depth on the student only (and a ViT built at rate 0 is today's, bit for
bit); bf16 by default on GPUs; the script end to end (backbone.pt, the kNN monitor and
linear_eval.py read the teacher; --knn at k = 10, 20, 100, 200; --vit-features dino), exact
resume, the collapse warning and the divergence guard. The learning check: tests/test_learning.py.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common.run
import dino
import linear_eval
from common.errors import UserError
from common.model import build_backbone, resolve_precision
from common.optim import param_groups, warmup_cosine
from common.vit import DropPath, VisionTransformerBackbone
from common.weights import load_backbone
from tests import dino_ddp_check as ddp
from tests.helpers import assert_same_tensors, ok, read_log, run, run_until_stopped

# ResNet-18 (small-image stem) at 16 px, a small head: 2 steps of 32 images per epoch
TINY = ["--data", "synthetic", "--arch", "resnet18", "--img-size", "16", "--synthetic-size", "64",
        "--batch-size", "32", "--workers", "0", "--log-every", "1", "--out-dim", "64",
        "--hidden-dim", "64", "--bottleneck-dim", "32"]
TINY_VIT = ["--data", "synthetic", "--arch", "vit_tiny", "--img-size", "16", "--synthetic-size",
            "32", "--batch-size", "16", "--workers", "0", "--log-every", "1", "--out-dim", "64",
            "--hidden-dim", "64", "--bottleneck-dim", "32"]


# ---------------------------------------------------------------- the loss

class OfficialDINOLoss(nn.Module):
    """A reference written from facebookresearch/dino main_dino.py:363-416 (DINOLoss), one
    process: the per-epoch temperature table built with np.linspace, the student's outputs
    chunked into its crops, the teacher's centred, sharpened and chunked into 2, every pair of
    a teacher crop and ANOTHER student crop averaged, then the centre's EMA (the all-reduce of a
    single process is the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float64))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0, 0
        for iq, q in enumerate(teacher):
            for v in range(len(student)):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
                terms += 1
        total /= terms
        with torch.no_grad():
            batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (
                1 - self.center_momentum)
        return total


@pytest.mark.parametrize("local_crops", [0, 2, 8])
def test_loss_equals_the_official_dinoloss_across_the_temperature_warmup(local_crops):
    """Values, gradients and the centre, over successive steps of epochs inside and after a
    warmup of the teacher temperature from 0.04 to 0.07 over 4 of 10 epochs."""
    n, K, crops = 3, 7, 2 + local_crops
    official = OfficialDINOLoss(K, crops, 0.04, 0.07, 4, 10)
    center = torch.zeros(1, K, dtype=torch.float64)
    g = torch.Generator().manual_seed(local_crops)
    for epoch in (0, 1, 2, 3, 4, 9):
        temp = dino.teacher_temperature(epoch, 0.04, 0.07, 4)
        assert temp == official.teacher_temp_schedule[epoch]  # the same float, not just close
        student = torch.randn(crops * n, K, generator=g, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(2 * n, K, generator=g, dtype=torch.float64)
        ours, _ = dino.dino_loss(student, teacher, center, 0.1, temp)
        theirs = official(student, teacher, epoch)
        assert torch.allclose(ours, theirs, rtol=1e-12), (epoch, ours, theirs)
        ours_grad, = torch.autograd.grad(ours, student)
        theirs_grad, = torch.autograd.grad(theirs, student)
        assert torch.allclose(ours_grad, theirs_grad, rtol=1e-10, atol=1e-15), epoch
        center = dino.next_center(teacher, center, 0.9)
        assert torch.allclose(center, official.center, rtol=1e-12)
    assert center.abs().sum() > 0  # the centre took part from the second step on
    # CONTROL: a loss that also compares each global crop with itself differs
    p = F.softmax((teacher - center) / 0.07, dim=1)
    log_q = F.log_softmax(student / 0.1, dim=1)
    with_self = -sum((p[t * n:(t + 1) * n] * log_q[s * n:(s + 1) * n]).sum(1).mean()
                     for t in range(2) for s in range(crops)) / (2 * crops)
    assert not torch.allclose(with_self, dino.dino_loss(student, teacher, center, 0.1, 0.07)[0],
                              rtol=1e-3)


def test_loss_by_hand_no_crop_compared_with_itself():
    """2 global crops of one image, K = 2, centre 0: L = (CE(P_0, S_1) + CE(P_1, S_0)) / 2, and
    the gradient reaching student crop 0 comes from teacher crop 1 only:
    dL/ds_0 = (softmax(s_0 / tau_s) - P_1) / tau_s / 2."""
    s = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.05, 0.01], [-0.02, 0.03]], dtype=torch.float64)
    p = [[math.exp(v / 0.04) / sum(math.exp(w / 0.04) for w in row) for v in row] for row in t.tolist()]
    log_q = [[v / 0.1 - math.log(sum(math.exp(w / 0.1) for w in row)) for v in row]
             for row in s.tolist()]
    ce = lambda a, b: -sum(x * y for x, y in zip(p[a], log_q[b]))
    loss, entropy = dino.dino_loss(s, t, torch.zeros(1, 2, dtype=torch.float64), 0.1, 0.04)
    assert loss.item() == pytest.approx((ce(0, 1) + ce(1, 0)) / 2, rel=1e-12)
    assert entropy.item() == pytest.approx(-sum(x * math.log(x) for row in p for x in row) / 2,
                                           rel=1e-12)
    loss.backward()
    expect = (torch.softmax(s.detach()[0] / 0.1, 0) - torch.tensor(p[1], dtype=torch.float64)) / 0.1 / 2
    assert torch.allclose(s.grad[0], expect, rtol=1e-10)
    mutated = (2 * torch.softmax(s.detach()[0] / 0.1, 0) - torch.tensor(p[0]) - torch.tensor(p[1]))
    assert not torch.allclose(s.grad[0], mutated.double() / 0.1 / 4, rtol=1e-3)  # with self-pairs


def test_collapse_monitors_at_their_extremes():
    """Identical teacher logits: uniform P_t, entropy ln K; one dominant logit: entropy ~0. KL =
    loss - entropy is 0 when the student equals the teacher's distribution."""
    K = 16
    uniform = torch.zeros(2, K, dtype=torch.float64)
    loss, entropy = dino.dino_loss(torch.zeros(2, K, dtype=torch.float64), uniform,
                                   torch.zeros(1, K, dtype=torch.float64), 0.1, 0.04)
    assert entropy.item() == pytest.approx(math.log(K), rel=1e-12)
    assert (loss - entropy).item() == pytest.approx(0.0, abs=1e-12)  # student uniform too
    peaked = torch.zeros(2, K, dtype=torch.float64)
    peaked[:, 3] = 1.0
    _, entropy = dino.dino_loss(torch.zeros(2, K, dtype=torch.float64), peaked,
                                torch.zeros(1, K, dtype=torch.float64), 0.1, 0.04)
    assert entropy.item() < 1e-8


def test_centre_update_by_hand():
    teacher = torch.tensor([[1.0, 3.0], [3.0, 5.0], [2.0, 1.0], [2.0, 3.0]])  # 2 crops x 2 images
    new = dino.next_center(teacher, torch.tensor([[10.0, -10.0]]), 0.9)
    assert torch.allclose(new, torch.tensor([[0.9 * 10 + 0.1 * 2.0, 0.9 * -10 + 0.1 * 3.0]]))


def test_teacher_temperature_schedule():
    # np.linspace(0.04, 0.07, 30) over epochs 0-29, then 0.07 (the boosted recipe)
    table = np.linspace(0.04, 0.07, 30)
    assert [dino.teacher_temperature(e, 0.04, 0.07, 30) for e in range(30)] == list(table)
    assert dino.teacher_temperature(30, 0.04, 0.07, 30) == 0.07 == dino.teacher_temperature(
        0, 0.04, 0.07, 0)
    assert dino.teacher_temperature(0, 0.04, 0.07, 1) == 0.04  # np.linspace(a, b, 1) == [a]


# ---------------------------------------------------------------- model

def test_only_the_global_crops_reach_the_teacher():
    torch.manual_seed(0)
    model = dino.DINO("resnet18", small_images=True, out_dim=12, hidden_dim=16, bottleneck_dim=8)
    seen = {"student": [], "teacher": []}
    model.student_backbone.register_forward_hook(
        lambda m, i, o: seen["student"].append(tuple(i[0].shape)))
    model.backbone.register_forward_hook(lambda m, i, o: seen["teacher"].append(tuple(i[0].shape)))
    crops = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), *torch.randn(3, 4, 3, 8, 8)]
    student, teacher = model(crops)
    assert seen == {"student": [(8, 3, 16, 16), (12, 3, 8, 8)], "teacher": [(8, 3, 16, 16)]}
    assert student.shape == (20, 12) and teacher.shape == (8, 12) and not teacher.requires_grad
    # the teacher's outputs do not depend on the local crops
    assert torch.equal(model(crops[:2])[1], teacher)
    assert all(not p.requires_grad for p in [*model.backbone.parameters(), *model.head.parameters()])


def test_head_weight_normalised_last_layer():
    torch.manual_seed(0)
    head = dino.Head(32, 100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    out = head(x)
    assert out.abs().max() <= 1 + 1e-6  # norm_last_layer: cosines of unit vectors with unit rows
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g,
                                                                      torch.ones(100, 1))
    # the same function as torch's weight_norm of a bias-free Linear with g = 1
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(16, 100, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.fill_(1.0)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    z = F.normalize(head.mlp(x), dim=1)
    assert torch.allclose(head.last_layer(z), reference(z), atol=1e-6)
    free = dino.Head(32, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    assert {k for k, _ in head.named_parameters()} >= {"last_layer.weight_g", "last_layer.weight_v"}
    # the hidden layers: truncated normal, std 0.02, zero biases (DINO's _init_weights)
    assert abs(head.mlp[2].weight.std().item() - 0.02) < 0.002 and head.mlp[2].bias.abs().sum() == 0
    bound = 1 / math.sqrt(16)  # the last layer keeps nn.Linear's default initialisation
    assert head.last_layer.weight_v.abs().max() <= bound and head.last_layer.weight_v.std() > 0.05


def test_stochastic_depth_student_only_and_bit_identical_at_zero():
    torch.manual_seed(0)
    today = build_backbone("vit_tiny", small_images=True)
    torch.manual_seed(0)
    at_zero = VisionTransformerBackbone(32, 4, 12, 3, 192, 768, drop_path_rate=0.0)
    torch.manual_seed(0)
    dropping = VisionTransformerBackbone(32, 4, 12, 3, 192, 768, drop_path_rate=0.1)
    assert_same_tensors(today.state_dict(), at_zero.state_dict())
    assert_same_tensors(today.state_dict(), dropping.state_dict())  # DropPath has no weights
    assert repr(today) == repr(at_zero) and not any(isinstance(m, DropPath) for m in at_zero.modules())
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(1)
    a = today.train()(x)
    torch.manual_seed(1)
    assert torch.equal(at_zero.train()(x), a)  # bit for bit, in training mode too
    assert torch.equal(dropping.eval()(x), today.eval()(x))  # eval: stochastic depth is off
    assert not torch.allclose(dropping.train()(x), today.train()(x), atol=1e-3)
    # DINO's rule: rate i / 11 x 0.1 in block i, on both residual branches; block 0 none
    rates = [m.p for m in dropping.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(1, 12) for _ in range(2)])

    torch.manual_seed(0)
    model = dino.DINO("vit_tiny", small_images=True, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                      drop_path=0.1)
    assert sum(isinstance(m, DropPath) for m in model.student_backbone.modules()) == 22
    assert not any(isinstance(m, DropPath) for m in [*model.backbone.modules(), *model.head.modules()])
    assert_same_tensors(model.student_backbone.state_dict(), model.backbone.state_dict())


def test_drop_path_by_hand():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3)
    out = DropPath(0.25).train()(x)
    per_sample = out[:, 0, 0]
    assert per_sample.unique().tolist() == [0.0, pytest.approx(4 / 3)]  # dropped, or kept, scaled
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))  # whole samples
    assert abs((per_sample == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_dino_vit_initialisation():
    torch.manual_seed(0)
    model = dino.DINO("vit_small", small_images=False, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    vit = model.student_backbone
    block = vit.encoder.layers[0]
    for weight in (block.self_attention.in_proj_weight, block.mlp[0].weight, vit.class_token,
                   vit.encoder.pos_embedding):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert block.self_attention.in_proj_bias.abs().sum() == 0 and block.mlp[3].bias.abs().sum() == 0
    # the patch projection keeps PyTorch's Conv2d default: U(+-1/sqrt(fan_in)), std ~0.029 here
    # (torchvision's own: std sqrt(1/fan_in) = 0.051)
    fan_in = 3 * 16 * 16
    assert vit.conv_proj.weight.abs().max() <= 1 / math.sqrt(fan_in)
    assert abs(vit.conv_proj.weight.std().item() - 1 / math.sqrt(3 * fan_in)) < 0.002


def test_clip_per_parameter_by_hand():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])  # norms 5 and 1
    dino.clip_per_parameter([a, b], 3.0)
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) * 3 / (5 + 1e-6))
    assert torch.equal(b.grad, torch.tensor([0.0, 1.0, 0.0]))  # under the threshold: untouched
    # not the global norm's clipping, which would scale both by 3 / sqrt(26)
    assert not torch.allclose(b.grad, torch.tensor([0.0, 3 / math.sqrt(26), 0.0]))


# ---------------------------------------------------------------- recipes and bad input

def test_recipes_from_their_sources():
    a = dino.get_args(["--data", "/imagenet"])  # ViT-S/16: main_dino.py's defaults
    assert (a.arch, a.recipe, a.epochs, a.batch_size, a.optimizer, a.lr, a.min_lr) == (
        "vit_small", dino.VIT["recipe"], 100, 512, "adamw", 5e-4, 1e-6)
    assert a.peak_lr == pytest.approx(5e-4 * 512 / 256) and a.warmup_epochs == 10
    assert (a.weight_decay, a.weight_decay_end, a.tau_base, a.teacher_temp, a.student_temp,
            a.center_momentum) == (0.04, 0.4, 0.996, 0.04, 0.1, 0.9)
    assert (a.warmup_teacher_temp, a.warmup_teacher_temp_epochs, a.out_dim, a.hidden_dim,
            a.bottleneck_dim, a.norm_last_layer) == (0.04, 0, 65536, 2048, 256, True)
    assert (a.clip_grad, a.freeze_last_layer_epochs, a.drop_path, a.local_crops) == (3.0, 1, 0.1, 8)
    assert (tuple(a.global_crops_scale), tuple(a.local_crops_scale), a.local_crop_size) == (
        (0.4, 1.0), (0.05, 0.4), 96)
    assert a.precision == "auto"  # bf16 on GPUs that have it (below)
    views = dino.dino_views(a)
    assert [v.size for v in views] == [224, 224] + [96] * 8
    assert [(v.blur_p, v.solarize_p) for v in views] == [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 8
    assert all(v.jitter == (0.4, 0.4, 0.2, 0.1) and v.jitter_p == 0.8 and v.gray_p == 0.2
               and v.interpolation == "bicubic" for v in views)
    assert [v.scale for v in views] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    r = dino.get_args(["--data", "/imagenet", "--arch", "resnet50"])  # the README's command
    assert (r.recipe, r.optimizer, r.lr, r.weight_decay, r.weight_decay_end, r.drop_path) == (
        dino.RESNET_RECIPE, "sgd", 0.03, 1e-4, 1e-4, 0.0)
    assert (tuple(r.global_crops_scale), tuple(r.local_crops_scale)) == ((0.14, 1.0), (0.05, 0.14))
    s = dino.get_args(["--data", "cifar10"])  # solo-learn's CIFAR DINO
    assert (s.arch, s.epochs, s.batch_size, s.optimizer, s.lr, s.weight_decay, s.tau_base) == (
        "resnet18", 1000, 256, "lars", 0.3, 1e-6, 0.9995)
    assert (s.out_dim, s.teacher_temp, s.clip_grad, s.local_crops, s.min_lr) == (4096, 0.07, 0.0,
                                                                                 0, 0.0)
    assert [(v.size, v.scale, v.blur_p, v.solarize_p) for v in dino.dino_views(s)] == [
        (32, (0.08, 1.0), 0.0, 0.0), (32, (0.08, 1.0), 0.0, 0.2)]
    v = dino.get_args(["--data", "cifar10", "--arch", "vit_tiny", "--local-crops", "2"])
    assert (v.optimizer, v.lr, v.clip_grad, v.drop_path, v.out_dim, v.local_crop_size) == (
        "adamw", 5e-4, 3.0, 0.1, 4096, 12)  # 96/224 of 32 px: 3 patches of 4 px
    assert dino.get_args(["--data", "cifar10", "--local-crops", "2"]).local_crop_size == 14
    assert dino.get_args(["--data", "/imagenet", "--no-norm-last-layer"]).norm_last_layer is False


def test_bf16_is_the_default_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"  # not fp16 (dino#58)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("bad, message", [
    (["--teacher-temp", "0"], "--teacher-temp 0: must be positive"),
    (["--global-crops-scale", "0.5", "0.2"], "needs 0 < MIN <= MAX <= 1"),
    (["--arch", "resnet50", "--drop-path", "0.1"], "stochastic depth is for ViTs"),
    (["--center-momentum", "1.5"], "--center-momentum 1.5: must be in [0, 1]"),
    (["--local-crops", "-1"], "--local-crops -1: must be 0 or more"),
    (["--arch", "vit_small", "--local-crop-size", "90"], "a ViT needs multiples of its")])
def test_bad_settings_are_one_line(bad, message, capsys):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dino.get_args(["--data", "/imagenet", *bad])
    with pytest.raises(SystemExit) as stop:
        dino.main(["--data", "synthetic", *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0]


# ---------------------------------------------------------------- end to end

def param_index(model, name, weight_decay=1e-6):
    """The position of the student parameter `name` in the optimizer's state dict (LARS keeps
    param_groups' two groups: the weights, then the 1-D parameters)."""
    ids = [id(p) for group in param_groups(model, weight_decay) for p in group["params"]]
    return ids.index(id(dict(model.named_parameters())[name]))


def test_run_freezes_the_student_last_layer_and_evaluates_the_teacher(tmp_path, monkeypatch,
                                                                      capsys):
    """2 epochs of 2 steps, the last layer frozen for the first, the teacher temperature warmed
    up from 0.04 to 0.07 over the 2 epochs. Epoch 1 leaves the STUDENT's last layer exactly as
    initialised (no update, no optimizer state) while the rest of the student trains and the
    teacher follows it by EMA; epoch 2 moves it. The kNN monitor, backbone.pt and linear_eval.py
    read the teacher."""
    knn_calls = []
    monkeypatch.setattr(common.run, "knn_monitor", lambda args, device: lambda backbone: (
        knn_calls.append(copy.deepcopy(backbone.state_dict())) or 10.0))
    run_dir = tmp_path / "run"
    dino.main([*TINY, "--epochs", "2", "--warmup-epochs", "0", "--save-every", "1",
               "--warmup-teacher-temp-epochs", "2", "--run-dir", str(run_dir)])
    torch.manual_seed(0)  # dino.py seeds 0 + rank before it builds the model
    model = dino.DINO("resnet18", True, out_dim=64, hidden_dim=64, bottleneck_dim=32)
    init = model.state_dict()
    epoch1 = torch.load(run_dir / "checkpoint_epoch1.pt", weights_only=False)
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    last = "student_head.last_layer.weight_v"
    assert torch.equal(epoch1["model"][last], init[last])
    assert param_index(model, last) not in epoch1["optimizer"]["state"]  # not even momentum
    for name in ("student_head.mlp.0.weight", "student_backbone.conv1.weight"):
        assert not torch.equal(epoch1["model"][name], init[name]), name  # the rest trained
    assert torch.equal(epoch1["model"]["head.last_layer.weight_v"], init[last])  # EMA of equals
    assert not torch.equal(epoch1["model"]["backbone.conv1.weight"], init["backbone.conv1.weight"])
    assert not torch.equal(final["model"][last], init[last])  # unfrozen in epoch 2
    assert param_index(model, last) in final["optimizer"]["state"]
    assert not torch.equal(final["model"]["head.last_layer.weight_v"], init[last])
    assert final["model"]["center"].shape == (1, 64) and final["model"]["center"].abs().sum() > 0

    steps = [r for r in read_log(run_dir) if "step" in r]
    assert [r["last_layer_frozen"] for r in steps] == [True, True, False, False]
    assert [r["teacher_temp"] for r in steps] == [0.04, 0.04, 0.07, 0.07]
    for r in steps:
        assert r["kl"] == pytest.approx(r["loss"] - r["teacher_entropy"], abs=1e-5)
        assert 0 < r["teacher_entropy"] < math.log(64) and r["kl"] >= -1e-6
    assert [r["tau"] for r in steps] == pytest.approx(
        [warmup_cosine(k, 4, 0, 0.9995, final=1.0) for k in range(4)])
    assert "collapsing" not in capsys.readouterr().out

    # the teacher is what is evaluated: backbone.pt, every kNN call, linear_eval.py
    backbone = torch.load(run_dir / "backbone.pt")
    assert_same_tensors(backbone, {k[9:]: v for k, v in final["model"].items()
                                   if k.startswith("backbone.")})
    assert not torch.equal(backbone["conv1.weight"], final["model"]["student_backbone.conv1.weight"])
    assert len(knn_calls) == 3 and all(k in knn_calls[-1] for k in backbone)
    assert all(torch.equal(knn_calls[-1][k], backbone[k]) for k in backbone)
    loaded, info = load_backbone(str(run_dir / "checkpoint.pt"))
    assert info["layout"] == "cleanssl dino checkpoint"
    assert all(torch.equal(v, backbone[k]) for k, v in loaded.state_dict().items())
    monkeypatch.undo()
    result = linear_eval.main(["--ckpt", str(run_dir / "checkpoint.pt"), "--data", "synthetic",
                               "--synthetic-size", "64", "--img-size", "16", "--workers", "0",
                               "--batch-size", "16", "--knn", "--run-dir", str(tmp_path / "knn")])
    by_k = result["knn_top1_by_k"]
    assert result["k"] == [10, 20, 100, 200] and list(by_k) == ["10", "20", "100", "200"]
    assert result["knn_top1"] == by_k["200"] and all(0 <= v <= 100 for v in by_k.values())
    linear = linear_eval.main(["--ckpt", str(run_dir / "backbone.pt"), "--data", "synthetic",
                               "--synthetic-size", "64", "--workers", "0", "--batch-size", "16",
                               "--epochs", "2", "--cached-features",
                               "--run-dir", str(tmp_path / "linear")])
    assert 0 <= linear["top1"] <= linear["top5"] <= 100


@pytest.mark.full
def test_knn_several_k_equal_one_k_each(tmp_path):
    """--knn-k 10 20 100 200 (one feature pass) gives what a run of one k gives, for each."""
    from common.checkpoint import export_backbone
    torch.manual_seed(0)
    export_backbone(build_backbone("resnet18", small_images=True), tmp_path / "backbone.pt")
    flags = ["--ckpt", str(tmp_path / "backbone.pt"), "--data", "synthetic", "--synthetic-size",
             "64", "--workers", "0", "--batch-size", "32", "--knn"]
    many = linear_eval.main([*flags, "--run-dir", str(tmp_path / "many")])
    for k in (10, 200):
        one = linear_eval.main([*flags, "--knn-k", str(k), "--run-dir", str(tmp_path / str(k))])
        assert one["knn_top1"] == many["knn_top1_by_k"][str(k)] and one["k"] == k
        assert "knn_top1_by_k" not in one


def test_vit_run_clips_after_the_unscale_and_decays_only_weights(tmp_path, monkeypatch):
    """A ViT-Ti run with 2 local crops and a GradScaler made active (as with --precision fp16,
    whose CPU kernels are too slow to test): at every optimizer step each student parameter's
    gradient has norm <= --clip-grad and the largest is at it, so clipping saw the unscaled
    gradients (clipped while still scaled x 65536, they would reach the optimizer 65536 times
    smaller). The weight decay follows its cosine on the weights' groups, 0 on the 1-D ones."""
    scalers = []
    monkeypatch.setattr(common.run, "grad_scaler", lambda precision, device: scalers.append(
        torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)) or scalers[-1])
    seen = []

    def before_step(optimizer, args, kwargs):
        norms = [p.grad.norm().item() for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        seen.append((norms, [(g["weight_decay"], g["lars_exclude"], [p.ndim for p in g["params"]])
                             for g in optimizer.param_groups]))
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        dino.main([*TINY_VIT, "--epochs", "1", "--warmup-epochs", "0", "--local-crops", "2",
                   "--clip-grad", "0.001", "--weight-decay", "0.04", "--weight-decay-end", "0.4",
                   "--knn-every", "0", "--run-dir", str(tmp_path / "run")])
    finally:
        handle.remove()
    assert scalers[0].is_enabled() and scalers[0].get_scale() == 2.0 ** 16  # no step skipped
    assert len(seen) == 2
    for step, (norms, groups) in enumerate(seen):
        assert max(norms) <= 0.001 * (1 + 1e-4) and max(norms) > 0.0009, (step, max(norms))
        wd = warmup_cosine(step, 2, 0, 0.04, final=0.4)
        for decay, one_d, dims in groups:
            assert decay == (0.0 if one_d else pytest.approx(wd)) and (one_d == (max(dims) == 1))
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["optimizer"], args["drop_path"], args["local_crop_size"]) == ("adamw", 0.1, 8)
    # linear_eval.py with DINO's ViT features reads the teacher's last 4 class tokens
    out = linear_eval.main(["--ckpt", str(tmp_path / "run" / "checkpoint.pt"), "--data",
                            "synthetic", "--synthetic-size", "32", "--workers", "0",
                            "--batch-size", "16", "--epochs", "1", "--cached-features",
                            "--vit-features", "dino", "--run-dir", str(tmp_path / "linear")])
    head = torch.load(tmp_path / "linear" / "linear_head.pt")
    assert head["weight"].shape == (10, 4 * 192) and 0 <= out["top1"] <= 100


def test_collapse_warning_and_divergence_guard(tmp_path, capsys):
    # a teacher temperature of 100 makes the teacher uniform: entropy ~ ln K, a warning line
    dino.main([*TINY, "--epochs", "1", "--knn-every", "0", "--teacher-temp", "100",
               "--warmup-teacher-temp", "100", "--run-dir", str(tmp_path / "uniform")])
    out = capsys.readouterr().out
    assert "warning: the embedding is collapsing at step 1: teacher_entropy" in out
    assert "near ln K the teacher is uniform" in out
    # a rate that blows the weights up: the divergence guard stops the run, exit 3, one line
    with pytest.raises(SystemExit) as stop:
        dino.main([*TINY, "--epochs", "1", "--knn-every", "0", "--warmup-epochs", "0",
                   "--freeze-last-layer-epochs", "0", "--lr", "1e30", "--run-dir",
                   str(tmp_path / "nan")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 3 and len(err) == 1 and "the run diverged" in err[0], err
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- two processes, resume

@pytest.mark.full
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "dino_ddp.pt"
    ok(run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/dino_ddp_check.py", out], timeout=240))
    res = torch.load(out)
    assert res["world"] == 2
    model = ddp.make_model()  # one process, the whole batch
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ddp.LR)
    for step, (record, control) in enumerate(zip(res["steps"], res["control"])):
        student_out, teacher_out = model(ddp.make_crops(step))
        loss, _ = dino.dino_loss(student_out, teacher_out, model.center, ddp.STUDENT_TEMP,
                                 ddp.TEACHER_TEMP)
        model.center.copy_(dino.next_center(teacher_out, model.center, ddp.CENTER_MOMENTUM))
        optimizer.zero_grad()
        loss.backward()
        assert torch.allclose(record["losses"].mean(), loss, rtol=1e-12), step
        assert torch.allclose(record["center"], model.center, rtol=1e-12), step
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        assert record["grads"].keys() == grads.keys()
        for k, g in record["grads"].items():
            assert torch.allclose(g, grads[k], rtol=1e-9, atol=1e-15), (step, k)
        # CONTROL: centred with each rank's own samples, the centre differs at once, and the
        # loss and gradients from the step that first uses it
        assert not torch.allclose(control["center"], model.center, rtol=1e-3)
        if step > 0:
            assert not torch.allclose(control["losses"].mean(), loss, rtol=1e-6)
            assert not torch.allclose(control["grads"]["student_head.mlp.0.weight"],
                                      grads["student_head.mlp.0.weight"], rtol=1e-4)
        optimizer.step()
        model.update_teacher(ddp.TAU)


@pytest.mark.full
def test_interrupted_run_resumes_exactly(tmp_path):
    """2 epochs straight == the same run stopped in epoch 1 (the last layer still frozen, the
    teacher temperature warming up) and resumed: student, teacher, centre and optimizer state
    bit-identical, and the log's schedules continue where they stopped."""
    flags = ["dino.py", *TINY, "--synthetic-size", "48", "--batch-size", "16", "--epochs", "2",
             "--knn-every", "0", "--freeze-last-layer-epochs", "1", "--warmup-teacher-temp-epochs",
             "2", "--warmup-epochs", "0.5"]
    ok(run([*flags, "--run-dir", tmp_path / "straight"]))
    stopped = run_until_stopped([*flags, "--run-dir", tmp_path / "resumed"], tmp_path / "resumed",
                                after_step=2)  # inside epoch 1 (3 steps)
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (0, 2)
    assert stopped["model"]["center"].abs().sum() > 0
    assert "resumed from" in ok(run([*flags, "--run-dir", tmp_path / "resumed"])).stdout
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)
            for d in ("straight", "resumed"))
    assert_same_tensors(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][i])
    keys = ("step", "loss", "lr", "tau", "teacher_temp", "last_layer_frozen", "teacher_entropy")
    logs = [[{k: r[k] for k in keys} for r in read_log(tmp_path / d) if "step" in r]
            for d in ("straight", "resumed")]
    assert logs[0] == logs[1] and [r["last_layer_frozen"] for r in logs[0]] == [True] * 3 + [False] * 3
